"""One request on the device: its text, its session's messages, and the two ways it is made.

  Request      what the request owns: the committed text (emit, force, the grammar's state),
               the session's round state (device/rounds.py) and messages (OPEN, EXTEND, CLOSE,
               kept for a next turn), its statistics, and the exchanges device/rounds.py decides
               and this module performs (send, wait, act)
  Streaming    the stream-and-prefill part: a GENERATE and its TOKENS (cloud-ar; adaptive's
               streamed stretches), the draft's prefill behind the stream, and when to leave it
  Speculation  the speculative-round part: what to draft (a prompt lookup, the model, ahead
               during the wait), a round's DRAFT and verdict, and what each round teaches the
               scheduler

The agent (device/agent.py) owns what outlives a request (link, engine, scheduler, meter, the
kept session) and runs one Request at a time.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from specedge.device import lookup
from specedge.device.draft import Drafted
from specedge.device.pipeline import Ahead
from specedge.device.rounds import (ASK_AGAIN, AWAIT_BROKER, BROKER_LOST, DELIVER, DRAFT_ALONE, DROPPED, FAIL,
                                    HINT, OPEN, REFUSE, REPLICA_LOST, SEND, SEND_GRAMMAR, TIMEOUT, Exchange, Failure,
                                    Kept, Rounds)
from specedge.device.scheduler import SPECULATE, STREAM, Objective, request_budget
from specedge.metrics import SpecStats
from specedge.protocol import wire
from specedge.speculative import TokenLogprob

log = logging.getLogger("specedge.device")

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


class DraftAlone(Exception):
    """The fault policy says: go on with the draft alone, unverified, for now."""


@dataclass
class GenerationResult:
    tokens: list[int]
    stats: SpecStats
    stopped: bool  # ended on a stop token rather than the length limit
    unverified: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of tokens the target never saw
    # Where params.logprobs asked: the target's log-softmax at each token (None: a token it never saw).
    logprobs: list[TokenLogprob | None] | None = None


class Request:
    def __init__(self, agent, prompt, params, max_new_tokens, policy, on_tokens, grammar=None, on_logprobs=None):
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
        self.faults = agent.cfg.faults
        self.start_s = time.perf_counter()
        self.stopped = False
        self.vocab_size = agent.engine.vocab_size
        self.sent_connects = 0  # the link's connection count when we last sent
        self.alone = False  # the last round went on without the target: next failure needs no retries
        self.unverified: list[tuple[int, int]] = []
        self.streaming = Streaming(self)

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len

    @property
    def done(self) -> bool:
        return self.stopped or self.generated >= self.max_new

    @property
    def stated(self) -> int:
        """The committed tokens a verifier is told of: all but the forced ones the next DRAFT carries."""
        return len(self.committed) - len(self.unsent)

    def run(self) -> GenerationResult:
        self.sent0, self.recv0 = self.link.bytes_sent, self.link.bytes_received
        self.energy0 = self.agent.meter.energy_j()
        while not self.agent.inbox.empty():  # leftovers of an earlier request
            self.agent.inbox.get_nowait()
        self.begin()
        try:
            if self.policy.autoregressive:
                self.streaming.run_autoregressive()
            else:
                Speculation(self).run()
        except BaseException:
            self.send(wire.Close(self.rounds.session, self.rounds.next_round()))
            raise
        else:
            self.keep_or_close()
        finally:
            self.streaming.join_prefill()  # the engine is the next request's: never left to a thread
            self.account()
        return GenerationResult(self.committed[self.prompt_len:], self.stats, self.stopped, self.unverified,
                                None if self.params.logprobs is None else self.logprobs)

    def account(self) -> None:
        """The request's totals: time, tokens, bytes, energy, who verified it."""
        agent, stats = self.agent, self.stats
        if stats.resyncs:  # the kept session did not take the new turn as it stood
            stats.cached_prompt_tokens = 0
        stats.total_s = time.perf_counter() - self.start_s
        stats.generated_tokens = self.generated
        sent, received = self.link.bytes_sent - self.sent0, self.link.bytes_received - self.recv0
        stats.wire_bytes = sent + received
        # The radio is modelled (its connected-state power over the request, plus per byte); its
        # tail after the request is reported apart: it follows the last request of a burst.
        stats.energy_j = agent.meter.energy_j() - self.energy0 + agent.radio.energy_j(stats.total_s, sent, received)
        stats.radio_tail_j = agent.radio.tail_j
        stats.energy_source = agent.energy_source
        stats.target_version = self.rounds.target_version
        agent.last_target_version = self.rounds.target_version or agent.last_target_version
        stats.replica = self.rounds.replica or ""

    # -- the session's messages ------------------------------------------------------------------
    def send(self, msg) -> None:
        self.sent_connects = self.link.connects
        self.agent.send_round(msg, self.rounds.replica)

    def open_message(self, resync: bool) -> wire.Open:
        """An OPEN with the committed text, under the round number Rounds.opening() gave it."""
        agent, stated = self.agent, self.stated
        by_hash = self.grammar_hash in agent.grammars_held
        prompts = [(a, min(b, stated)) for a, b in self.prompts if a < stated]
        return wire.Open(self.rounds.session, self.rounds.open_seq, self.committed[:stated], self.params,
                         agent.contract, resync, self.policy.early_exit, agent.draft_name,
                         self.grammar_hash, "" if by_hash else self.grammar, self.prompt_len if self.grammar else 0,
                         None if prompts == [(0, stated)] else prompts)

    def begin(self) -> None:
        """OPEN the session; or, for a conversation's next turn, send the replica that kept it
        only the new tokens (its next round finds out whether they took, and resyncs if not).
        A kept session this request does not continue is closed."""
        if self.shared:
            base = self.shared
            self.send(wire.Extend(self.rounds.session, self.rounds.next_round(), base, self.committed[base:],
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
        if keep and self.rounds.replica is not None and not self.unverified and self.stats.exact_targets is not None:
            self.agent.kept = Kept(self.rounds, list(self.committed), self.params, self.policy.early_exit,
                                   self.stats.exact_targets, self.prompts, self.stopped)
        else:
            self.send(wire.Close(self.rounds.session, self.rounds.next_round()))

    # -- the text ----------------------------------------------------------------------------------
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

    # -- the exchanges: device/rounds.py decides, this performs --------------------------------
    def new_exchange(self, pending, can_draft: bool = False, attempt: int = 0) -> Exchange:
        return Exchange(self.rounds, pending, self.faults, self.stats, self.agent.round_timer, self.vocab_size,
                        time.monotonic(), can_draft=can_draft, alone=self.alone, attempt=attempt)

    def exchange(self, ex: Exchange, ahead: Ahead | None = None):
        """Perform `ex`'s actions and feed it what happens: yields each answer it delivers (a
        VERDICT ends it; a stream's TOKENS go on), returns when it says to ask again."""
        todo = deque(ex.start(time.monotonic()))
        while True:
            while todo:
                act = todo.popleft()
                if act.kind == DELIVER:
                    if self.grammar_hash:  # the verifier took the grammar: later OPENs name it by hash
                        self.agent.grammars_held.add(self.grammar_hash)
                    yield act.arg
                elif act.kind == ASK_AGAIN:
                    return
                else:
                    todo.extend(self.act(ex, act, ahead))
            todo.extend(self.next_event(ex, ahead))

    def act(self, ex: Exchange, act, ahead: Ahead | None) -> list:
        """Perform one of `ex`'s actions other than DELIVER and ASK_AGAIN; the actions it leads to."""
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
        elif act.kind == SEND_GRAMMAR:
            self.agent.grammars_held.discard(self.grammar_hash)
        elif act.kind == AWAIT_BROKER:
            back = self.link.connected.wait(max(0.0, act.arg - time.monotonic()))
            now = time.monotonic()
            return ex.on_broker_back(now) if back else ex.on_silence(BROKER_LOST, now)
        elif act.kind == REFUSE:
            raise Refused(act.arg.code, act.arg.text)
        elif act.kind == DRAFT_ALONE:
            raise DraftAlone(act.arg)
        elif act.kind == FAIL:
            raise self.failure(act.arg)
        return []

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
                if self.rounds.replica is not None and self.rounds.replica in agent.offline_replicas:
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


class Streaming:
    """The stream-and-prefill part of a request: the verifier decodes alone and streams each
    token (cloud-ar, and an adaptive request's streamed stretches) while the draft's cache may be
    prefilled behind the stream, on a thread, for the rounds after it."""

    def __init__(self, req: Request):
        self.req, self.agent = req, req.agent
        self.failures = 0  # streams asked again in a row (the exchange's attempt)
        self.stalled = 0  # stream answers in a row that added no token
        self.prefill: threading.Thread | None = None  # the draft's prefill behind a stream
        self.prefill_done: tuple[float, BaseException | None] | None = None  # (seconds, error) when it ends
        self.draft_started = False

    def run_autoregressive(self) -> None:
        """cloud-ar: the verifier decodes alone and streams every token as it is made."""
        while not self.req.done:
            self.phase()

    def phase(self, leave=None) -> bool:
        """One GENERATE for the rest of the request and its stream, until the request is done, the
        stream is to be asked again, or `leave()`, asked after each new token, says so: True then.
        The next round's message ends the stream on the verifier, whatever it still had in flight."""
        req, scheduler, link = self.req, self.agent.scheduler, self.req.link
        req.rounds.next_round()
        request = wire.Generate(req.rounds.session, req.rounds.seq, len(req.committed), req.max_new - req.generated,
                                req.rounds.text_hash())
        last = None  # (when, bytes sent, bytes received) at the last message that brought tokens
        for msg in self.stream(request):
            # `start` is the absolute position of the first token: duplicates are dropped,
            # and after a gap (a lost message) we ask again from what we hold.
            have = len(req.committed)
            fresh = msg.tokens[have - msg.start:] if msg.start <= have else []
            fresh_logprobs = msg.logprobs[have - msg.start:] if msg.logprobs and msg.start <= have else None
            self.stalled = 0 if fresh else self.stalled + 1
            if self.stalled >= MAX_STALLED:
                raise VerifierUnavailable(f"the verifier's stream added no token in {self.stalled} answers in a "
                                          f"row; {req.generated} tokens committed and kept")
            if msg.start > have:
                break
            if fresh:
                now = time.perf_counter()
                if last is not None:  # the first also waited for the request and, maybe, a prefill
                    scheduler.observe_stream(now - last[0], len(fresh), link.bytes_sent - last[1],
                                             link.bytes_received - last[2])
                last = (now, link.bytes_sent, link.bytes_received)
            req.stats.target_passes += len(fresh)
            before = req.generated
            req.emit(fresh, logprobs=fresh_logprobs)
            # What the stream added to the answer: not its stop token, nor tokens past max_tokens
            # (counting those put the held-out long prompts' streamed share at 1.011).
            req.stats.streamed_tokens += req.generated - before
            if msg.done or req.done:
                break
            if fresh and leave is not None and leave():
                return True
        return False

    def stream(self, request: wire.Generate):
        """Tokens messages answering `request`; returns early (to be re-asked) on a timeout."""
        ex = self.req.new_exchange(request, attempt=self.failures)
        try:
            yield from self.req.exchange(ex)
        finally:
            self.failures = ex.attempt

    def leave(self) -> bool:
        """Asked after each streamed token: switch to speculation now? Only where speculation could
        pay at all (else the draft is not even prefilled), once the draft is ready, and when the
        scheduler says it pays, or after probe_stream_tokens streamed tokens (a round teaches the
        estimators what a stream cannot)."""
        req, scheduler = self.req, self.agent.scheduler
        remaining, objective = req.max_new - req.generated, req.objective()
        if not scheduler.can_pay(remaining, objective):
            return False
        if not self.draft_started and self.prefill is None:
            if not scheduler.prefill_in_time(len(req.committed), remaining):
                return False
            self.prefill_behind()
        if self.prefill is not None and self.prefill.is_alive():
            return False
        return scheduler.probe_due or scheduler.mode(remaining, True, objective) == SPECULATE

    # -- the draft's prefill -------------------------------------------------------------------
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
        stats = self.req.stats
        stats.draft_s += seconds
        stats.draft_prefill_s += seconds
        self.agent.meter.note_busy(seconds)
        stats.draft_reused_tokens = getattr(self.agent.engine, "reused", 0)  # a test wrapper may not say
        self.draft_started = True

    def prefill_behind(self) -> None:
        """Prefill the draft on a thread while the cloud streams (both engines release the GIL)."""
        committed = list(self.req.committed)

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
            self.agent.engine.commit(self.req.committed)
        elif not self.draft_started:
            self.count_prefill(self.prefill_draft(self.req.committed))


class Speculation:
    """The speculative-round part of a request: each round drafts (a prompt lookup's proposal,
    the model's, or what was drafted ahead while the last round was verified), sends the DRAFT,
    waits for the verdict (drafting ahead meanwhile where pipelined), commits it and teaches the
    scheduler what the round cost. An adaptive request streams where the scheduler says that pays
    (Streaming), and comes back when speculating does."""

    def __init__(self, req: Request):
        self.req, self.agent, self.engine = req, req.agent, req.agent.engine
        self.sources = self.agent.cfg.draft.source_list()  # model, lookup, or lookup then model
        self.uses_model = "model" in self.sources  # prompt lookup alone never runs the draft model
        self.rng = np.random.default_rng([req.params.seed, req.rounds.session])
        self.carried: Drafted | None = None  # drafted ahead during the last round, its bet held
        self.first_round = True  # the first round (and a resync's) also waits for the verifier's prefill

    def run(self) -> None:
        req, scheduler, streaming = self.req, self.agent.scheduler, self.req.streaming
        # An adaptive request starts streaming, so its first token comes as soon as the cloud alone
        # would give it, unless measured rounds say speculating pays from the start (start_mode);
        # the scheduler then switches between streaming and speculating as costs say.
        # (Not under a grammar: forced tokens and masks are the speculative rounds' own.)
        streams = req.policy.stream and req.constraint is None and self.uses_model
        streamed = streams and scheduler.start_mode(req.max_new, req.objective()) == STREAM
        if self.uses_model and not streams:
            streaming.draft_ready()
        after_stream = streams and not streamed  # a speculating start is probed as a round after a stream
        while True:
            if req.force() and self.uses_model:
                self.engine.commit(req.committed)  # the draft goes on after the forced tokens
            if req.done:
                break
            if streams and not streamed and not after_stream and scheduler.mode(
                    req.max_new - req.generated, False, req.objective()) == STREAM:
                streamed, self.carried = True, None
            if streamed:
                req.enter(STREAM)
                if streaming.phase(streaming.leave):
                    streamed, self.first_round, after_stream = False, False, True
                continue
            if streams:
                req.enter(SPECULATE)
            if self.uses_model:
                streaming.draft_ready(after_stream)
            self.round(probe=after_stream)
            after_stream = False

    def round(self, probe: bool) -> None:
        """One round: draft, send, wait (drafting ahead where pipelined), commit the verdict."""
        req, meter, link, stats = self.req, self.agent.meter, self.req.link, self.req.stats
        draft_len, keep_going, pipelined = self.plan_round(probe)
        t0, e0, sent0, recv0 = time.perf_counter(), meter.energy_j(), link.bytes_sent, link.bytes_received
        resyncs = stats.resyncs
        drafted = self.draft(draft_len, keep_going, self.carried)
        t1 = time.perf_counter()
        meter.note_busy(t1 - t0)
        e1 = meter.energy_j()
        stats.draft_s += t1 - t0
        req.rounds.next_round()
        draft = drafted.tokens
        ahead = self.ahead_of(drafted, keep_going) if pipelined else None
        hints = stats.hints, stats.hints_agreed
        try:
            verdict = self.round_trip(self.draft_message(drafted), ahead)
        except DraftAlone:
            self.go_alone(draft)
            self.carried = None
            return
        req.alone = False
        t2 = time.perf_counter()
        if verdict.accepted > len(draft):
            raise RequestFailed(f"verdict accepts {verdict.accepted} of {len(draft)} drafted tokens")
        stats.wait_s += t2 - t1
        stats.record_round(len(draft), verdict.accepted, t2 - t1, verdict.verify_us / 1e6,
                           t0 - req.start_s, drafted.source)
        if ahead is not None:
            meter.note_busy(ahead.seconds)
            stats.ahead_s += ahead.seconds
            stats.ahead_tokens += ahead.tokens
        self.observe(drafted, verdict, ahead, (t0, t1, t2), (e0, e1), (sent0, recv0), stats.resyncs > resyncs)
        req.emit(draft[: verdict.accepted] + [verdict.next_token], logprobs=verdict.logprobs)
        self.carried = None
        if ahead is None:
            if self.uses_model:
                self.engine.commit(req.committed)
        elif not req.done:
            self.carried = self.resolve_ahead(ahead, verdict, len(draft), hints)
        self.first_round = False

    def observe(self, drafted: Drafted, verdict: wire.Verdict, ahead: Ahead | None, times, energies,
                bytes0, resynced: bool) -> None:
        """Every policy's rounds teach the estimators (the device's own traffic, whoever planned
        it); the first round (and a resync's) also waits for the verifier to prefill: not a
        round's costs. `times`: (drafting began, sent, verdict came); `energies`: the meter's at
        the first two; `bytes0`: the link's (sent, received) when drafting began."""
        scheduler, meter, link = self.agent.scheduler, self.agent.meter, self.req.link
        (t0, t1, t2), (e0, e1) = times, energies
        busy_s = drafted.seconds or (t1 - t0)
        scheduler.observe_round(drafted.confidences, verdict.accepted, busy_s, verdict.verify_us / 1e6,
                                t2 - t1, link.bytes_sent - bytes0[0], link.bytes_received - bytes0[1],
                                cold=self.first_round or resynced, source=drafted.source)
        modelled = drafted.tokens and drafted.source == "model" and t1 > t0  # a lookup burns no drafting power
        scheduler.observe_power((e1 - e0) / (t1 - t0) if modelled else None,
                                None if ahead and ahead.seconds else (meter.energy_j() - e1) / (t2 - t1))

    def go_alone(self, draft: list[int]) -> None:
        """The fault policy's `draft`: commit the draft unverified (as far as the limit allows)."""
        req = self.req
        req.emit(draft[: req.faults.unverified_max_tokens - req.stats.unverified_tokens], verified=False)
        req.alone = True
        if self.uses_model:
            self.engine.commit(req.committed)

    def plan_round(self, probe: bool):
        """(the most tokens to draft, the scheduler's keep-drafting test or None, whether to draft
        ahead during the wait) for this round; `probe`: draft at least one token."""
        req, scheduler = self.req, self.agent.scheduler
        policy = req.policy
        draft_len = policy.next_draft_len(req.max_new - req.generated)
        pipelined = policy.pipelined and self.uses_model and req.constraint is None
        if not policy.adaptive:
            return draft_len, None, pipelined
        draft_len = min(draft_len, scheduler.draft_cap)  # the device's cap: the scheduler's to say
        objective = req.objective()
        pipelined = pipelined and scheduler.pipelining_pays(objective)  # +pipelined allows it; costs decide
        return draft_len, scheduler.planner(draft_len, objective, pipelined, probe=probe), pipelined

    def ahead_of(self, drafted: Drafted, keep_going) -> Ahead:
        """Drafting ahead while `drafted` is verified, on the bet that all of it holds."""
        req, policy = self.req, self.req.policy
        next_draft_len = lambda accepted: policy.next_draft_len(req.max_new - req.generated - accepted - 1)
        ahead = Ahead(self.engine, list(req.committed), list(drafted.tokens), req.params, self.rng,
                      req.stop_ids, next_draft_len, keep_going)
        if policy.adaptive and policy.early_exit:
            ahead.follow_hints = self.agent.scheduler.follow_hint(drafted.confidences)
        return ahead

    def resolve_ahead(self, ahead: Ahead, verdict: wire.Verdict, drafted: int, hints: tuple[int, int]):
        """The block drafted ahead if its bet held (else None); the bet and a hint, if one came
        (`hints`: the hint counts before the round), teach the scheduler how often they hold."""
        scheduler, stats = self.agent.scheduler, self.req.stats
        carried = ahead.resolve(verdict.accepted, verdict.next_token, self.req.committed)
        if carried is not None:
            stats.ahead_hits += 1
            stats.ahead_kept += len(carried.tokens)
        if stats.hints > hints[0]:
            scheduler.observe_hint(stats.hints_agreed > hints[1])
        if ahead.branch is not None and ahead.branch[0] == drafted == verdict.accepted:
            scheduler.observe_bet(carried is not None)  # all were accepted: the guess decided
        return carried

    def draft_message(self, drafted: Drafted) -> wire.Draft:
        """This round's DRAFT: the text the verifier holds, the forced tokens it has not been told
        of, then the draft."""
        req = self.req
        message = wire.Draft(req.rounds.session, req.rounds.seq, req.stated, drafted.tokens, drafted.q,
                             req.rounds.text_hash(), list(req.unsent))
        if drafted.q is not None and drafted.tokens:
            # The naive baseline ships each drafted token's full distribution (fp16 over the
            # vocabulary) instead of its sparse q: counted, never sent.
            req.stats.q_wire_bytes += len(wire.encode(message)) - len(wire.encode(replace(message, q=None)))
            req.stats.dense_q_bytes += 2 * req.vocab_size * len(drafted.tokens)
        return message

    def round_trip(self, msg: wire.Draft, ahead: Ahead | None = None) -> wire.Verdict:
        """Send a draft and wait for its verdict; `ahead` drafts during the wait, between messages."""
        req = self.req
        return next(req.exchange(req.new_exchange(msg, bool(msg.tokens)), ahead))

    def draft(self, draft_len: int, keep_going, carried: Drafted | None) -> Drafted:
        """This round's draft: what was drafted ahead (if its bet held), extended up to `draft_len`;
        else a prompt lookup's proposal where [draft] sources puts one first; else the model's."""
        req, engine = self.req, self.engine
        if carried is None and self.sources[0] == "lookup":
            looked_up = self.look_up(draft_len)
            if looked_up is not None or not self.uses_model:
                return looked_up or Drafted.empty(req.params)
        if carried is None:
            if req.constraint is not None:  # (a test's engine wrapper may not take the keyword)
                return engine.draft(draft_len, req.params, self.rng, req.stop_ids, keep_going,
                                    constraint=req.constraint)
            return engine.draft(draft_len, req.params, self.rng, req.stop_ids, keep_going)
        if len(carried.tokens) > draft_len:  # the request is nearly done: drop the tail
            carried = carried.cut(draft_len)
            engine.commit(req.committed + carried.tokens)
        if (carried.tokens and carried.tokens[-1] in req.stop_ids) or len(carried.tokens) >= draft_len:
            return carried
        drafted_before = carried.confidences
        more = engine.draft(draft_len - len(carried.tokens), req.params, self.rng, req.stop_ids,
                            keep_going and (lambda confidences: keep_going(drafted_before + confidences)))
        return carried.extend(more)

    def look_up(self, draft_len: int) -> Drafted | None:
        """A prompt lookup's proposal, cut to what the grammar allows and (adaptive) to what pays."""
        req = self.req
        looked_up = lookup.drafted(req.committed, draft_len, req.params, req.stop_ids)
        if looked_up is not None and req.constraint is not None:  # what the grammar allows of it
            valid = req.constraint.valid_prefix(looked_up.tokens)
            looked_up = looked_up.cut(valid) if valid else None
        if looked_up is not None and req.policy.adaptive:  # how much of it pays, if any
            n = self.agent.scheduler.lookup_len(len(looked_up.tokens), req.objective())
            looked_up = looked_up.cut(n) if n else None
        return looked_up
