"""The draft on onnxruntime: the exported graph (device/onnx_export.py) with its KV cache held
as numpy arrays between calls. CPU here; the CUDA and TensorRT execution providers where
onnxruntime-gpu has them, TensorRT's engine cache enabled and keyed to this device."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from specedge.device.draft import DraftEngine


def providers(cache_folder: Path | None = None) -> list:
    """The best execution providers present, best first."""
    import onnxruntime as ort

    present = ort.get_available_providers()
    chosen: list = []
    if "TensorrtExecutionProvider" in present and cache_folder is not None:
        from specedge.device.trt_engine import device_key

        folder = cache_folder / f"ort-trt-{device_key()}"
        folder.mkdir(parents=True, exist_ok=True)
        chosen.append(("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                      "trt_engine_cache_path": str(folder)}))
    if "CUDAExecutionProvider" in present:
        chosen.append("CUDAExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


class OrtDraftEngine(DraftEngine):
    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, model_cfg, q_top_k: int = 8, q_top_p: float = 0.98):
        import onnxruntime as ort

        super().__init__(q_top_k, q_top_p)
        self.cfg = model_cfg
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers(Path(onnx_path).parent))
        self.provider = self.session.get_providers()[0]
        self.key = self.value = None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _reset(self, capacity: int) -> None:
        from specedge.device.onnx_export import empty_cache

        self.key, self.value = empty_cache(self.cfg)

    def _feed(self, tokens: list[int]) -> np.ndarray:
        logits, self.key, self.value = self.session.run(
            None, {"input_ids": np.asarray(tokens, np.int64), "past_key": self.key, "past_value": self.value})
        return logits[-1]

    def _truncate(self, length: int) -> None:
        self.key, self.value = self.key[:, :, :length], self.value[:, :, :length]
