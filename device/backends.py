"""Which draft backend runs here: the best available, or the one `[draft] backend` names.

auto tries tensorrt (a CUDA GPU, TensorRT and pycuda present), then onnxruntime (installed),
then torch (always). The ONNX file and the TensorRT engine are built on first use and cached
(`specedge device build-engine` builds them ahead of time).
"""
from __future__ import annotations

import importlib.util
import logging

from specedge.config import ConfigError

log = logging.getLogger("specedge.device")

ORDER = ("tensorrt", "onnxruntime", "torch")


def unavailable(backend: str) -> str:
    """"" if `backend` can run here, else why not."""
    if backend == "torch":
        return ""
    if backend == "onnxruntime":
        return "" if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"
    if backend == "tensorrt":
        for module in ("tensorrt", "pycuda"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install 'specedge[gpu]')"
        import torch

        return "" if torch.cuda.is_available() else "no CUDA GPU"
    return f"unknown backend {backend!r}"


def open_engine(draft_cfg, report=log.info):
    """(engine, tokenizer) for a [draft] section, on its backend."""
    from specedge.device.draft import TorchDraftEngine, load_draft

    wanted = draft_cfg.backend
    names = ORDER if wanted == "auto" else (wanted,)
    for name in names:
        reason = unavailable(name)
        if reason:
            if wanted != "auto":
                raise ConfigError(f"draft.backend = {name}: {reason}")
            report(f"draft backend {name}: skipped ({reason})")
            continue
        model, tok = load_draft(draft_cfg)
        if name == "torch":
            return TorchDraftEngine(model, draft_cfg.q_top_k, draft_cfg.q_top_p), tok
        try:
            from specedge.device.onnx_export import cached_export

            onnx_path = cached_export(draft_cfg, report)
            if name == "onnxruntime":
                from specedge.device.ort_engine import OrtDraftEngine

                return OrtDraftEngine(onnx_path, model.cfg, draft_cfg.q_top_k, draft_cfg.q_top_p), tok
            from specedge.device.trt_engine import TrtDraftEngine, cached_engine

            return TrtDraftEngine(cached_engine(onnx_path, model.cfg, report), model.cfg, draft_cfg.q_top_k,
                                  draft_cfg.q_top_p), tok
        except Exception as exc:  # a backend that fails to start must not stop the device
            if wanted != "auto":
                raise
            report(f"draft backend {name}: failed to start ({exc}); trying the next")
    raise AssertionError("torch is always available")
