"""`make gpu-check`: every GPU path in one script, under 8 minutes on one H100/H200, with the
image's own python3 (no network there: what it must receive is `gpu_bundle`, under 64 MiB).

Checks, in this order, each PASS, FAIL or SKIP with the reason, each in a process of its own (a
crash in a native library, as llama.cpp's CUDA build segfaulted on the first H200 run, is that
check's FAIL, not the end of the report), within one time budget:
  torch-cuda      the machine: torch's CUDA device;
  kernels         the CUDA kernels against their NumPy references (pytest -m gpu tests/test_kernels.py);
  torch-selftest  the reference target (specedge.model.Qwen2) on the device: the bitwise self-test
                  (exact, or numerical with its measured gap) on the tiny pair's target and on a
                  1.5B-shaped model with random weights made on the device;
  profiles        `specedge profile` of the 1.5B and 7B shapes (then 14B and 32B while time and
                  memory last) on the torch engine, random weights made on the device: decode,
                  prefill and verify ms by (S sessions, k rows); one JSON each under --out;
  end-to-end      one speculative generation, draft and target on the device, through the
                  embedded broker: its output must equal the target's own greedy decoding;
  llama.cpp       the llama.cpp target offloaded to the GPU, where a CUDA build is installed;
  tensorrt, vllm  where installed; neither fits what can travel to the lent machine (SKIP).
Without CUDA this is the rehearsal (`make gpu-check` on a CPU): the torch paths run on the CPU
with the tiny shape standing in for the real ones, so a GPU's minutes go to measuring.
Models: the real Qwen pair when `specedge models fetch` has cached it and a GPU is here, else the
tiny generated pair; the report says which.
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
SELFTEST_SHAPES = ("qwen2.5-1.5b",)
PROFILE_SHAPES = ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b")
REHEARSAL_SHAPE = "tiny"  # stands in for every real shape on a CPU
# What the lent GPU machine's image lacks of specedge's dependencies for the checks above (it has
# torch, numpy, transformers with tokenizers and safetensors, jinja2, onnxruntime, pytest): the
# pure-Python or abi3 wheels `make gpu-bundle` downloads, under 64 MiB with the repository.
BUNDLE = ("paho-mqtt", "amqtt", "dacite", "pwdlib", "transitions", "typer", "click", "rich", "shellingham",
          "markdown-it-py", "mdurl", "pygments", "websockets", "psutil", "gguf", "llguidance", "prometheus-client",
          "pytools", "platformdirs", "mako", "siphash24")  # the last four: pycuda's (its source travels too)
TRAVEL_LIMIT = 64 * 2 ** 20


def device_here() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shapes(real: tuple[str, ...]) -> tuple[str, ...]:
    return real if device_here() == "cuda" else (REHEARSAL_SHAPE,)


def _models() -> tuple[str, str, str]:
    """(draft, target, which): the cached real pair on a GPU, else a tiny pair written here (the
    CPU's rehearsal keeps to it: the real 1.5B in bf16 on two cores would take the budget)."""
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, FetchError, resolve

    try:
        if device_here() != "cuda":
            raise FetchError("rehearsal")
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
    from specedge.cloud.registry import installed

    if not installed("llama.cpp"):
        return {"status": "SKIP", "detail": "llama-cpp-python is not installed (the lent GPU image has none: its CUDA "
                                            "build took 201 s of the 15 minutes there, then segfaulted after "
                                            "ggml_cuda_init, cause not established; docs/engines.md)"}
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return {"status": "SKIP", "detail": "llama-cpp-python was built without a GPU backend "
                                            "(CMAKE_ARGS=-DGGML_CUDA=on, docs/engines.md)"}
    return _target_engine("llama.cpp", target)


def check_vllm(target: str) -> dict:
    import torch

    from specedge.cloud.registry import installed

    if not installed("vllm"):
        return {"status": "SKIP", "detail": "vLLM is not installed (pip install 'specedge[vllm]')"}
    if not torch.cuda.is_available():
        return {"status": "SKIP", "detail": "no CUDA device: vLLM's batch-invariant mode starts on GPUs only"}
    return _target_engine("vllm", target)


def _target_engine(name: str, target: str) -> dict:
    """A target engine in its batch-invariant mode: the bitwise self-test, then ms/token and
    verify-call ms by k (PASS means it ran; the exactness it found is in the report)."""
    from specedge.tools.bench_engines import target_timings
    from specedge.cloud.registry import open_engine, weights_held
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


def _verdict(found) -> dict:
    return {"exact": found.exact, "block": found.block, "max_abs_diff": found.max_abs_diff, "summary": found.summary()}


def check_torch_selftest(target: str) -> dict:
    """The start-up self-test where the reference target computes: the tiny pair's target, then
    each real shape with random weights (PASS: it ran and decided; the verdict is the result)."""
    from specedge.exactness import establish
    from specedge.loader import load_model
    from specedge.tools.profile import random_qwen2

    device = device_here()
    model, _ = load_model(target, dtype="bf16", batch_invariant=True, device=device)
    out = {"device": device, "tiny-pair target": _verdict(establish(model))}
    for shape in shapes(SELFTEST_SHAPES):
        out[f"{shape} (random weights)"] = _verdict(establish(random_qwen2(shape, device)))
        _free()
    detail = "; ".join(f"{k}: {'exact' if v['exact'] else 'numerical'} (block {v['block']}, "
                       f"|dlogit| {v['max_abs_diff']:.3g})" for k, v in out.items() if isinstance(v, dict))
    return {"status": "PASS", "detail": detail, **out}


def check_profiles(out_dir: str, budget_s: float) -> dict:
    """Profiles of the real shapes, random weights made on the device, each self-tested first
    (its passes then run on the block the verifier would use); one JSON each in `out_dir`."""
    import torch

    from specedge.exactness import establish
    from specedge.tools.profile import measured, profile_target, random_qwen2, shape_params

    device, t0, done, skipped = device_here(), time.monotonic(), {}, {}
    todo = shapes(PROFILE_SHAPES)
    for i, shape in enumerate(todo):
        left = budget_s - (time.monotonic() - t0)
        if left < 20:
            skipped[shape] = f"the check's {budget_s:.0f} s were spent"
            continue
        if device == "cuda" and shape_params(shape) * 2 * 1.15 > torch.cuda.mem_get_info()[0]:
            skipped[shape] = f"{shape_params(shape) * 2 / 2 ** 30:.0f} GiB of bf16 weights do not fit the free memory"
            continue
        model = random_qwen2(shape, device)
        found = establish(model)
        grid = dict(contexts=(128, 512, 2048), prefill_rows=(32, 128, 512), sessions=(1, 4, 16, 64),
                    rows=(1, 2, 4, 8, 16), repeats=3) if device == "cuda" else dict(
                    contexts=(32, 128), prefill_rows=(8, 32), sessions=(1, 2), rows=(1, 4), repeats=1)
        prof = measured(profile_target(model, budget_s=max(5.0, left / (len(todo) - i) / 2), **grid), shape,
                        f"random, bf16 on {device} (made here: the shape only)", device, grid["repeats"])
        prof["exactness"] = _verdict(found)
        path = Path(out_dir) / f"target-{shape}-torch-{_slug(prof['machine'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(prof, indent=1) + "\n")
        ms = prof["verify"]["ms"]
        done[shape] = {"file": str(path), "decode_ms_128": prof["decode_ms"].get("128"),
                       "verify_ms_1x1": ms[0][0], "verify_ms_1x16_or_last": ms[0][-1],
                       "verify_ms_largest_S_x_last": next((r[-1] for r in reversed(ms) if r[-1] is not None), None),
                       "skipped_cells": len(prof["verify"]["skipped"])}
        del model
        _free()
    detail = "; ".join(f"{k}: decode {v['decode_ms_128']} ms, verify 1x1 {v['verify_ms_1x1']} ms"
                       for k, v in done.items())
    return {"status": "PASS" if done else "FAIL", "detail": detail or "no shape profiled", "device": device,
            "profiles": done, "skipped": skipped}


def check_end_to_end(draft: str, target: str) -> dict:
    """One greedy speculative generation, draft and target on the device, through the embedded
    broker (amqtt: nothing to install beside the bundle): the output must be the target's own."""
    from specedge.cloud.engine import own_generation
    from specedge.device.policy import parse_policy
    from specedge.exactness import establish
    from specedge.loader import load_model
    from specedge.speculative import SamplingParams
    from specedge.tools.demo import Stack

    device = device_here()
    draft_model, tok = load_model(draft, dtype="bf16", device=device)
    target_model, _ = load_model(target, dtype="bf16", batch_invariant=True, device=device)
    found = establish(target_model)
    prompt, max_new = tok.encode_chat("Explain a mutex."), 48  # the tiny pair runs it to 48 tokens too
    stack = Stack(draft_model, tok, target_model, tok, broker="embedded")
    try:
        t0 = time.monotonic()
        result = stack.agent.generate(prompt, SamplingParams(), max_new, parse_policy("fixed:4"))
        seconds = time.monotonic() - t0
    finally:
        stack.close()
    expected = own_generation(target_model, [prompt], max_new, tok.stop_ids)[0]
    same = result.tokens == expected
    stats = result.stats.summary()
    return {"status": "PASS" if same else "FAIL", "device": device, "equal_to_target_own": same,
            "tokens": len(result.tokens), "tokens_per_s": round(len(result.tokens) / seconds, 2),
            "acceptance_rate": stats.get("acceptance_rate"), "target": _verdict(found),
            "detail": f"{len(result.tokens)} tokens, {'equal to' if same else 'NOT equal to'} the target's own "
                      f"greedy decoding ({'exact' if found.exact else 'numerical'} target, on {device})"}


def _slug(machine: dict) -> str:
    name = machine.get("gpu") or machine.get("cpu") or "machine"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())[:40]


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_bundle(folder: str | Path) -> dict:
    """What the GPU machine must receive beside the repository: the wheels in `folder` (made by
    `make gpu-bundle`), their total size, and whether it stays under what can travel."""
    wheels = sorted(w for w in Path(folder).glob("*") if w.name.endswith((".whl", ".tar.gz"))) \
        if Path(folder).is_dir() else []
    size = sum(w.stat().st_size for w in wheels)
    return {"folder": str(folder), "packages": list(BUNDLE), "wheels": [w.name for w in wheels], "bytes": size,
            "under_64_mib": size < TRAVEL_LIMIT,
            "missing": [p for p in BUNDLE if not any(w.name.lower().startswith(p.replace("-", "_") + "-")
                                                       for w in wheels)]}


CHECKS = {"torch-cuda": lambda a: check_torch_cuda(),
          "kernels": lambda a: check_kernels(),
          "torch-selftest": lambda a: check_torch_selftest(a.target),
          "profiles": lambda a: check_profiles(a.out, a.budget_s),
          "end-to-end": lambda a: check_end_to_end(a.draft, a.target),
          "llama.cpp": lambda a: check_llama_cpp(a.target),
          "tensorrt": lambda a: check_tensorrt(a.draft),
          "vllm": lambda a: check_vllm(a.target)}
# The share of what is left that a check may take (the profiles measure while time lasts).
SHARE = {"profiles": 0.6}


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


def run_one(name: str, args) -> dict:
    try:
        return CHECKS[name](args)
    except Exception as exc:
        return {"status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="specedge-gpu-check")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--out", default="gpu-check", help="the profiles' folder")
    p.add_argument("--bundle", default="gpu-wheels", help="the wheels the GPU machine receives (make gpu-bundle)")
    p.add_argument("--only", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # one check, in a child
    p.add_argument("--draft", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(run_one(args.only, args)), flush=True)
        return 0
    t0 = time.monotonic()
    draft, target, which = _models()
    report = {"models": which, "draft": draft, "target": target, "device": device_here(),
              "rehearsal": device_here() != "cuda", "bundle": gpu_bundle(args.bundle), "checks": {}}
    if report["rehearsal"]:
        report["rehearsal_note"] = (f"no CUDA device: the torch paths ran on the CPU with the {REHEARSAL_SHAPE} "
                                    f"shape for {', '.join(PROFILE_SHAPES)}; a GPU adds their self-tests, "
                                    "profiles and the end-to-end run on CUDA")
    for name in CHECKS:
        left = BUDGET_S - (time.monotonic() - t0)
        if left <= 0:
            report["checks"][name] = {"status": "SKIP", "detail": f"over the {BUDGET_S} s budget"}
            continue
        started = time.monotonic()
        share = left * SHARE.get(name, 1.0)
        result = isolated([sys.executable, "-X", "faulthandler", "-m", "specedge.gpu_check", "--only", name,
                           "--draft", draft, "--target", target, "--out", args.out,
                           "--budget-s", str(round(share * 0.85))], share)
        result["seconds"] = round(time.monotonic() - started, 1)
        report["checks"][name] = result
        print(f"{name:15}{result['status']:6}{result['seconds']:>7}s  "
              f"{result.get('detail') or result.get('summary') or ''}", flush=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    print(f"bundle: {len(report['bundle']['wheels'])} wheels, {report['bundle']['bytes'] / 2 ** 20:.1f} MiB "
          f"({'under' if report['bundle']['under_64_mib'] else 'OVER'} 64 MiB); total {report['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if any(c["status"] == "FAIL" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
