"""CUDA drafting kernels: they compile with the machine's nvcc (here and in CI), and on a GPU
(`make test-gpu`, marker gpu) they agree with their NumPy references on the draft's real
vocabulary size."""
from __future__ import annotations

import time

import numpy as np
import pytest

from specedge.protocol import wire
from specedge.kernels.build import build, nvcc
from specedge.speculative import Q_ONE, quantize, sample_sparse, softmax

VOCAB = 151936  # Qwen2.5's


@pytest.mark.integration  # nvcc runs in a subprocess of the build (tests/conftest.py)
def test_cuda_sources_compile_with_nvcc(tmp_path):
    if nvcc() is None:
        pytest.skip("nvcc is not installed on this machine (the CUDA toolkit); CI has it")
    built = build(tmp_path)
    assert [p.name for p in built] == ["sampling.fatbin"] and built[0].stat().st_size > 10_000


def test_wire_form_of_q_is_what_the_encoder_kernel_writes():
    q = quantize(softmax(np.random.default_rng(0).normal(size=500).astype(np.float32) * 3), 8, 0.98)
    raw = wire.encode_q(q, int(q.ids[1]))
    n = len(q.ids)
    assert raw[0] == n and raw[1] == 1 and len(raw) == 2 + 5 * n
    ids = np.frombuffer(raw[2:2 + 3 * n], np.uint8).reshape(n, 3).astype(np.uint32)
    assert ((ids[:, 0] | ids[:, 1] << 8 | ids[:, 2] << 16) == q.ids).all()
    assert (np.frombuffer(raw[2 + 3 * n:], "<u2") + 1 == q.counts).all()


@pytest.fixture(scope="module")
def kernels():
    from specedge.kernels.cuda import Kernels

    return Kernels()


def _logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, VOCAB).astype(np.float32)
    logits[rng.integers(VOCAB, size=20)] += 12  # a peaked head, as real next-token logits have
    return logits


@pytest.mark.gpu
def test_greedy_kernel_matches_numpy(kernels):
    for seed in range(5):
        logits = _logits(seed)
        token, confidence = kernels.greedy(kernels.to_gpu(logits), VOCAB)
        assert token == int(np.argmax(logits))
        assert confidence == pytest.approx(float(softmax(logits)[token]), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 8, 0.98), (0.7, 8, 1.0), (1.3, 255, 0.9), (1.0, 1, 1.0)])
def test_fused_sampling_kernel_matches_numpy(kernels, temperature, top_k, top_p):
    for seed in range(8):
        logits = _logits(seed)
        draw = int(np.random.default_rng(seed).integers(Q_ONE))
        token, q = kernels.sample(kernels.to_gpu(logits), VOCAB, temperature, top_k, top_p, draw)
        want = quantize(softmax(logits / temperature), top_k, top_p)
        assert q.ids.tolist() == want.ids.tolist()
        assert int(q.counts.sum()) == Q_ONE and np.abs(q.counts - want.counts).max() <= 1
        assert token == sample_sparse(q, draw)


@pytest.mark.gpu
def test_encoder_kernel_matches_the_wire(kernels):
    q = quantize(softmax(_logits(3)), 32, 1.0)
    assert kernels.encode_q(q, int(q.ids[5])) == wire.encode_q(q, int(q.ids[5]))


@pytest.mark.gpu
def test_kernel_against_reference_timing(kernels, capsys):
    logits = _logits(0)
    gpu = kernels.to_gpu(logits)
    kernels.sample(gpu, VOCAB, 1.0, 8, 0.98, 123)  # warm
    t0 = time.perf_counter()
    for _ in range(50):
        kernels.sample(gpu, VOCAB, 1.0, 8, 0.98, 123)
    kernel_ms = (time.perf_counter() - t0) / 50 * 1000
    t0 = time.perf_counter()
    for _ in range(5):
        sample_sparse(quantize(softmax(logits), 8, 0.98), 123)
    numpy_ms = (time.perf_counter() - t0) / 5 * 1000
    with capsys.disabled():
        print(f"\nfused sampling over {VOCAB} logits: kernel {kernel_ms:.3f} ms, NumPy {numpy_ms:.3f} ms")


def test_the_gpu_check_rehearses_every_torch_path_on_the_cpu_and_says_why_the_others_did_not_run(tmp_path):
    """`make gpu-check` without a GPU is the rehearsal: the torch self-test, the profiles and the
    end-to-end generation run on the CPU (the tiny shape standing in for the real ones) and pass;
    no GPU-only path is reported passed, and each skip says why."""
    import json
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: `make gpu-check` runs the real checks")
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "specedge.gpu_check", "--json", str(out), "--out", str(tmp_path / "p"),
                           "--bundle", str(tmp_path / "none")], capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert list(checks) == ["torch-cuda", "kernels", "torch-selftest", "profiles", "end-to-end", "llama.cpp",
                            "tensorrt", "vllm"]
    rehearsed = {"torch-selftest", "profiles", "end-to-end"}
    assert all(checks[c]["status"] == "PASS" for c in rehearsed), checks
    assert all(c["status"] == "SKIP" and c["detail"] for n, c in checks.items() if n not in rehearsed), checks
    assert report["rehearsal"] and report["device"] == "cpu" and checks["end-to-end"]["equal_to_target_own"]
    assert checks["end-to-end"]["tokens"] == 48
    assert checks["torch-selftest"]["tiny-pair target"]["exact"]
    profile = json.loads(next((tmp_path / "p").glob("target-tiny-torch-*.json")).read_text())
    assert profile["weights"].startswith("random, bf16 on cpu") and profile["exactness"]["exact"]
    assert report["bundle"]["missing"] == list(report["bundle"]["packages"])  # no wheels given: all missing


@pytest.mark.integration  # gpu_check.isolated runs subprocesses (tests/conftest.py)
def test_a_check_that_crashes_natively_is_its_own_fail_with_the_traceback():
    """A segfault in one GPU library (llama.cpp's CUDA build did this on the H200) must not end the
    whole gpu-check: it becomes that check's FAIL, naming the signal and where it happened."""
    import sys

    from specedge.gpu_check import isolated

    crash = isolated([sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"], 60)
    assert crash["status"] == "FAIL" and "SIGSEGV" in crash["detail"] and "Fatal Python error" in crash["detail"]
    ok = isolated([sys.executable, "-c", 'print("noise"); print(\'{"status": "PASS"}\')'], 60)
    assert ok == {"status": "PASS"}
    hang = isolated([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert hang["status"] == "FAIL" and "no answer" in hang["detail"]
