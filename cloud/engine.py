"""Target engines: what the verifier computes with, behind one interface.

The verifier owns sessions, rounds, versions and statistics; cloud/session.py owns the
verification rules. An engine only turns token ids into logits:

  cfg            vocab_size, max_seq_len, n_layers
  new_cache()    a session's KV state: `.length` positions held, `.truncate(n)` rolls back,
                 `.nbytes()` what it holds in memory
  forward_batch([(tokens, cache), ...], keep=[k, ...], on_layer=None, calls=None)
                 one pass over every session's new tokens after its cached positions; fp32
                 logits of the last k rows of each (a cold prefill rides along, only the
                 drafted rows reach the output head); `calls[i]`, where given, the rows per
                 engine call of sequence i (prompt_calls)
  prompt_batch   rows per call of the engine's own prompt processing, on an engine whose row
                 bits depend on how rows are grouped into calls (llama.cpp's n_batch); 0 where
                 they do not (the reference's fixed-shape products) or nobody promises them
  exactness      what specedge.exactness found on this machine (None until established)
  refuses(tokens)   optional: why a session on this text cannot open ("" if it can; the
                 emulated target answers its recorded prompts only)
  max_sessions   optional: sessions one pass may hold (llama.cpp: its sequences)
  shared_cells   optional: KV positions one pass's sessions may hold together, where they share
                 one cache (llama.cpp batched); 0 or absent: each session has its own
  engine, hints, batch_invariant, block   see Capabilities

Engines:
  torch      specedge.model.Qwen2, the reference: batch-invariant by construction, bitwise
             self-tested, reads early-exit hints mid-pass; bf16/int8/fp32 from the GGUF.
  llama.cpp  cloud/llama_target.py: the GGUF's own quantised weights, KV rollback by
             llama_memory_seq_rm; batch-invariant (one row per llama_decode, self-tested like the
             reference) or batched (every session's rows in one call: numerical).
  vllm       cloud/vllm_target.py, for GPU servers (never picked by "auto"): a request per
             session scored through prompt logprobs, vLLM's prefix cache in place of a KV cache;
             batch-invariant with VLLM_BATCH_INVARIANT=1 (GPUs), else numerical.
  emulated   cloud/emulated_target.py (never picked by "auto"; the model is an emulation file):
             the recorded greedy generation of a real target, each pass held for the time its
             profile gives it (docs/capacity.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from specedge.speculative import SamplingParams, coupled_choice, target_distribution


def call_start(prompts: list[tuple[int, int]], position: int, batch: int) -> int:
    """The first position of the engine call that computes `position` in the engine's own
    generation (prompt_calls): a pass that needs that row's logits, or starts there, refeeds from it."""
    if batch:
        for start, end in prompts:
            if start <= position < end:
                return start + (position - start) // batch * batch
    return position


def prompt_calls(prompts: list[tuple[int, int]], start: int, end: int, batch: int) -> list[int]:
    """Rows per engine call that feed positions [start, end) of a text the way the engine's own
    generation fed them, as llama-cpp-python's `Llama.generate`, `llama-cli` and `llama-server`
    do for one user: each prompt span (first, end) (the OPEN's text, a conversation's next turn)
    in calls of `batch` rows counted from its first position, every other position (a generated
    token) in a call of its own. `start` begins a call (call_start)."""
    calls, p = [], start
    for first, last in prompts:
        if last <= p:
            continue
        if first >= end:
            break
        if first > p:
            calls += [1] * (first - p)
            p = first
        stop = min(last, end)
        while p < stop:
            size = min(batch - (p - first) % batch, stop - p)
            calls.append(size)
            p += size
    return calls + [1] * (end - p)


def prefill_calls(engine, prompt_len: int) -> list[int] | None:
    """The calls of a prompt of `prompt_len` tokens on `engine`, None where grouping changes no bit."""
    batch = getattr(engine, "prompt_batch", 0)
    return prompt_calls([(0, prompt_len)], 0, prompt_len, batch) if batch else None


def own_rows(engine, tokens: list[int], prompt_len: int = 1):
    """The logits of positions prompt_len - 1 .. len(tokens) - 1 as the engine's own generation
    computes them, tokens[:prompt_len] its prompt: one forward per call it makes."""
    import torch

    cache = engine.new_cache(capacity=4)  # grows as it goes, as a long generation's does
    first = engine.forward_batch([(tokens[:prompt_len], cache)], keep=[1], calls=[prefill_calls(engine, prompt_len)])
    return torch.cat(first + [engine.forward([t], cache) for t in tokens[prompt_len:]])


def own_generation(engine, prompts: list[list[int]], max_new: int, stop_ids,
                   with_stop: bool = False, coupled: SamplingParams | None = None) -> list[list[int]]:
    """The engine's own greedy generation of each prompt, as its users' runtime runs it: the prompt
    in the engine's prompt calls, then one token per call, argmax at every step; the stop token
    that ended it too, `with_stop`. The prompts go in lockstep, one forward_batch per step, on a
    batch-invariant engine (every row gets the bits it gets alone); a numerical engine's own
    generation is each prompt alone. `coupled`: sampled with those (coupled) parameters instead,
    each position's token the target's choice under that position's noise (specedge.speculative)."""
    import torch

    if not engine.batch_invariant and len(prompts) > 1:
        return [own_generation(engine, [p], max_new, stop_ids, with_stop, coupled)[0] for p in prompts]

    def choose(row, position: int) -> int:
        if coupled is None:
            return int(torch.argmax(row))
        return coupled_choice(target_distribution(row.numpy(), coupled), coupled.seed, position)

    caches = [engine.new_cache(capacity=len(p) + max_new + 8) for p in prompts]
    logits = engine.forward_batch(list(zip(prompts, caches)), keep=[1] * len(prompts),
                                  calls=[prefill_calls(engine, len(p)) for p in prompts])
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts))) if max_new > 0 else []
    while live:
        going = []
        for i, rows in zip(live, logits):
            token = choose(rows[-1], len(prompts[i]) + len(outputs[i]))
            if token in stop_ids:
                outputs[i] += [token] if with_stop else []
                continue
            outputs[i].append(token)
            if len(outputs[i]) < max_new:
                going.append(i)
        live = going
        if live:
            logits = engine.forward_batch([([outputs[i][-1]], caches[i]) for i in live])
    return outputs


@dataclass(frozen=True)
class Shape:
    """What the verifier reads of a target engine's model."""

    vocab_size: int
    max_seq_len: int
    n_layers: int


def feeds(engine, sequences, last_only: bool, on_layer, keep: list[int] | None):
    """(token lists, caches, rows kept per sequence) of a forward_batch call on an engine that
    shows no layers (not torch), checked against what it holds."""
    if on_layer is not None:
        raise ValueError(f"the {engine.engine} engine has no early-exit layer to show (capabilities.hints)")
    tokens = [[int(t) for t in toks] for toks, _ in sequences]
    caches = [cache for _, cache in sequences]
    keep = [1] * len(tokens) if last_only else keep if keep is not None else [len(t) for t in tokens]
    for toks, cache, k in zip(tokens, caches, keep):
        if not toks or not 1 <= k <= len(toks):
            raise ValueError(f"a sequence of {len(toks)} new tokens cannot keep {k} rows")
        if cache.length + len(toks) > engine.cfg.max_seq_len:
            raise ValueError(f"sequence of {cache.length + len(toks)} positions exceeds the "
                             f"engine's {engine.cfg.max_seq_len}")
    return tokens, caches, keep


@dataclass(frozen=True)
class Capabilities:
    """What an engine promises; sent in the verifier's status and shown by `fleet ls`."""

    engine: str
    exactness: str  # "exact": bitwise self-tested here; "numerical": equal up to max_abs_dlogit
    max_abs_dlogit: float | None  # largest block-vs-alone logit difference the self-test saw
    sampled: bool  # full distributions at drafted positions: sampled verification works
    hints: bool  # early-exit hints mid-pass (the reference engine only)
    batch_invariant: bool
    max_context: int

    @classmethod
    def of(cls, engine) -> "Capabilities":
        found = engine.exactness
        exact = bool(found and found.exact)
        return cls(engine.engine, "exact" if exact else "numerical", found.max_abs_diff if found else None, True,
                   engine.hints, engine.batch_invariant, engine.cfg.max_seq_len)

    def to_json(self) -> dict:
        return asdict(self)
