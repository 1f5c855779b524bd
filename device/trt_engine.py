"""The draft as a native TensorRT engine, run with pycuda device buffers.

The engine is built from the ONNX export (device/onnx_export.py) with the TensorRT Python
builder: FP16 where the GPU has fast FP16, one optimisation profile for single-token decode
(1 token, a few hundred cached) up to prefill chunks of MAX_TOKENS and MAX_CONTEXT cached, and
is serialised to a cache keyed by GPU name, compute capability and TensorRT version (an engine
is only valid on the GPU and TensorRT that built it). `specedge device build-engine` builds it
ahead of time with progress output.

The KV cache stays on the GPU in two buffers per tensor: each step reads the past from one and
TensorRT writes the present to the other; rolling back rejected drafts re-packs the kept prefix
with one strided 2-D copy. Only the last position's logits come back to the host.

Written against TensorRT 10 and pycuda; not run on this project's CI machines (no GPU there):
tests cover the selection logic and the cache keys around it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from specedge.device.draft import DraftEngine

MAX_TOKENS = 64  # tokens one call feeds (a longer prompt is prefilled in chunks)
MAX_CONTEXT = 4096  # cached positions the engine's profile admits
OPT_CONTEXT = 512


def device_key() -> str:
    """GPU name, compute capability and TensorRT version: what a serialised engine is bound to."""
    import pycuda.driver as cuda
    import tensorrt as trt

    cuda.init()
    gpu = cuda.Device(0)
    major, minor = gpu.compute_capability()
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu.name()}-sm{major}{minor}-trt{trt.__version__}").strip("-")


def engine_path(onnx_path: str | Path, key: str) -> Path:
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}-{key}.engine")


def build_engine(onnx_path: str | Path, model_cfg, report=print, fp16: bool = True) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external-data file beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    layers, kv, hd = model_cfg.n_layers, model_cfg.n_kv_heads, model_cfg.head_dim
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1,), (1,), (MAX_TOKENS,))
    for name in ("past_key", "past_value"):
        profile.set_shape(name, (layers, kv, 0, hd), (layers, kv, OPT_CONTEXT, hd), (layers, kv, MAX_CONTEXT, hd))
    config.add_optimization_profile(profile)
    config.progress_monitor = _Progress(report)
    report(f"building the TensorRT engine from {onnx_path} ({'FP16' if fp16 else 'FP32'}); this takes minutes")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    return bytes(blob)


def _Progress(report):
    import tensorrt as trt

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.last = {}

        def phase_start(self, parent_phase, phase_name, num_steps):
            report(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Progress()


def cached_engine(onnx_path: str | Path, model_cfg, report=print) -> Path:
    """The engine for this GPU and TensorRT, built from `onnx_path` if not cached yet."""
    path = engine_path(onnx_path, device_key())
    if not path.exists():
        blob = build_engine(onnx_path, model_cfg, report)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        report(f"TensorRT engine cached: {path} ({len(blob) / 1e6:.0f} MB)")
    return path


class TrtDraftEngine(DraftEngine):
    backend = "tensorrt"

    def __init__(self, path: str | Path, model_cfg, q_top_k: int = 8, q_top_p: float = 0.98):
        import importlib

        import pycuda.driver as cuda
        import tensorrt as trt

        importlib.import_module("pycuda.autoinit")  # creates the CUDA context
        super().__init__(q_top_k, q_top_p)
        self.cuda, self.cfg = cuda, model_cfg
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path} is not a TensorRT engine for this GPU and TensorRT version")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.row_bytes = model_cfg.head_dim * 4  # one position of one head, fp32
        self.rows = model_cfg.n_layers * model_cfg.n_kv_heads
        kv_bytes = self.rows * MAX_CONTEXT * self.row_bytes
        # [past, present] for keys and for values; swapped after every call.
        self.keys = [cuda.mem_alloc(kv_bytes), cuda.mem_alloc(kv_bytes)]
        self.values = [cuda.mem_alloc(kv_bytes), cuda.mem_alloc(kv_bytes)]
        self.ids = cuda.mem_alloc(MAX_TOKENS * 8)
        self.logits = cuda.mem_alloc(MAX_TOKENS * model_cfg.vocab_size * 4)
        self.host_ids = cuda.pagelocked_empty(MAX_TOKENS, np.int64)
        self.host_logits = cuda.pagelocked_empty(model_cfg.vocab_size, np.float32)
        self.length = 0

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _reset(self, capacity: int) -> None:
        self.length = 0

    def _room(self, capacity: int) -> bool:
        return capacity <= MAX_CONTEXT

    def _feed(self, tokens: list[int]) -> np.ndarray:
        for first in range(0, len(tokens), MAX_TOKENS):
            self._step(tokens[first:first + MAX_TOKENS])
        return self.host_logits.copy()

    def _step(self, tokens: list[int]) -> None:
        cuda, ctx, cfg = self.cuda, self.context, self.cfg
        n = len(tokens)
        if self.length + n > MAX_CONTEXT:
            raise ValueError(f"the TensorRT draft holds at most {MAX_CONTEXT} positions")
        self.host_ids[:n] = tokens
        cuda.memcpy_htod_async(self.ids, self.host_ids[:n], self.stream)
        past = (cfg.n_layers, cfg.n_kv_heads, self.length, cfg.head_dim)
        ctx.set_input_shape("input_ids", (n,))
        ctx.set_input_shape("past_key", past)
        ctx.set_input_shape("past_value", past)
        for name, buffer in (("input_ids", self.ids), ("past_key", self.keys[0]), ("past_value", self.values[0]),
                             ("logits", self.logits), ("present_key", self.keys[1]),
                             ("present_value", self.values[1])):
            ctx.set_tensor_address(name, int(buffer))
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT failed to run the draft")
        last = int(self.logits) + (n - 1) * cfg.vocab_size * 4
        cuda.memcpy_dtoh_async(self.host_logits, last, self.stream)
        self.stream.synchronize()
        self.keys.reverse()
        self.values.reverse()
        self.length += n

    def _truncate(self, length: int) -> None:
        """Keep the first `length` positions: [rows, P, hd] re-packed as [rows, length, hd]."""
        if length == self.length:
            return
        for pair in (self.keys, self.values):
            copy = self.cuda.Memcpy2D()
            copy.set_src_device(pair[0])
            copy.set_dst_device(pair[1])
            copy.src_pitch, copy.dst_pitch = self.length * self.row_bytes, length * self.row_bytes
            copy.width_in_bytes, copy.height = length * self.row_bytes, self.rows
            if length:
                copy(self.stream)
            pair.reverse()
        self.stream.synchronize()
        self.length = length
