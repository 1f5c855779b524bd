"""Qwen2 decoder in one plain file: RMSNorm, rotary embeddings, grouped-query
attention with a truncatable KV cache, SwiGLU MLP, tied or untied head.

The same forward runs one position (drafting) or many (verification, prefill),
on the CPU or a CUDA device (`device`): weights, caches and activations live there,
logits come back to the CPU. Weights are stored as bf16 (AMX/AVX512-BF16 matmuls on
modern x86, and GPUs), int8 weight-only (per-row scales; CPU) or fp32/fp64
(reference, tests).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 32768
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Chunk size for long teacher-forced passes (exit-head training); any size is exact.
INVARIANT_BLOCK = 32
# Batch invariance: a CPU GEMM picks its kernel, and with it each row's reduction order, by the
# number of rows it is given (a GEMV for one row, a micro-kernel with a ragged tail for five, ...),
# and which rows flip a rounding depends on the data, so no probe on random rows can clear a
# kernel. Calling every product with the same number of rows, zero-padded, makes the kernel choice
# a constant: a row's bits then depend only on the row. Which block is fastest, and that the whole
# model is invariant with it, is established on the loaded model by specedge.exactness.
DEFAULT_BLOCK = 8


class Linear:
    """y = x @ W.T + b with the weight kept in a CPU-friendly form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, int8: bool,
                 device: torch.device | str = "cpu"):
        self.bias = None if bias is None else bias.to(device, dtype)
        self.int8 = int8
        if int8:
            w = weight.float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous().to(device)
            self.scale = scale.to(device, dtype)
        else:
            self.weight = weight.to(device, dtype).contiguous()

    def dense_weight(self) -> torch.Tensor:
        """W as fp32 (int8 weights dequantised): for training against the layer, not for inference."""
        if self.int8:
            return self.weight.float() * self.scale.float()[:, None]
        return self.weight.float()

    def __call__(self, x: torch.Tensor, block: int = 0) -> torch.Tensor:
        """block > 0: every product call gets exactly `block` rows (see DEFAULT_BLOCK)."""
        n = x.shape[0]
        if not block or n == block:
            y = self._product(x)
        elif block == 1:
            y = torch.cat([self._product(row) for row in x.split(1)])
        else:
            padded = torch.cat([x, x.new_zeros(-n % block, x.shape[1])]) if n % block else x
            y = torch.cat([self._product(b) for b in padded.split(block)])[:n]
        return y if self.bias is None else y + self.bias

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return F.linear(x, self.weight)


def grown_capacity(capacity: int, length: int, max_seq_len: int) -> int:
    """What a KVCache of `capacity` positions holds once it takes `length`: doubled when it must
    grow, at least `length`, at most the context (the verifier admits passes by it)."""
    return capacity if length <= capacity else min(max_seq_len, max(length, 2 * capacity))


class KVCache:
    """Keys and values of one sequence, per layer: [n_kv_heads, capacity, head_dim].

    `length` positions are valid; truncate() rolls back rejected drafts for free.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, capacity: int = 256, device: torch.device | str = "cpu"):
        self.cfg, self.dtype, self.device, self.length = cfg, dtype, torch.device(device), 0
        self.k = [self._empty(capacity) for _ in range(cfg.n_layers)]
        self.v = [self._empty(capacity) for _ in range(cfg.n_layers)]

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.zeros(self.cfg.n_kv_heads, capacity, self.cfg.head_dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, length: int) -> None:
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {length} positions exceeds the model's {self.cfg.max_seq_len}")
        if length <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, length, self.cfg.max_seq_len)
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = self._empty(capacity)
                new[:, : self.length] = old[:, : self.length]
                cache[i] = new

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def fork(self, length: int, capacity: int) -> "KVCache":
        """A new cache holding a copy of this one's first `length` positions (another session's
        shared prefix: a batch-invariant engine computes them to the same bits anyway)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot fork {length} of a cache's {self.length} positions")
        new = KVCache(self.cfg, self.dtype, max(capacity, length), self.device)
        for mine, theirs in ((self.k, new.k), (self.v, new.v)):
            for src, dst in zip(mine, theirs):
                dst[:, :length] = src[:, :length]
        new.length = length
        return new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Qwen2:
    engine = "torch"  # the reference target engine (cloud/engine.py)
    hints = True  # on_layer shows the residual stream mid-pass: early-exit hints

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.bfloat16, int8=False,
                 batch_invariant: bool = False, device: torch.device | str = "cpu"):
        """`weights` use GGUF tensor names (token_embd.weight, blk.N.attn_q.weight, ...).

        batch_invariant: fixed-shape products and per-query attention, so that every position's
        logits can be bit-identical whether it is fed alone (autoregressive decoding), inside a
        block (verification) or beside other sequences (batching), and greedy speculative decoding
        reproduces the target's own decoding exactly. specedge.exactness checks that it does.
        device: where it computes (a CUDA device: bf16, fp32 or fp64; int8 products are the CPU's).
        """
        self.device = device = torch.device(device)
        if int8 and device.type != "cpu":
            raise ValueError(f"int8 weights are a CPU form; on {device} use bf16")
        self.cfg, self.dtype, self.batch_invariant = cfg, dtype, batch_invariant

        def lin(name: str) -> Linear:
            return Linear(weights[f"{name}.weight"], None, dtype, int8, device)

        def vec(name: str) -> torch.Tensor:
            return weights[name].to(device, torch.float32)

        self.embed = weights["token_embd.weight"].to(device, dtype)
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}"
            q, k, v = (weights[f"{p}.attn_{n}.weight"] for n in "qkv")
            qkv_bias = torch.cat([weights[f"{p}.attn_{n}.bias"] for n in "qkv"])
            self.layers.append(dict(
                attn_norm=vec(f"{p}.attn_norm.weight"),
                qkv=Linear(torch.cat([q, k, v]), qkv_bias, dtype, int8, device),
                out=lin(f"{p}.attn_output"),
                ffn_norm=vec(f"{p}.ffn_norm.weight"),
                gate_up=Linear(torch.cat([weights[f"{p}.ffn_gate.weight"], weights[f"{p}.ffn_up.weight"]]),
                               None, dtype, int8, device),
                down=lin(f"{p}.ffn_down"),
            ))
        self.norm = vec("output_norm.weight")
        head = weights.get("output.weight")
        self.head = Linear(weights["token_embd.weight"] if head is None else head, None, dtype, int8, device)
        self._rope_len = 0
        self._grow_rope(4096)
        # Rows per product call (0: any); specedge.exactness.establish() may pick another.
        self.block = DEFAULT_BLOCK if batch_invariant else 0
        self.exactness = None  # what specedge.exactness found on this machine, once tested
        self.adapter = None

    def _grow_rope(self, length: int) -> None:
        length = min(max(length, 2 * self._rope_len), self.cfg.max_seq_len)
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(self.device, self.dtype), angles.sin().to(self.device, self.dtype)
        self._rope_len = length

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.cfg, self.dtype, capacity, self.device)

    def _rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return (xf * weight).to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attend(self, q, k, v, start, mask):
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        n = q.shape[1]
        if self.batch_invariant and n > 1:
            # One query at a time over exactly its causal prefix: the same kernel call,
            # shapes and reduction order as when that position is decoded alone.
            return torch.cat([self._attend(q[:, i:i + 1], k, v, start + i, None) for i in range(n)], dim=1)
        end = start + n
        return F.scaled_dot_product_attention(q.unsqueeze(0), k[None, :, :end], v[None, :, :end],
                                              attn_mask=mask, enable_gqa=True, scale=scale)[0]

    def forward(self, tokens, cache: KVCache, last_only: bool = False, on_layer=None) -> torch.Tensor:
        """Feed `tokens` after the cached positions; return fp32 logits [len(tokens), vocab]
        (or [1, vocab] for the last position with last_only, as prefill needs).
        `on_layer(i, hidden)` sees the residual stream (one row per token) after i layers, before
        layer i runs: an early exit reads it there and acts before the pass goes on."""
        return self.forward_batch([(tokens, cache)], last_only, on_layer)[0]

    @torch.inference_mode()
    def forward_batch(self, sequences, last_only: bool = False, on_layer=None,
                      keep: list[int] | None = None, calls=None) -> list[torch.Tensor]:
        """One pass over several sequences, each `(tokens, cache)` with its own cached length:
        the weight products run on all their rows at once (what batching across devices buys),
        attention runs per sequence over its own cache. Returns each sequence's logits, as
        forward() would; in batch-invariant mode they are bit-identical to it. `keep[i]` asks
        for the logits of only the last keep[i] rows of sequence i (a cold session's prefill
        rides along in the batch, and only its draft rows reach the output head).
        `on_layer(i, hidden)` sees the rows of all sequences, concatenated in order. `calls` (how
        llama.cpp groups rows) changes nothing here: every product has a fixed shape."""
        cfg = self.cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        tokens = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t, _ in sequences]
        spans = []  # (first row, rows, first position, cache, rotary cos, sin, causal mask)
        row = 0
        for toks, (_, cache) in zip(tokens, sequences):
            n, start = toks.shape[0], cache.length
            if n == 0:
                raise ValueError("a sequence in the batch has no tokens")
            end = start + n
            cache.reserve(end)
            if end > self._rope_len:
                self._grow_rope(end)
            # Causal within the new block; everything cached before it is visible.
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(diagonal=start) if n > 1 else None
            spans.append((row, n, start, cache, self.cos[start:end], self.sin[start:end], mask))
            row += n

        x = self.embed[torch.cat(tokens).to(self.device)]
        for li, layer in enumerate(self.layers):
            if on_layer is not None:
                on_layer(li, x)
            h = self._rmsnorm(x, layer["attn_norm"])
            qkv = layer["qkv"](h, self.block)
            attn = []
            for first, n, start, cache, cos, sin, mask in spans:
                q, k, v = qkv[first:first + n].split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q = self._rotate(q.view(n, nh, hd).transpose(0, 1), cos, sin)
                k = self._rotate(k.view(n, nkv, hd).transpose(0, 1), cos, sin)
                cache.k[li][:, start:start + n] = k
                cache.v[li][:, start:start + n] = v.view(n, nkv, hd).transpose(0, 1)
                attn.append(self._attend(q, cache.k[li], cache.v[li], start, mask).transpose(0, 1).reshape(n, nh * hd))
            x = x + layer["out"](torch.cat(attn) if len(attn) > 1 else attn[0], self.block)
            h = self._rmsnorm(x, layer["ffn_norm"])
            gate, up = layer["gate_up"](h, self.block).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up, self.block)
        for _, n, start, cache, *_ in spans:
            cache.length = start + n
        if last_only:
            keep = [1] * len(spans)
        if keep is None:
            return list(self.logits(x).split([n for _, n, *_ in spans]))
        rows = [x[first + n - k:first + n] for k, (first, n, *_) in zip(keep, spans)]
        return list(self.logits(torch.cat(rows)).split(keep))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, adapter=None) -> torch.Tensor:
        """The final norm and output head on residual-stream rows: fp32 logits. An adapter
        (down [rank, dim], up [dim, rank]; default the model's own, if truncated with one) maps
        the rows first: an early exit's or a shallow draft's trained head. On the CPU, wherever
        the model computes: what reads them (acceptance, sampling, hints) is the CPU's."""
        adapter = self.adapter if adapter is None else adapter
        if adapter is not None:
            h = hidden.float()
            hidden = (h + (h @ adapter[0].to(h.device).T) @ adapter[1].to(h.device).T).to(hidden.dtype)
        return self.head(self._rmsnorm(hidden, self.norm), self.block).float().cpu()

    def layer_subset(self, layers: list[int], adapter: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Qwen2":
        """A model made of some of this one's layers (sharing their weights) and its output head,
        behind an optional adapter: the first N layers make a shallower draft on the same backbone,
        leaving a few out makes a layer-pruned target."""
        if not layers or any(not 0 <= i < self.cfg.n_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers {layers} are not distinct indices below {self.cfg.n_layers}")
        small = copy.copy(self)
        small.cfg = dataclasses.replace(self.cfg, n_layers=len(layers))
        small.layers = [self.layers[i] for i in sorted(layers)]
        small.adapter = adapter
        small.exactness = None  # other layers compute other bits: the subset is tested on its own
        return small
