"""The llama.cpp target engine on the tiny GGUF models: sessions share one context through
sequence ids, roll back by llama_memory_seq_rm and lose their sequence (never their text) when
the context is full. Fed one row per call it passes the bitwise self-test and speculation
reproduces its own decoding exactly; batched, it is numerical and the verifier says so."""
from __future__ import annotations

import pytest
import torch

from conftest import alone, speculation_is_the_engines_own_decoding
from specedge.cloud.engine import Capabilities
from specedge.cloud.llama_target import LlamaCppTarget
from specedge.cloud.registry import TargetSpec, load_target, resolve_engine
from specedge.config import ConfigError
from specedge.exactness import establish

PROMPT = "the robot turns left"


@pytest.fixture(scope="module")
def llama_target(tiny_files):
    return load_target(TargetSpec("tiny-llama", str(tiny_files[1]), engine="llama.cpp"))


@pytest.fixture(scope="module")
def llama_batched(tiny_files):
    return load_target(TargetSpec("tiny-llama", str(tiny_files[1]), engine="llama.cpp"), batch_invariant=False)


def test_its_logits_follow_the_torch_reference_on_the_same_file(llama_target, tiny_models):
    """llama.cpp multiplies the Q8_0 blocks as stored, torch the dequantised values: close, not equal."""
    _, tok, target, _ = tiny_models
    ids = tok.encode_chat(PROMPT)
    got = llama_target.model.forward(ids, llama_target.model.new_cache())
    want = target.forward(ids, target.new_cache()).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("mode", ["invariant", "batched"])
def test_sessions_verified_in_one_pass_get_their_own_logits(mode, llama_target, llama_batched, tiny_models):
    """Four sessions of different lengths and histories in one pass, each asking for its last few
    rows only, against each fed alone: bit for bit one row per call; close, same argmax, batched."""
    engine, tok = (llama_target if mode == "invariant" else llama_batched).model, tiny_models[1]
    texts = [tok.encode_chat(t) for t in (PROMPT, "sensor arm wheel", "write a loop", "go")]
    caches = [engine.new_cache() for _ in texts]
    engine.forward_batch([(t[:5], c) for t, c in zip(texts, caches)], keep=[1] * 4)  # warm, unequal
    outs = engine.forward_batch([(t[5:], c) for t, c in zip(texts, caches)], keep=[3, 3, 3, 3])
    for text, cache, out in zip(texts, caches, outs):
        want = alone(engine, text)[-3:]
        assert out.shape == want.shape and cache.length == len(text)
        if mode == "invariant":
            assert torch.equal(out, want)
        assert (out - want).abs().max() < 0.05 * want.abs().max()
        assert torch.equal(out.argmax(-1), want.argmax(-1))


def test_a_rolled_back_sequence_continues_as_a_fresh_one(llama_batched, tiny_models):
    engine, tok = llama_batched.model, tiny_models[1]
    ids = tok.encode_chat(PROMPT)
    cache = engine.new_cache()
    engine.forward(ids + [5, 6, 7], cache)  # a draft of three, all rejected
    cache.truncate(len(ids))
    again = engine.forward([9, 10], cache)
    fresh = engine.forward(ids + [9, 10], engine.new_cache())[-2:]
    assert cache.length == len(ids) + 2
    assert (again - fresh).abs().max() < 0.05 * fresh.abs().max()


def test_a_session_whose_sequence_was_taken_rereads_its_text(tiny_files, tiny_models):
    """Two sequences, three sessions: the least recently used loses its sequence and comes back
    cold (length 0), which the verifier's session answers by feeding its whole text."""
    tok = tiny_models[1]
    engine = LlamaCppTarget(tiny_files[1], False, n_ctx=512, n_seq=2, n_batch=32, threads=1)
    ids = tok.encode_chat(PROMPT)
    a, b, c = (engine.new_cache() for _ in range(3))
    engine.forward(ids, a)
    engine.forward(ids, b)
    engine.forward(ids, c)  # takes a's sequence
    assert a.seq is None and a.length == 0 and {b.seq, c.seq} == {0, 1}
    with pytest.raises(RuntimeError, match="more than 2 sessions"):
        engine.forward_batch([(ids, x) for x in (a, b, c)])
    assert (b.length, c.length) == (len(ids), len(ids))  # a refused batch fed nobody
    out = engine.forward(ids, a)
    assert (out - alone(engine, ids)).abs().max() < 0.05 * out.abs().max()


def test_a_full_context_takes_cells_from_the_oldest_sessions_outside_the_batch(tiny_files, tiny_models):
    tok = tiny_models[1]
    engine = LlamaCppTarget(tiny_files[1], False, n_ctx=512, n_seq=4, n_batch=64, threads=1)
    long = (tok.encode_chat(PROMPT) * 20)[:200]
    first, second, third = (engine.new_cache() for _ in range(3))
    engine.forward(long, first)
    engine.forward(long, second)
    engine.forward(long, third)  # 600 cells > 512: the oldest (first) gives its up
    assert (first.seq, first.length) == (None, 0)
    assert second.length == third.length == 200 and second.seq is not None


def test_a_gguf_target_loads_on_llama_cpp_by_default_and_self_tests_bitwise(llama_target, tiny_files):
    assert resolve_engine("auto", tiny_files[1]) == "llama.cpp"
    assert resolve_engine("auto", "/models/qwen-folder") == "torch"
    found = establish(llama_target.model)
    caps = Capabilities.of(llama_target.model)
    assert found.exact and found.block == 1 and found.engine == "llama.cpp"
    assert caps.exactness == "exact" and caps.engine == "llama.cpp" and not caps.hints
    assert found.client_equal and found.client.startswith("llama-cpp-python")
    assert "bitwise exact: llama.cpp's own generation, as llama-cpp-python" in found.summary()
    assert llama_target.describe()["engine"] == "llama.cpp" and llama_target.spec.weights == "gguf"
    with pytest.raises(ValueError, match="rows per call, not 16"):
        establish(LlamaCppTarget(tiny_files[1], n_ctx=256, n_seq=2, threads=1), block=16)
    with pytest.raises(ConfigError, match="drop_layers needs engine"):
        load_target(TargetSpec("cut", str(tiny_files[1]), drop_layers=(1,), engine="llama.cpp"))


def test_batched_it_is_measured_and_called_numerical(llama_batched):
    found = establish(llama_batched.model)
    caps = Capabilities.of(llama_batched.model)
    assert not found.exact and not found.invariant and found.block == 0
    assert caps.exactness == "numerical" and caps.max_abs_dlogit == found.trials[0].max_abs_diff
    assert "numerical (llama.cpp" in found.summary()


@pytest.mark.parametrize("mode", ["invariant", "batched"])
def test_speculating_against_it_gives_its_own_decoding(mode, llama_target, llama_batched, tiny_models, mosquitto):
    """Greedy speculation verified on llama.cpp one row per call equals llama.cpp's own
    one-at-a-time decoding token for token, and says exact. Batched, blocks and single rows may
    round a near-tie differently: a difference is allowed only where the engine's top two logits
    are within twice the self-test's measured gap, and every answer says numerical."""
    target = llama_target if mode == "invariant" else llama_batched
    speculation_is_the_engines_own_decoding(target, tiny_models[:2], mosquitto, f"llama-{mode}",
                                            exact=mode == "invariant")


def test_a_target_whose_own_generation_differs_from_llama_cpp_python_is_not_called_exact(tiny_files):
    """The self-test's client check can fail: a client whose rows are one ulp off (a subclass made
    for this test) leaves the target numerical, with the reason in its summary."""
    from specedge.cloud.llama_target import LlamaClient

    class OneUlpOff(LlamaClient):
        def rows(self, tokens, prompt_len):
            rows = super().rows(tokens, prompt_len)
            return torch.nextafter(rows, torch.full_like(rows, float("inf")))

    engine = LlamaCppTarget(tiny_files[1], n_ctx=2048, n_seq=8, threads=1)
    engine.client = lambda: OneUlpOff(engine)
    found = establish(engine)
    assert not found.exact and found.client_equal is False
    assert "differs from llama-cpp-python" in found.summary()
