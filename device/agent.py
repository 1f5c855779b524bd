"""The device agent: holds the committed text, drafts, asks the verifier, applies verdicts.

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

Those rules live in device/rounds.py, with no I/O (Rounds, Exchange); this module drafts, sends,
waits and performs the actions an Exchange returns.
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from specedge.protocol import wire
from specedge.config import DeviceConfig
from specedge.grammar import Cache as GrammarCache
from specedge.protocol.contract import Contract
from specedge.device import checks, lookup
from specedge.device.draft import Drafted
from specedge.device.pipeline import Ahead
from specedge.device.policy import Policy
from specedge.device.power import PowerMeter, open_meter
from specedge.device.profiles import DeviceProfile, RadioModel, get_profile
from specedge.device.rounds import (ASK_AGAIN, AWAIT_BROKER, BROKER_LOST, DELIVER, DRAFT_ALONE, DROPPED, FAIL,
                                    HINT, OPEN, REFUSE, REPLICA_LOST, SEND, SEND_GRAMMAR, TIMEOUT, Exchange, Failure,
                                    Kept, RoundTimer, Rounds)
from specedge.device.scheduler import SPECULATE, STREAM, Objective, Scheduler, State, objective, request_budget
from specedge.metrics import SpecStats
from specedge.mqtt import Link, publish_packet_bytes
from specedge.protocol import topics
from specedge.speculative import SamplingParams, TokenLogprob

log = logging.getLogger("specedge.device")


# Messages waiting for the request thread. A round has a few in flight (verdict, hint, OPENED, a
# cloud-ar stream's tokens as they come); more is a flood, dropped and counted rather than held:
# at most this many messages of at most wire.MAX_PACKET bytes each.
MAX_INBOX = 256
# cloud-ar: answers in a row that add no token before the verifier counts as broken. Its stream
# sends a token per message; a few repeats (a resent GENERATE) are normal, endless ones are not.
MAX_STALLED = 64


class RequestFailed(RuntimeError):
    """The verifier refused the request (the reason is in the message)."""


class Refused(RequestFailed):
    """The verifier answered the request with an error: `code` (wire.ErrorCode) and its `reason`,
    e.g. one of its limits (OVERLOADED: sessions or context per device, KV budget)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"verifier refused the request (code {code}): {reason}")
        self.code, self.reason = code, reason


class VerifierUnavailable(RequestFailed):
    """No verdict within the fault policy's bounds: the request fails cleanly, committed text intact."""


class BrokerUnreachable(VerifierUnavailable):
    """The broker connection stayed down within the fault policy's bounds."""


class _DraftAlone(Exception):
    """The fault policy says: go on with the draft alone, unverified, for now."""


@dataclass
class GenerationResult:
    tokens: list[int]
    stats: SpecStats
    stopped: bool  # ended on a stop token rather than the length limit
    unverified: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of tokens the target never saw
    # Where params.logprobs asked: the target's log-softmax at each token (None: a token it never saw).
    logprobs: list[TokenLogprob | None] | None = None


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
        self.current: _Request | None = None  # the request running or last run
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

    def set_objective(self, **changes) -> None:
        """Change the adaptive policies' objective at run time (mode, budget_j_per_token,
        min_tokens_per_s); the next round plans with it."""
        self.scheduler.set_objective(replace(self.scheduler.objective, **changes))

    def configure(self, objective: Objective, max_draft: int | None = None) -> None:
        """The adaptive policies' objective (and longest draft) from a config change; the next
        round plans with them."""
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
            self.current = _Request(self, prompt, params, max_new_tokens, policy, on_tokens, grammar, on_logprobs)
            return self.current.run()


class _Request:
    def __init__(self, agent: Agent, prompt, params, max_new_tokens, policy, on_tokens, grammar=None,
                 on_logprobs=None):
        self.agent, self.params, self.policy = agent, params, policy
        self.link = agent.link
        self.max_new, self.on_tokens = max_new_tokens, on_tokens or (lambda tokens, verified: None)
        self.on_logprobs = on_logprobs or (lambda logprobs: None)
        self.logprobs: list[TokenLogprob | None] = []  # the generated tokens', where params.logprobs asks
        self.stats = SpecStats(policy=policy.name)
        # The session's round state, no I/O (device/rounds.py): seq, OPEN, replica, version, text
        # hash. The next turn of a conversation goes on in the last request's session (EXTEND).
        self.kept, agent.kept = agent.kept, None
        # Structured output: the grammar's state over the generated text, and the tokens it forced
        # that this device committed and the verifier has not been told yet (the next DRAFT says).
        self.grammar = grammar or ""
        compiled = agent.grammars.get(agent.tokenizer, agent.engine.vocab_size, grammar) if grammar else None
        self.constraint = compiled.start() if compiled else None
        self.grammar_hash = compiled.hash if compiled else b""
        self.unsent: list[int] = []
        usable = (self.kept is not None and self.kept.rounds.replica not in agent.offline_replicas
                  and self.constraint is None)
        self.shared = self.kept.shared(prompt, params, policy.early_exit) if usable else 0
        if self.shared:
            self.rounds = self.kept.rounds
            self.rounds.rebase(prompt)
            self.stats.verified_by(self.kept.exact)
        else:
            self.rounds = Rounds(secrets.randbits(32), prompt)
        self.prompt_len = len(prompt)
        self.committed = list(prompt)
        # The spans of the text that came as prompts: a resync's OPEN states them, so the verifier
        # processes each as the target's own generation did (prompts in batches, the rest alone).
        self.prompts = self.kept.prompts + [(self.shared, len(prompt))] if self.shared else [(0, len(prompt))]
        self.stop_ids = agent.tokenizer.stop_ids
        self.sources = agent.cfg.draft.source_list()  # model, lookup, or lookup then model
        self.rng = np.random.default_rng([params.seed, self.session])
        self.faults = agent.cfg.faults
        self.start_s = time.perf_counter()
        self.stopped = False
        self.stream_failures = 0
        self.stalled = 0  # stream answers in a row that added no token
        self.vocab_size = agent.engine.vocab_size
        self.sent_connects = 0  # the link's connection count when we last sent
        self.alone = False  # the last round went on without the target: next failure needs no retries
        self.unverified: list[tuple[int, int]] = []
        self.prefill: threading.Thread | None = None  # the draft's prefill behind a stream
        self.prefill_done: tuple[float, BaseException | None] | None = None  # (seconds, error) when it ends
        self.draft_started = False

    # The round state, read and set where the agent did before it moved to Rounds.
    session = property(lambda self: self.rounds.session)
    replica = property(lambda self: self.rounds.replica)
    target_version = property(lambda self: self.rounds.target_version)
    seq = property(lambda self: self.rounds.seq)
    open_seq = property(lambda self: self.rounds.open_seq)

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len

    def send(self, msg) -> None:
        self.sent_connects = self.link.connects
        self.agent.send_round(msg, self.replica)

    @property
    def stated(self) -> int:
        """The committed tokens a verifier is told of: all but the forced ones the next DRAFT carries."""
        return len(self.committed) - len(self.unsent)

    def open_message(self, resync: bool) -> wire.Open:
        """An OPEN with the committed text, under the round number Rounds.opening() gave it."""
        by_hash = self.grammar_hash in self.agent.grammars_held
        stated = self.stated
        prompts = [(a, min(b, stated)) for a, b in self.prompts if a < stated]
        return wire.Open(self.session, self.open_seq, self.committed[:stated], self.params,
                         self.agent.contract, resync, self.policy.early_exit, self.agent.draft_name,
                         self.grammar_hash, "" if by_hash else self.grammar, self.prompt_len if self.grammar else 0,
                         None if prompts == [(0, stated)] else prompts)

    def run(self) -> GenerationResult:
        agent = self.agent
        sent0, recv0 = self.sent0, self.recv0 = self.link.bytes_sent, self.link.bytes_received
        energy0 = self.energy0 = agent.meter.energy_j()
        while not agent.inbox.empty():  # leftovers of an earlier request
            agent.inbox.get_nowait()
        self.begin()
        try:
            if self.policy.autoregressive:
                self.run_autoregressive()
            else:
                self.run_speculative()
        except BaseException:
            self.send(wire.Close(self.session, self.rounds.next_round()))
            raise
        else:
            self.keep_or_close()
        finally:
            self.join_prefill()  # the engine is the next request's: never left to a thread
            if self.stats.resyncs:  # the kept session did not take the new turn as it stood
                self.stats.cached_prompt_tokens = 0
            self.stats.total_s = time.perf_counter() - self.start_s
            self.stats.generated_tokens = self.generated
            sent, received = self.link.bytes_sent - sent0, self.link.bytes_received - recv0
            self.stats.wire_bytes = sent + received
            # The radio is modelled (its connected-state power over the request, plus per byte);
            # its tail after the request is reported apart: it follows the last request of a burst.
            self.stats.energy_j = (agent.meter.energy_j() - energy0
                                   + agent.radio.energy_j(self.stats.total_s, sent, received))
            self.stats.radio_tail_j = agent.radio.tail_j
            self.stats.energy_source = agent.energy_source
            self.stats.target_version = self.target_version
            agent.last_target_version = self.target_version or agent.last_target_version
            self.stats.replica = self.replica or ""
        return GenerationResult(self.committed[self.prompt_len:], self.stats, self.stopped, self.unverified,
                                None if self.params.logprobs is None else self.logprobs)

    def begin(self) -> None:
        """OPEN the session; or, for a conversation's next turn, send the replica that kept it
        only the new tokens (its next round finds out whether they took, and resyncs if not).
        A kept session this request does not continue is closed."""
        if self.shared:
            base = self.shared
            self.send(wire.Extend(self.session, self.rounds.next_round(), base, self.committed[base:],
                                  wire.text_hash(self.committed[:base])))
            self.stats.cached_prompt_tokens = base
            return
        if self.kept is not None:
            self.agent.close_kept(self.kept)
        self.rounds.opening()
        self.send(self.open_message(resync=False))

    def keep_or_close(self) -> None:
        """A request that ended well leaves its session open on its replica for a next turn; one
        that committed unverified tokens (the target lacks them) or never bound is closed."""
        keep = self.agent.cfg.speculation.keep_session and self.constraint is None
        if keep and self.replica is not None and not self.unverified and self.stats.exact_targets is not None:
            self.agent.kept = Kept(self.rounds, list(self.committed), self.params, self.policy.early_exit,
                                   self.stats.exact_targets, self.prompts, self.stopped)
        else:
            self.send(wire.Close(self.session, self.rounds.next_round()))

    def emit(self, tokens: list[int], verified: bool = True, forced: bool = False,
             logprobs: list[TokenLogprob] | None = None) -> None:
        """Commit tokens (the verifier's with their `logprobs`, the draft's alone, or the grammar's
        `forced` ones), cut at a stop token or the length limit."""
        out = []
        for token in tokens[: self.max_new - self.generated]:
            if token in self.stop_ids:
                self.stopped = True
                break
            out.append(token)
        if self.constraint is not None and not self.constraint.accept(out):
            raise RequestFailed(f"the verifier's tokens {out} break the request's grammar")
        if out and self.generated == 0:
            self.stats.ttft_s = time.perf_counter() - self.start_s
            self.stats.first_tokens = len(out)
        self.committed += out
        if forced:
            self.unsent += out
            self.stats.forced_tokens += len(out)
        else:  # a round has stated the forced tokens before these (or will, by a resync's OPEN)
            self.rounds.commit(self.unsent + out)
            self.unsent = []
        if out and not verified:
            self.unverified.append((self.generated - len(out), self.generated))
            self.stats.unverified_tokens += len(out)
        if out and self.params.logprobs is not None:
            said = (list(logprobs or []) + [None] * len(out))[: len(out)]
            self.logprobs += said
            self.on_logprobs(said)
        if out:
            self.on_tokens(out, verified)

    @property
    def done(self) -> bool:
        return self.stopped or self.generated >= self.max_new

    def force(self) -> int:
        """Commit what the grammar forces (the one token it allows: the constrained target's point
        mass), with no round trip; the next DRAFT tells the verifier, which checks them. Returns
        how many tokens it committed."""
        before = len(self.committed)
        # With logprobs asked, a forced token is drafted and verified as any: the target's row at
        # its position is then computed, and its logprob with it.
        while self.constraint is not None and self.params.logprobs is None and not self.done:
            token = self.constraint.forced()
            if token is None:
                break
            self.emit([token], forced=True)
        return len(self.committed) - before

    def objective(self) -> Objective:
        """The adaptive objective for the rest of this request: the device's, with the policy's
        options, its energy budget held over the whole request (scheduler.request_budget)."""
        agent = self.agent
        chosen = replace(agent.scheduler.objective, **self.policy.overrides)
        elapsed = time.perf_counter() - self.start_s
        spent = (agent.meter.energy_j() - self.energy0 + agent.radio.energy_j(
            elapsed, self.link.bytes_sent - self.sent0, self.link.bytes_received - self.recv0))
        return request_budget(chosen, spent, self.generated, self.max_new - self.generated)

    def enter(self, mode: str) -> None:
        if not self.stats.modes or self.stats.modes[-1][1] != mode:
            self.stats.modes.append((time.perf_counter() - self.start_s, mode))

    def prefill_draft(self, committed: list[int]) -> float:
        """Prefill the draft's cache with `committed` (start()); its seconds, taught to the scheduler."""
        engine = self.agent.engine
        t0 = time.perf_counter()
        engine.start(committed, self.agent.cfg.speculation.keep_session)
        seconds = time.perf_counter() - t0
        self.agent.scheduler.observe_prefill(seconds, len(committed) - getattr(engine, "reused", 0))
        return seconds

    def count_prefill(self, seconds: float) -> None:
        """A finished prefill of the draft: its time and energy are this request's."""
        self.stats.draft_s += seconds
        self.stats.draft_prefill_s += seconds
        self.agent.meter.note_busy(seconds)
        self.stats.draft_reused_tokens = getattr(self.agent.engine, "reused", 0)  # a test wrapper may not say
        self.draft_started = True

    def prefill_behind(self) -> None:
        """Prefill the draft on a thread while the cloud streams (both engines release the GIL)."""
        committed = list(self.committed)

        def run():
            t0 = time.perf_counter()
            try:
                self.prefill_done = (self.prefill_draft(committed), None)
            except BaseException as exc:  # raised in the request's thread when it joins
                self.prefill_done = (time.perf_counter() - t0, exc)

        self.prefill = threading.Thread(target=run, name="draft-prefill", daemon=True)
        self.prefill.start()

    def join_prefill(self) -> None:
        """Wait for the draft's prefill behind the stream, count its time and energy, raise its error."""
        if self.prefill is None:
            return
        self.prefill.join()
        self.prefill = None
        seconds, error = self.prefill_done
        self.count_prefill(seconds)
        if error is not None:
            raise error

    def draft_ready(self, after_stream: bool = False) -> None:
        """Before a drafted round: the draft's cache holds the committed text (prefilled now, or
        behind a stream; after one, it takes what the stream brought with the next draft)."""
        self.join_prefill()
        if after_stream and self.draft_started:
            self.agent.engine.commit(self.committed)
        elif not self.draft_started:
            self.count_prefill(self.prefill_draft(self.committed))

    def leave_stream(self) -> bool:
        """Asked after each streamed token: switch to speculation now? Only where speculation could
        pay at all (else the draft is not even prefilled), once the draft is ready, and when the
        scheduler says it pays, or after probe_stream_tokens streamed tokens (a round teaches the
        estimators what a stream cannot)."""
        scheduler, remaining, objective = self.agent.scheduler, self.max_new - self.generated, self.objective()
        if not scheduler.can_pay(remaining, objective):
            return False
        if not self.draft_started and self.prefill is None:
            if not scheduler.prefill_in_time(len(self.committed), remaining):
                return False
            self.prefill_behind()
        if self.prefill is not None and self.prefill.is_alive():
            return False
        return scheduler.probe_due or scheduler.mode(remaining, True, objective) == SPECULATE

    def run_speculative(self) -> None:
        agent, engine, policy = self.agent, self.agent.engine, self.policy
        scheduler, meter, link = agent.scheduler, agent.meter, self.link
        uses_model = "model" in self.sources  # prompt lookup alone never runs the draft model
        # An adaptive request starts streaming, so its first token comes as soon as the cloud alone
        # would give it, unless measured rounds say speculating pays from the start (start_mode);
        # the scheduler then switches between streaming and speculating as costs say.
        # (Not under a grammar: forced tokens and masks are the speculative rounds' own.)
        streams = policy.stream and self.constraint is None and uses_model
        streaming = streams and scheduler.start_mode(self.max_new, self.objective()) == STREAM
        if uses_model and not streams:
            self.draft_ready()
        first_round = True
        carried: Drafted | None = None  # drafted ahead during the last round, its bet held
        after_stream = streams and not streaming  # a speculating start is probed as a round after a stream
        while True:
            if self.force() and uses_model:
                engine.commit(self.committed)  # the draft goes on after the forced tokens
            if self.done:
                break
            if streams and not streaming and not after_stream and scheduler.mode(self.max_new - self.generated, False,
                                                            self.objective()) == STREAM:
                streaming, carried = True, None
            if streaming:
                self.enter(STREAM)
                if self.stream_phase(self.leave_stream):
                    streaming, first_round, after_stream = False, False, True
                continue
            if streams:
                self.enter(SPECULATE)
            if uses_model:
                self.draft_ready(after_stream)
            draft_len, keep_going, pipelined = self.plan_round(probe=after_stream)
            after_stream = False
            t0, e0, sent0, recv0 = time.perf_counter(), meter.energy_j(), link.bytes_sent, link.bytes_received
            resyncs = self.stats.resyncs
            drafted = self.draft(draft_len, keep_going, carried)
            t1 = time.perf_counter()
            meter.note_busy(t1 - t0)
            e1 = meter.energy_j()
            self.stats.draft_s += t1 - t0
            self.rounds.next_round()
            draft = drafted.tokens
            ahead = self.ahead_of(drafted, keep_going) if pipelined else None
            hints = self.stats.hints, self.stats.hints_agreed
            try:
                verdict = self.round_trip(self.draft_message(drafted), ahead)
            except _DraftAlone:
                self.go_alone(draft)
                carried = None
                continue
            self.alone = False
            t2 = time.perf_counter()
            if verdict.accepted > len(draft):
                raise RequestFailed(f"verdict accepts {verdict.accepted} of {len(draft)} drafted tokens")
            self.stats.wait_s += t2 - t1
            self.stats.record_round(len(draft), verdict.accepted, t2 - t1, verdict.verify_us / 1e6,
                                    t0 - self.start_s, drafted.source)
            if ahead is not None:
                meter.note_busy(ahead.seconds)
                self.stats.ahead_s += ahead.seconds
                self.stats.ahead_tokens += ahead.tokens
            # Every policy's rounds teach the estimators (the device's own traffic, whoever planned it);
            # the first round (and a resync's) also waits for the verifier to prefill: not a round's costs.
            busy_s = drafted.seconds or (t1 - t0)
            scheduler.observe_round(drafted.confidences, verdict.accepted, busy_s, verdict.verify_us / 1e6,
                                    t2 - t1, link.bytes_sent - sent0, link.bytes_received - recv0,
                                    cold=first_round or self.stats.resyncs > resyncs, source=drafted.source)
            modelled = draft and drafted.source == "model" and t1 > t0  # a lookup burns no drafting power
            scheduler.observe_power((e1 - e0) / (t1 - t0) if modelled else None,
                                    None if ahead and ahead.seconds else (meter.energy_j() - e1) / (t2 - t1))
            self.emit(draft[: verdict.accepted] + [verdict.next_token], logprobs=verdict.logprobs)
            carried = None
            if ahead is None:
                if uses_model:
                    engine.commit(self.committed)
            elif not self.done:
                carried = self.resolve_ahead(ahead, verdict, len(draft), hints)
            first_round = False

    def go_alone(self, draft: list[int]) -> None:
        """The fault policy's `draft`: commit the draft unverified (as far as the limit allows)."""
        self.emit(draft[: self.faults.unverified_max_tokens - self.stats.unverified_tokens], verified=False)
        self.alone = True
        if "model" in self.sources:
            self.agent.engine.commit(self.committed)

    def plan_round(self, probe: bool):
        """(the most tokens to draft, the scheduler's keep-drafting test or None, whether to draft
        ahead during the wait) for this round; `probe`: draft at least one token."""
        policy, scheduler = self.policy, self.agent.scheduler
        draft_len = policy.next_draft_len(self.max_new - self.generated)
        pipelined = policy.pipelined and "model" in self.sources and self.constraint is None
        if not policy.adaptive:
            return draft_len, None, pipelined
        objective = self.objective()
        pipelined = pipelined and scheduler.pipelining_pays(objective)  # +pipelined allows it; costs decide
        return draft_len, scheduler.planner(draft_len, objective, pipelined, probe=probe), pipelined

    def ahead_of(self, drafted: Drafted, keep_going) -> Ahead:
        """Drafting ahead while `drafted` is verified, on the bet that all of it holds."""
        policy = self.policy
        next_draft_len = lambda accepted: policy.next_draft_len(self.max_new - self.generated - accepted - 1)
        ahead = Ahead(self.agent.engine, list(self.committed), list(drafted.tokens), self.params, self.rng,
                      self.stop_ids, next_draft_len, keep_going)
        if policy.adaptive and policy.early_exit:
            ahead.follow_hints = self.agent.scheduler.follow_hint(drafted.confidences)
        return ahead

    def resolve_ahead(self, ahead: Ahead, verdict: wire.Verdict, drafted: int, hints: tuple[int, int]):
        """The block drafted ahead if its bet held (else None); the bet and a hint, if one came
        (`hints`: the hint counts before the round), teach the scheduler how often they hold."""
        scheduler = self.agent.scheduler
        carried = ahead.resolve(verdict.accepted, verdict.next_token, self.committed)
        if carried is not None:
            self.stats.ahead_hits += 1
            self.stats.ahead_kept += len(carried.tokens)
        if self.stats.hints > hints[0]:
            scheduler.observe_hint(self.stats.hints_agreed > hints[1])
        if ahead.branch is not None and ahead.branch[0] == drafted == verdict.accepted:
            scheduler.observe_bet(carried is not None)  # all were accepted: the guess decided
        return carried

    def draft_message(self, drafted: Drafted) -> wire.Draft:
        """This round's DRAFT: the text the verifier holds, the forced tokens it has not been told
        of, then the draft."""
        message = wire.Draft(self.session, self.seq, self.stated, drafted.tokens, drafted.q,
                             self.rounds.text_hash(), list(self.unsent))
        if drafted.q is not None and drafted.tokens:
            # The naive baseline ships each drafted token's full distribution (fp16 over the
            # vocabulary) instead of its sparse q: counted, never sent.
            self.stats.q_wire_bytes += len(wire.encode(message)) - len(wire.encode(replace(message, q=None)))
            self.stats.dense_q_bytes += 2 * self.vocab_size * len(drafted.tokens)
        return message

    def draft(self, draft_len: int, keep_going, carried: Drafted | None) -> Drafted:
        """This round's draft: what was drafted ahead (if its bet held), extended up to `draft_len`;
        else a prompt lookup's proposal where [draft] sources puts one first; else the model's."""
        engine = self.agent.engine
        if carried is None and self.sources[0] == "lookup":
            looked_up = lookup.drafted(self.committed, draft_len, self.params, self.stop_ids)
            if looked_up is not None and self.constraint is not None:  # what the grammar allows of it
                valid = self.constraint.valid_prefix(looked_up.tokens)
                looked_up = looked_up.cut(valid) if valid else None
            if looked_up is not None and self.policy.adaptive:  # how much of it pays, if any
                scheduler = self.agent.scheduler
                n = scheduler.lookup_len(len(looked_up.tokens), self.objective())
                looked_up = looked_up.cut(n) if n else None
            if looked_up is not None or "model" not in self.sources:
                return looked_up or Drafted.empty(self.params)
        if carried is None:
            if self.constraint is not None:  # (a test's engine wrapper may not take the keyword)
                return engine.draft(draft_len, self.params, self.rng, self.stop_ids, keep_going,
                                    constraint=self.constraint)
            return engine.draft(draft_len, self.params, self.rng, self.stop_ids, keep_going)
        if len(carried.tokens) > draft_len:  # the request is nearly done: drop the tail
            carried = carried.cut(draft_len)
            engine.commit(self.committed + carried.tokens)
        if (carried.tokens and carried.tokens[-1] in self.stop_ids) or len(carried.tokens) >= draft_len:
            return carried
        drafted_before = carried.confidences
        more = engine.draft(draft_len - len(carried.tokens), self.params, self.rng, self.stop_ids,
                            keep_going and (lambda confidences: keep_going(drafted_before + confidences)))
        return carried.extend(more)

    def run_autoregressive(self) -> None:
        """cloud-ar: the verifier decodes alone and streams every token as it is made."""
        while not self.done:
            self.stream_phase()

    def stream_phase(self, leave=None) -> bool:
        """One GENERATE for the rest of the request and its stream, until the request is done, the
        stream is to be asked again, or `leave()`, asked after each new token, says so: True then.
        The next round's message ends the stream on the verifier, whatever it still had in flight."""
        self.rounds.next_round()
        request = wire.Generate(self.session, self.seq, len(self.committed), self.max_new - self.generated,
                                self.rounds.text_hash())
        scheduler, link = self.agent.scheduler, self.link
        last = None  # (when, bytes sent, bytes received) at the last message that brought tokens
        for msg in self.stream(request):
            # `start` is the absolute position of the first token: duplicates are dropped,
            # and after a gap (a lost message) we ask again from what we hold.
            have = len(self.committed)
            fresh = msg.tokens[have - msg.start:] if msg.start <= have else []
            fresh_logprobs = msg.logprobs[have - msg.start:] if msg.logprobs and msg.start <= have else None
            self.stalled = 0 if fresh else self.stalled + 1
            if self.stalled >= MAX_STALLED:
                raise VerifierUnavailable(f"the verifier's stream added no token in {self.stalled} answers in a "
                                          f"row; {self.generated} tokens committed and kept")
            if msg.start > have:
                break
            if fresh:
                now = time.perf_counter()
                if last is not None:  # the first also waited for the request and, maybe, a prefill
                    scheduler.observe_stream(now - last[0], len(fresh), link.bytes_sent - last[1],
                                             link.bytes_received - last[2])
                last = (now, link.bytes_sent, link.bytes_received)
            self.stats.target_passes += len(fresh)
            before = self.generated
            self.emit(fresh, logprobs=fresh_logprobs)
            # What the stream added to the answer: not its stop token, nor tokens past max_tokens
            # (counting those put the held-out long prompts' streamed share at 1.011).
            self.stats.streamed_tokens += self.generated - before
            if msg.done or self.done:
                break
            if fresh and leave is not None and leave():
                return True
        return False

    # -- the exchanges: device/rounds.py decides, this performs --------------------------------
    def exchange(self, ex: Exchange, ahead: Ahead | None = None):
        """Perform `ex`'s actions and feed it what happens: yields each answer it delivers (a
        VERDICT ends it; a stream's TOKENS go on), returns when it says to ask again."""
        todo = deque(ex.start(time.monotonic()))
        while True:
            while todo:
                act = todo.popleft()
                if act.kind == SEND:
                    self.send(act.arg)
                elif act.kind == OPEN:
                    self.send(self.open_message(resync=True))
                elif act.kind == DROPPED:
                    self.agent.count_error(act.arg[0])
                    log.warning("%s", act.arg[1])
                elif act.kind == HINT:
                    if ahead is not None and ahead.follow_hints:
                        ahead.redirect(act.arg.accepted, act.arg.next_token)
                elif act.kind == DELIVER:
                    if self.grammar_hash:  # the verifier took the grammar: later OPENs name it by hash
                        self.agent.grammars_held.add(self.grammar_hash)
                    yield act.arg
                elif act.kind == SEND_GRAMMAR:
                    self.agent.grammars_held.discard(self.grammar_hash)
                elif act.kind == ASK_AGAIN:
                    return
                elif act.kind == AWAIT_BROKER:
                    back = self.link.connected.wait(max(0.0, act.arg - time.monotonic()))
                    now = time.monotonic()
                    todo.extend(ex.on_broker_back(now) if back else ex.on_silence(BROKER_LOST, now))
                elif act.kind == REFUSE:
                    raise Refused(act.arg.code, act.arg.text)
                elif act.kind == DRAFT_ALONE:
                    raise _DraftAlone(act.arg)
                elif act.kind == FAIL:
                    raise self.failure(act.arg)
            todo.extend(self.next_event(ex, ahead))

    def next_event(self, ex: Exchange, ahead: Ahead | None):
        """Wait for what happens next (drafting ahead meanwhile, between messages) and hand it to `ex`."""
        agent, link = self.agent, self.link
        while True:
            now = time.monotonic()
            if not link.connected.is_set():
                return ex.on_silence(BROKER_LOST, now)
            if link.connects != self.sent_connects:
                return ex.on_reconnected(now)
            busy = ahead is not None and ahead.wants_more()
            if busy and agent.inbox.empty():
                ahead.step()
                continue
            if now >= ex.deadline:
                return ex.on_silence(TIMEOUT, now)
            try:
                payload = agent.inbox.get(timeout=min(ex.deadline - now, 0.001) if busy else ex.deadline - now)
            except queue.Empty:
                continue
            if payload is None:  # a replica's or the link's state changed
                if self.replica is not None and self.replica in agent.offline_replicas:
                    return ex.on_silence(REPLICA_LOST, time.monotonic())
                continue
            actions = ex.on_payload(payload, time.monotonic())
            if actions:
                return actions

    def failure(self, why: Failure) -> VerifierUnavailable:
        what = ("the MQTT broker is unreachable" if why.broker
                else f"no verdict ({why.cause}, {why.tries} tries)")
        failure = BrokerUnreachable if why.broker else VerifierUnavailable
        return failure(f"{what}: request failed after {why.waited_s:.1f}s under the '{why.policy}' policy; "
                       f"{self.generated} tokens committed and kept")

    def new_exchange(self, pending, can_draft: bool = False, attempt: int = 0) -> Exchange:
        return Exchange(self.rounds, pending, self.faults, self.stats, self.agent.round_timer, self.vocab_size,
                        time.monotonic(), can_draft=can_draft, alone=self.alone, attempt=attempt)

    def round_trip(self, msg: wire.Draft, ahead: Ahead | None = None) -> wire.Verdict:
        """Send a draft and wait for its verdict; `ahead` drafts during the wait, between messages."""
        can_draft = bool(msg.tokens) and not self.policy.autoregressive
        return next(self.exchange(self.new_exchange(msg, can_draft), ahead))

    def stream(self, request: wire.Generate):
        """Tokens messages answering `request`; returns early (to be re-asked) on a timeout."""
        ex = self.new_exchange(request, attempt=self.stream_failures)
        try:
            yield from self.exchange(ex)
        finally:
            self.stream_failures = ex.attempt
