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
"""
from __future__ import annotations

import json
import logging
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from specedge import wire
from specedge.config import DeviceConfig
from specedge.contract import Contract
from specedge.device.draft import Drafted
from specedge.device.pipeline import Ahead
from specedge.device.policy import Policy
from specedge.device.power import PowerMeter, open_meter
from specedge.device.profiles import get_profile
from specedge.device.rounds import BOUND, CURRENT, DRAFT_ALONE, FAIL, MOVED, OTHER_OPENED, RESYNC, STALE, Rounds
from specedge.device.scheduler import Scheduler, State
from specedge.metrics import SpecStats
from specedge.mqtt import REPLICAS, Link, device_topic, publish_packet_bytes
from specedge.speculative import SamplingParams

log = logging.getLogger("specedge.device")


# What receive() returns besides messages and None (its deadline passed):
REPLICA_LOST = "replica lost"  # the replica holding the session went offline
BROKER_LOST = "broker lost"  # the connection to the broker is down
RECONNECTED = "reconnected"  # the connection came back since our last send: that message may be lost
TIMEOUT = "timeout"

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


@dataclass
class RoundTimer:
    """How long a round waits for its verdict: RFC 6298's retransmission timer over this device's
    round trips, between `faults.round_timeout_s` and 8 times that (or `max_wait_s`). A verifier
    that slows down under load stretches the wait instead of drawing timeouts and resyncs, whose
    cold prefills would add to the very load that made it slow."""

    srtt_s: float | None = None
    rttvar_s: float = 0.0

    def observe(self, rtt_s: float) -> None:
        """A round trip answered on its first try (Karn: a resent round's time is ambiguous)."""
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt_s)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt_s

    def timeout_s(self, floor_s: float, cap_s: float = float("inf")) -> float:
        if self.srtt_s is None:
            return floor_s
        return max(floor_s, min(8 * floor_s, cap_s, self.srtt_s + 4 * self.rttvar_s))


class Agent:
    def __init__(self, cfg: DeviceConfig, engine, tokenizer):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        ident = cfg.device
        self.up_topic = device_topic(ident.fleet, ident.id, "draft")
        self.down_topic = device_topic(ident.fleet, ident.id, "verdict")
        # None: a replica's or the link's state changed
        self.inbox: queue.Queue[bytes | None] = queue.Queue(maxsize=MAX_INBOX)
        self.offline_replicas: set[str] = set()
        self.draft_name = cfg.draft.display_name()
        self.contract = Contract.of(tokenizer, engine.vocab_size)
        self.link = Link(cfg.mqtt, f"specedge-device-{ident.fleet}-{ident.id}", self._on_message,
                         on_connection=lambda up: self._enqueue(None),  # wake a waiting round
                         max_packet=wire.MAX_PACKET)
        self.decode_errors: dict[str, int] = {}
        self._busy = threading.Lock()
        energy = cfg.energy
        self.profile = get_profile(energy.profile, energy.profiles or None)
        self.radio = self.profile.radio(energy.link)
        self.meter: PowerMeter | None = None
        self.current: _Request | None = None  # the request running or last run
        self.round_timer = RoundTimer()
        empty_draft = len(wire.encode(wire.Draft(0, 0, 0, [])))
        prior = State((0.6,), draft_s=0.05, verify_base_s=0.1, verify_per_row_s=0.0, rtt_s=0.0,
                      up_bytes_base=publish_packet_bytes(self.up_topic, empty_draft, cfg.mqtt.qos, True),
                      active_w=self.profile.active_w, idle_w=self.profile.idle_w, radio_w=self.radio.active_w,
                      radio_j_per_byte_up=self.radio.j_per_byte_up,
                      radio_j_per_byte_down=self.radio.j_per_byte_down)
        self.scheduler = Scheduler(energy.objective(), cfg.speculation.max_draft, prior)

    @property
    def energy_source(self) -> str:
        source = self.meter.source if self.meter else "none"
        link = self.cfg.energy.link
        return source if link == "none" else f"{source}+radio-model:{link}"

    def set_objective(self, **changes) -> None:
        """Change the adaptive policies' objective at run time (mode, budget_j_per_token,
        min_tokens_per_s); the next round plans with it."""
        self.scheduler.set_objective(replace(self.scheduler.objective, **changes))

    def count_error(self, kind: str) -> None:
        self.decode_errors[kind] = self.decode_errors.get(kind, 0) + 1

    # paho's network thread: nothing here may block or raise, or every later message is lost.
    def _enqueue(self, item: bytes | None) -> None:
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.count_error("inbox_full")  # a lost verdict is asked for again

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.startswith(REPLICAS + "/"):
            self._on_replica_status(topic.split("/")[3], payload)
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
        self.link.subscribe(f"{REPLICAS}/+/status")
        self.link.start(retry=retry)
        return self

    def stop(self) -> None:
        self.link.stop()
        if self.meter:
            self.meter.close()

    # -- one request -------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, max_new_tokens: int, policy: Policy,
                 on_tokens=None) -> GenerationResult:
        """Generate after `prompt`; `on_tokens(tokens, verified)` sees committed tokens as they land
        (verified False: the draft's alone, under the `draft` fault policy)."""
        with self._busy:
            self.current = _Request(self, prompt, params, max_new_tokens, policy, on_tokens)
            return self.current.run()


class _Request:
    def __init__(self, agent: Agent, prompt, params, max_new_tokens, policy, on_tokens):
        self.agent, self.params, self.policy = agent, params, policy
        self.max_new, self.on_tokens = max_new_tokens, on_tokens or (lambda tokens, verified: None)
        # The session's round state, no I/O (device/rounds.py): seq, OPEN, replica, version, text hash.
        self.rounds = Rounds(secrets.randbits(64), prompt)
        self.prompt_len = len(prompt)
        self.committed = list(prompt)
        self.stats = SpecStats(policy=policy.name)
        self.stop_ids = agent.tokenizer.stop_ids
        self.rng = np.random.default_rng([params.seed, self.session])
        self.faults = agent.cfg.faults
        self.start_s = time.perf_counter()
        self.stopped = False
        self.stream_failures = 0
        self.vocab_size = agent.engine.vocab_size
        self.sent_connects = 0  # the link's connection count when we last sent
        self.alone = False  # the last round went on without the target: next failure needs no retries
        self.unverified: list[tuple[int, int]] = []

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
        """To the replica holding the session; OPEN (and anything before one answers) to the group."""
        topic = self.agent.up_topic
        if self.replica is not None and not isinstance(msg, wire.Open):
            topic = f"{topic}/{self.replica}"
        self.sent_connects = self.agent.link.connects
        self.agent.link.publish(topic, wire.encode(msg))

    def open_message(self, resync: bool) -> wire.Open:
        return wire.Open(self.session, self.rounds.opening(), list(self.committed), self.params, self.agent.contract,
                         resync, self.policy.early_exit, self.agent.draft_name)

    def resync(self, failover: bool = False) -> None:
        """Rebuild the session from the committed text on whichever replica of the group answers.
        A new round number: nothing the previous replica still sends can be taken for the new one's."""
        self.stats.failovers += failover
        self.stats.resyncs += 1
        self.rounds.unbind()
        self.reopen()

    def reopen(self) -> None:
        """OPEN again with the committed text, under the next round number."""
        self.rounds.next_round()
        self.send(self.open_message(resync=True))

    def bind(self, since: float, can_draft: bool = False) -> None:
        """Wait for OPENED: from then on the session's messages go to the replica it names."""
        attempt = 0
        while self.replica is None:
            reply = self.receive(time.monotonic() + self.backoff(attempt), lambda m: self.replica is not None)
            if isinstance(reply, wire.Error):
                self.handle_error(reply)  # a refusal raises; a lost session resyncs
            elif reply is RECONNECTED:
                self.reopen()
            elif reply in (None, BROKER_LOST) and self.replica is None:
                self.unanswered(reply or TIMEOUT, attempt, since, can_draft)
                attempt += 1
                self.stats.retries += 1
                self.reopen()

    def run(self) -> GenerationResult:
        agent = self.agent
        sent0, recv0 = agent.link.bytes_sent, agent.link.bytes_received
        energy0 = agent.meter.energy_j()
        while not agent.inbox.empty():  # leftovers of an earlier request
            agent.inbox.get_nowait()
        self.send(self.open_message(resync=False))
        try:
            if self.policy.autoregressive:
                self.run_autoregressive()
            else:
                self.run_speculative()
        finally:
            self.send(wire.Close(self.session, self.rounds.next_round()))
            self.stats.total_s = time.perf_counter() - self.start_s
            self.stats.generated_tokens = self.generated
            sent, received = agent.link.bytes_sent - sent0, agent.link.bytes_received - recv0
            self.stats.wire_bytes = sent + received
            # The radio is modelled (its connected-state power over the request, plus per byte);
            # its tail after the request is reported apart: it follows the last request of a burst.
            self.stats.energy_j = (agent.meter.energy_j() - energy0
                                   + agent.radio.energy_j(self.stats.total_s, sent, received))
            self.stats.radio_tail_j = agent.radio.tail_j
            self.stats.energy_source = agent.energy_source
            self.stats.target_version = self.target_version
            self.stats.replica = self.replica or ""
        return GenerationResult(self.committed[self.prompt_len:], self.stats, self.stopped, self.unverified)

    def emit(self, tokens: list[int], verified: bool = True) -> None:
        """Commit tokens (the verifier's, or the draft's alone), cut at a stop token or the length limit."""
        out = []
        for token in tokens[: self.max_new - self.generated]:
            if token in self.stop_ids:
                self.stopped = True
                break
            out.append(token)
        if out and self.generated == 0:
            self.stats.ttft_s = time.perf_counter() - self.start_s
        self.committed += out
        self.rounds.commit(out)
        if out and not verified:
            self.unverified.append((self.generated - len(out), self.generated))
            self.stats.unverified_tokens += len(out)
        if out:
            self.on_tokens(out, verified)

    @property
    def done(self) -> bool:
        return self.stopped or self.generated >= self.max_new

    def run_speculative(self) -> None:
        agent, engine, policy = self.agent, self.agent.engine, self.policy
        scheduler, meter, link = agent.scheduler, agent.meter, agent.link
        t0 = time.perf_counter()
        engine.start(self.committed)
        prefill_s = time.perf_counter() - t0
        self.stats.draft_s += prefill_s
        meter.note_busy(prefill_s)
        first_round = True
        carried: Drafted | None = None  # drafted ahead during the last round, its bet held
        while not self.done:
            limit = policy.next_draft_length(self.max_new - self.generated)
            keep_going = None
            if policy.adaptive:
                keep_going = scheduler.planner(limit, replace(scheduler.objective, **policy.overrides),
                                               policy.pipelined)
            t0, e0, sent0, recv0 = time.perf_counter(), meter.energy_j(), link.bytes_sent, link.bytes_received
            drafted = self.draft(limit, keep_going, carried)
            t1 = time.perf_counter()
            meter.note_busy(t1 - t0)
            e1 = meter.energy_j()
            self.stats.draft_s += t1 - t0
            self.rounds.next_round()
            draft = drafted.tokens
            ahead = None
            if policy.pipelined:
                room = lambda accepted: policy.next_draft_length(self.max_new - self.generated - accepted - 1)
                ahead = Ahead(engine, list(self.committed), list(draft), self.params, self.rng, self.stop_ids,
                              room, keep_going)
            message = wire.Draft(self.session, self.seq, len(self.committed), draft, drafted.q,
                                 self.rounds.text_hash())
            if drafted.q is not None and draft:
                # The naive baseline ships each drafted token's full distribution (fp16 over the
                # vocabulary) instead of its sparse q: counted, never sent.
                self.stats.q_wire_bytes += len(wire.encode(message)) - len(wire.encode(replace(message, q=None)))
                self.stats.dense_q_bytes += 2 * self.vocab_size * len(draft)
            try:
                verdict = self.round_trip(message, ahead)
            except _DraftAlone:
                self.emit(draft[: self.faults.unverified_max_tokens - self.stats.unverified_tokens], verified=False)
                self.alone = True
                carried = None
                engine.commit(self.committed)
                continue
            self.alone = False
            t2 = time.perf_counter()
            if verdict.accepted > len(draft):
                raise RequestFailed(f"verdict accepts {verdict.accepted} of {len(draft)} drafted tokens")
            self.stats.wait_s += t2 - t1
            self.stats.record_round(len(draft), verdict.accepted, t2 - t1, verdict.verify_us / 1e6,
                                    t0 - self.start_s)
            if ahead is not None:
                meter.note_busy(ahead.seconds)
                self.stats.ahead_s += ahead.seconds
                self.stats.ahead_tokens += ahead.tokens
            if policy.adaptive:
                # The first round also waits for the verifier to prefill the prompt: not the network.
                busy_s = drafted.seconds or (t1 - t0)
                scheduler.observe_round(drafted.confidences, verdict.accepted, busy_s, verdict.verify_us / 1e6,
                                        t2 - t1, link.bytes_sent - sent0, link.bytes_received - recv0,
                                        network=not first_round)
                scheduler.observe_power((e1 - e0) / (t1 - t0) if draft and t1 > t0 else None,
                                        None if ahead and ahead.seconds else (meter.energy_j() - e1) / (t2 - t1))
            self.emit(draft[: verdict.accepted] + [verdict.next_token])
            carried = None
            if ahead is None:
                engine.commit(self.committed)
            elif not self.done:
                carried = ahead.resolve(verdict.accepted, verdict.next_token, self.committed)
                if carried is not None:
                    self.stats.ahead_hits += 1
                    self.stats.ahead_kept += len(carried.tokens)
            first_round = False

    def draft(self, limit: int, keep_going, carried: Drafted | None) -> Drafted:
        """This round's draft: what was drafted ahead (if its bet held), extended up to `limit`."""
        engine = self.agent.engine
        if carried is None:
            return engine.draft(limit, self.params, self.rng, self.stop_ids, keep_going)
        if len(carried.tokens) > limit:  # the request is nearly done: drop the tail
            carried = carried.cut(limit)
            engine.commit(self.committed + carried.tokens)
        if (carried.tokens and carried.tokens[-1] in self.stop_ids) or len(carried.tokens) >= limit:
            return carried
        drafted_before = carried.confidences
        more = engine.draft(limit - len(carried.tokens), self.params, self.rng, self.stop_ids,
                            keep_going and (lambda confidences: keep_going(drafted_before + confidences)))
        return carried.extend(more)

    def run_autoregressive(self) -> None:
        """cloud-ar: the verifier decodes alone and streams every token as it is made."""
        stalled = 0  # answers in a row that added no token
        while not self.done:
            self.rounds.next_round()
            request = wire.Generate(self.session, self.seq, len(self.committed), self.max_new - self.generated,
                                    self.rounds.text_hash())
            for msg in self.stream(request):
                # `start` is the absolute position of the first token: duplicates are dropped,
                # and after a gap (a lost message) we ask again from what we hold.
                have = len(self.committed)
                fresh = msg.tokens[have - msg.start:] if msg.start <= have else []
                stalled = 0 if fresh else stalled + 1
                if stalled >= MAX_STALLED:
                    raise VerifierUnavailable(f"the verifier's stream added no token in {stalled} answers in a "
                                              f"row; {self.generated} tokens committed and kept")
                if msg.start > have:
                    break
                self.stats.target_passes += len(fresh)
                self.emit(fresh)
                if msg.done or self.done:
                    break

    # -- waiting for the verifier, with retries and resync ------------------------------------
    def receive(self, deadline: float, accept):
        """The next message for this session and round that `accept` wants, or None at the deadline."""
        link = self.agent.link
        while True:
            if not link.connected.is_set():
                return BROKER_LOST
            if link.connects != self.sent_connects:
                return RECONNECTED
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return None
            try:
                payload = self.agent.inbox.get(timeout=timeout)
            except queue.Empty:
                return None
            if payload is None:
                if self.replica is not None and self.replica in self.agent.offline_replicas:
                    return REPLICA_LOST
                continue
            try:
                msg = wire.decode(payload)
            except wire.WireError as exc:
                self.agent.count_error(exc.kind)
                log.warning("dropped a bad verifier message: %s", exc)
                continue
            problem = Rounds.check(msg, self.vocab_size)
            if problem:
                self.agent.count_error(problem[0])
                log.warning("dropped a verifier message: %s", problem[1])
                continue
            seen = self.rounds.classify(msg)
            if seen.kind in (BOUND, MOVED):
                self.stats.verified_by(msg.exact)
                self.stats.version_switches += seen.kind == MOVED
            if seen.kind in (BOUND, MOVED, OTHER_OPENED):
                if accept(msg):
                    return msg
                continue
            if seen.kind != STALE and (seen.kind != CURRENT or accept(msg)):
                return msg  # an ERROR of this round, or the message the caller waits for
            self.stats.stale_messages += 1

    def handle_error(self, err: wire.Error) -> None:
        if Rounds.error_action(err) == RESYNC:
            self.resync()
            return
        raise Refused(err.code, err.text)

    def backoff(self, attempt: int) -> float:
        """Jitter around an exponential timeout (capped): replays stay idempotent anyway."""
        base = self.agent.round_timer.timeout_s(self.faults.round_timeout_s, self.faults.max_wait_s)
        base *= 1.5 ** min(attempt, 4)
        return base * (0.75 + 0.5 * random.random())

    def unanswered(self, cause: str, attempt: int, since: float, can_draft: bool = False) -> None:
        """A message went unanswered (`cause`: TIMEOUT, REPLICA_LOST or BROKER_LOST) on its
        `attempt`-th try, the wait having begun at `since`. Applies the fault policy: returns when
        it is worth trying again, raises _DraftAlone to go on unverified, or fails the request."""
        faults, link = self.faults, self.agent.link
        broker = cause == BROKER_LOST
        policy = faults.on_broker_loss if broker else faults.on_verifier_loss
        waited = time.monotonic() - since
        failure = BrokerUnreachable if broker else VerifierUnavailable
        what = "the MQTT broker is unreachable" if broker else f"no verdict ({cause}, {attempt + 1} tries)"
        action = Rounds.fault_action(faults, broker, attempt, waited, self.alone, can_draft,
                                     self.stats.unverified_tokens)
        if action == FAIL:
            raise failure(f"{what}: request failed after {waited:.1f}s under the '{policy}' policy; "
                          f"{self.generated} tokens committed and kept")
        if action == DRAFT_ALONE:
            raise _DraftAlone(cause)
        if broker and not link.connected.wait(max(0.0, since + faults.max_wait_s - time.monotonic())):
            raise failure(f"{what}: request failed after {faults.max_wait_s:.0f}s (max_wait_s); "
                          f"{self.generated} tokens committed and kept")

    def round_trip(self, msg: wire.Draft, ahead: Ahead | None = None) -> wire.Verdict:
        """Send a draft and wait for its verdict; `ahead` drafts during the wait, between messages."""
        inbox = self.agent.inbox
        wanted = lambda m: isinstance(m, (wire.Verdict, wire.Hint)) and m.committed == msg.committed
        hint, since, attempt = None, time.monotonic(), 0
        can_draft = bool(msg.tokens) and not self.policy.autoregressive
        while True:
            self.bind(since, can_draft)
            self.send(replace(msg, seq=self.seq))
            sent = time.monotonic()
            deadline = sent + self.backoff(attempt)
            while True:
                busy = ahead is not None and ahead.wants_more()
                if busy and inbox.empty():
                    ahead.step()
                    continue
                reply = self.receive(min(deadline, time.monotonic() + 0.001) if busy else deadline, wanted)
                if reply is None and time.monotonic() < deadline:
                    continue
                if reply is RECONNECTED:  # what we sent may have died with the old connection
                    self.send(replace(msg, seq=self.seq))
                    continue
                if reply is None or isinstance(reply, str):
                    self.unanswered(reply or TIMEOUT, attempt, since, can_draft)
                    attempt += 1
                    self.stats.retries += 1
                    if reply is not BROKER_LOST:
                        self.resync(failover=True)  # this replica may be gone: ask the group
                    break
                if isinstance(reply, wire.Error):
                    self.handle_error(reply)
                    self.bind(since, can_draft)
                    self.send(replace(msg, seq=self.seq))
                    sent = time.monotonic()
                    continue
                if not Rounds.text_matches(reply, msg):
                    # The replica answers for another text of the same length (a late verdict of a
                    # stale draft moved it, say): never taken as verified. A verdict resyncs it.
                    self.agent.count_error("text_mismatch")
                    log.warning("dropped a %s over another committed text of %d tokens", type(reply).__name__,
                                msg.committed)
                    if isinstance(reply, wire.Hint):
                        continue
                    self.resync()
                    self.bind(since, can_draft)
                    self.send(replace(msg, seq=self.seq))
                    sent = time.monotonic()
                    continue
                if isinstance(reply, wire.Hint):
                    hint = reply
                    if ahead is not None:
                        ahead.redirect(reply.accepted, reply.next_token)
                    continue
                if hint is not None:
                    self.stats.hints += 1
                    self.stats.hints_agreed += (hint.accepted, hint.next_token) == (reply.accepted, reply.next_token)
                    self.stats.hint_layer = hint.layer
                if attempt == 0:
                    self.agent.round_timer.observe(time.monotonic() - sent)
                return reply

    def stream(self, request: wire.Generate):
        """Tokens messages answering `request`; returns early (to be re-asked) on a timeout."""
        since = time.monotonic()
        self.bind(since)
        self.send(replace(request, seq=self.seq))
        while True:
            reply = self.receive(time.monotonic() + self.backoff(self.stream_failures),
                                 lambda m: isinstance(m, wire.Tokens))
            if reply is RECONNECTED:
                self.send(replace(request, seq=self.seq))
                continue
            if reply is None or isinstance(reply, str):
                self.unanswered(reply or TIMEOUT, self.stream_failures, since)
                self.stream_failures += 1
                self.stats.retries += 1
                if reply is not BROKER_LOST:
                    self.resync(failover=True)
                return  # the caller asks again from the committed length it has
            if isinstance(reply, wire.Error):
                self.handle_error(reply)
                return
            self.stream_failures = 0
            since = time.monotonic()
            yield reply
