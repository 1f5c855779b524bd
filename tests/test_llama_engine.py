"""The llama.cpp draft backend on the tiny GGUF models: the same file the torch reference loads,
run by llama.cpp's own kernels on its own quantised weights."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import reference_greedy
from specedge.cloud.registry import Target
from specedge.config import CloudConfig, DeviceConfig, DraftConfig, build
from specedge.device.backends import open_engine, unavailable
from specedge.device.llama_engine import LlamaCppDraftEngine
from specedge.speculative import SamplingParams

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def llama_draft(tiny_files):
    return LlamaCppDraftEngine(tiny_files[0], n_ctx=512, threads=1)


def test_its_logits_follow_the_torch_reference_on_the_same_file(llama_draft, tiny_models):
    """llama.cpp multiplies the Q8_0 blocks as stored, torch the dequantised fp32 values: close,
    not equal (a draft need not be exact; only the target must)."""
    draft, tok, _, _ = tiny_models
    ids = tok.encode_chat("the robot turns left")
    llama_draft._reset(len(ids))
    got = llama_draft._feed(ids)
    want = draft.forward(ids, draft.new_cache())[-1].float().numpy()
    assert got.shape == want.shape == (llama_draft.vocab_size,)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_a_rolled_back_cache_drafts_what_a_fresh_one_does(llama_draft, tiny_files, tiny_models):
    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat("sensor arm wheel")
    llama_draft.start(prompt)
    first = llama_draft.draft(6, SamplingParams(), RNG).tokens
    llama_draft.commit(prompt + first[:2] + [first[2] + 1])  # a verdict that rejected the third token
    after = llama_draft.draft(4, SamplingParams(), RNG).tokens
    fresh = LlamaCppDraftEngine(tiny_files[0], n_ctx=512, threads=1)
    fresh.start(prompt + first[:2] + [first[2] + 1])
    assert after == fresh.draft(4, SamplingParams(), RNG).tokens


def test_the_next_turn_of_a_conversation_keeps_the_history_in_the_cache(llama_draft, tiny_files, tiny_models):
    _, tok, _, _ = tiny_models
    turn1 = tok.encode_chat("wheel sensor")
    llama_draft.start(turn1)
    answer = llama_draft.draft(5, SamplingParams(), RNG).tokens
    turn2 = turn1 + answer + tok.encode_chat("arm")[1:]
    llama_draft.start(turn2)
    assert llama_draft.reused == len(turn1 + answer) - 1
    fresh = LlamaCppDraftEngine(tiny_files[0], n_ctx=512, threads=1)
    fresh.start(turn2)
    assert llama_draft.draft(4, SamplingParams(), RNG).tokens == fresh.draft(4, SamplingParams(), RNG).tokens


def test_a_prompt_past_its_context_is_refused_clearly(tiny_files):
    small = LlamaCppDraftEngine(tiny_files[0], n_ctx=256, threads=1)
    with pytest.raises(ValueError, match="context of 256"):
        small.start(list(range(3, 50)) * 10)


def test_speculating_with_it_gives_the_targets_own_decoding(llama_draft, tiny_models, mosquitto):
    from specedge.cloud.verifier import Verifier
    from specedge.device.agent import Agent
    from specedge.device.policy import parse_policy

    _, tok, target, target_tok = tiny_models
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": "v-llama", "fleet": "llama"}}), Target.in_memory("tiny", target, target_tok)).start()
    agent = Agent(build(DeviceConfig, {"device": {"fleet": "llama", "id": "d"}, "mqtt": {"port": mosquitto.port},
                                       "energy": {"meter": "estimated"}}), llama_draft, tok).start()
    try:
        prompt = tok.encode_chat("write a loop")
        result = agent.generate(prompt, SamplingParams(), 40, parse_policy("fixed:4"))
        assert result.tokens == reference_greedy(target, prompt, 40, tok.stop_ids)
        assert result.stats.accepted_tokens > 0 and result.stats.exact
    finally:
        agent.stop()
        verifier.stop()


def test_auto_picks_llama_cpp_for_a_gguf_draft_and_not_for_a_shallow_one(tiny_files):
    said = []
    engine, tok = open_engine(DraftConfig(model=str(tiny_files[0])), said.append)
    assert engine.backend == "llama.cpp" and tok.encode("go") and engine.vocab_size == tok.vocab_size
    assert any(line.startswith("draft backend tensorrt: skipped") for line in said)
    shallow = DraftConfig(model=str(tiny_files[0]), layers=1)
    assert "trained head" in unavailable("llama.cpp", shallow)
