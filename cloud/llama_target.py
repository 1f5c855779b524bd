"""The target on llama.cpp (llama-cpp-python's C API): the same GGUF file, its weights used as
stored, several devices' sessions verified in one `llama_decode` through sequence ids.

It offers what specedge.model.Qwen2 offers the verifier (cloud/engine.py names that interface):
`new_cache()` hands out a sequence, `forward_batch()` feeds every sequence's new tokens in one
batch and returns logits only for the rows asked for. Rolling back a rejected draft is
`llama_memory_seq_rm` on the positions past the committed length.

One context holds every session: `n_seq` sequences, each with its own n_ctx / n_seq KV cells
when batch-invariant, all sharing n_ctx cells (a unified cache) when batched.
A cache whose session is gone frees its sequence lazily; when every sequence is taken, or the
cells run out mid-batch, the least recently used sessions outside the batch lose theirs and
re-read their text on their next round (the same thing a memory-budget eviction does).

Two ways to feed a pass:
  batch_invariant (default)  the calls llama.cpp's own generation makes, session after session: a
                             prompt in calls of n_batch rows (n_ubatch = n_batch), as
                             llama-cpp-python's `Llama.generate`, `llama-cli` and `llama-server`
                             process one user's prompt, then every generated or drafted row in a
                             call of its own, as they decode. llama.cpp picks its kernels by the
                             rows in a call, so only the same calls give the same bits: the
                             self-test (specedge.exactness) checks them against llama-cpp-python's
                             own `Llama` with the same settings. A 2-core EPYC's 1.5B target
                             verifies k drafted tokens in k + 1 decode steps (docs/engines.md).
  batched                    every session's rows in one llama_decode: cheaper per row, but
                             verified logits differ from decoding alone by ulps (0.67 at most on
                             the 1.5B here); the self-test measures how far and the engine is
                             numerical.

Attention: flash attention off, as llama-cpp-python's `Llama` defaults; on a 2-core AVX2 EPYC it
decoded the 1.5B at 70 ms/token against 80 with it on, prefill alike (docs/engines.md).
"""
from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import numpy as np
import torch

from specedge.cloud.engine import Shape, feeds

CONTEXT = 4096  # positions per session when each session has its own cells (batch_invariant)
SEQUENCES = {True: 16, False: 64}  # sessions holding a warm cache at once, by batch_invariant
SHARED_CONTEXT = 16384  # KV cells shared by every session when batched
DEFAULT_BATCH = 512  # tokens per llama_decode call: a longer pass is fed in several


class LlamaSequence:
    """One session's share of the context: a sequence id while warm, and how many positions it holds."""

    def __init__(self, engine: "LlamaCppTarget"):
        self.engine, self.seq, self.length, self.used = engine, None, 0, 0

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length < self.length and self.seq is not None:
            self.engine._remove(self.seq, length)
        self.length = length

    def nbytes(self) -> int:
        return self.length * self.engine.bytes_per_token


class LlamaCppTarget:
    engine = "llama.cpp"
    hints = False  # no residual stream to read an early exit from
    candidates = (1,)  # rows per llama_decode the self-test may keep (specedge.exactness)

    def __init__(self, gguf_path: str | Path, batch_invariant: bool = True, n_ctx: int = 0, n_seq: int = 0,
                 n_batch: int = DEFAULT_BATCH, threads: int | None = None, flash_attn: bool = False):
        """n_ctx: KV cells in all (0: CONTEXT per session when batch_invariant, else SHARED_CONTEXT);
        n_seq: sessions with a warm cache at once (0: SEQUENCES); n_batch: rows per prompt call
        (llama.cpp's n_batch and n_ubatch)."""
        import llama_cpp as lib

        self.lib, self.exactness, self.batch_invariant = lib, None, batch_invariant
        self.block = 1 if batch_invariant else 0  # rows per verified call; 0 = as many as a pass has
        self.prompt_batch = n_batch if batch_invariant else 0
        self.path, self.flash_attn = str(gguf_path), flash_attn
        _route_log(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = -1  # every layer on the GPU where the build has one; ignored on CPU
        model = lib.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not model:
            raise ValueError(f"llama.cpp could not load {gguf_path}")
        n_seq = min(n_seq or SEQUENCES[batch_invariant], lib.llama_max_parallel_sequences())
        n_ctx = n_ctx or (n_seq * CONTEXT if batch_invariant else SHARED_CONTEXT)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        # Invariant: each session its own cells (n_ctx / n_seq). In one shared cache a session's
        # attention came out other bits when other sessions' cells grew past a few hundred
        # (the 1.5B here, 8 sessions: bench-verifier caught it; tests/test_real_models.py keeps
        # it caught). Batched: cells go to whichever session needs them.
        cparams.kv_unified = not batch_invariant
        # The cores this process may run on: two threads pinned to one core (the bench's verifier)
        # decoded a fifth slower here, each spinning while the other ran.
        cparams.n_threads = cparams.n_threads_batch = self.threads = threads or len(os.sched_getaffinity(0))
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            lib.llama_model_free(model)
            raise ValueError(f"llama.cpp could not make a context of {n_ctx} cells for {gguf_path}")
        self.model, self.ctx, self.n_batch = model, ctx, n_batch
        self.memory = lib.llama_get_memory(ctx)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        weakref.finalize(self, _free, lib, self.batch, ctx, model)
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        n_ctx = lib.llama_n_ctx(ctx)
        per_session = n_ctx // n_seq if batch_invariant else n_ctx
        self.cfg = Shape(vocab, min(per_session, lib.llama_model_n_ctx_train(model)), lib.llama_model_n_layer(model))
        head_dim = lib.llama_model_n_embd(model) // lib.llama_model_n_head(model)
        # f16 keys and values (llama.cpp's default cache type) of every layer
        self.bytes_per_token = self.cfg.n_layers * 2 * lib.llama_model_n_head_kv(model) * head_dim * 2
        self.n_ctx = n_ctx
        self.slots: list[weakref.ref | None] = [None] * n_seq
        self.max_sessions = n_seq  # in one pass (specedge profile's grid stops there)
        self.shared_cells = 0 if batch_invariant else n_ctx  # what one pass's sessions hold together
        self.clock = 0

    def client(self) -> "LlamaClient":
        """llama-cpp-python's own `Llama` on this file with this engine's settings: the self-test's
        and the tests' client nobody here wrote."""
        return LlamaClient(self)

    def new_cache(self, capacity: int = 0) -> LlamaSequence:
        return LlamaSequence(self)  # a sequence id is taken when it is first fed

    def forward(self, tokens, cache: LlamaSequence, last_only: bool = False, on_layer=None) -> torch.Tensor:
        return self.forward_batch([(tokens, cache)], last_only, on_layer)[0]

    def forward_batch(self, sequences, last_only: bool = False, on_layer=None,
                      keep: list[int] | None = None, calls=None) -> list[torch.Tensor]:
        """As Qwen2.forward_batch: each `(tokens, cache)` fed after its cached positions, fp32 logits
        of the last keep[i] rows of each (all rows without keep). Batch-invariant, sequence i goes
        in llama_decode calls of calls[i] rows (one row each where calls or calls[i] is None),
        each call's last row an output as in llama-cpp-python's `Llama.eval`; a kept row should
        end its call (the rows a call outputs choose its last layer's kernels)."""
        tokens, caches, keep = feeds(self, sequences, last_only, on_layer, keep)
        self.clock += 1
        for cache in caches:
            cache.used = self.clock
            if cache.seq is None:
                self._take_slot(cache, caches)
        starts = [cache.length for cache in caches]
        batches = self._calls(tokens, starts, keep, calls)
        out: list[list[np.ndarray]] = [[] for _ in tokens]
        try:
            for rows in batches:
                self._decode(rows, caches, out)
        except BaseException:
            for cache, start in zip(caches, starts):  # leave no half-fed sequence behind
                self._remove(cache.seq, start)
            raise
        for toks, cache in zip(tokens, caches):
            cache.length += len(toks)
        vocab = self.cfg.vocab_size
        return [torch.from_numpy(np.stack(o)) if o else torch.empty(0, vocab) for o in out]

    def _calls(self, tokens, starts, keep, calls) -> list[list[tuple]]:
        """The rows (sequence, token, position, kept, output) of each llama_decode call of a pass."""
        kept = [[j >= len(toks) - keep[i] for j in range(len(toks))] for i, toks in enumerate(tokens)]
        rows = [[(i, t, starts[i] + j, kept[i][j], kept[i][j]) for j, t in enumerate(toks)]
                for i, toks in enumerate(tokens)]
        if not self.batch_invariant:  # everyone's rows together, n_batch at a time
            flat = [row for seq in rows for row in seq]
            return [flat[first:first + self.n_batch] for first in range(0, len(flat), self.n_batch)]
        out = []
        for i, seq in enumerate(rows):
            sizes = calls[i] if calls is not None and calls[i] is not None else [1] * len(seq)
            if sum(sizes) != len(seq) or not all(1 <= n <= self.n_batch for n in sizes):
                raise ValueError(f"calls {sizes} do not split {len(seq)} rows into calls of 1..{self.n_batch}")
            first = 0
            for n in sizes:
                call = seq[first:first + n]
                call[-1] = call[-1][:4] + (True,)
                out.append(call)
                first += n
        return out

    # -- llama.cpp ---------------------------------------------------------------------------------
    def _decode(self, rows, caches, out) -> None:
        lib, batch = self.lib, self.batch
        for j, (i, token, pos, _, output) in enumerate(rows):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
            batch.seq_id[j][0] = caches[i].seq
            batch.logits[j] = output
        batch.n_tokens = len(rows)
        rc = lib.llama_decode(self.ctx, batch)
        if rc == 1:  # out of KV cells: sessions outside the batch give theirs up, oldest first
            for slot in self._outside(caches):
                self._release(slot)
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 1:
                    break
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): {len(rows)} rows, context of {self.n_ctx} cells")
        vocab = self.cfg.vocab_size
        for j, (i, _, _, kept, _) in enumerate(rows):
            if kept:
                row = lib.llama_get_logits_ith(self.ctx, j)
                out[i].append(np.ctypeslib.as_array(row, shape=(vocab,)).copy())

    def _remove(self, seq: int | None, start: int) -> None:
        if seq is not None:
            self.lib.llama_memory_seq_rm(self.memory, seq, start, -1)

    def _release(self, slot: int) -> None:
        ref = self.slots[slot]
        holder = ref() if ref is not None else None
        if holder is not None:  # a live session: cold from now on, its next round re-reads its text
            holder.seq, holder.length = None, 0
        self._remove(slot, 0)
        self.slots[slot] = None

    def _take_slot(self, cache: LlamaSequence, batch: list[LlamaSequence]) -> None:
        free = [s for s, ref in enumerate(self.slots) if ref is None or ref() is None]
        if not free:
            free = self._outside(batch)
            if not free:
                raise RuntimeError(f"a batch of more than {len(self.slots)} sessions (n_seq)")
        self._release(free[0])
        self.slots[free[0]] = weakref.ref(cache)
        cache.seq, cache.length = free[0], 0

    def _outside(self, batch: list[LlamaSequence]) -> list[int]:
        """Slots held outside the batch, dead sessions' first, then least recently used."""
        held = [(-1 if ref() is None else ref().used, s) for s, ref in enumerate(self.slots)
                if ref is not None and ref() not in batch]
        return [slot for _, slot in sorted(held)]


class LlamaClient:
    """llama-cpp-python's high-level `Llama`, as its users run it, with the settings a row's bits
    depend on taken from a LlamaCppTarget: n_batch = n_ubatch, threads, flash attention, GPU
    layers. Its context holds one sequence of the engine's per-session length."""

    def __init__(self, engine: LlamaCppTarget):
        from llama_cpp import Llama, __version__

        self.settings = dict(n_batch=engine.n_batch, n_ubatch=engine.n_batch, n_threads=engine.threads,
                             n_threads_batch=engine.threads, flash_attn=engine.flash_attn)
        self.version, self.vocab = __version__, engine.cfg.vocab_size
        self.llm = Llama(engine.path, n_ctx=engine.cfg.max_seq_len, n_gpu_layers=-1, verbose=False, **self.settings)

    def describe(self) -> str:
        return (f"llama-cpp-python {self.version} Llama(n_batch={self.settings['n_batch']}, n_ubatch="
                f"{self.settings['n_ubatch']}, flash_attn={self.settings['flash_attn']}, "
                f"n_threads={self.settings['n_threads']})")

    def rows(self, tokens: list[int], prompt_len: int) -> torch.Tensor:
        """The logits its generation computes for positions prompt_len - 1 .. len(tokens) - 1, with
        tokens[:prompt_len] as the prompt: `Llama.eval` of the prompt, then of each token."""
        import llama_cpp as lib

        llm, out = self.llm, []
        llm.reset()
        for fed in [tokens[:prompt_len]] + [[t] for t in tokens[prompt_len:]]:
            llm.eval(fed)
            out.append(np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(self.vocab,)).copy())
        return torch.from_numpy(np.stack(out))

    def generate(self, prompt: list[int], max_new: int, stop_ids, fresh: bool = True) -> list[int]:
        """Its own greedy generation (`Llama.generate` with temp = 0), up to a stop token or
        max_new, ended as `create_completion` ends it (neither the stop token nor the last token is
        fed). Fresh: from an empty context; else going on from its last call, as it serves a
        conversation's next turn (its prefix match over what it had fed)."""
        if fresh:
            self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, reset=True):
            if token in stop_ids:
                break
            out.append(token)
            if len(out) >= max_new:
                break
        return out


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; DEBUG, INFO, CONT dropped
_log_callback = None  # kept alive: llama.cpp holds a pointer to it


def _route_log(lib) -> None:
    """llama.cpp's own log (hundreds of lines per load) to the logging module, warnings and up."""
    global _log_callback
    if _log_callback is None:
        log = logging.getLogger("specedge.llama.cpp")

        @lib.llama_log_callback
        def forward(level, text, _user):
            if level in _LOG_LEVELS:
                log.log(_LOG_LEVELS[level], text.decode("utf-8", "replace").rstrip())

        _log_callback = forward
        lib.llama_log_set(forward, None)


def _free(lib, batch, ctx, model) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
