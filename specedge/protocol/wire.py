"""The wire: a versioned, compact, bounded binary encoding of every message.

Layout (little-endian), documented in docs/protocol.md:
    header  = version u8 | type u8 | session u32 | seq u32      (10 bytes)
    body    = per type, every length field bounded, no trailing bytes.
Decoding never trusts a length: sizes are checked before anything is allocated.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from specedge.protocol.contract import Contract
from specedge.speculative import MAX_TOP_LOGPROBS, Q_ONE, SamplingParams, SparseDist, TokenLogprob

PROTOCOL_VERSION = 11  # 3: OPEN states the draft and its contract, OPENED names replica and version;
# 4: OPENED says whether that version passed its bitwise self-test on the verifier's machine;
# 5: DRAFT, GENERATE, VERDICT and HINT carry a hash of the committed text beside its length;
# 6: a tighter round: 4-byte session ids (a session is named per device), DRAFT's token count
#    and q flag in one byte, VERDICT's verify time in 100 µs units (u16); rounds at QoS 0;
# 7: answers on a short topic of their own (topics.answers), not under the device's topics;
# 8: EXTEND: the next turn of a conversation appends only its new tokens to a session kept open;
# 9: OPEN may name a grammar (structured output; by hash, its text when the verifier may lack
#    it: else UNKNOWN_GRAMMAR), and DRAFT the tokens it forced (type 6)
# 10: OPEN may state which spans of its text came as prompts (a resync of generated tokens, a
#    conversation's turns): the verifier processes them as the target's own generation did
# 11: OPEN may ask for coupled sampling (a request's seed: each position sampled with noise of
#    (seed, position) alone, reproducible; its drafts carry no q) and for the target's logprobs,
#    which its VERDICTs and TOKENS then carry
LOGPROB = struct.Struct("<fB")  # an answered token's logprob, how many top (id, logprob) follow
TOP_LOGPROB = struct.Struct("<If")
MAX_PAYLOAD = 256 * 1024  # bytes; OPEN with MAX_CONTEXT tokens fits
MAX_PACKET = MAX_PAYLOAD + 4096  # an MQTT packet carrying it: framing and topic besides
MAX_CONTEXT = 32768  # tokens in OPEN
MAX_DRAFT = 64  # drafted tokens per DRAFT
MAX_FORCED = 255  # forced tokens per DRAFT
MAX_Q_ENTRIES = 255  # (id, count) pairs per drafted token
MAX_STREAM = 1024  # tokens per TOKENS message
MAX_TOKEN_ID = (1 << 24) - 1
MAX_ERROR_TEXT = 255
MAX_NAME = 64  # bytes of a draft, replica or target-version name
MAX_PROMPTS = 255  # prompt spans an OPEN states: a conversation of more turns opens afresh
# Round messages (everything here) travel at MQTT QoS 0: a round is its own acknowledgement (every
# DRAFT, GENERATE and OPEN is answered, and re-sent when its answer does not come), so QoS 1's
# packet ids and PUBACKs would only repeat it. QoS 0 also lets the device send them by topic alias.
ROUND_QOS = 0

HEADER = struct.Struct("<BBII")  # version, type, session, seq
MAX_SESSION = (1 << 32) - 1  # session ids are random per request, and sessions are named per device
HASH_BYTES = 8
TEXT_AND_COUNT = struct.Struct("<I8sI")  # a position, a hash, a count: GENERATE's, EXTEND's, OPEN's grammar
NO_HASH = bytes(HASH_BYTES)  # what a message built without one states: it matches no text
MAX_GRAMMAR = 64 * 1024  # bytes of grammar text in an OPEN


def grammar_hash(text: str) -> bytes:
    """The name an OPEN gives a grammar (specedge/grammar.py), so a verifier that holds it compiled
    takes it by name alone."""
    return hashlib.blake2b(text.encode(), digest_size=HASH_BYTES, person=b"specedge-gram").digest()


class TextHasher:
    """The committed text's hash, kept up to date as tokens are committed: 8 bytes of BLAKE2b over
    the token ids as little-endian u32, streamed, so it costs O(new tokens) per round and does
    not depend on how the text was split into rounds. Both ends keep one per session; a message
    that states a committed length states this hash of those tokens beside it, and a mismatch is
    OUT_OF_SYNC: two texts of one length never pass for each other."""

    def __init__(self, tokens=()):
        self._h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"specedge-text")
        self.length = 0
        self.update(tokens)

    def update(self, tokens) -> None:
        if len(tokens):
            self._h.update(np.asarray(tokens, dtype="<u4").tobytes())
            self.length += len(tokens)

    def digest(self) -> bytes:
        return self._h.digest()


def text_hash(tokens) -> bytes:
    """The hash of a whole text at once (what TextHasher holds after the same tokens)."""
    return TextHasher(tokens).digest()


class WireError(ValueError):
    """A payload that cannot be decoded. `kind` names the failure for metrics."""

    kind = "malformed"


class Truncated(WireError):
    kind = "truncated"


class Oversized(WireError):
    kind = "oversized"


class UnsupportedVersion(WireError):
    kind = "unsupported_version"


class UnknownType(WireError):
    kind = "unknown_type"


class ErrorCode:
    UNKNOWN_SESSION = 1  # verifier has no state for this session: send OPEN (resync)
    OUT_OF_SYNC = 2  # committed length disagrees: send OPEN (resync)
    BAD_REQUEST = 3
    UNSUPPORTED_VERSION = 4
    INCOMPATIBLE = 5  # draft and target do not share a tokenizer
    OVERLOADED = 6
    INTERNAL = 7
    UNKNOWN_GRAMMAR = 8  # an OPEN named its grammar by hash alone, and this verifier lacks it: OPEN with the text


@dataclass
class Open:
    """Device -> verifier: start (or resync) a session from the committed tokens."""

    session: int
    seq: int
    tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    contract: Contract = field(default_factory=Contract.unchecked)  # the verifier refuses a mismatch
    resync: bool = False
    hints: bool = False  # ask for early-exit hints (when the verifier has an exit head)
    draft: str = ""  # the draft model's name: acceptance is tracked per (draft, target version)
    # Structured output (specedge/grammar.py): the grammar constraining the tokens from position
    # `grammar_from` on (the prompt's end; a resync's OPEN states generated tokens too), named by
    # its hash; its text rides along unless the verifier is known to hold it compiled (a verifier
    # that does not answers UNKNOWN_GRAMMAR, and the device opens again with the text).
    grammar_hash: bytes = b""  # empty: no grammar
    grammar: str = ""  # the text, or "" when sent by hash alone
    grammar_from: int = 0
    # The spans [start, end) of `tokens` that came as prompts, the rest generated (a resync's
    # text, a conversation's turns); None: all of them, a new session's prompt.
    prompts: list[tuple[int, int]] | None = None
    TYPE = 1
    # flags (resync | hints << 1 | grammar << 2 | prompts << 3 | coupled << 4), temperature, top_k, top_p, seed,
    # the contract (tokenizer hash, vocabulary size, special tokens' hash, chat template's hash),
    # token count; then the draft's name and the tokens; with a grammar, GRAMMAR and its text
    # (UTF-8); with prompts, their count (u8) and each span's start and end (u32 each)
    BODY = struct.Struct("<BfIfQ8sI8s8sI")
    GRAMMAR = TEXT_AND_COUNT  # grammar_from, the grammar text's hash (grammar_hash), its length
    SPAN = struct.Struct("<II")


@dataclass
class Opened:
    """Verifier -> device: the session lives on `replica`, verified by target `version`. Sent for
    every OPEN and whenever the session moves to another target version; the device addresses
    its drafts to that replica from then on. `exact`: that version passed the bitwise self-test
    (specedge.exactness) on the verifier's machine, so greedy output is the target's own decoding."""

    session: int
    seq: int
    replica: str
    version: str
    exact: bool = False
    TYPE = 20
    BODY = struct.Struct("<B")  # after the two names: exact


@dataclass
class Draft:
    """Device -> verifier: drafted tokens extending the first `committed` tokens."""

    session: int
    seq: int
    committed: int
    tokens: list[int]
    q: list[SparseDist] | None = None  # sampled mode: the exact draft distribution per token
    text_hash: bytes = NO_HASH  # TextHasher of those `committed` tokens
    # Tokens the grammar forced after those `committed` ones, which the device committed without a
    # round trip (grammar.py): the verifier checks and appends them, and the draft follows them.
    forced: list[int] = field(default_factory=list)
    TYPE = 2
    TYPE_FORCED = 6  # a DRAFT with forced tokens: the type says so, so a plain DRAFT pays no byte for it
    BODY = struct.Struct("<I8sB")  # committed, text_hash, token count | has q << 7; then tokens or q's
    # type 6: BODY, then the forced tokens' count (u8) and the tokens, then the drafted ones


@dataclass
class Generate:
    """Device -> verifier: plain autoregressive generation (the cloud-only baseline)."""

    session: int
    seq: int
    committed: int
    max_new_tokens: int
    text_hash: bytes = NO_HASH  # TextHasher of those `committed` tokens
    TYPE = 3
    BODY = TEXT_AND_COUNT  # committed, text_hash, max_new_tokens


@dataclass
class Extend:
    """Device -> the replica holding the session: append `tokens` to the committed text (the next
    turn of a conversation, after its history), which must be the first `committed` tokens with
    `text_hash`. Unanswered: the next DRAFT or GENERATE states the whole text's length and hash,
    so a lost or refused EXTEND shows up there as OUT_OF_SYNC (or UNKNOWN_SESSION) and resyncs."""

    session: int
    seq: int
    committed: int
    tokens: list[int]
    text_hash: bytes = NO_HASH  # TextHasher of those `committed` tokens
    TYPE = 5
    BODY = TEXT_AND_COUNT  # committed, text_hash, token count; then the tokens


@dataclass
class Close:
    session: int
    seq: int
    TYPE = 4
    BODY = struct.Struct("<")


@dataclass
class Verdict:
    """Verifier -> device: `accepted` drafted tokens hold, then the target's `next_token`."""

    session: int
    seq: int
    committed: int
    accepted: int
    next_token: int
    verify_us: int = 0  # target compute time for this round (sent in 100 µs units, up to 6.5 s)
    text_hash: bytes = NO_HASH  # the hash of the text it extends: the DRAFT's, checked by the verifier
    # Where the session asked (SamplingParams.logprobs): one per answered token, accepted + 1.
    logprobs: list[TokenLogprob] | None = None
    TYPE = 16
    BODY = struct.Struct("<I8sBIH")  # committed, text_hash, accepted, next_token, verify time (100 µs units)


@dataclass
class Hint:
    """Verifier -> device, mid-verification: the verdict an intermediate layer predicts.
    Advisory only: the device may start drafting from it, the Verdict decides."""

    session: int
    seq: int
    committed: int
    accepted: int
    next_token: int
    layer: int
    text_hash: bytes = NO_HASH  # as VERDICT's
    TYPE = 19
    BODY = struct.Struct("<I8sBIB")  # committed, text_hash, accepted, next_token, layer


@dataclass
class Tokens:
    """Verifier -> device: streamed tokens of a Generate, starting at generated index `start`."""

    session: int
    seq: int
    start: int
    tokens: list[int]
    done: bool = False
    logprobs: list[TokenLogprob] | None = None  # where the session asked: one per token
    TYPE = 17
    BODY = struct.Struct("<IBH")  # start, done, token count; then the tokens


@dataclass
class Error:
    session: int
    seq: int
    code: int
    text: str = ""
    TYPE = 18
    BODY = struct.Struct("<HB")  # code, text length; then the text (UTF-8)


def _tokens(values, limit: int, what: str) -> bytes:
    """Token ids packed as 3-byte little-endian integers (ids < 2**24: every vocabulary here)."""
    arr = np.asarray(values, dtype=np.int64)
    if arr.size > limit:
        raise Oversized(f"{what}: {arr.size} tokens exceed the limit of {limit}")
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise WireError(f"{what}: token id out of range")
    return arr.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()


def _name(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_NAME:
        raise Oversized(f"{what}: {len(raw)} bytes exceed the limit of {MAX_NAME}")
    return bytes([len(raw)]) + raw


def encode_q(q: SparseDist, token: int) -> bytes:
    """One drafted token's q: n u8 | the token's place in q u8 | n ids (3 bytes) | n (count - 1) u16.
    The reference of kernels/sampling.cu's encode_q."""
    if not 0 < len(q.ids) <= MAX_Q_ENTRIES:
        raise Oversized(f"q with {len(q.ids)} entries")
    where = np.nonzero(np.asarray(q.ids) == token)[0]
    if not where.size:
        raise WireError(f"draft: token {token} lies outside its own q")
    # The drafted token is named by its place in q: one byte instead of three; counts are
    # 1..65536, minus one they fit 16 bits.
    return (_Q.pack(len(q.ids), int(where[0])) + _tokens(q.ids, MAX_Q_ENTRIES, "q")
            + (np.asarray(q.counts, dtype=np.int64) - 1).astype("<u2").tobytes())


_Q = struct.Struct("<BB")  # a q's entry count and the drafted token's place in it


def _hash(msg) -> bytes:
    if not isinstance(msg.text_hash, bytes) or len(msg.text_hash) != HASH_BYTES:
        raise WireError(f"{type(msg).__name__.lower()}: text_hash must be {HASH_BYTES} bytes")
    return msg.text_hash


class _Reader:
    def __init__(self, data: bytes, offset: int):
        self.data, self.pos = data, offset

    def take(self, layout: struct.Struct):
        if self.pos + layout.size > len(self.data):
            raise Truncated(f"payload ends at byte {len(self.data)}, needed {self.pos + layout.size}")
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > len(self.data):
            raise Truncated(f"payload ends at byte {len(self.data)}, needed {self.pos + size}")
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return arr

    def token_array(self, count: int) -> np.ndarray:
        packed = self.array("u1", 3 * count).reshape(count, 3).astype(np.uint32)
        return packed[:, 0] | packed[:, 1] << 8 | packed[:, 2] << 16

    def name(self, what: str) -> str:
        n = self.array("u1", 1)[0]
        raw = bytes(self.array("u1", _bounded(int(n), MAX_NAME, what)))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{what}: not UTF-8") from None

    def tokens(self, count: int) -> list[int]:
        return self.token_array(count).astype(np.int64).tolist()


def _bounded(count: int, limit: int, what: str) -> int:
    if count > limit:
        raise Oversized(f"{what}: {count} exceeds the limit of {limit}")
    return count


# -- one codec per message type: body bytes out, a message back (header fields given) ----------
def _encode_open(m: Open) -> bytes:
    p, c = m.params, m.contract
    if not all(len(h) == 8 for h in (c.tokenizer, c.special_tokens, c.chat_template)):
        raise WireError("contract hashes must be 8 bytes")
    flags = (int(m.resync) | int(m.hints) << 1 | int(bool(m.grammar_hash)) << 2 | int(m.prompts is not None) << 3
             | int(p.coupled) << 4 | int(p.logprobs is not None) << 5)
    body = (Open.BODY.pack(flags, p.temperature, p.top_k, p.top_p, p.seed,
                           c.tokenizer, c.vocab_size, c.special_tokens, c.chat_template, len(m.tokens))
            + _name(m.draft, "draft name") + _tokens(m.tokens, MAX_CONTEXT, "open"))
    if m.grammar_hash:
        text = m.grammar.encode("utf-8")
        if len(text) > MAX_GRAMMAR:
            raise Oversized(f"open: a grammar of {len(text)} bytes exceeds the limit of {MAX_GRAMMAR}")
        if len(m.grammar_hash) != HASH_BYTES or (text and grammar_hash(m.grammar) != m.grammar_hash):
            raise WireError("open: the grammar's hash is not its text's")
        if not 0 <= m.grammar_from <= len(m.tokens):
            raise WireError("open: grammar_from lies outside the tokens")
        body += Open.GRAMMAR.pack(m.grammar_from, m.grammar_hash, len(text)) + text
    elif m.grammar:
        raise WireError("open: a grammar's text without its hash")
    if m.prompts is not None:
        _check_prompts(m.prompts, len(m.tokens))
        body += bytes([_bounded(len(m.prompts), MAX_PROMPTS, "open: prompt spans")])
        body += b"".join(Open.SPAN.pack(a, b) for a, b in m.prompts)
    if p.logprobs is not None:
        body += bytes([p.logprobs])
    return body


def prompt_spans_fit(spans: list[tuple[int, int]], n: int) -> bool:
    """Whether `spans` are prompt spans of a text of n tokens: ordered, apart and inside it."""
    return all(0 <= a < b <= n for a, b in spans) and all(b <= a for (_, b), (a, _) in zip(spans, spans[1:]))


def _check_prompts(spans: list[tuple[int, int]], n: int) -> None:
    if not prompt_spans_fit(spans, n):
        raise WireError("open: prompt spans must be ordered, apart and inside the tokens")


def _decode_open(session: int, seq: int, r: _Reader) -> Open:
    flags, temperature, top_k, top_p, seed, tok, vocab, specials, template, n = r.take(Open.BODY)
    try:
        params = SamplingParams(float(temperature), int(top_k), float(top_p), int(seed), bool(flags & 16))
    except ValueError as exc:
        raise WireError(f"open: {exc}") from exc
    if flags > 63:
        raise WireError("open: unknown flags")
    _bounded(n, MAX_CONTEXT, "open")
    draft = r.name("open: draft name")
    msg = Open(session, seq, r.tokens(n), params, Contract(tok, vocab, specials, template), bool(flags & 1),
               bool(flags & 2), draft)
    if not msg.tokens:
        raise WireError("open: no tokens")
    if flags & 4:
        start, digest, size = r.take(Open.GRAMMAR)
        raw = bytes(r.array("u1", _bounded(size, MAX_GRAMMAR, "open: grammar")))
        try:
            msg.grammar = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("open: grammar is not UTF-8") from None
        if msg.grammar and grammar_hash(msg.grammar) != digest:
            raise WireError("open: the grammar's text does not match its hash")
        msg.grammar_hash = digest
        if start > n:
            raise WireError("open: grammar_from lies outside the tokens")
        msg.grammar_from = start
    if flags & 8:
        count = int(r.array("u1", 1)[0])
        msg.prompts = [r.take(Open.SPAN) for _ in range(count)]
        _check_prompts(msg.prompts, n)
    if flags & 32:
        try:
            msg.params = replace(msg.params, logprobs=int(r.array("u1", 1)[0]))
        except ValueError as exc:  # SamplingParams bounds the count
            raise WireError(f"open: {exc}") from exc
    return msg


def _encode_opened(m: Opened) -> bytes:
    return _name(m.replica, "replica") + _name(m.version, "version") + Opened.BODY.pack(int(m.exact))


def _decode_opened(session: int, seq: int, r: _Reader) -> Opened:
    replica, version = r.name("opened: replica"), r.name("opened: version")
    (flags,) = r.take(Opened.BODY)
    if flags > 1:
        raise WireError("opened: unknown flags")
    return Opened(session, seq, replica, version, bool(flags))


def _encode_draft(m: Draft) -> bytes:
    has_q = m.q is not None
    if has_q and len(m.q) != len(m.tokens):
        raise WireError("draft: one q per drafted token")
    if len(m.tokens) > MAX_DRAFT:
        raise Oversized(f"draft: {len(m.tokens)} tokens exceed the limit of {MAX_DRAFT}")
    head = Draft.BODY.pack(m.committed, _hash(m), len(m.tokens) | int(has_q) << 7)
    if m.forced:
        head += bytes([_bounded(len(m.forced), MAX_FORCED, "draft: forced")]) + _tokens(m.forced, MAX_FORCED, "forced")
    if not has_q:
        return head + _tokens(m.tokens, MAX_DRAFT, "draft")
    return head + b"".join(encode_q(q, token) for token, q in zip(m.tokens, m.q))


def _decode_draft(session: int, seq: int, r: _Reader, forced: bool = False) -> Draft:
    committed, digest, packed = r.take(Draft.BODY)
    n, has_q = packed & 0x7F, packed >> 7
    _bounded(n, MAX_DRAFT, "draft")
    before = []
    if forced:
        before = r.tokens(int(r.array("u1", 1)[0]))
        if not before:
            raise WireError("draft: a forced-tokens DRAFT with none")
    if not has_q:
        return Draft(session, seq, committed, r.tokens(n), None, digest, before)
    tokens, q = [], []
    for _ in range(n):
        k, index = r.take(_Q)
        if k == 0:
            raise WireError("draft: empty q")
        if index >= k:
            raise WireError(f"draft: drafted token at place {index} of a q with {k} entries")
        ids = r.token_array(k)
        counts = r.array("<u2", k).astype(np.int64) + 1
        if int(counts.sum()) != Q_ONE:
            raise WireError(f"draft: q counts sum to {int(counts.sum())}, not {Q_ONE}")
        if len(np.unique(ids)) != k:
            raise WireError("draft: q ids repeat")
        tokens.append(int(ids[index]))
        q.append(SparseDist(ids, counts))
    return Draft(session, seq, committed, tokens, q, digest, before)


def _encode_generate(m: Generate) -> bytes:
    return Generate.BODY.pack(m.committed, _hash(m), m.max_new_tokens)


def _decode_generate(session: int, seq: int, r: _Reader) -> Generate:
    committed, digest, max_new = r.take(Generate.BODY)
    return Generate(session, seq, committed, max_new, digest)


def _encode_extend(m: Extend) -> bytes:
    return Extend.BODY.pack(m.committed, _hash(m), len(m.tokens)) + _tokens(m.tokens, MAX_CONTEXT, "extend")


def _decode_extend(session: int, seq: int, r: _Reader) -> Extend:
    committed, digest, n = r.take(Extend.BODY)
    tokens = r.tokens(_bounded(n, MAX_CONTEXT, "extend"))
    if not tokens:
        raise WireError("extend: no tokens")
    return Extend(session, seq, committed, tokens, digest)


def _encode_logprobs(logprobs: list[TokenLogprob] | None, n: int, what: str) -> bytes:
    """One (logprob f32, top count u8, then (id u32, logprob f32) x count) per answered token; the
    section is there only where the session asked (the message's remaining bytes say)."""
    if logprobs is None:
        return b""
    if len(logprobs) != n:
        raise WireError(f"{what}: {len(logprobs)} logprobs for {n} tokens")
    out = bytearray()
    for lp in logprobs:
        out += LOGPROB.pack(lp.logprob, _bounded(len(lp.top), MAX_TOP_LOGPROBS, f"{what}: top logprobs"))
        out += b"".join(TOP_LOGPROB.pack(i, v) for i, v in lp.top)
    return bytes(out)


def _decode_logprobs(r: _Reader, n: int, what: str) -> list[TokenLogprob] | None:
    if r.pos == len(r.data):
        return None
    out = []
    for _ in range(n):
        logprob, count = r.take(LOGPROB)
        top = tuple(r.take(TOP_LOGPROB) for _ in range(_bounded(count, MAX_TOP_LOGPROBS, f"{what}: top logprobs")))
        if any(i > MAX_TOKEN_ID for i, _ in top):
            raise WireError(f"{what}: token id out of range")
        out.append(TokenLogprob(logprob, top))
    return out


def _encode_verdict(m: Verdict) -> bytes:
    return (Verdict.BODY.pack(m.committed, _hash(m), m.accepted, m.next_token, min(m.verify_us // 100, 0xFFFF))
            + _encode_logprobs(m.logprobs, m.accepted + 1, "verdict"))


def _decode_verdict(session: int, seq: int, r: _Reader) -> Verdict:
    committed, digest, accepted, next_token, verify = r.take(Verdict.BODY)
    if next_token > MAX_TOKEN_ID:
        raise WireError("verdict: token id out of range")
    return Verdict(session, seq, committed, accepted, next_token, verify * 100, digest,
                   _decode_logprobs(r, accepted + 1, "verdict"))


def _encode_hint(m: Hint) -> bytes:
    return Hint.BODY.pack(m.committed, _hash(m), m.accepted, m.next_token, m.layer)


def _decode_hint(session: int, seq: int, r: _Reader) -> Hint:
    committed, digest, accepted, next_token, layer = r.take(Hint.BODY)
    if next_token > MAX_TOKEN_ID:
        raise WireError("hint: token id out of range")
    return Hint(session, seq, committed, accepted, next_token, layer, digest)


def _encode_tokens(m: Tokens) -> bytes:
    return (Tokens.BODY.pack(m.start, int(m.done), len(m.tokens)) + _tokens(m.tokens, MAX_STREAM, "tokens")
            + _encode_logprobs(m.logprobs, len(m.tokens), "tokens"))


def _decode_tokens(session: int, seq: int, r: _Reader) -> Tokens:
    start, done, n = r.take(Tokens.BODY)
    if done > 1:
        raise WireError("tokens: bad done flag")
    tokens = r.tokens(_bounded(n, MAX_STREAM, "tokens"))
    return Tokens(session, seq, start, tokens, bool(done), _decode_logprobs(r, n, "tokens"))


def _encode_error(m: Error) -> bytes:
    # Cut at a character boundary: the text stays valid UTF-8.
    text = m.text.encode("utf-8")[:MAX_ERROR_TEXT].decode("utf-8", "ignore").encode("utf-8")
    return Error.BODY.pack(m.code, len(text)) + text


def _decode_error(session: int, seq: int, r: _Reader) -> Error:
    code, n = r.take(Error.BODY)
    raw = bytes(r.array("u1", n))
    try:
        return Error(session, seq, code, raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WireError("error text: not UTF-8") from None


class Codec(NamedTuple):
    message: type
    encode: Callable  # message -> body bytes
    decode: Callable  # (session, seq, _Reader) -> message


CODECS = {c.message.TYPE: c for c in (
    Codec(Open, _encode_open, _decode_open), Codec(Opened, _encode_opened, _decode_opened),
    Codec(Draft, _encode_draft, _decode_draft), Codec(Generate, _encode_generate, _decode_generate),
    Codec(Extend, _encode_extend, _decode_extend),
    Codec(Close, lambda m: b"", lambda session, seq, r: Close(session, seq)),
    Codec(Verdict, _encode_verdict, _decode_verdict), Codec(Hint, _encode_hint, _decode_hint),
    Codec(Tokens, _encode_tokens, _decode_tokens), Codec(Error, _encode_error, _decode_error),
)}
# A DRAFT with forced tokens: the same message, told apart by its type.
CODECS[Draft.TYPE_FORCED] = Codec(Draft, _encode_draft,
                                  lambda session, seq, r: _decode_draft(session, seq, r, forced=True))
MESSAGES = {t: c.message for t, c in CODECS.items()}


def wire_type(msg) -> int:
    return Draft.TYPE_FORCED if isinstance(msg, Draft) and msg.forced else msg.TYPE


class Header(NamedTuple):
    version: int
    type: int
    session: int
    seq: int


def peek_header(data: bytes) -> Header:
    """The header alone, of any version: who to answer about a payload that does not decode."""
    if len(data) < HEADER.size:
        raise Truncated(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    return Header(*HEADER.unpack_from(data))


def encode(msg) -> bytes:
    codec = CODECS.get(getattr(msg, "TYPE", None))
    if codec is None or not isinstance(msg, codec.message):
        raise TypeError(f"not a wire message: {msg!r}")
    if not 0 <= msg.session <= MAX_SESSION:
        raise WireError(f"session id {msg.session} is not a u32")
    payload = HEADER.pack(PROTOCOL_VERSION, wire_type(msg), msg.session, msg.seq) + codec.encode(msg)
    if len(payload) > MAX_PAYLOAD:
        raise Oversized(f"{len(payload)} bytes exceed {MAX_PAYLOAD}")
    return payload


def decode(data: bytes):
    """bytes -> message; raises a WireError subclass on anything but a valid message."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("payload is not bytes")
    data = bytes(data)
    if len(data) > MAX_PAYLOAD:
        raise Oversized(f"{len(data)} bytes exceed {MAX_PAYLOAD}")
    header = peek_header(data)
    if header.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {header.version}; this build speaks {PROTOCOL_VERSION}")
    codec = CODECS.get(header.type)
    if codec is None:
        raise UnknownType(f"message type {header.type}")
    r = _Reader(data, HEADER.size)
    msg = codec.decode(header.session, header.seq, r)
    if r.pos != len(data):
        raise WireError(f"{len(data) - r.pos} trailing bytes after a {type(msg).__name__}")
    return msg
