"""Bitwise exactness of a loaded target, shown on this machine instead of assumed.

Terms:
  canary     a fixed sequence of token ids (seeded, the model's own vocabulary);
  reference  the canary's logits as the target's own generation computes them with its first P
             tokens as the prompt (cloud/engine.py own_rows): the prompt in the engine's
             prompt calls, then every position alone. On the reference engine (no prompt calls)
             every position is fed alone from the first;
  client     llama-cpp-python's own `Llama` with the engine's settings, where the engine is
             llama.cpp: the reference is also computed by a client nobody here wrote, and must
             equal ours bit for bit (the promise is "llama.cpp's own generation");
  probe      the same positions fed the ways verification feeds them (SESSIONS): a prompt
             first, then blocks of every size 1..max_draft+1, one-row steps, and several
             sessions in one pass, cold and warm together, with more rows than a product block;
  block      rows per weight-product call (specedge.model.DEFAULT_BLOCK says why it is fixed).

A block passes when every probe row the reference has (all of them on the reference engine; from
the prompt's last on, where a prompt's rows come from calls of many rows) equals its reference row
bit for bit. self_test() measures each candidate block's cost on a round's typical passes, tries
them cheapest first and keeps the first that passes. If none passes, the model keeps the cheapest
and is reported as not exact: greedy outputs are then the target's up to rounding, and everyone
who relays an answer says so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from specedge.cloud.engine import own_rows, prefill_calls

# Blocks whose cost is measured and tried cheapest first; 1 (one GEMV per row, a kernel call no
# other row can share) is the last resort, tried only when every measured block failed.
CANDIDATES = (16, 8, 4, 2)
# On a GPU a product of 64 rows costs about what one of 8 does (memory-bound): fewer calls a pass.
CUDA_CANDIDATES = (64, 32, 16, 8)
LAST_RESORT = 1
# The typical round a block is chosen for (round_cost_ms): a draft of 8, so passes of 1, 5, 9 and
# 36 rows. Not the device's max_draft (64, where the scheduler stops well short).
TYPICAL_DRAFT = 8
# Sessions fed in lockstep, one forward_batch per step, each a list of consecutive span sizes
# over the canary (the first its prompt, a cold prefill): every verify size 1..9, one-row steps,
# and passes with cold and warm sessions together and more rows than a block.
SESSIONS = ([10, 6], [2, 1, 3, 4, 6], [3, 9, 2, 1, 1], [1, 7, 8], [11, 5])
CANARY_LEN = 16
PROBE_ROWS = sum(map(sum, SESSIONS))


@dataclass(frozen=True)
class Trial:
    block: int
    ms: float | None  # round_cost_ms (None: not measured)
    passed: bool | None = None  # None: not tried (a cheaper block had passed)
    rows_differing: int = 0
    max_abs_diff: float = 0.0


@dataclass(frozen=True)
class Exactness:
    """What the self-test found: `exact` is the promise the verifier may make."""

    exact: bool
    block: int
    seconds: float
    trials: tuple[Trial, ...] = ()
    engine: str = "torch"
    invariant: bool = True  # the engine tried to be batch-invariant (else it was only measured)
    # The generation it equals: the engine's own, checked against a client nobody here wrote
    # where there is one ("" on the reference engine, which is its own client).
    client: str = ""
    client_equal: bool | None = None  # None: no client to compare with

    @property
    def max_abs_diff(self) -> float:
        """The largest |dlogit| any trial found (0 where every row was bit-identical)."""
        return max((t.max_abs_diff for t in self.trials), default=0.0)

    def describe(self) -> dict:
        return {"exact": self.exact, "engine": self.engine, "invariant": self.invariant, "block": self.block,
                "seconds": round(self.seconds, 2), "trials": [asdict(t) for t in self.trials],
                "client": self.client, "client_equal": self.client_equal}

    def summary(self) -> str:
        if self.exact and self.client:
            return f"bitwise exact: {self.engine}'s own generation, as {self.client} (self-test {self.seconds:.1f}s)"
        if self.exact:
            unit = "products" if self.engine == "torch" else f"{self.engine} calls"
            how = f"{self.block}-row {unit}" if self.block else f"{self.engine}'s own batching"
            return f"bitwise exact with {how} (self-test {self.seconds:.1f}s)"
        if self.client_equal is False:
            return (f"NOT bitwise exact on this machine: {self.engine}'s own generation here differs from "
                    f"{self.client}; outputs are the target's up to rounding")
        worst = self.max_abs_diff
        if not self.invariant:
            rows = sum(t.rows_differing for t in self.trials)
            return (f"numerical ({self.engine}, not batch-invariant): verified logits differ from one-at-a-time "
                    f"by up to {worst:.3g} ({rows} of {PROBE_ROWS} probe rows); outputs are the engine's own "
                    f"decoding except where an argmax sits at a near-tie")
        return (f"NOT bitwise exact on this machine: no product block kept every position's logits "
                f"identical (max |dlogit| {worst:.3g}); outputs are the target's up to rounding")


def canary(vocab_size: int, length: int = CANARY_LEN, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def check(model, tokens: list[int], references) -> tuple[int, float]:
    """(rows differing from the reference, their largest |dlogit|) over SESSIONS, each session's
    prompt (its first span) fed in the engine's prompt calls; references(P) is the reference of
    prompt length P. Where a prompt's rows come from calls of many rows, its rows before its last
    are nobody's output and not compared."""
    # Caches of other capacities than the reference's: attention reads keys at other strides.
    caches = [model.new_cache(capacity=len(tokens) + 37 * i) for i in range(len(SESSIONS))]
    outs: list[list[torch.Tensor]] = [[] for _ in SESSIONS]
    batched = getattr(model, "prompt_batch", 0)
    for step in range(max(map(len, SESSIONS))):
        live = [i for i, spans in enumerate(SESSIONS) if step < len(spans)]
        feeds, calls, keep = [], [], []
        for i in live:
            start, size = caches[i].length, SESSIONS[i][step]
            feeds.append((tokens[start:start + size], caches[i]))
            calls.append(prefill_calls(model, size) if step == 0 else None)
            # A prompt call outputs its last row only, as verification's does: the rows a
            # llama.cpp call outputs choose its last layer's kernels.
            keep.append(1 if step == 0 and batched else size)
        for i, out in zip(live, model.forward_batch(feeds, calls=calls, keep=keep)):
            outs[i].append(out)
    differing, worst = 0, 0.0
    for spans, rows in zip(SESSIONS, outs):
        prompt = spans[0] if batched else 1
        got = torch.cat(rows)
        differing, worst = _compare(got, references(prompt)[:len(got)], differing, worst)
    return differing, worst


def _compare(got: torch.Tensor, expected: torch.Tensor, differing: int = 0, worst: float = 0.0) -> tuple[int, float]:
    top = torch.finfo(torch.float32).max  # a NaN or inf row counts as the largest difference
    diff = (got - expected).abs().nan_to_num(nan=top, posinf=top)
    return differing + int((diff.amax(dim=-1) > 0).sum()), max(worst, float(diff.max()))


class References:
    """references(P): the reference of prompt length P, computed once each. With a client (a
    llama.cpp engine's llama-cpp-python `Llama`), the client's, once our own loop has been compared
    with it on the first prompt length asked for (`client_equal`)."""

    def __init__(self, model, tokens: list[int]):
        self.model, self.tokens, self.made = model, tokens, {}
        self.source = model.client() if hasattr(model, "client") else None
        self.client = self.source.describe() if self.source else ""
        self.client_equal: bool | None = None

    def __call__(self, prompt_len: int) -> torch.Tensor:
        if prompt_len in self.made:
            return self.made[prompt_len]
        if self.source is None:
            self.made[prompt_len] = own_rows(self.model, self.tokens, prompt_len)
            return self.made[prompt_len]
        self.made[prompt_len] = self.source.rows(self.tokens, prompt_len)
        if self.client_equal is None:
            ours = own_rows(self.model, self.tokens, prompt_len)
            self.client_equal = _compare(ours, self.made[prompt_len])[0] == 0
        return self.made[prompt_len]


def call_ms(model, block: int, repeats: int = 5) -> float:
    """Best time of one `block`-row product on the largest weight of a layer (the MLP's)."""
    lin, device = model.layers[0]["gate_up"], model.device
    x = torch.randn(block, lin.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(device, model.dtype)
    lin(x, block)  # warm-up: kernels are picked and JIT-compiled on first use
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lin(x, block)
        if device.type == "cuda":  # a GPU's call returns before its work is done
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def round_cost_ms(model, block: int) -> float:
    """Product time of a cloud-ar step, a short and a full verify, and a four-session batch:
    every pass costs one call per started block."""
    rows = (1, TYPICAL_DRAFT // 2 + 1, TYPICAL_DRAFT + 1, 4 * (TYPICAL_DRAFT + 1))
    return sum(-(-n // block) for n in rows) * call_ms(model, block)


@torch.inference_mode()
def self_test(model, candidates=CANDIDATES, last_resort: bool = True) -> Exactness:
    """Pick the cheapest block under which `model` is bitwise batch-invariant; sets model.block."""
    t0 = time.perf_counter()
    # One candidate (a pinned block, or llama.cpp's one row per call) is not worth timing.
    costs = {block: round_cost_ms(model, block) if len(candidates) > 1 else None for block in candidates}
    order = sorted(candidates, key=costs.__getitem__)
    if last_resort and LAST_RESORT not in order:
        order.append(LAST_RESORT)
        costs[LAST_RESORT] = None  # slow by construction: not worth measuring
    tokens = canary(model.cfg.vocab_size)
    trials, chosen = {}, None
    for block in order:
        model.block = block
        expected = References(model, tokens)
        differing, worst = check(model, tokens, expected)
        trials[block] = Trial(block, _rounded(costs[block]), differing == 0, differing, worst)
        if differing == 0 and expected.client_equal is not False:
            chosen = block
            break
    model.block = chosen if chosen is not None else order[0]
    result = Exactness(chosen is not None, model.block, time.perf_counter() - t0,
                       tuple(trials.get(b, Trial(b, _rounded(costs[b]))) for b in order), model.engine,
                       client=expected.client, client_equal=expected.client_equal)
    model.exactness = result
    return result


@torch.inference_mode()
def measure(model) -> Exactness:
    """A numerical engine (not batch-invariant): how far verification strays from its own
    one-at-a-time decoding on the canary. Never exact, whatever it finds: one canary cannot
    promise what the construction does not."""
    t0 = time.perf_counter()
    tokens = canary(model.cfg.vocab_size)
    differing, worst = check(model, tokens, lambda prompt_len: own_rows(model, tokens, prompt_len))
    model.exactness = Exactness(False, model.block, time.perf_counter() - t0,
                                (Trial(model.block, None, differing == 0, differing, worst),), model.engine,
                                invariant=False)
    return model.exactness


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)


def establish(model, block: int = 0) -> Exactness:
    """The model's exactness, self-tested on first use: every holder of the same model object
    (verifier, reference decoding, bench) then computes with the same block. `block` > 0 pins
    the block (TargetConfig.block): only it is tested."""
    if model.exactness is None:
        fixed = getattr(model, "candidates", None)  # an engine with its own blocks (llama.cpp: one row)
        if block and fixed and block not in fixed:
            raise ValueError(f"the {model.engine} engine computes {fixed} rows per call, not {block}")
        if not model.batch_invariant:
            measure(model)
        elif block:
            self_test(model, (block,), last_resort=False)
        elif fixed:  # one way to compute: nothing to fall back to
            self_test(model, fixed, last_resort=False)
        else:
            self_test(model, CUDA_CANDIDATES if model.device.type == "cuda" else CANDIDATES)
    return model.exactness
