"""Which draft backend runs here: the best available, or the one `[draft] backend` names.

auto tries tensorrt (a CUDA GPU, TensorRT and pycuda present), then llama.cpp (llama-cpp-python
installed and the draft a whole GGUF model: 2-4x faster per token than onnxruntime's int8 graph on
a CPU, docs/device.md), then onnxruntime (installed), then torch (always). The ONNX file and the
TensorRT engine are built on first use and cached (`specedge device build-engine` builds them
ahead of time); llama.cpp reads the GGUF file as it is.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace

from specedge.config import ConfigError

log = logging.getLogger("specedge.device")

ORDER = ("tensorrt", "llama.cpp", "onnxruntime", "torch")


def unavailable(backend: str, draft_cfg=None) -> str:
    """"" if `backend` can run here (and, given a [draft] section, run that draft), else why not."""
    if backend == "torch":
        return ""
    if backend == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install 'specedge[llama]')"
        if draft_cfg is not None and draft_cfg.layers:
            return "a shallow draft reads out through its trained head, which llama.cpp does not run"
        if draft_cfg is not None and not _names_gguf(draft_cfg.model):
            return "llama.cpp reads GGUF files, and the draft is not one"
        return ""
    if backend == "onnxruntime":
        return "" if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"
    if backend == "emulated":
        return "" if draft_cfg is None or draft_cfg.model.endswith(".json") else "the model is not an emulation file"
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
        reason = unavailable(name, draft_cfg)
        if reason:
            if wanted != "auto":
                raise ConfigError(f"draft.backend = {name}: {reason}")
            report(f"draft backend {name}: skipped ({reason})")
            continue
        if name == "emulated":
            return _emulated_engine(draft_cfg)
        if name == "llama.cpp":
            try:
                return _llama_engine(draft_cfg)
            except Exception as exc:  # a backend that fails to start must not stop the device
                if wanted != "auto":
                    raise
                report(f"draft backend {name}: failed to start ({exc}); trying the next")
                continue
        # the exports read the weights on the CPU; only the torch backend computes where `device` says
        model, tok = load_draft(draft_cfg if name == "torch" else replace(draft_cfg, device="cpu"))
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


def _names_gguf(model: str) -> bool:
    """A registry name (every one is a GGUF file) or a .gguf path; nothing is read or fetched."""
    from specedge.fetch import MODELS

    return model in MODELS or model.endswith(".gguf")


def _llama_engine(draft_cfg):
    """(engine, tokenizer): the file resolved (fetched and hash-checked) once for both."""
    from specedge.device.llama_engine import LlamaCppDraftEngine
    from specedge.fetch import resolve
    from specedge.loader import read_gguf_tokenizer

    path, _ = resolve(draft_cfg.model)
    return LlamaCppDraftEngine(path, draft_cfg.q_top_k, draft_cfg.q_top_p), read_gguf_tokenizer(path)


def _emulated_engine(draft_cfg):
    """(engine, tokenizer): the recorded draft (device/emulated_draft.py), the real draft's tokenizer."""
    from specedge.device.emulated_draft import EmulatedDraftEngine
    from specedge.emulation import read_bundle
    from specedge.loader import read_gguf_tokenizer

    data = read_bundle(draft_cfg.model)
    engine = EmulatedDraftEngine(data, draft_cfg.q_top_k, draft_cfg.q_top_p)
    return engine, read_gguf_tokenizer(data["draft"]["tokenizer"])


def build_engine_command(args) -> int:
    """`specedge device build-engine`: the draft's ONNX export (checked against PyTorch) and, with a
    GPU, its TensorRT engine, built into the cache ahead of the first start. Exit 1 when --tensorrt
    asks for the engine and none can be built here."""
    import json

    from specedge.device import checks
    from specedge.device.draft import load_draft
    from specedge.device.onnx_export import cached_export
    from specedge.progress import say

    cfg = checks.load(args.config)
    onnx_path = cached_export(cfg.draft, say)
    print(json.dumps({"onnx": str(onnx_path)}), flush=True)
    reason = unavailable("tensorrt")
    if reason:
        say(f"no TensorRT engine built: {reason}")
        return 0 if not args.tensorrt else 1
    from specedge.device.trt_engine import cached_engine

    model, _ = load_draft(replace(cfg.draft, weights="int8", device="cpu"))
    print(json.dumps({"engine": str(cached_engine(onnx_path, model.cfg, say))}), flush=True)
    return 0
