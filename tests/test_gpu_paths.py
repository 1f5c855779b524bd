"""The CUDA-capable paths (the GPU issue), run here on the CPU through the same code: the reference
target placed by `device`, random-weight models of the real shapes, and their profiles."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from specedge.config import CloudConfig, ConfigError, build
from specedge.loader import load_model, resolve_device, resolve_weights
from specedge.model import Qwen2
from specedge.tools.assumed import SHAPES
from specedge.tools.profile import random_qwen2, shape_params

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: `make gpu-check` runs it there")


def test_the_torch_engine_computes_where_its_device_says_and_returns_logits_to_the_cpu(tiny_files):
    model, _ = load_model(tiny_files[1], dtype="bf16", batch_invariant=True, device="cpu")
    cache = model.new_cache()
    logits = model.forward([1, 2, 3], cache)
    assert model.device.type == "cpu" and cache.k[0].device.type == "cpu" and logits.device.type == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_weights("auto", "cuda") == "bf16"  # a GPU multiplies bf16 natively
    with pytest.raises(ValueError, match="int8 weights are a CPU form"):
        Qwen2(model.cfg, {}, int8=True, device="meta")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@NO_CUDA
def test_asking_for_cuda_where_there_is_none_is_a_clear_error_not_a_quiet_cpu(tiny_files, tmp_path):
    from specedge.cloud.registry import load_target, read_registry, registry_for

    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    cfg = build(CloudConfig, {"target": {"model": str(tiny_files[1]), "engine": "torch", "device": "cuda"}})
    specs, default = registry_for(cfg.target)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        load_target(specs[default])
    with pytest.raises(ConfigError, match="target.device"):
        build(CloudConfig, {"target": {"device": "gpu"}})
    registry = tmp_path / "targets.toml"
    registry.write_text(f'[versions.a]\nmodel = "{tiny_files[1]}"\ndevice = "npu"\n')
    with pytest.raises(ConfigError, match="device must be one of"):
        read_registry(registry)


def test_the_device_a_target_computes_on_is_part_of_its_version(tiny_files):
    """Another device computes other bits: a verifier on cuda is another version than one on cpu."""
    from specedge.cloud.registry import TargetSpec

    on_cpu = TargetSpec("t", str(tiny_files[1]), "bf16", engine="torch", device="cpu")
    on_gpu = TargetSpec("t", str(tiny_files[1]), "bf16", engine="torch", device="cuda")
    assert on_cpu.recipe()["device"] == "cpu" and on_cpu.recipe() != on_gpu.recipe()


def test_a_random_model_of_a_real_shape_holds_the_real_models_weight_count():
    model = random_qwen2("tiny")
    held = sum(t.numel() for layer in model.layers for t in
               [layer["qkv"].weight, layer["qkv"].bias, layer["out"].weight, layer["gate_up"].weight,
                layer["down"].weight, layer["attn_norm"], layer["ffn_norm"]])
    norms = 2 * model.cfg.n_layers * model.cfg.dim + model.cfg.dim
    biases = model.cfg.n_layers * (model.cfg.dim + 2 * model.cfg.head_dim * model.cfg.n_kv_heads)
    assert held + model.embed.numel() + model.cfg.dim == shape_params("tiny") + norms + biases
    # the published sizes of Qwen2.5 (their config.json shapes): 1.54B, 7.62B, 14.7B, 32.8B
    assert [round(shape_params(s) / 1e9, 2) for s in ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b")] \
        == [1.54, 7.62, 14.77, 32.76]
    assert set(SHAPES) >= {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b"}
    cache = model.new_cache()
    assert torch.isfinite(model.forward([1, 2, 3], cache)).all()


def test_the_torch_engine_is_profiled_on_a_random_shape_made_in_memory_on_its_device(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "specedge.cli", "profile", "target", "--engine", "torch",
                           "--random-shape", "tiny", "--device", "cpu", "--contexts", "8,32", "--prefill-rows", "4,16",
                           "--sessions", "1,2", "--rows", "1,3", "--repeats", "2", "--budget-s", "30",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prof = json.loads(out.read_text())
    assert prof["engine"] == "torch" and prof["device"] == "cpu" and prof["model"] == "tiny"
    assert prof["weights"].startswith("random, bf16 on cpu") and prof["measured_at"]
    assert all(v is not None for row in prof["verify"]["ms"] for v in row)
