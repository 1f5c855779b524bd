"""A request's seed makes a sampled answer reproducible (coupled sampling, issue 36): through
device, Mosquitto and verifier it is the target's own coupled sampling, computed outside every
service, whatever the draft proposed, however long the rounds were, whether the cloud streamed
or the device drafted ahead, and across a verifier restart. Without a seed, answers differ."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specedge.cloud.engine import own_generation
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams

WORDS = ["the", "cat", "robot", "turn", "left", "stop", "sensor", "arm", "wheel", "go", "?", "42", "é"]
POLICIES = ["fixed:1", "fixed:4", "fixed:8+pipelined", "cloud-ar", "adaptive", "fixed:3+early-exit"]


def coupled_reference(tiny_models, prompt: list[int], params: SamplingParams, max_new: int) -> list[int]:
    _, tok, target, _ = tiny_models
    return own_generation(target, [prompt], max_new, tok.stop_ids, coupled=params)[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8), policy=st.sampled_from(POLICIES),
       seed=st.integers(0, (1 << 64) - 1), temperature=st.sampled_from([0.6, 1.0, 1.5]),
       top_k=st.sampled_from([0, 12]), top_p=st.sampled_from([1.0, 0.9]), max_new=st.integers(1, 24))
def test_a_seeded_answer_is_the_targets_own_coupled_sampling_whatever_the_rounds(
        stack, tiny_models, words, policy, seed, temperature, top_k, top_p, max_new):
    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat(" ".join(words))
    params = SamplingParams.seeded(temperature, top_k, top_p, seed)
    result = stack.agent.generate(prompt, params, max_new, parse_policy(policy))
    assert result.tokens == coupled_reference(tiny_models, prompt, params, max_new)
    assert result.stats.q_wire_bytes == 0  # coupled drafts carry no q


def test_a_seeded_answer_is_the_same_across_a_verifier_restart(tiny_models, fleet_verifier, mosquitto):
    from specedge.config import DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine

    draft, tok, _, _ = tiny_models
    cfg = build(DeviceConfig, {"device": {"fleet": "seed-restart", "id": "d"}, "mqtt": {"port": mosquitto.port},
                               "energy": {"meter": "estimated"}}, env={})
    prompt, params = tok.encode_chat("robot arm go"), SamplingParams.seeded(1.0, 0, 1.0, 7)
    answers = []
    agent = Agent(cfg, TorchDraftEngine(draft), tok).start()
    try:
        for _ in range(2):
            verifier = fleet_verifier("seed-restart")
            answers.append(agent.generate(prompt, params, 20, parse_policy("fixed:4")).tokens)
            verifier.stop()
    finally:
        agent.stop()
    assert answers[0] == answers[1] == coupled_reference(tiny_models, prompt, params, 20)


@pytest.mark.parametrize("policy", ["fixed:4", "cloud-ar"])
def test_without_a_seed_sampled_answers_are_drawn_afresh(stack, tiny_models, policy):
    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat("the cat")
    params = SamplingParams.seeded(1.0, 0, 1.0, None)
    answers = {tuple(stack.agent.generate(prompt, params, 24, parse_policy(policy)).tokens) for _ in range(3)}
    assert len(answers) == 3
