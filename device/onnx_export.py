"""The draft as ONNX: one graph for prefill and single-step decode, its KV cache explicit.

    inputs   input_ids     int64 [T]                  the tokens fed now
             past_key      fp32  [L, kv_heads, P, hd] the cache so far (P may be 0)
             past_value    fp32  [L, kv_heads, P, hd]
    outputs  logits        fp32  [T, vocab]
             present_key   fp32  [L, kv_heads, P+T, hd]
             present_value fp32  [L, kv_heads, P+T, hd]

T and P are dynamic. The graph is `specedge.model.Qwen2.forward` written as one pure function
(fp32, int8 weights dequantised, a shallow draft's adapter included), exported with the
TorchScript exporter; weights live in an external-data file next to the .onnx (a 0.5B model is
past protobuf's 2 GB). `export_draft` checks the graph against the PyTorch model before it is
cached (`check_export`). TensorRT builds its engine from the same file (device/trt_engine.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from specedge.model import Qwen2

EXPORT_VERSION = 1  # bump when the graph changes: cached exports are keyed by it
INPUTS = ("input_ids", "past_key", "past_value")
OUTPUTS = ("logits", "present_key", "present_value")
# fp32 graph against the fp32 PyTorch model: reductions are ordered differently, nothing else.
LOGIT_TOLERANCE = 1e-3
# 8-bit weights against the fp32 PyTorch model (relative to the largest logit). For scale: on the
# real 0.5B draft the q8 graph is 0.57 off at most, PyTorch's own int8 draft 0.86.
Q8_TOLERANCE = 0.1


class _Graph(torch.nn.Module):
    def __init__(self, model: Qwen2):
        super().__init__()
        cfg = model.cfg
        self.n_heads, self.n_kv, self.hd, self.eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        self.register_buffer("embed", model.embed.float())
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd))
        self.register_buffer("inv_freq", inv_freq.float())
        self.layers = torch.nn.ModuleList()
        for layer in model.layers:
            m = torch.nn.Module()
            for name in ("qkv", "out", "gate_up", "down"):
                m.register_buffer(name, layer[name].dense_weight())
            m.register_buffer("qkv_bias", layer["qkv"].bias.float())
            m.register_buffer("attn_norm", layer["attn_norm"].float())
            m.register_buffer("ffn_norm", layer["ffn_norm"].float())
            self.layers.append(m)
        self.register_buffer("norm", model.norm.float())
        self.register_buffer("head", model.head.dense_weight())
        self.adapter = model.adapter is not None
        if self.adapter:
            self.register_buffer("adapter_down", model.adapter[0].float())
            self.register_buffer("adapter_up", model.adapter[1].float())

    def rmsnorm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, input_ids, past_key, past_value):
        nh, nkv, hd = self.n_heads, self.n_kv, self.hd
        n = input_ids.shape[0]
        past = past_key.shape[2]
        positions = torch.arange(n, dtype=torch.float32) + past
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[None], angles.sin()[None]  # [1, T, hd]
        keys = torch.arange(n, dtype=torch.int64)[None, :] + past  # causal: key j visible to query i if j <= P + i
        visible = torch.cat([torch.ones(n, past, dtype=torch.bool), keys <= (torch.arange(n)[:, None] + past)], dim=1)
        bias = torch.where(visible, 0.0, -math.inf)
        x = self.embed[input_ids]
        present_k, present_v = [], []
        for i, layer in enumerate(self.layers):
            h = self.rmsnorm(x, layer.attn_norm)
            qkv = h @ layer.qkv.T + layer.qkv_bias
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self.rotate(q.reshape(n, nh, hd).transpose(0, 1), cos, sin)
            k = self.rotate(k.reshape(n, nkv, hd).transpose(0, 1), cos, sin)
            v = v.reshape(n, nkv, hd).transpose(0, 1)
            k = torch.cat([past_key[i], k], dim=1)
            v = torch.cat([past_value[i], v], dim=1)
            present_k.append(k)
            present_v.append(v)
            group = nh // nkv
            kk, vv = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
            scores = (q @ kk.transpose(1, 2)) / math.sqrt(hd) + bias
            attn = torch.softmax(scores, dim=-1) @ vv  # [nh, T, hd]
            x = x + attn.transpose(0, 1).reshape(n, nh * hd) @ layer.out.T
            h = self.rmsnorm(x, layer.ffn_norm)
            gate, up = (h @ layer.gate_up.T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ layer.down.T
        if self.adapter:
            x = x + (x @ self.adapter_down.T) @ self.adapter_up.T
        logits = self.rmsnorm(x, self.norm) @ self.head.T
        return logits, torch.stack(present_k), torch.stack(present_v)


def empty_cache(model_cfg, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    shape = (model_cfg.n_layers, model_cfg.n_kv_heads, length, model_cfg.head_dim)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def export(model: Qwen2, path: str | Path) -> Path:
    """Write the graph to `path`, its weights to `path`.data beside it."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _Graph(model).eval()
    ids = torch.tensor([1, 2, 3], dtype=torch.long)
    past = tuple(torch.from_numpy(a) for a in empty_cache(model.cfg, 2))
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        raw = Path(folder) / "raw.onnx"
        # The TorchScript exporter, deliberately: it traces this one static graph with dynamic axes,
        # with no torch.export constraints to state; it is deprecated, hence the silenced warning.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(graph, (ids, *past), str(raw), input_names=list(INPUTS), output_names=list(OUTPUTS),
                              dynamic_axes={"input_ids": {0: "tokens"}, "past_key": {2: "past"},
                                            "past_value": {2: "past"}, "logits": {0: "tokens"},
                                            "present_key": {2: "total"}, "present_value": {2: "total"}},
                              opset_version=17, dynamo=False)
        # One external-data file, whatever the exporter wrote, so an export moves as two files.
        staged = Path(folder) / path.name
        onnx.save_model(onnx.load(str(raw)), str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        _move(staged, path)
    return path


def quantize_weights(src: str | Path, dst: str | Path) -> Path:
    """8-bit weight-only quantisation of every weight product (onnxruntime's MatMulNBits: blocks
    of 32 along the reduction, symmetric scales, int8 compute). On a CPU it halves the bytes a
    draft step reads against PyTorch's int8 draft and lets the kernels use VNNI/AMX."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst = Path(dst)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return dst


def check_export(model: Qwen2, path: str | Path, prompt: list[int], steps: int = 4,
                 tolerance: float = LOGIT_TOLERANCE) -> float:
    """The largest |logit difference| between the ONNX graph (onnxruntime, CPU) and `model`
    over a prefill of `prompt` and `steps` single-token decodes; raises past `tolerance` (relative
    to the largest logit)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = model.new_cache(len(prompt) + steps + 1)
    pk, pv = empty_cache(model.cfg)
    worst, feed = 0.0, list(prompt)
    for _ in range(steps + 1):
        want = model.forward(feed, cache).float().numpy()
        got, pk, pv = session.run(None, {"input_ids": np.array(feed, np.int64), "past_key": pk, "past_value": pv})
        worst = max(worst, float(np.abs(got - want).max()))
        feed = [int(want[-1].argmax())]
    if worst > tolerance * max(1.0, float(np.abs(want).max())):
        raise ValueError(f"the ONNX draft's logits differ from PyTorch's by {worst:.2e} "
                         f"(tolerance {tolerance} relative to the largest logit)")
    return worst


def export_key(model_file: str | Path, layers: int = 0, head: str = "") -> str:
    """What a cached export is keyed by: the model file's bytes (size and mtime stand in for a
    hash: the loader already checked the content), the shallow-draft settings, this exporter."""
    stat = Path(model_file).stat()
    head_stat = Path(head).stat() if head else None
    raw = json.dumps([str(Path(model_file).resolve()), stat.st_size, stat.st_mtime_ns, layers, head,
                      head_stat and head_stat.st_mtime_ns, EXPORT_VERSION, torch.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cached_export(draft_cfg, log=print) -> Path:
    """The draft's ONNX file in the cache, exported and checked against PyTorch if missing: the
    fp32 graph, or for `[draft] weights = "int8"` (the default) its 8-bit weight-only form."""
    from specedge.device.draft import load_draft
    from specedge.fetch import cache_dir, resolve

    model_file, _ = resolve(draft_cfg.model)
    stem = f"{Path(str(model_file)).stem}-{export_key(model_file, draft_cfg.layers, draft_cfg.head)}"
    fp32_path = cache_dir() / "onnx" / f"{stem}.onnx"
    path = fp32_path.with_name(f"{stem}-q8.onnx") if draft_cfg.weights == "int8" else fp32_path
    if _complete(path):
        return path
    model, tok = load_draft(dataclasses.replace(draft_cfg, weights="fp32", device="cpu"))
    prompt = tok.encode("def fibonacci(n):\n    ")
    fp32_path.parent.mkdir(parents=True, exist_ok=True)
    if not _complete(fp32_path):
        log(f"exporting the draft to ONNX: {fp32_path} (once; cached)")
        with tempfile.TemporaryDirectory(dir=fp32_path.parent) as folder:
            staged = export(model, Path(folder) / fp32_path.name)
            worst = check_export(model, staged, prompt, steps=3)
            log(f"ONNX export checked against PyTorch: max |logit difference| {worst:.2e}")
            _move(staged, fp32_path)
    if path != fp32_path:
        log(f"quantising its weights to 8 bits (MatMulNBits): {path}")
        with tempfile.TemporaryDirectory(dir=fp32_path.parent) as folder:
            staged = quantize_weights(fp32_path, Path(folder) / path.name)
            worst = check_export(model, staged, prompt, steps=3, tolerance=Q8_TOLERANCE)
            log(f"8-bit ONNX draft checked against fp32 PyTorch: max |logit difference| {worst:.3f}")
            _move(staged, path)
    return path


def _complete(path: Path) -> bool:
    return path.exists() and path.with_name(path.name + ".data").exists()


def _move(staged: Path, path: Path) -> None:
    """Data first, graph last: a graph in the cache always has its data beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged.with_name(staged.name + ".data"), path.with_name(path.name + ".data"))
    os.replace(staged, path)
