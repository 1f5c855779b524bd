"""The device's side of one session's rounds, with no I/O: messages in, actions out.

Like cloud/session.py on the verifier, this holds the state both ends must agree on and decides
what every event means; device/request.py only sends, waits and drafts as the actions say.

`Rounds` holds a session's state: its id, the round number (seq) and that of the latest OPEN, the
replica that holds the session and its target version, and the committed text's hash
(wire.TextHasher). It decides whether a verifier's message is malformed in meaning (`check`),
what it is for this session (`classify`), whether a verdict was computed over the device's own
text (`text_matches`), what an ERROR asks for (`error_action`) and what the fault policy says
when a message goes unanswered (`fault_action`).

`Exchange` is one message (a DRAFT, or a GENERATE and its stream) until its answer: every try,
OPEN, resync, failover, retry count and deadline. Its events are `on_payload` (bytes from the
session's inbox), `on_silence` (the deadline passed, the replica went offline, the broker is
down), `on_broker_back` and `on_reconnected`; each returns the actions to perform, in order.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, replace

from specedge.protocol import wire
from specedge.config import TOPIC_NAME
from specedge.speculative import SamplingParams


def replica_name_ok(name: str) -> bool:
    """A replica's name becomes a topic level (draft/{replica}): a verifier id as config allows it."""
    return TOPIC_NAME.fullmatch(name) is not None


def token_out_of_range(msg, vocab_size: int) -> int | None:
    """A token id in a verifier's message that the vocabulary lacks, or None."""
    if isinstance(msg, (wire.Verdict, wire.Hint)):
        ids = [msg.next_token]
    elif isinstance(msg, wire.Tokens):
        ids = msg.tokens
    else:
        return None
    return next((t for t in ids if not 0 <= t < vocab_size), None)


# What classify() makes of a decoded message:
BOUND = "bound"  # OPENED answering our latest OPEN: the session lives on that replica now
MOVED = "moved"  # OPENED of our replica: it moved the session to another target version
OTHER_OPENED = "other opened"  # OPENED of no interest (another replica's, a late one): ignored
STALE = "stale"  # another session's or another round's
ERROR = "error"  # an ERROR for this round (or for our OPEN while no replica holds the session)
CURRENT = "current"  # a message of this round: the caller decides if it is the one it waits for

# What error_action() says:
RESYNC = "resync"  # OPEN again with the committed text (UNKNOWN_SESSION, OUT_OF_SYNC, UNKNOWN_GRAMMAR)
REFUSED = "refused"  # the request fails with the verifier's reason

# What an Exchange is told when nothing came (on_silence's cause):
TIMEOUT = "timeout"  # the deadline passed
REPLICA_LOST = "replica lost"  # the replica holding the session went offline
BROKER_LOST = "broker lost"  # the connection to the broker is down

# What fault_action() says when a message went unanswered:
RETRY = "retry"  # worth another try (after the broker is back, for a broker loss)
DRAFT_ALONE = "draft alone"  # go on with the draft alone, its tokens marked unverified
FAIL = "fail"  # the request fails, its committed text kept


@dataclass
class Classified:
    kind: str
    msg: object


class Rounds:
    def __init__(self, session: int, prompt: list[int]):
        self.session = session
        self.seq = 0
        self.open_seq = 0  # the round number of our latest OPEN
        self.replica: str | None = None  # the verifier replica holding this session
        self.target_version = ""
        self.hasher = wire.TextHasher(prompt)  # the committed text's hash, stated in every round

    # -- state changes ------------------------------------------------------------------------
    def next_round(self) -> int:
        self.seq += 1
        return self.seq

    def opening(self) -> int:
        """An OPEN goes out under the current round number; its OPENED will name it."""
        self.open_seq = self.seq
        return self.seq

    def reopening(self) -> int:
        """A resync's OPEN: the round number jumps by a secret random step, so no one who saw
        the session's earlier rounds can name this OPEN in advance. A broken replica that
        answers every message with forged refusals and claims "for the next rounds" (the fault
        suite's wrong-answers) could otherwise hit it, and a refusal of an OPEN is final."""
        self.seq += 1 + secrets.randbelow(1 << 16)
        return self.opening()

    def unbind(self) -> None:
        """The replica is lost or out of sync: the next OPEN goes to the whole group."""
        self.replica = None

    def commit(self, tokens: list[int]) -> None:
        self.hasher.update(tokens)

    def rebase(self, text: list[int]) -> None:
        """The committed text is now `text`: a conversation's next turn in this session."""
        self.hasher = wire.TextHasher(text)

    def text_hash(self) -> bytes:
        return self.hasher.digest()

    # -- messages in --------------------------------------------------------------------------
    @staticmethod
    def check(msg, vocab_size: int) -> tuple[str, str] | None:
        """(kind, why) if a well-formed message says what no verifier of ours may: such a message
        is dropped as a malformed one would be, and its round asked again."""
        if isinstance(msg, wire.Opened) and not replica_name_ok(msg.replica):
            return "bad_replica", f"replica name {msg.replica!r} is not 1-64 of [A-Za-z0-9_-]"
        token = token_out_of_range(msg, vocab_size)
        if token is not None:
            return ("token_out_of_range",
                    f"{type(msg).__name__} names token {token}, outside the vocabulary of {vocab_size}")
        return None

    def classify(self, msg) -> Classified:
        """What `msg` (decoded and checked) is to this session; an OPENED that binds the session
        or moves it to another version is applied here."""
        if isinstance(msg, wire.Opened) and msg.session == self.session:
            if msg.seq == self.open_seq and self.replica is None:  # the answer to our OPEN
                self.replica, self.target_version = msg.replica, msg.version
                return Classified(BOUND, msg)
            if msg.replica == self.replica:  # our replica moved the session to another version
                self.target_version = msg.version
                return Classified(MOVED, msg)
            return Classified(OTHER_OPENED, msg)
        # A refusal of our OPEN carries the OPEN's round number.
        answers_open = isinstance(msg, wire.Error) and self.replica is None and msg.seq == self.open_seq
        if msg.session != self.session or (msg.seq != self.seq and not answers_open):
            return Classified(STALE, msg)
        return Classified(ERROR if isinstance(msg, wire.Error) else CURRENT, msg)

    @staticmethod
    def text_matches(reply, sent) -> bool:
        """Whether a VERDICT or HINT answering `sent` (a DRAFT of this round, same committed
        length) was computed over the same committed text: its hash is the DRAFT's. One that is
        not would extend another text while marked verified; the device resyncs instead."""
        return reply.text_hash == sent.text_hash

    @staticmethod
    def error_action(err: wire.Error) -> str:
        if err.code in (wire.ErrorCode.UNKNOWN_SESSION, wire.ErrorCode.OUT_OF_SYNC, wire.ErrorCode.UNKNOWN_GRAMMAR):
            return RESYNC
        return REFUSED

    @staticmethod
    def fault_action(faults, broker: bool, attempt: int, waited_s: float, alone: bool, can_draft: bool,
                     unverified: int) -> str:
        """A message went unanswered on its `attempt`-th try, `waited_s` after the wait began
        (`broker`: the broker connection is down, else no verdict came): what the fault policy
        (docs/faults.md) says. `alone`: the last round already went on without the target, so
        this failure needs no retries before the policy applies."""
        policy = faults.on_broker_loss if broker else faults.on_verifier_loss
        if broker or alone or attempt >= faults.max_retries:  # lost, not a hiccup
            if policy == "fail" or waited_s >= faults.max_wait_s:
                return FAIL
            if policy == "draft" and can_draft and unverified < faults.unverified_max_tokens:
                return DRAFT_ALONE
        return RETRY


@dataclass
class Kept:
    """A session left open on its replica after its request, for the conversation's next turn:
    that request sends only its new tokens (EXTEND) and the replica keeps its cache."""

    rounds: Rounds
    text: list[int]  # the committed text the request ended with
    params: SamplingParams
    hints: bool
    exact: bool
    prompts: list[tuple[int, int]]  # the spans of `text` that came as prompts (wire.Open.prompts)
    stopped: bool = True  # the answer ended at a stop token (not at max_tokens)

    def shared(self, prompt: list[int], params: SamplingParams, hints: bool) -> int:
        """Where a request's prompt goes on from the kept text, when the request is the
        conversation's next turn and can go on in this session (the same sampling and hints, a
        bound session, a turn more to state); 0 when it cannot. A next turn repeats the last
        request's whole prompt and goes on; a request that shares less (a system prompt, the same
        prompt again) opens afresh, so that it is the target's own generation of its text alone.
        The history is often repeated not to its last token: the chat template re-tokenizes the
        answer after its role header, and BPE may split the seam differently. It never goes on
        past what the target's own generation had fed: the answer before a stop token, or all but
        its last token when max_tokens cut it (sampled, never fed)."""
        if (params != self.params or hints != self.hints or self.rounds.replica is None
                or len(self.prompts) >= wire.MAX_PROMPTS):
            return 0
        fed = len(self.text) - (0 if self.stopped else 1)
        n, limit = 0, min(fed, len(prompt) - 1)  # at least one new token to send
        while n < limit and self.text[n] == prompt[n]:
            n += 1
        return n if n >= self.prompts[-1][1] else 0


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


# What an Exchange asks of the glue (Action.kind; Action.arg as noted):
SEND = "send"  # publish arg (the pending message under the current round) to the session's replica
OPEN = "open"  # publish an OPEN with the committed text under the current round, to the group
DROPPED = "dropped"  # count and log a dropped message: arg = (kind, why)
HINT = "hint"  # arg: a HINT over our text; drafting ahead may follow it
DELIVER = "deliver"  # arg: the answer (the VERDICT; or one TOKENS of a stream, which goes on)
ASK_AGAIN = "ask again"  # the stream ends here: the caller asks again from what it holds
AWAIT_BROKER = "await broker"  # wait for the broker until arg (monotonic s), then on_broker_back or on_silence
REFUSE = "refuse"  # arg: the verifier's ERROR: the request fails with its reason
SEND_GRAMMAR = "send grammar"  # the verifier lacks the grammar named by hash: the next OPEN carries its text
# and DRAFT_ALONE (arg: the cause) and FAIL (arg: Failure) of fault_action's vocabulary


@dataclass(frozen=True)
class Action:
    kind: str
    arg: object = None


@dataclass(frozen=True)
class Failure:
    """Why the fault policy failed the request: the glue words it with what was committed."""
    broker: bool
    cause: str
    tries: int
    waited_s: float
    policy: str


class Exchange:
    """One message until its answer, with no I/O (see the module docstring).

    pending: the DRAFT or GENERATE to deliver (its seq is set at each send). stats: the request's
    SpecStats, whose fault counters (retries, resyncs, failovers, stale messages, hints) are kept
    here. A session with no replica is bound first: the OPEN is out, and the pending message goes
    to the replica that answers. `attempt`: tries already spent (a stream's, across its re-asks)."""

    def __init__(self, rounds: Rounds, pending, faults, stats, timer: RoundTimer, vocab_size: int, now: float,
                 *, can_draft: bool = False, alone: bool = False, attempt: int = 0,
                 rng: random.Random | None = None):
        self.rounds, self.pending, self.faults, self.stats = rounds, pending, faults, stats
        self.timer, self.vocab_size, self.rng = timer, vocab_size, rng or random.Random()
        self.stream = isinstance(pending, wire.Generate)
        self.can_draft, self.alone = can_draft, alone
        self.since = now  # when the wait began: the fault policy's max_wait_s counts from here
        self.attempt = attempt  # tries of the pending message that went unanswered
        self.open_attempt = 0  # tries of the current OPEN
        self.resyncs_asked = 0  # resyncs the verifier asked for (ERROR, a verdict over another text)
        self.sent_at: float | None = None
        self.hint: wire.Hint | None = None
        self.deadline = now

    @property
    def binding(self) -> bool:
        return self.rounds.replica is None

    def backoff(self, attempt: int) -> float:
        """Jitter around an exponential timeout (capped): replays stay idempotent anyway."""
        base = self.timer.timeout_s(self.faults.round_timeout_s, self.faults.max_wait_s)
        return base * 1.5 ** min(attempt, 4) * (0.75 + 0.5 * self.rng.random())

    # -- events -------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        if self.binding:  # an OPEN is out: wait for its OPENED
            self.deadline = now + self.backoff(self.open_attempt)
            return []
        return self._send(now)

    def on_payload(self, payload: bytes, now: float) -> list[Action]:
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            return [Action(DROPPED, (exc.kind, f"dropped a bad verifier message: {exc}"))]
        problem = Rounds.check(msg, self.vocab_size)
        if problem:
            return [Action(DROPPED, (problem[0], f"dropped a verifier message: {problem[1]}"))]
        seen = self.rounds.classify(msg)
        if seen.kind in (BOUND, MOVED):
            self.stats.verified_by(msg.exact)
            self.stats.version_switches += seen.kind == MOVED
        if seen.kind == BOUND:
            return self._send(now)
        if seen.kind in (MOVED, OTHER_OPENED):
            return []
        if seen.kind == ERROR:
            if Rounds.error_action(msg) == REFUSED:
                return [Action(REFUSE, msg)]
            lacks = [Action(SEND_GRAMMAR)] if msg.code == wire.ErrorCode.UNKNOWN_GRAMMAR else []
            return lacks + self._asked_to_resync(now) + ([Action(ASK_AGAIN)] if self.stream else [])
        if seen.kind == STALE or self.binding or not self._wanted(msg):
            self.stats.stale_messages += 1
            return []
        return self._answer(msg, now)

    def on_silence(self, cause: str, now: float) -> list[Action]:
        """Nothing came by the deadline (TIMEOUT), the replica went offline (REPLICA_LOST) or the
        broker connection is down (BROKER_LOST)."""
        broker = cause == BROKER_LOST
        given_up = self._policy(cause, self.open_attempt if self.binding else self.attempt, now)
        if given_up:
            return given_up
        self.stats.retries += 1
        if self.binding:
            self.open_attempt += 1
        else:
            self.attempt += 1
        if broker:
            return [Action(AWAIT_BROKER, self.since + self.faults.max_wait_s)]
        if self.binding:
            return self._reopen(now)
        # this replica may be gone: ask the group
        return self._resync(now, failover=True) + ([Action(ASK_AGAIN)] if self.stream else [])

    def on_broker_back(self, now: float) -> list[Action]:
        if self.binding:
            return self._reopen(now)
        return [Action(ASK_AGAIN)] if self.stream else self._send(now)

    def on_reconnected(self, now: float) -> list[Action]:
        """The connection came back since the last send: what was sent may have died with it."""
        if self.binding:
            return self._reopen(now, wait=False)
        return [Action(SEND, replace(self.pending, seq=self.rounds.seq))]

    # -- the rules ----------------------------------------------------------------------------
    def _wanted(self, msg) -> bool:
        if self.stream:
            return isinstance(msg, wire.Tokens)
        return isinstance(msg, (wire.Verdict, wire.Hint)) and msg.committed == self.pending.committed

    def _answer(self, msg, now: float) -> list[Action]:
        if self.stream:  # each TOKENS restarts the wait
            self.attempt, self.since = 0, now
            self.deadline = now + self.backoff(0)
            return [Action(DELIVER, msg)]
        if not Rounds.text_matches(msg, self.pending):
            # The replica answers for another text of the same length (a late verdict of a stale
            # draft moved it, say): never taken as verified. A verdict resyncs it.
            dropped = Action(DROPPED, ("text_mismatch", f"dropped a {type(msg).__name__} over another "
                                                        f"committed text of {msg.committed} tokens"))
            return [dropped] if isinstance(msg, wire.Hint) else [dropped] + self._asked_to_resync(now)
        if isinstance(msg, wire.Hint):
            self.hint = msg
            return [Action(HINT, msg)]
        if self.hint is not None:
            self.stats.hints += 1
            self.stats.hints_agreed += (self.hint.accepted, self.hint.next_token) == (msg.accepted, msg.next_token)
            self.stats.hint_layer = self.hint.layer
        if self.attempt == 0 and self.sent_at is not None:
            self.timer.observe(now - self.sent_at)
        return [Action(DELIVER, msg)]

    def _send(self, now: float) -> list[Action]:
        self.sent_at = now
        self.deadline = now + self.backoff(self.attempt)
        return [Action(SEND, replace(self.pending, seq=self.rounds.seq))]

    def _reopen(self, now: float, wait: bool = True) -> list[Action]:
        """OPEN again with the committed text, under the next round number."""
        self.rounds.reopening()
        if wait:
            self.deadline = now + self.backoff(self.open_attempt)
        return [Action(OPEN)]

    def _asked_to_resync(self, now: float) -> list[Action]:
        """An ERROR or a verdict over another text asks for a resync. A verifier that keeps asking
        (a resync loop) counts as lost after max_retries of them in one exchange: the fault policy
        decides, and under `wait` it fails the request once max_wait_s has passed."""
        self.resyncs_asked += 1
        if self.resyncs_asked > self.faults.max_retries:
            given_up = self._policy("resync loop", self.resyncs_asked - 1, now)
            if given_up:
                return given_up
        return self._resync(now)

    def _policy(self, cause: str, attempt: int, now: float) -> list[Action]:
        """The fault policy's FAIL or DRAFT_ALONE for a message lost on its `attempt`-th try
        (0-based) by `cause`; [] when it is worth trying again."""
        broker = cause == BROKER_LOST
        waited = now - self.since
        action = Rounds.fault_action(self.faults, broker, attempt, waited, self.alone, self.can_draft,
                                     self.stats.unverified_tokens)
        if action == FAIL:
            policy = self.faults.on_broker_loss if broker else self.faults.on_verifier_loss
            return [Action(FAIL, Failure(broker, cause, attempt + 1, waited, policy))]
        if action == DRAFT_ALONE:
            return [Action(DRAFT_ALONE, cause)]
        return []

    def _resync(self, now: float, failover: bool = False) -> list[Action]:
        """Rebuild the session from the committed text on whichever replica of the group answers.
        A new round number: nothing the previous replica still sends can be taken for the new one's."""
        self.stats.failovers += failover
        self.stats.resyncs += 1
        self.rounds.unbind()
        self.open_attempt = 0
        return self._reopen(now)
