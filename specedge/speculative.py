"""The math of lossless speculative decoding, as pure NumPy functions.

Greedy: accept the longest prefix where draft == target argmax, then the
target's own token. Sampled (Leviathan et al. 2023, Chen et al. 2023): accept
drafted x with probability min(1, p(x)/q(x)); on the first rejection sample
norm(max(0, p - q)); if all are accepted, sample the bonus token from p.

The device drafts from a truncated distribution quantised to integers that
sum exactly to 2**16 (`SparseDist`). What it sends *is* q, so verification is
exact with respect to the target while only k (id, count) pairs per drafted
token cross the link. These functions are the reference for kernels/.

Coupled (a request that gives a `seed`): every position t of the text has its own
noise G_t, a standard Gumbel per token id drawn from (seed, t) alone, and the token
at t is argmax_x log p(x) + G_t(x) (Gumbel-max: a sample of p). The device drafts
argmax_x log q(x) + G_t(x) with the same noise and sends no q; the verifier accepts
the longest prefix where the draft agrees with the target's own choice, then that
choice: the greedy rule on perturbed rows. So the answer is a function of the seed,
the text and the target alone, whatever the draft proposed, however long the rounds
were and whether the cloud streamed. The price: a drafted token agrees with
probability at least (1 - d) / (1 + d), d the total variation between p and q,
where the rejection rule accepts with 1 - d (Gumbel coupling without communication).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Q_BITS = 16
Q_ONE = 1 << Q_BITS  # total fixed-point mass of a sparse draft distribution
MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = whole vocabulary
    top_p: float = 1.0
    seed: int = 0
    # Sampled with the noise of (seed, position) (the module notes): reproducible. A request's `seed`.
    coupled: bool = False
    # Report the target's log-softmax at every answered position: its token's, and the `logprobs`
    # most likely tokens' (0..MAX_TOP_LOGPROBS); None: none (nothing extra crosses the wire).
    logprobs: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be 0..{MAX_TOP_LOGPROBS} most likely tokens, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def seeded(cls, temperature: float, top_k: int, top_p: float, seed: int | None) -> "SamplingParams":
        """The parameters a request or config asks for: a `seed` makes sampling coupled, so the same
        request gives the same answer; None draws afresh (the session's random id keys it)."""
        return cls(temperature, top_k, top_p, 0 if seed is None else seed % (1 << 64), seed is not None)

    @property
    def sends_q(self) -> bool:
        """Whether drafts carry their distribution q: only the rejection rule reads it."""
        return not self.greedy and not self.coupled


@dataclass(frozen=True)
class SparseDist:
    """A draft distribution q: q(ids[i]) = counts[i] / Q_ONE, zero elsewhere."""

    ids: np.ndarray  # uint32, distinct
    counts: np.ndarray  # int64, each >= 1, summing to Q_ONE

    def prob(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.counts[hit[0]]) / Q_ONE if hit.size else 0.0

    def dense(self, vocab_size: int) -> np.ndarray:
        q = np.zeros(vocab_size, dtype=np.float64)
        q[self.ids] = self.counts / Q_ONE
        return q


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The model's own log-probabilities of a row of logits, as float32 (what the API reports):
    no temperature, top_k, top_p or grammar applied."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-softmax at one answered position: its token's, and the most likely
    (id, logprob) pairs, most likely first (ties: the lower id)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(logits)
    ids: np.ndarray | tuple = ()
    if top:
        top = min(top, lp.shape[0])
        near = np.flatnonzero(lp >= np.partition(lp, lp.shape[0] - top)[lp.shape[0] - top])  # ties kept
        ids = near[np.lexsort((near, -lp[near]))][:top]
    return TokenLogprob(float(lp[token]), tuple((int(i), float(lp[i])) for i in ids))


def truncate(probs: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probs) of the kept candidates, most likely first: at most top_k of them
    (0 = no limit), and the smallest prefix whose mass reaches top_p."""
    k = probs.shape[-1] if top_k <= 0 else min(top_k, probs.shape[-1])
    if k < probs.shape[-1]:
        ids = np.argpartition(-probs, k - 1)[:k]
    else:
        ids = np.arange(probs.shape[-1])
    # Stable sort with the id as tie-break keeps the result deterministic.
    ids = ids[np.lexsort((ids, -probs[ids]))]
    kept = probs[ids]
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(kept), top_p * kept.sum())) + 1
        ids, kept = ids[:cut], kept[:cut]
    return ids, kept


def target_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """p over the whole vocabulary (float64) for the user's sampling parameters."""
    probs = softmax(logits / params.temperature)
    if params.top_k <= 0 and params.top_p >= 1.0:
        return probs
    ids, kept = truncate(probs, params.top_k, params.top_p)
    p = np.zeros_like(probs)
    p[ids] = kept / kept.sum()
    return p


def quantize(probs: np.ndarray, top_k: int, top_p: float) -> SparseDist:
    """Truncate and quantise to integer counts summing exactly to Q_ONE (largest remainder)."""
    ids, kept = truncate(probs, top_k, top_p)
    scaled = kept / kept.sum() * Q_ONE
    counts = np.floor(scaled).astype(np.int64)
    short = Q_ONE - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(scaled - counts), kind="stable")[:short]] += 1
    keep = counts > 0  # a candidate that rounds to nothing is not in q's support
    return SparseDist(ids[keep].astype(np.uint32), counts[keep])


def sample_sparse(dist: SparseDist, draw: int) -> int:
    """The token at `draw` (uniform integer in [0, Q_ONE)) under q: exact inverse CDF."""
    if not 0 <= draw < Q_ONE:
        raise ValueError(f"draw {draw} outside [0, {Q_ONE})")
    return int(dist.ids[np.searchsorted(np.cumsum(dist.counts), draw, side="right")])


def sample_dense(p: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.shape[0] - 1))


def position_noise(seed: int, position: int, size: int) -> np.ndarray:
    """G_t: `size` standard Gumbel variables of (seed, position) alone, the same on every machine
    up to the last bit of numpy's log (Philox is counter-based: no state carries between calls)."""
    rng = np.random.Generator(np.random.Philox(key=(seed % (1 << 64)) << 64 | position % (1 << 64)))
    u = rng.random(size) + 2.0 ** -54  # k / 2**53 moved half a step: in (0, 1), never log(0)
    return -np.log(-np.log(u))


def coupled_choice(p: np.ndarray, seed: int, position: int) -> int:
    """The token at `position` under p, coupled: argmax over p's support of log p + G_position."""
    support = np.flatnonzero(p > 0)
    noise = position_noise(seed, position, p.shape[-1])[support]
    return int(support[np.argmax(np.log(p[support]) + noise)])


def greedy_verify(draft: list[int], target_argmax: list[int]) -> tuple[int, int]:
    """target_argmax[i] is the target's token after the committed text + draft[:i]
    (len(draft) + 1 entries). Returns (accepted count, the target's next token)."""
    if len(target_argmax) != len(draft) + 1:
        raise ValueError("need one target token per drafted token plus one")
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return n, int(target_argmax[n])


def speculative_verify(draft: list[int], q: list[SparseDist], p: np.ndarray,
                       rng: np.random.Generator) -> tuple[int, int]:
    """p: [len(draft) + 1, vocab] target distributions. Returns (accepted, next token)."""
    if p.shape[0] != len(draft) + 1 or len(q) != len(draft):
        raise ValueError("need a q per drafted token and len(draft) + 1 rows of p")
    for i, x in enumerate(draft):
        qx = q[i].prob(x)
        if qx <= 0.0:
            raise ValueError(f"drafted token {x} has zero probability under its own q")
        if rng.random() * qx < p[i, x]:  # u < p/q without dividing
            continue
        residual = np.maximum(p[i] - q[i].dense(p.shape[1]), 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: any sample from p is exact
            residual = p[i]
        return i, sample_dense(residual, rng)
    return len(draft), sample_dense(p[-1], rng)
