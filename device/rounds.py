"""The device's side of one session's rounds, with no I/O: messages in, decisions out.

Like cloud/session.py on the verifier, this holds the state both ends must agree on and decides
what an incoming message means; device/agent.py does the waiting, sending and drafting around it.
Held here: the session id, the round number (seq) and that of the latest OPEN, the replica that
holds the session and its target version, and the committed text's hash (wire.TextHasher). Decided
here: whether a verifier's message is malformed in meaning (`check`), what it is for this
session (`classify`), whether a verdict was computed over the device's own text
(`text_matches`), what an ERROR asks for (`error_action`) and what the fault policy says when a
round goes unanswered (`fault_action`).
"""
from __future__ import annotations

from dataclasses import dataclass

from specedge import wire
from specedge.config import TOPIC_NAME


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
RESYNC = "resync"  # OPEN again with the committed text (UNKNOWN_SESSION, OUT_OF_SYNC)
REFUSED = "refused"  # the request fails with the verifier's reason

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

    def unbind(self) -> None:
        """The replica is lost or out of sync: the next OPEN goes to the whole group."""
        self.replica = None

    def commit(self, tokens: list[int]) -> None:
        self.hasher.update(tokens)

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
        if err.code in (wire.ErrorCode.UNKNOWN_SESSION, wire.ErrorCode.OUT_OF_SYNC):
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
