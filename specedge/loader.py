"""Load Qwen2 checkpoints (GGUF or Hugging Face safetensors) into `specedge.model`.

GGUF files are dequantised once with the `gguf` package; the result (bf16
safetensors plus the tokenizer) is cached next to the model, keyed by the
GGUF file's sha256, so later starts take seconds. The cache records its files'
sha256 and is checked on every load: a damaged one is rebuilt, never used.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from specedge.config import DEVICES, WEIGHTS
from specedge.model import ModelConfig, Qwen2
from specedge.tokenizer import Tokenizer

log = logging.getLogger("specedge.loader")

ARCH = "qwen2"
# Hugging Face parameter names -> GGUF tensor names (the loader's one naming scheme).
_HF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


class ModelFileError(RuntimeError):
    """A model file that cannot be used: missing, corrupted or of the wrong architecture."""


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelFileError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError/struct.error/... on bad headers
        raise ModelFileError(f"{path}: not a readable GGUF file ({exc})") from exc
    try:
        return _from_reader(reader, path)
    except ModelFileError:
        raise
    except Exception as exc:  # a corrupted table or string: the gguf package raises all kinds
        raise ModelFileError(f"{path}: corrupted GGUF metadata or tensor table ({type(exc).__name__}: {exc})") \
            from exc


def _from_reader(reader, path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ModelFileError(f"{path}: architecture {arch!r}, expected {ARCH!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    weights = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = torch.from_numpy(np.array(array, dtype=np.float32))  # owns its memory
    cfg = ModelConfig(
        vocab_size=len(tokens),
        dim=int(_field(reader, f"{ARCH}.embedding_length")),
        n_layers=int(_field(reader, f"{ARCH}.block_count")),
        n_heads=int(_field(reader, f"{ARCH}.attention.head_count")),
        n_kv_heads=int(_field(reader, f"{ARCH}.attention.head_count_kv")),
        ffn_dim=int(_field(reader, f"{ARCH}.feed_forward_length")),
        rope_theta=float(_field(reader, f"{ARCH}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_seq_len=int(_field(reader, f"{ARCH}.context_length", 32768)),
        tie_embeddings="output.weight" not in weights,
    )
    _check_shapes(cfg, weights, path)
    return cfg, weights, _tokenizer(reader)


def _tokenizer(reader) -> Tokenizer:
    return Tokenizer.from_gguf_fields(
        tokens=_field(reader, "tokenizer.ggml.tokens"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        token_types=_field(reader, "tokenizer.ggml.token_type"),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        chat_template=_field(reader, "tokenizer.chat_template", ""),
    )


def read_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer alone, from a GGUF file's metadata: for engines that load the weights
    themselves (llama.cpp), without dequantising anything."""
    import gguf

    try:
        return _tokenizer(gguf.GGUFReader(str(path)))
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: no readable tokenizer in the GGUF metadata ({exc})") from exc


def _check_shapes(cfg: ModelConfig, weights: dict[str, torch.Tensor], path) -> None:
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    expected = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}"
        expected.update({
            f"{p}.attn_q.weight": (cfg.dim, cfg.dim), f"{p}.attn_k.weight": (kv_dim, cfg.dim),
            f"{p}.attn_v.weight": (kv_dim, cfg.dim), f"{p}.attn_output.weight": (cfg.dim, cfg.dim),
            f"{p}.attn_q.bias": (cfg.dim,), f"{p}.attn_k.bias": (kv_dim,), f"{p}.attn_v.bias": (kv_dim,),
            f"{p}.ffn_gate.weight": (cfg.ffn_dim, cfg.dim), f"{p}.ffn_up.weight": (cfg.ffn_dim, cfg.dim),
            f"{p}.ffn_down.weight": (cfg.dim, cfg.ffn_dim),
            f"{p}.attn_norm.weight": (cfg.dim,), f"{p}.ffn_norm.weight": (cfg.dim,),
        })
    for name, shape in expected.items():
        if name not in weights:
            raise ModelFileError(f"{path}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise ModelFileError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """A Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer.json."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable config.json ({exc})") from exc
    weights = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{path}: no .safetensors files")
    for f in files:
        for name, tensor in load_file(str(f)).items():
            weights[_gguf_name(name)] = tensor.float()
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        ffn_dim=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if cfg.tie_embeddings:
        weights.pop("output.weight", None)
    _check_shapes(cfg, weights, path)
    return cfg, weights, read_tokenizer(path)


def read_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a GGUF file or a Hugging Face folder, without reading the weights."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_file(path / "tokenizer.json", path / "tokenizer_config.json")
    return read_gguf_tokenizer(path)


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_NAMES:
        return _HF_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _HF_LAYER_NAMES:
        return f"blk.{parts[2]}.{_HF_LAYER_NAMES['.'.join(parts[3:])]}"
    raise ModelFileError(f"unexpected tensor {hf_name!r} in a Qwen2 checkpoint")


# v2: norms and biases kept in fp32 (v1 rounded them to bf16 in the cache only, so a model's
# first load and its later ones computed differently). Anything derived from a model's outputs
# (recorded drafts) keys on it too.
CONVERSION = "v2"


def _converted_dir(sha256: str) -> Path:
    from specedge.fetch import cache_dir

    return cache_dir() / "converted" / f"{CONVERSION}-{sha256[:32]}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: that is how its entries reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cache_ok(folder: Path, sha256: str) -> bool:
    """Whether `folder` is a finished cache of the GGUF `sha256` whose files all still have the
    hashes recorded in its `done` manifest; warns about any other cache it finds."""
    from specedge.fetch import sha256_file

    done = folder / "done"
    if not done.exists():
        return False
    try:
        manifest = json.loads(done.read_text())
        files = manifest["files"]
        if manifest["gguf_sha256"] != sha256 or not files:
            raise ValueError("not this model's manifest")
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: no readable record of its files' hashes (an older specedge made it?): "
                    "rebuilding it from the GGUF", folder)
        return False
    for name, want in files.items():
        try:
            got = sha256_file(folder / name)
        except OSError as exc:
            log.warning("%s: %s unreadable (%s): rebuilding the cache from the GGUF", folder, name, exc)
            return False
        if got != want:
            log.warning("%s: %s does not have the sha256 recorded when it was written (damaged or "
                        "truncated): rebuilding the cache from the GGUF", folder, name)
            return False
    return True


def _seal(tmp: Path, final: Path, sha256: str) -> None:
    """Record the hashes of the files in `tmp`, make them durable, and put `tmp` in `final`'s place.
    Everything is fsynced before the rename: after a crash, a cache folder either is complete
    or is not there (a rename can reach the disk before the data it names)."""
    from specedge.fetch import sha256_file

    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.name != "done"}
    (tmp / "done").write_text(json.dumps({"gguf_sha256": sha256, "files": files}))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)


def _cached_form(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices as bf16, vectors (norms, biases) as fp32: what the conversion cache holds."""
    return {k: v.to(torch.bfloat16) if v.dim() > 1 else v.float() for k, v in weights.items()}


def read_checkpoint(path: str | Path, sha256: str | None = None):
    """(cfg, weights, tokenizer) from a GGUF file or an HF folder.

    With the GGUF's verified sha256, the dequantised weights are cached (matrices as bf16) and
    every load, the first included, returns that form: a model computes the same on every load.
    """
    path = Path(path)
    if path.is_dir():
        return read_hf_dir(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if sha256 is None:
        return read_gguf(path)
    from safetensors.torch import load_file, save_file

    conv = _converted_dir(sha256)
    if _cache_ok(conv, sha256):
        cfg = ModelConfig(**json.loads((conv / "config.json").read_text()))
        tok = Tokenizer.from_file(conv / "tokenizer.json", conv / "tokenizer_config.json")
        return cfg, load_file(str(conv / "weights.safetensors")), tok
    cfg, weights, tok = read_gguf(path)
    weights = _cached_form(weights)
    tmp = conv.with_name(conv.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "weights.safetensors"))
    (tmp / "config.json").write_text(json.dumps(asdict(cfg)))
    tok.save(tmp / "tokenizer.json", tmp / "tokenizer_config.json")
    _seal(tmp, conv, sha256)
    return cfg, weights, tok


def hf_dir(path: str | Path, sha256: str | None = None) -> Path:
    """A Hugging Face folder for engines that read only that (vLLM): `path` itself when it is one,
    else the GGUF's cached form (matrices bf16, vectors fp32) written once under HF names, keyed
    by the file's sha256. vLLM's own GGUF loader needs CUDA kernels for the quantised blocks."""
    from safetensors.torch import save_file

    from specedge.fetch import sha256_file

    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    sha256 = sha256 or sha256_file(path)
    out = _converted_dir(sha256).with_name(f"{CONVERSION}-hf-{sha256[:32]}")
    if _cache_ok(out, sha256):
        return out
    cfg, weights, tok = read_checkpoint(path, sha256)
    hf_names = {v: k for k, v in _HF_NAMES.items()}
    layer_names = {v: k for k, v in _HF_LAYER_NAMES.items()}

    def hf(name: str) -> str:
        if not name.startswith("blk."):
            return hf_names[name]
        _, layer, rest = name.split(".", 2)
        return f"model.layers.{layer}.{layer_names[rest]}"

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({hf(k): v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.ffn_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "bfloat16"}))
    tok.save(tmp / "tokenizer.json", tmp / "tokenizer_config.json")
    _seal(tmp, out, sha256)
    return out


def resolve_device(device: str) -> str:
    """"auto": the first CUDA device where torch sees one, else the CPU; "cuda" where there is none
    is an error, not a quiet CPU."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} ({', '.join(DEVICES)})")
    if device == "cpu":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ValueError("device = \"cuda\", but torch sees no CUDA device here")
    return "cpu"


def resolve_weights(dtype: str, device: str = "cpu") -> str:
    """"auto": bf16 on a GPU, and where the CPU multiplies it natively (AMX, AVX512-BF16), else
    fp32. Elsewhere bf16 products are emulated and cost the same per row at any batch size, so
    batching many devices' drafts into one pass buys nothing; fp32 products batch well on AVX2."""
    if dtype != "auto":
        return dtype
    native = device != "cpu" or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return "bf16" if native else "fp32"


def load_model(path: str | Path, sha256: str | None = None, dtype: str = "bf16",
               batch_invariant: bool = False, device: str = "cpu") -> tuple[Qwen2, Tokenizer]:
    """dtype: bf16 | int8 (weight-only, bf16 activations; CPU) | fp32 | fp64 | auto (resolve_weights);
    device: cpu | cuda | auto (resolve_device)."""
    device = resolve_device(device)
    dtype = resolve_weights(dtype, device)
    torch_dtype = {"bf16": torch.bfloat16, "int8": torch.bfloat16, "fp32": torch.float32,
                   "fp64": torch.float64}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown weight dtype {dtype!r} ({', '.join(WEIGHTS)})")
    # fp32/fp64 ask for the file's exact values: no bf16 conversion cache for them.
    cfg, weights, tok = read_checkpoint(path, None if dtype in ("fp32", "fp64") else sha256)
    return Qwen2(cfg, weights, torch_dtype, int8=dtype == "int8", batch_invariant=batch_invariant,
                 device=device), tok


def load_named(name_or_path: str, dtype: str, batch_invariant: bool = False,
               device: str = "cpu") -> tuple[Qwen2, Tokenizer]:
    """A registry name (fetched and hash-checked) or a path."""
    from specedge.fetch import resolve

    path, sha256 = resolve(name_or_path)
    return load_model(path, sha256, dtype, batch_invariant, device)
