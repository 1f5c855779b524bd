"""Tiny Qwen2-architecture models written to real GGUF files, for tests and smoke benches.

Same tensor names, metadata, byte-level BPE tokenizer and chat template shape
as the real Qwen files, so the real loader, tokenizer and services run on them
in milliseconds. A draft is made from its target by adding noise, which gives
realistic partial acceptance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "a t", "e n",
          "Ġ s", "o r", "Ġ w", "a n", "Ġ c", "i s", "Ġ o", "e s", "Ġ f", "i t"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    tokens = byte_level_alphabet()
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, MERGES, types


def tiny_weights(seed: int, n_layers: int, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                 vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hd = dim // n_heads
    kv = n_kv_heads * hd

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((vocab_size, dim)).astype(np.float32),
         "output_norm.weight": np.ones(dim, dtype=np.float32),
         "output.weight": mat(vocab_size, dim, 4.0)}  # peaked enough that greedy is well defined
    for i in range(n_layers):
        p = f"blk.{i}"
        w.update({
            f"{p}.attn_norm.weight": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32),
            f"{p}.ffn_norm.weight": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32),
            f"{p}.attn_q.weight": mat(dim, dim), f"{p}.attn_q.bias": (0.1 * rng.standard_normal(dim)).astype(np.float32),
            f"{p}.attn_k.weight": mat(kv, dim), f"{p}.attn_k.bias": (0.1 * rng.standard_normal(kv)).astype(np.float32),
            f"{p}.attn_v.weight": mat(kv, dim), f"{p}.attn_v.bias": (0.1 * rng.standard_normal(kv)).astype(np.float32),
            f"{p}.attn_output.weight": mat(dim, dim),
            f"{p}.ffn_gate.weight": mat(ffn_dim, dim), f"{p}.ffn_up.weight": mat(ffn_dim, dim),
            f"{p}.ffn_down.weight": mat(dim, ffn_dim),
        })
    return w


def perturb(weights: dict[str, np.ndarray], seed: int, noise: float) -> dict[str, np.ndarray]:
    """A draft that mostly agrees with its target: weights plus relative Gaussian noise."""
    rng = np.random.default_rng(seed)
    return {k: (v + noise * v.std() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}


def write_gguf(path: str | Path, weights: dict[str, np.ndarray], n_layers: int, dim: int, n_heads: int,
               n_kv_heads: int, ffn_dim: int, quantize: bool = True, context: int = 2048) -> Path:
    """Write a Qwen2 GGUF; with `quantize`, 2-D weights are stored Q8_0 (dequantised on load)."""
    import gguf

    tokens, merges, types = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(n_layers)
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in weights.items():
        if quantize and array.ndim == 2 and array.shape[1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_pair(folder: str | Path, seed: int = 0, noise: float = 0.3, n_layers: int = 2, dim: int = 64,
               n_heads: int = 4, n_kv_heads: int = 2, ffn_dim: int = 128) -> tuple[Path, Path]:
    """(draft.gguf, target.gguf) in `folder`: a target and a noisy copy of it as the draft."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(tiny_vocab()[0])
    shape = dict(n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim)
    target = tiny_weights(seed, vocab_size=vocab, **shape)
    draft = perturb(target, seed + 1, noise)
    return (write_gguf(folder / "draft.gguf", draft, **shape),
            write_gguf(folder / "target.gguf", target, **shape))
