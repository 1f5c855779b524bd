"""Draft engine: the frozen draft model plus its KV cache, one request at a time.

Backends share this interface (start / draft / commit, `backend`, `vocab_size`): `torch` is
the reference, running `specedge.model` on the CPU; `onnxruntime` runs the exported graph
(device/ort_engine.py); `tensorrt` a TensorRT engine built from it (device/trt_engine.py).
`device/backends.py` picks the best one available.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from specedge.model import Qwen2
from specedge.speculative import (Q_ONE, SamplingParams, SparseDist, coupled_choice, quantize, sample_sparse, softmax,
                                  target_distribution)


@dataclass
class Drafted:
    tokens: list[int]
    q: list[SparseDist] | None  # sampled mode: each token's draft distribution
    confidences: list[float]  # the draft's probability of each token it chose
    seconds: float = 0.0  # drafting time
    source: str = "model"  # model | lookup (device/lookup.py): each has its own acceptance

    @classmethod
    def empty(cls, params: SamplingParams) -> "Drafted":
        return cls([], [] if params.sends_q else None, [])

    def extend(self, more: "Drafted") -> "Drafted":
        self.tokens += more.tokens
        self.confidences += more.confidences
        if self.q is not None:
            self.q += more.q
        self.seconds += more.seconds
        return self

    def cut(self, n: int) -> "Drafted":
        return Drafted(self.tokens[:n], None if self.q is None else self.q[:n], self.confidences[:n], self.seconds,
                       self.source)


class DraftEngine:
    """What every backend shares: the committed text against the cache, and the drafting loop.
    A backend supplies `_reset(capacity)`, `_feed(tokens) -> last logits` (fp32 numpy, the
    cache advanced past `tokens`) and `_truncate(length)`."""

    backend = "?"
    vocab_size: int

    def __init__(self, q_top_k: int = 8, q_top_p: float = 0.98):
        self.q_top_k, self.q_top_p = q_top_k, q_top_p
        self.fed: list[int] = []  # tokens whose keys/values are in the cache
        self.pending: list[int] = []  # committed tokens not fed yet
        self.reused = 0  # prompt tokens the last start() found in the cache and did not feed again

    def start(self, committed: list[int], reuse: bool = True) -> None:
        """Prefill the prompt (all but its last token, whose logits start the first draft), so a
        draft step costs the same in the first round as in any other. A prompt that begins like
        the text the cache holds (the next turn of a conversation, a shared system prompt) keeps
        the cache's common prefix: only the rest is fed (`reused` says how much was kept; `reuse`
        False: never)."""
        if reuse and self.fed and self.fed[0] == committed[0] and self._room(len(committed) + 128):
            self.commit(committed)
        else:
            self._reset(len(committed) + 128)
            self.fed, self.pending = [], list(committed)
        self.reused = len(self.fed)
        if len(self.pending) > 1:
            self._feed(self.pending[:-1])
            self.fed += self.pending[:-1]
            self.pending = self.pending[-1:]

    def _room(self, capacity: int) -> bool:
        """Whether the cache can hold `capacity` positions without a reset (a backend with a fixed
        context says so; the others grow)."""
        return True

    def commit(self, committed: list[int]) -> None:
        """The device's committed text changed (a verdict): keep the cache's valid prefix."""
        fed = self.fed
        common = 0
        limit = min(len(fed), len(committed))
        while common < limit and fed[common] == committed[common]:
            common += 1
        common = min(common, len(committed) - 1)  # the last token is re-fed: its logits start the draft
        self._truncate(common)
        del fed[common:]
        self.pending = list(committed[common:])

    def draft(self, draft_len: int, params: SamplingParams, rng: np.random.Generator, stop_ids=frozenset(),
              keep_going=None, constraint=None) -> Drafted:
        """Draft up to draft_len tokens after the committed text. `keep_going(confidences so far)` may
        stop the draft early (it is asked before each token, the first included). `constraint` (a
        grammar's state at the committed text, specedge/grammar.py) masks every step's logits, so q
        is the masked draft's; it is left as it was given."""
        out = Drafted.empty(params)
        t0, taken = time.perf_counter(), 0
        for _ in range(draft_len):
            if keep_going is not None and not keep_going(out.confidences):
                break
            logits = self._feed(self.pending)
            self.fed += self.pending
            if constraint is not None:
                logits = constraint.mask(logits)
            if params.greedy:
                token = int(np.argmax(logits))
                confidence = float(softmax(logits)[token])
            elif params.coupled:  # the token at position len(fed), under that position's noise
                p = target_distribution(logits, params)
                token = coupled_choice(p, params.seed, len(self.fed))
                confidence = float(p[token])
            else:
                dist = quantize(softmax(logits / params.temperature), self.q_top_k, self.q_top_p)
                token = sample_sparse(dist, int(rng.integers(Q_ONE)))
                confidence = dist.prob(token)
                out.q.append(dist)
            out.tokens.append(token)
            out.confidences.append(confidence)
            self.pending = [token]
            if token in stop_ids:  # nothing follows a stop token worth verifying
                break
            if constraint is not None:
                constraint.accept([token])
                taken += 1
        if constraint is not None:
            constraint.rollback(taken)
        out.seconds = time.perf_counter() - t0
        return out


class TorchDraftEngine(DraftEngine):
    """The reference: `specedge.model` in PyTorch on the CPU."""

    backend = "torch"

    def __init__(self, model: Qwen2, q_top_k: int = 8, q_top_p: float = 0.98):
        super().__init__(q_top_k, q_top_p)
        self.model = model
        self.cache = None

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def _reset(self, capacity: int) -> None:
        self.cache = self.model.new_cache(capacity=capacity)

    def _feed(self, tokens: list[int]) -> np.ndarray:
        return self.model.forward(tokens, self.cache, last_only=True)[-1].numpy()

    def _truncate(self, length: int) -> None:
        self.cache.truncate(length)


def load_draft(cfg):
    """(model, tokenizer) for a [draft] section: the model, or its first `layers` layers read out
    through a trained head (a smaller draft sharing the backbone, and its weights in memory)."""
    from specedge.exit_head import load_exit_head
    from specedge.loader import load_named, resolve_device

    device = resolve_device(cfg.device)
    # int8 is the CPU's fastest form; a GPU's products are bf16 (and int8's are the CPU's kernel)
    weights = "bf16" if device != "cpu" and cfg.weights == "int8" else cfg.weights
    model, tok = load_named(cfg.model, weights, device=device)
    if cfg.layers:
        head = load_exit_head(model, cfg.layers, cfg.head or None)
        adapter = None if head.down is None else (head.down, head.up)
        model = model.layer_subset(list(range(head.layer)), adapter)
    return model, tok
