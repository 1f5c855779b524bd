"""`make gpu-check`: every GPU path in one script, under 8 minutes on one H100/H200.

Checks, each with its own time limit, each PASS, FAIL or SKIP with the reason:
  kernels     the CUDA kernels against their NumPy references (pytest -m gpu tests/test_kernels.py);
  tensorrt    the TensorRT draft end to end: ONNX export, engine build, greedy drafts against
              the torch draft on the same weights;
  llama.cpp   the llama.cpp target offloaded to the GPU: its exactness self-test, decode
              ms/token and verify-call ms by k (bench_engines.target_timings);
  vllm        the vLLM target with VLLM_BATCH_INVARIANT=1: the same self-test and timings;
  torch-cuda  not a product path (the reference engine runs on CPU); reported so the machine
              is described.
Each check runs in a process of its own, so a crash in a native library (llama.cpp's CUDA build
segfaulted on the first H200 run) is that check's FAIL, not the end of the report.
Models: the real Qwen pair when `specedge models fetch` has cached it, else the tiny generated
pair (a device machine may have no network); the report says which. A path whose package is
not installed on the machine (pycuda, tensorrt, a CUDA llama-cpp-python, vllm) is a SKIP with
that reason, never a pass.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 450  # of the 8 minutes: the rest is start-up and installs


def _models() -> tuple[str, str, str]:
    """(draft, target, which): the cached real pair, else a tiny pair written here."""
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, FetchError, resolve

    try:
        draft, target = (str(resolve(name, fetch_missing=False)[0]) for name in (DEFAULT_DRAFT, DEFAULT_TARGET))
        return draft, target, "real"
    except FetchError:
        from specedge.tiny import write_pair

        # 64-wide heads: GPU attention kernels (vLLM's) take no narrower ones
        draft, target = write_pair(tempfile.mkdtemp(prefix="gpu-check-"), dim=128, n_heads=2, n_kv_heads=1,
                                   ffn_dim=256)
        return str(draft), str(target), "tiny"


def check_kernels() -> dict:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("pycuda") is None:
        return {"status": "SKIP", "detail": "needs a CUDA device and pycuda (pip install 'specedge[gpu]')"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels.py"],
                         capture_output=True, text=True, timeout=180)
    tail = out.stdout.strip().splitlines()[-1:] or [out.stderr.strip()[-200:]]
    status = "PASS" if out.returncode == 0 and "passed" in tail[0] and "skipped" not in tail[0] else "FAIL"
    return {"status": status, "detail": tail[0]}


def check_tensorrt(draft: str) -> dict:
    from dataclasses import replace

    import numpy as np

    from specedge.config import DraftConfig
    from specedge.device.backends import open_engine, unavailable
    from specedge.speculative import SamplingParams

    cfg = DraftConfig(model=draft, weights="fp32", backend="tensorrt")
    reason = unavailable("tensorrt", cfg)
    if reason:
        return {"status": "SKIP", "detail": reason}
    trt, tok = open_engine(cfg)
    ref, _ = open_engine(replace(cfg, backend="torch"))
    prompt = tok.encode_chat("def fibonacci(n):")
    drafts = []
    for engine in (trt, ref):
        engine.start(prompt)
        drafts.append(engine.draft(16, SamplingParams(), np.random.default_rng(0)))
    same = sum(a == b for a, b in zip(drafts[0].tokens, drafts[1].tokens))
    return {"status": "PASS" if same == 16 else "FAIL", "same_greedy_tokens_of_16": same,
            "trt_ms_per_token": round(1000 * drafts[0].seconds / 16, 2),
            "torch_ms_per_token": round(1000 * drafts[1].seconds / 16, 2)}


def check_llama_cpp(target: str) -> dict:
    from specedge.cloud.engine import installed

    if not installed("llama.cpp"):
        return {"status": "SKIP", "detail": "llama-cpp-python is not installed"}
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return {"status": "SKIP", "detail": "llama-cpp-python was built without a GPU backend "
                                            "(CMAKE_ARGS=-DGGML_CUDA=on, docs/engines.md)"}
    return _target_engine("llama.cpp", target)


def check_vllm(target: str) -> dict:
    import torch

    from specedge.cloud.engine import installed

    if not installed("vllm"):
        return {"status": "SKIP", "detail": "vLLM is not installed (pip install 'specedge[vllm]')"}
    if not torch.cuda.is_available():
        return {"status": "SKIP", "detail": "no CUDA device: vLLM's batch-invariant mode starts on GPUs only"}
    return _target_engine("vllm", target)


def _target_engine(name: str, target: str) -> dict:
    """A target engine in its batch-invariant mode: the bitwise self-test, then ms/token and
    verify-call ms by k (PASS means it ran; the exactness it found is in the report)."""
    from specedge.tools.bench_engines import target_timings
    from specedge.cloud.engine import open_engine, weights_held
    from specedge.exactness import establish

    engine, tok = open_engine(name, target, None, weights_held(name, "auto"), True)
    found = establish(engine)
    prompts = [tok.encode_chat(t) for t in ("def fibonacci(n):", "Explain a mutex.", "Sort a list in Go.")]
    return {"status": "PASS", "exactness": found.describe(), "summary": found.summary(),
            **target_timings(engine, prompts, 32)}


def check_torch_cuda() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"status": "SKIP", "detail": "torch sees no CUDA device"}
    return {"status": "PASS", "device": torch.cuda.get_device_name(0), "torch": torch.__version__}


CHECKS = {"torch-cuda": lambda draft, target: check_torch_cuda(),
          "kernels": lambda draft, target: check_kernels(),
          "tensorrt": lambda draft, target: check_tensorrt(draft),
          "llama.cpp": lambda draft, target: check_llama_cpp(target),
          "vllm": lambda draft, target: check_vllm(target)}


def isolated(command: list[str], timeout_s: float) -> dict:
    """Run one check in a process of its own: a native crash (a segfault in a CUDA library) or a
    hang becomes that check's FAIL, with faulthandler's traceback, and the other checks still run.
    The child prints its result as the last line of stdout."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "FAIL", "detail": f"no answer in {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return {"status": "FAIL", "detail": f"{how}: {proc.stderr.strip()[-1500:]}"}


def run_one(name: str, draft: str, target: str) -> dict:
    try:
        return CHECKS[name](draft, target)
    except Exception as exc:
        return {"status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="specedge-gpu-check")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--only", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # one check, in a child
    p.add_argument("--draft", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(run_one(args.only, args.draft, args.target)), flush=True)
        return 0
    t0 = time.monotonic()
    draft, target, which = _models()
    report = {"models": which, "draft": draft, "target": target, "checks": {}}
    for name in CHECKS:
        left = BUDGET_S - (time.monotonic() - t0)
        if left <= 0:
            report["checks"][name] = {"status": "SKIP", "detail": f"over the {BUDGET_S} s budget"}
            continue
        started = time.monotonic()
        result = isolated([sys.executable, "-X", "faulthandler", "-m", "specedge.gpu_check", "--only", name,
                           "--draft", draft, "--target", target], left)
        result["seconds"] = round(time.monotonic() - started, 1)
        report["checks"][name] = result
        print(f"{name:12}{result['status']:6}{result['seconds']:>7}s  "
              f"{result.get('detail') or result.get('summary') or ''}", flush=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if any(c["status"] == "FAIL" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
