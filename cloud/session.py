"""Device sessions on the target: committed text, KV cache, batched verification.

No I/O here: the verifier service feeds it decoded messages.
Invariant: a warm cache holds every committed token but the last, which is fed
together with the next draft so one pass yields len(draft) + 1 rows. A cold
session (new, evicted under the memory budget, or moved to another target
version) has no cache; its next passes feed its committed text, inside the same
batch as everyone else's drafts, at most `chunk` positions per pass: a long
context then holds nobody's round back for more than a chunk.

Every position is computed in the engine call the target's own generation computes
it in (cloud/engine.py prompt_calls): the session's `prompts` (the OPEN's text,
each EXTEND's turn) in the engine's prompt calls from their first position, every
generated or drafted token alone. So on an engine whose bits depend on the rows
in a call (llama.cpp), a verified row is bit for bit the engine's own generation
of the same text, whatever the pass's shape, chunks and resyncs included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from specedge.cloud.engine import call_start, prompt_calls
from specedge.protocol.contract import Contract
from specedge.model import grown_capacity
from specedge.protocol.wire import TextHasher, prompt_spans_fit
from specedge.speculative import (SamplingParams, SparseDist, TokenLogprob, coupled_choice, greedy_verify,
                                  speculative_verify, target_distribution, token_logprobs)


HEADROOM = 128  # positions a new reference cache holds beyond the committed text: a few rounds' drafts


def position_bytes(model) -> int:
    """KV bytes per position: what an engine states, else the reference's keys and values."""
    stated = getattr(model, "bytes_per_token", None)
    if stated is not None:
        return stated
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize


class OutOfSync(Exception):
    pass


class BadRequest(Exception):
    pass


class TargetSession:
    def __init__(self, target, tokens: list[int], params: SamplingParams, session_id: int,
                 draft: str = "", contract: Contract | None = None, constraint=None, grammar_from: int = 0,
                 prompts: list[tuple[int, int]] | None = None, scope: str = ""):
        """`constraint`: a grammar's fresh state (specedge/grammar.py) for the tokens from
        `grammar_from` on: every verdict is the grammar-constrained target's. `prompts`: the spans
        of `tokens` that came as prompts (a resync's OPEN states them; default: all of them).
        `scope`: whose cached prefixes an engine with a prefix cache of its own may reuse (vLLM's
        cache salt; the verifier's prefix scope)."""
        self.target, self.params, self.draft, self.contract = target, params, draft, contract
        self.scope = scope
        self._check_ids(tokens)
        refused = getattr(target.model, "refuses", lambda _: "")(tokens)  # an engine for some texts only
        if refused:
            raise BadRequest(refused)
        if len(tokens) + 1 > target.model.cfg.max_seq_len:
            raise BadRequest(f"{len(tokens)} tokens exceed the target's context of {target.model.cfg.max_seq_len}")
        self.prompts = [(0, len(tokens))] if prompts is None else [tuple(span) for span in prompts]
        if not prompt_spans_fit(self.prompts, len(tokens)):
            raise BadRequest("prompt spans must be ordered, apart and inside the text")
        self.constraint, self.grammar_from = constraint, grammar_from
        if constraint is not None and not constraint.accept(tokens[grammar_from:]):
            raise BadRequest("the generated text breaks the session's grammar")
        self.committed = list(tokens)
        self.hasher = TextHasher(self.committed)  # follows `committed`: see text_hash()
        self.cache = None  # cold: built by the next pass
        self.rng = np.random.default_rng([params.seed, session_id])
        self.last_seq = 0
        self.last_reply: bytes | None = None
        self.last_used = time.monotonic()
        self.last_round = 0.0  # when a round of it was last answered (the verifier's batching waits for those)
        self.hints = False  # the device asked for early-exit hints
        self.generating = 0  # cloud-ar: tokens still to generate for the current Generate
        # Where the last Generate began: a device that switches from the stream to a draft states
        # fewer tokens than were streamed (some were in flight), and the text goes back to its.
        self.stream_from: int | None = None

    @property
    def model(self):
        return self.target.model

    def _check_ids(self, tokens) -> None:
        vocab = self.target.model.cfg.vocab_size
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise BadRequest(f"token id outside the target's vocabulary of {vocab}")

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    def evict(self) -> None:
        """Drop the KV cache (memory budget, version switch); the committed text stays."""
        self.cache = None

    def adopt_cache(self, old: "TargetSession") -> None:
        """A resync of a session this replica still holds (a device that timed out on a slow
        round, or reconnected): keep the old cache for the committed text both agree on, so the
        resync costs no prefill."""
        if old.cache is None or old.target is not self.target:
            return
        same = next((i for i, (a, b) in enumerate(zip(old.committed, self.committed)) if a != b),
                    min(len(old.committed), len(self.committed)))
        agree = _calls_agree(old.prompts, self.prompts) if self.batch else same
        old.cache.truncate(min(old.cache.length, same, agree, len(self.committed) - 1))
        self.cache = old.cache  # feed() starts the next pass where a call starts

    def share_prefix(self, donor: "TargetSession", length: int) -> int:
        """Start this cold session's cache from `donor`'s first `length` positions, where its engine
        can fork a cache and the texts agree there; returns the positions taken (0: none)."""
        held = donor.cache
        length = min(length, len(self.committed) - 1)
        # Where a row's bits depend on its call, a fork would hold positions computed in the
        # donor's calls, not in those of this text's own generation.
        if (self.batch or self.cache is not None or held is None or not hasattr(held, "fork")
                or donor.target is not self.target or held.length < length
                or donor.committed[:length] != self.committed[:length]):
            return 0
        self.cache = held.fork(length, len(self.committed) + HEADROOM)
        return length

    def switch(self, target) -> None:
        self.target = target
        self.evict()

    def text_hash(self) -> bytes:
        """The committed text's hash (wire.TextHasher): O(new tokens) as the text grows; rebuilt
        when the text was cut back behind the hasher's back."""
        if self.hasher.length > len(self.committed):
            self.hasher = TextHasher(self.committed)
        elif self.hasher.length < len(self.committed):
            self.hasher.update(self.committed[self.hasher.length:])
        return self.hasher.digest()

    def sync(self, committed: int, text_hash: bytes | None = None, allow_rollback: bool = False) -> None:
        """Make the session's committed text the device's: the same length, and (given the hash
        the device states) the same tokens. Two texts of one length are out of sync too: a
        verdict over one applied to the other would be marked verified on a text never verified."""
        if committed != len(self.committed):
            if not (allow_rollback and 1 <= committed < len(self.committed)):
                raise OutOfSync(f"device has {committed} committed tokens, verifier {len(self.committed)}")
            if text_hash is not None and text_hash != TextHasher(self.committed[:committed]).digest():
                raise OutOfSync(f"the device's committed text of {committed} tokens is not the start of the "
                                "verifier's")  # checked before the text is cut: a refused round changes nothing
            del self.committed[committed:]
            if self.constraint is not None:  # back to what it consumed of the shorter text (never a stop token)
                said = len(self._before_stop(self.committed[self.grammar_from:]))
                self.constraint.rollback(self.constraint.length - said)
            self.hasher = TextHasher(self.committed)  # O(n), on a rare rollback only
            self.prompts = [(a, min(b, committed)) for a, b in self.prompts if a < committed]
            if self.cache is not None:
                self.cache.truncate(min(self.cache.length, committed))
        if text_hash is not None and text_hash != self.text_hash():
            raise OutOfSync(f"the device's committed text of {committed} tokens has another hash than the "
                            "verifier's: the texts differ")

    def next_turn(self, committed: int, text_hash: bytes, tokens: list[int]) -> None:
        """The conversation's next turn (EXTEND): the text goes back to the device's `committed`
        tokens (it may lack a stop token, or a verdict's tokens past max_tokens) and `tokens` join
        it as a prompt, processed from where the target's own generation would pick up: the text
        it had fed (all but the last token it generated) or the device's, the shorter."""
        fed = len(self.committed) - 1
        self.sync(committed, text_hash, allow_rollback=True)
        self.extend(tokens, start=min(fed, committed))

    def extend(self, tokens: list[int], start: int | None = None) -> None:
        """Tokens of a prompt join the committed text, processed from `start` (default: their
        own first position); the cache keeps what it holds before that, so only they are fed
        (with the next draft, in chunks if long)."""
        self._check_ids(tokens)
        if self.constraint is not None:
            raise BadRequest("a session under a grammar takes no next turn: open a new one")
        if len(self.committed) + len(tokens) + 1 > self.model.cfg.max_seq_len:
            raise BadRequest(f"{len(self.committed) + len(tokens)} tokens exceed the target's context of "
                             f"{self.model.cfg.max_seq_len}")
        start = len(self.committed) if start is None else start
        self.prompts = [(a, min(b, start)) for a, b in self.prompts if a < start]
        self.committed += tokens
        self.prompts.append((start, len(self.committed)))
        if self.cache is not None:
            self.cache.truncate(min(self.cache.length, start))

    def force(self, tokens: list[int]) -> None:
        """Tokens the device committed because the grammar allowed nothing else (a DRAFT's
        `forced`): each is checked against this session's grammar, never computed by the target,
        and joins the committed text (fed with the next draft)."""
        if not tokens:
            return
        if self.constraint is None:
            raise BadRequest("forced tokens in a session without a grammar")
        self._check_ids(tokens)
        if len(self.committed) + len(tokens) + 1 > self.model.cfg.max_seq_len:
            raise BadRequest("forced tokens run past the target's context")
        taken = 0
        try:
            for token in tokens:
                if self.constraint.forced() != token:
                    raise BadRequest(f"token {token} is not the only one the grammar allows here")
                self.constraint.accept([token])
                taken += 1
        except BaseException:  # all or nothing: the grammar goes back where the text is
            self.constraint.rollback(taken)
            raise
        self.committed += tokens

    def check_draft(self, draft: list[int], q: list[SparseDist] | None, committed: int | None = None) -> None:
        """Everything a pass will read of a round, checked before it joins one: a round the rule
        cannot take would otherwise fail the pass of every session batched with it. `committed`:
        the text's length when the draft is verified (default: now)."""
        self._check_ids(draft)
        if (q is not None) != self.params.sends_q:
            raise BadRequest("sampled sessions need q with every draft, greedy and coupled ones none")
        if q is not None:
            if len(q) != len(draft):
                raise BadRequest(f"{len(q)} q for {len(draft)} drafted tokens")
            for dist in q:  # the wire checked the counts; the vocabulary is the target's
                self._check_ids(dist.ids)
        committed = len(self.committed) if committed is None else committed
        if committed + len(draft) + 1 > self.model.cfg.max_seq_len:
            raise BadRequest("draft runs past the target's context")

    @property
    def batch(self) -> int:
        """Rows per prompt call of the target's own generation (cloud/engine.py prompt_batch)."""
        return getattr(self.model, "prompt_batch", 0)

    def plan(self, draft: list[int], chunk: int = 0) -> tuple[int, int, bool]:
        """(first position, end of the committed text, whether the draft goes too) of the next pass.
        It starts at what the cache lacks, but the last committed token (its row is the first
        verified), and where an engine call starts. It feeds the rest of the text and the draft;
        or, where the text alone is more than `chunk` positions (0: no limit), whole calls of it
        up to `chunk` positions (at least one call)."""
        n, batch = len(self.committed), self.batch
        held = 0 if self.cache is None else self.cache.length
        start = call_start(self.prompts, min(held, n - 1), batch)
        if chunk and n - start > chunk:
            end = start + chunk
            if batch:
                end = start
                for size in prompt_calls(self.prompts, start, n, batch):
                    if end > start and end + size > start + chunk:
                        break
                    end += size
            return start, end, False
        return start, n, True

    def positions(self, draft: list[int], chunk: int = 0) -> int:
        """Positions the next pass would feed for this session (plan)."""
        start, end, done = self.plan(draft, chunk)
        return end - start + (len(draft) if done else 0)

    def length_after(self, draft: list[int], chunk: int = 0) -> int:
        """Positions the cache will hold after the next pass (plan)."""
        _, end, done = self.plan(draft, chunk)
        return end + (len(draft) if done else 0)

    def cache_bytes_after(self, draft: list[int], chunk: int = 0) -> int:
        """What the cache will hold in memory after the next pass: the verifier admits a pass
        against its KV budget before the pass allocates anything."""
        length = self.length_after(draft, chunk)
        if self.cache is None:
            # Only the reference's KVCache holds capacity ahead of its length (see feed()).
            capacity = len(self.committed) + HEADROOM if self.model.engine == "torch" else None
        else:
            capacity = getattr(self.cache, "capacity", None)
        if capacity is not None:
            capacity = grown_capacity(capacity, length, self.model.cfg.max_seq_len)
        return position_bytes(self.model) * (length if capacity is None else capacity)

    def feed(self, draft: list[int], chunk: int = 0):
        """(tokens, cache, whether the draft is in, rows per engine call) for the next pass (plan)."""
        start, end, done = self.plan(draft, chunk)
        if self.cache is None:
            salt = {"salt": self.scope} if getattr(self.model, "salted", False) else {}
            self.cache = self.model.new_cache(capacity=len(self.committed) + HEADROOM, **salt)
        if self.cache.length > start:
            self.cache.truncate(start)
        extra = draft if done else []
        calls = prompt_calls(self.prompts, start, end, self.batch) + [1] * len(extra) if self.batch else None
        return self.committed[start:end] + extra, self.cache, done, calls

    def verify(self, draft: list[int], q: list[SparseDist] | None = None, exit_head=None,
               on_hint=None) -> tuple[int, int]:
        """One pass over this session's draft alone: (accepted, next token)."""
        self.check_draft(draft, q)
        item = Item(self, draft, q, on_hint)
        verify_batch(self.model, [item], exit_head)
        return item.accepted, item.next_token

    def finish(self, draft: list[int], q, logits: torch.Tensor) -> tuple[int, int]:
        """Apply the target's logits for the last len(draft) + 1 positions: (accepted, next token)."""
        if self.constraint is not None:
            logits = self.masked(draft, logits)
        if self.params.greedy:
            accepted, token = greedy_verify(draft, torch.argmax(logits, dim=-1).tolist())
        elif self.params.coupled:  # row j holds the token at position len(committed) + j
            at, seed = len(self.committed), self.params.seed
            choices = [coupled_choice(target_distribution(row, self.params), seed, at + j)
                       for j, row in enumerate(logits.numpy())]
            accepted, token = greedy_verify(draft, choices)
        else:
            p = np.stack([target_distribution(row, self.params) for row in logits.numpy()])
            accepted, token = speculative_verify(draft, q, p, self.rng)
        self.cache.truncate(len(self.committed) + accepted)
        self.committed += draft[:accepted] + [token]
        if self.constraint is not None:
            if not self.constraint.accept(self._before_stop(draft[:accepted] + [token])):
                raise RuntimeError("a verdict under the grammar broke the grammar")  # cannot happen: rows are masked
        return accepted, token

    def logprobs_of(self, draft: list[int], accepted: int, token: int, logits: torch.Tensor) -> list | None:
        """The target's own log-softmax (no temperature, no grammar mask) at each answered position,
        row j the token after the text and draft[:j], where the session asked (params.logprobs)."""
        top = self.params.logprobs
        if top is None:
            return None
        answered = draft[:accepted] + [token]
        rows = logits[: len(answered)].float().numpy()
        return [token_logprobs(row, t, top) for row, t in zip(rows, answered)]

    def _before_stop(self, tokens: list[int]) -> list[int]:
        """`tokens` before the first stop token: the answer ends there (the grammar allowed the stop
        token, or the row's mask rejected it), and the device commits nothing after it."""
        stops = self.target.tokenizer.stop_ids
        return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]

    def masked(self, draft: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Each row's logits with the grammar's mask after the draft's tokens before it. Rows past
        a drafted token the grammar refuses stay as they are: that token has p = 0 under its own
        masked row, so the rule rejects it there and never reads a later row. So do rows past a
        stop token: the answer ended there."""
        c, out, taken = self.constraint, logits.clone(), 0
        said = self._before_stop(draft)  # row len(said) holds the stop token, or is the bonus row
        try:
            for i in range(len(said) + 1):
                out[i] = c.mask(logits[i])
                if i == len(said) or not c.accept([said[i]]):
                    break
                taken += 1
        finally:  # a grammar that fails mid-way leaves the state as the committed text left it
            c.rollback(taken)
        return out


def _calls_agree(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Where two texts' prompt spans may first put a position in different calls."""
    for x, y in zip(a, b):
        if x != y:
            return min(x[0], y[0])
    rest = a[len(b):] or b[len(a):]
    return rest[0][0] if rest else 1 << 62


class PrefixIndex:
    """Which session holds the KV cache of a token prefix, keyed by the prefix's hash at every
    BLOCK tokens (a fleet-wide system prompt, a shared document): a new session forks the longest
    one instead of prefilling it. Entries live in a `scope` (the verifier's: a device, or a fleet):
    a hit is faster than a miss, so a session only ever finds prefixes of its own scope. An entry
    is a hint, checked by share_prefix against the donor's text and cache when used; stale entries
    (a closed session, an evicted cache) are skipped."""

    BLOCK = 32

    def __init__(self, size: int = 4096):
        self.size, self._holders = size, {}  # (scope, prefix hash) -> session key, oldest first

    @classmethod
    def hashes(cls, tokens: list[int]) -> list[tuple[int, bytes]]:
        """(length, hash) of each whole block prefix of `tokens` but the last token's."""
        out, hasher = [], TextHasher()
        for end in range(cls.BLOCK, len(tokens), cls.BLOCK):
            hasher.update(tokens[end - cls.BLOCK:end])
            out.append((end, hasher.digest()))
        return out

    def add(self, scope, key, tokens: list[int]) -> None:
        for _, digest in self.hashes(tokens):
            self._holders.pop((scope, digest), None)
            self._holders[(scope, digest)] = key  # the latest holder is the likeliest to be warm
        while len(self._holders) > self.size:
            self._holders.pop(next(iter(self._holders)))

    def candidates(self, scope, tokens: list[int]):
        """(session key, prefix length) of the holders of `tokens`' block prefixes in `scope`,
        longest first."""
        for length, digest in reversed(self.hashes(tokens)):
            key = self._holders.get((scope, digest))
            if key is not None:
                yield key, length


@dataclass
class Item:
    """One session's share of a batched pass: its draft (empty = one autoregressive step)."""

    session: TargetSession
    draft: list[int]
    q: list[SparseDist] | None = None
    on_hint: object = None  # on_hint(accepted, token, confidence), mid-pass, from the exit head
    accepted: int = 0
    next_token: int = -1
    done: bool = False  # verified; False after a pass that fed only a chunk of the committed text
    error: Exception | None = None  # why this round got no verdict from a pass that ran
    fed: int = 0  # positions its last pass ran for it
    logprobs: list[TokenLogprob] | None = None  # the answered tokens', where the session asked

    @classmethod
    def step(cls, session: TargetSession) -> "Item":
        """One autoregressive step: an empty draft, whose verdict is the target's next token."""
        return cls(session, [], [] if session.params.sends_q else None)


def verify_batch(model, items: list[Item], exit_head=None, chunk: int = 0) -> int:
    """One target pass over every item's draft (ragged: each session its own length and cache);
    fills in each item's verdict and returns the positions it ran. A cold session whose text is
    longer than `chunk` gets only a chunk of it and no verdict (item.done stays False): the same
    item goes again in a later pass. With an exit head, items that want hints get them mid-pass."""
    fed, verified, calls = [], [], []
    for item in items:
        tokens, cache, item.done, item_calls = item.session.feed(item.draft, chunk)
        item.fed = len(tokens)
        fed.append((tokens, cache))
        verified.append(item.done)
        calls.append(item_calls)
    held = [cache.length for _, cache in fed]  # what each cache held before the pass
    keep = [len(item.draft) + 1 if done else 1 for item, done in zip(items, verified)]
    wants_hints = exit_head is not None and any(item.on_hint and item.done for item in items)
    on_layer = _hint_hook(items, fed, keep, exit_head) if wants_hints else None
    try:
        logits = model.forward_batch(fed, on_layer=on_layer, keep=keep, calls=calls)
    except BaseException:
        for (_, cache), length in zip(fed, held):  # drafted positions must not outlive the pass
            cache.truncate(min(cache.length, length))
        raise
    for item, rows, (_, cache), length in zip(items, logits, fed, held):
        if item.done:
            try:
                item.accepted, item.next_token = item.session.finish(item.draft, item.q, rows)
                item.logprobs = item.session.logprobs_of(item.draft, item.accepted, item.next_token, rows)
            except Exception as exc:  # this round's alone: the others keep their verdicts
                cache.truncate(min(cache.length, length))
                item.done, item.error = False, exc
    return sum(len(tokens) for tokens, _ in fed)


def _hint_hook(items: list[Item], fed, keep: list[int], exit_head):
    """on_layer for forward_batch: at the exit head's layer, each item that wants a hint gets one."""
    ends = np.cumsum([len(tokens) for tokens, _ in fed])

    def on_layer(index, hidden):
        if index != exit_head.layer:
            return
        for item, end, k in zip(items, ends, keep):
            if item.on_hint and item.draft and item.done:
                top = torch.softmax(exit_head.logits(hidden[end - k:end]), dim=-1).max(dim=-1)
                accepted, token = greedy_verify(item.draft, top.indices.tolist())
                item.on_hint(accepted, token, float(top.values[: accepted + 1].min()))
    return on_layer
