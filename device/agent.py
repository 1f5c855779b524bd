"""The device agent: what outlives one request (the link, the draft engine, the scheduler, the
meter, a session kept for the next turn), and its requests, one at a time (device/request.py:
holds the committed text, drafts, asks the verifier, applies verdicts).

The device is the source of truth for the committed text. Every round is
idempotent (session id + round sequence): a lost verdict is asked for again
with the same message, a verifier that lost the session gets an OPEN resync.
A session sticks to the verifier replica that answered its OPEN (OPENED names
it); when that replica's last will fires or a round times out, the device
resyncs with the replica group under a new round number, so a late verdict of
the lost replica cannot mix with the new one's state.

When verdicts stop coming (no verifier answers, the broker is gone) the
configured fault policy decides (docs/faults.md): wait and resume, go on with
the draft alone for a bounded number of tokens marked unverified, or fail the
request with a clear error. Either way the committed text is never rewritten.

Those rules live in device/rounds.py, with no I/O (Rounds, Exchange); device/request.py drafts,
sends, waits and performs the actions an Exchange returns.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass

from specedge.protocol import wire
from specedge.config import DeviceConfig
from specedge.grammar import Cache as GrammarCache
from specedge.protocol.contract import Contract
from specedge.device import checks
from specedge.device.policy import Policy
from specedge.device.power import PowerMeter, open_meter
from specedge.device.profiles import DeviceProfile, RadioModel, get_profile
from specedge.device.request import GenerationResult, Request
from specedge.device.rounds import Kept, RoundTimer
from specedge.device.scheduler import Objective, Scheduler, State, objective
from specedge.mqtt import Link, publish_packet_bytes
from specedge.protocol import topics
from specedge.speculative import SamplingParams

log = logging.getLogger("specedge.device")


# Messages waiting for the request thread. A round has a few in flight (verdict, hint, OPENED, a
# cloud-ar stream's tokens as they come); more is a flood, dropped and counted rather than held:
# at most this many messages of at most wire.MAX_PACKET bytes each.
MAX_INBOX = 256


@dataclass(frozen=True)
class AgentStatus:
    """What the agent's connection, meter and scheduler say now, for whoever reports on it."""
    protocol: str | None  # "5" or "3.1.1" once connected
    connected: bool
    bytes_sent: int  # on the link since it was made, MQTT framing included
    bytes_received: int
    energy_j: float  # since the meter opened; 0 before start()
    rtt_s: float  # the scheduler's estimates
    up_bps: float  # inf until measured
    objective: Objective
    max_draft: int
    draft: str  # the draft's name, as OPENs state it
    target: str  # the target version that answered the last request ("" before one has)


def scheduler_prior(profile: DeviceProfile, radio: RadioModel) -> State:
    """What a device's scheduler assumes until it has measured: its board's and radio's power, a
    DRAFT's size on the wire, guesses for the rest (`specedge plan` starts its devices the same)."""
    empty_draft = len(wire.encode(wire.Draft(0, 0, 0, [])))
    return State((0.6,), draft_s=0.05, verify_base_s=0.1, verify_per_row_s=0.0, rtt_s=0.0,
                 up_bytes_base=publish_packet_bytes("", empty_draft, wire.ROUND_QOS, True, alias=True),
                 active_w=profile.active_w, idle_w=profile.idle_w, radio_w=radio.active_w,
                 radio_j_per_byte_up=radio.j_per_byte_up, radio_j_per_byte_down=radio.j_per_byte_down)


def device_link(cfg: DeviceConfig) -> Link:
    """The device's MQTT connection; the Agent it is handed to takes its messages."""
    ident = cfg.device
    return Link(cfg.mqtt, f"specedge-device-{ident.fleet}-{ident.id}", None, max_packet=wire.MAX_PACKET)


class Agent:
    def __init__(self, cfg: DeviceConfig, engine, tokenizer, link: Link | None = None,
                 scheduler: type[Scheduler] = Scheduler):
        """`link`: the device's connection (device_link), started and stopped by whoever made it
        and shares it (device/node.py); without one the agent makes, starts and stops its own.
        `scheduler`: the Scheduler class (a test's scripted one)."""
        checks.validate(cfg)  # the device's half of the config checks, however `cfg` was built
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        ident = cfg.device
        self.up_topic = topics.draft(ident.fleet, ident.id)
        self.down_topic = topics.answers(ident.fleet, ident.id)
        # None: a replica's or the link's state changed
        self.inbox: queue.Queue[bytes | None] = queue.Queue(maxsize=MAX_INBOX)
        self.offline_replicas: set[str] = set()
        self.draft_name = cfg.draft.display_name()
        self.last_target_version = ""  # the version that answered the last request
        self.contract = Contract.of(tokenizer, engine.vocab_size)
        self._own_link = link is None
        self.link = device_link(cfg) if link is None else link
        # A link made before the agent (device_link) has nowhere to send messages until now.
        self.link.on_message = self._on_message
        self.link.on_connection = lambda up: self._enqueue(None)  # wake a waiting round
        self.decode_errors: dict[str, int] = {}
        self._busy = threading.Lock()
        energy = cfg.energy
        self.profile = get_profile(energy.profile, energy.profiles or None)
        self.radio = self.profile.radio(energy.link)
        self.meter: PowerMeter | None = None
        self.current: Request | None = None  # the request running or last run
        self.kept: Kept | None = None  # the last request's session, left open for a next turn
        self.round_timer = RoundTimer()
        self.grammars = GrammarCache(size=8)  # compiled once, for every request that states one
        # Grammars a verifier compiled for an earlier request: an OPEN names them by hash alone.
        self.grammars_held: set[bytes] = set()
        self.scheduler = scheduler(objective(energy), cfg.speculation.max_draft,
                                   scheduler_prior(self.profile, self.radio))

    @property
    def energy_source(self) -> str:
        source = self.meter.source if self.meter else "none"
        link = self.cfg.energy.link
        return source if link == "none" else f"{source}+radio-model:{link}"

    def configure(self, objective: Objective, max_draft: int | None = None) -> None:
        """The adaptive policies' objective (and their longest draft: the scheduler's draft_cap)
        from a config change; the next round plans with them."""
        if max_draft is not None:
            self.scheduler.max_draft = max_draft
        self.scheduler.set_objective(objective)

    def status(self) -> AgentStatus:
        """A snapshot of the link, meter and scheduler: what others read instead of reaching in."""
        link, state = self.link, self.scheduler.state()
        return AgentStatus(link.protocol, link.connected.is_set(), link.bytes_sent, link.bytes_received,
                           self.meter.energy_j() if self.meter else 0.0, state.rtt_s, state.up_bps,
                           self.scheduler.objective, self.scheduler.max_draft, self.draft_name,
                           self.last_target_version)

    def count_error(self, kind: str) -> None:
        self.decode_errors[kind] = self.decode_errors.get(kind, 0) + 1

    # paho's network thread: nothing here may block or raise, or every later message is lost.
    def _enqueue(self, item: bytes | None) -> None:
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.count_error("inbox_full")  # a lost verdict is asked for again

    def _on_message(self, topic: str, payload: bytes) -> None:
        replica = topics.parse_replica(topic)
        if replica is not None:
            self._on_replica_status(replica[0], payload)
            self._enqueue(None)  # wake a waiting round: its replica may be gone
        else:
            self._enqueue(payload)

    def _on_replica_status(self, replica: str, payload: bytes) -> None:
        try:
            state = json.loads(payload[:4096]).get("state") if payload else "offline"
        except (ValueError, AttributeError, RecursionError):  # RecursionError: nested too deeply
            self.count_error("replica_status")
            return
        if state == "online":
            self.offline_replicas.discard(replica)
        else:
            self.offline_replicas.add(replica)

    def start(self, retry: bool = False) -> "Agent":
        """`retry`: start even if the broker is unreachable, connecting when it comes (a service);
        else that is a BrokerUnavailable error (a one-off command wants to hear it)."""
        self.meter = open_meter(self.cfg.energy.meter, self.profile)
        log.info("power meter: %s", self.meter.source)
        self.link.subscribe(self.down_topic)
        self.link.subscribe(topics.replica(topics.ANY, "status"))
        if self._own_link:
            self.link.start(retry=retry)
        return self

    def stop(self) -> None:
        kept, self.kept = self.kept, None
        if kept is not None and self.link.connected.is_set():  # free the replica's cache now
            self.close_kept(kept)
        if self._own_link:
            self.link.stop()
        if self.meter:
            self.meter.close()

    def send_round(self, msg, replica: str | None) -> None:
        """A round message to the replica holding its session; OPEN (and anything before one
        answers: replica None) to the group."""
        ident = self.cfg.device
        topic = topics.draft(ident.fleet, ident.id, None if isinstance(msg, wire.Open) else replica)
        self.link.publish(topic, wire.encode(msg), qos=wire.ROUND_QOS)

    def close_kept(self, kept: Kept) -> None:
        """Close a session kept for a next turn that will not come (another request, or stop)."""
        self.send_round(wire.Close(kept.rounds.session, kept.rounds.next_round()), kept.rounds.replica)

    # -- one request -------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int, policy: Policy,
                 on_tokens=None, grammar: str | None = None, on_logprobs=None) -> GenerationResult:
        """Generate after `prompt`; `on_tokens(tokens, verified)` sees committed tokens as they land
        (verified False: the draft's alone, under the `draft` fault policy), `on_logprobs(logprobs)`
        their logprobs just before (where params.logprobs asks). `grammar`: llguidance grammar text
        (specedge/grammar.py) the output must follow; a GrammarError if it does not compile."""
        with self._busy:
            self.current = Request(self, prompt, params, max_new_tokens, policy, on_tokens, grammar, on_logprobs)
            return self.current.run()
