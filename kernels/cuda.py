"""The drafting kernels from Python (pycuda): a fat binary built by kernels/build.py if present,
else the source compiled at run time by SourceModule. Each call works on one row of logits
already on the GPU (a TensorRT engine's output) or copied there."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from specedge.speculative import SparseDist

HERE = Path(__file__).resolve().parent
THREADS = 1024
CAP = 256


class Kernels:
    def __init__(self, fatbin: str | Path | None = None):
        import importlib

        importlib.import_module("pycuda.autoinit")
        import pycuda.driver as cuda

        self.cuda = cuda
        fatbin = Path(fatbin) if fatbin else HERE / "build" / "sampling.fatbin"
        if fatbin.exists():
            self.module = cuda.module_from_file(str(fatbin))
        else:
            from pycuda.compiler import SourceModule

            self.module = SourceModule((HERE / "sampling.cu").read_text(), no_extern_c=True, options=["-O3"])
        self._greedy = self.module.get_function("greedy_argmax")
        self._sample = self.module.get_function("draft_sample")
        self._encode = self.module.get_function("encode_q")
        self.ids = cuda.mem_alloc(CAP * 4)
        self.counts = cuda.mem_alloc(CAP * 4)
        self.small = cuda.mem_alloc(16)

    def to_gpu(self, logits: np.ndarray):
        buffer = self.cuda.mem_alloc(logits.nbytes)
        self.cuda.memcpy_htod(buffer, np.ascontiguousarray(logits, np.float32))
        return buffer

    def greedy(self, logits_gpu, n: int) -> tuple[int, float]:
        token, confidence = np.zeros(1, np.int32), np.zeros(1, np.float32)
        self._greedy(logits_gpu, np.int32(n), self.cuda.Out(token), self.cuda.Out(confidence),
                     block=(THREADS, 1, 1), grid=(1, 1))
        return int(token[0]), float(confidence[0])

    def sample(self, logits_gpu, n: int, temperature: float, top_k: int, top_p: float,
               draw: int) -> tuple[int, SparseDist]:
        ids, counts = np.zeros(CAP, np.uint32), np.zeros(CAP, np.int32)
        sizes, token = np.zeros(2, np.int32), np.zeros(1, np.int32)
        self._sample(logits_gpu, np.int32(n), np.float32(temperature), np.int32(top_k), np.float32(top_p),
                     np.uint32(draw), self.cuda.Out(ids), self.cuda.Out(counts), self.cuda.Out(sizes),
                     self.cuda.Out(token), block=(THREADS, 1, 1), grid=(1, 1))
        m = int(sizes[0])
        return int(token[0]), SparseDist(ids[:m].copy(), counts[:m].astype(np.int64))

    def encode_q(self, q: SparseDist, token: int) -> bytes:
        n = len(q.ids)
        out = np.zeros(2 + 5 * n, np.uint8)
        self._encode(self.cuda.In(q.ids.astype(np.uint32)), self.cuda.In(q.counts.astype(np.int32)), np.int32(n),
                     np.uint32(token), self.cuda.Out(out), block=(256, 1, 1), grid=(1, 1))
        return out.tobytes()
