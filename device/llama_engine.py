"""The draft on llama.cpp (llama-cpp-python): the same GGUF file, no conversion, its quantised
weights read as they are, which is what makes it the fastest draft on a CPU. On a Jetson it is
what the community runs: build llama-cpp-python with CUDA (docs/device.md), and it offloads
every layer (`n_gpu_layers = -1`).

One sequence, KV cache in the llama.cpp context: feeding evaluates after the committed
positions and keeps only the last position's logits; rolling back sets the position count, and
the next evaluation removes the cache past it (llama_memory_seq_rm).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from specedge.device.draft import DraftEngine

DEFAULT_CONTEXT = 4096  # positions held; a longer prompt is refused before it is fed


class LlamaCppDraftEngine(DraftEngine):
    backend = "llama.cpp"

    def __init__(self, gguf_path: str | Path, q_top_k: int = 8, q_top_p: float = 0.98,
                 n_ctx: int = DEFAULT_CONTEXT, threads: int | None = None):
        import llama_cpp

        super().__init__(q_top_k, q_top_p)
        self._lib = llama_cpp
        # The cores it may run on, not the machine's, for one token and for many (a prefill, a
        # verdict's catch-up): Llama's own n_threads_batch default, every core of the machine, ran a
        # 2-token feed in 8.5 s instead of 0.14 on a device pinned to one core (`specedge profile draft`).
        threads = threads or len(os.sched_getaffinity(0))
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=-1, verbose=False)
        self.n_ctx = self.llm.n_ctx()

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def _reset(self, capacity: int) -> None:
        if capacity > self.n_ctx:
            raise ValueError(f"{capacity} positions exceed the llama.cpp draft's context of {self.n_ctx}")
        self.llm.reset()

    def _room(self, capacity: int) -> bool:
        return capacity <= self.n_ctx

    def _feed(self, tokens: list[int]) -> np.ndarray:
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise ValueError(f"the draft's context of {self.n_ctx} positions is full")
        self.llm.eval(tokens)
        row = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.vocab_size,)).copy()

    def _truncate(self, length: int) -> None:
        self.llm.n_tokens = length  # eval() drops the cache past it before it feeds
