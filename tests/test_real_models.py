"""Slow: the real Qwen2.5-Coder pair (0.5B draft, 1.5B target) through Mosquitto. `make test-slow`."""
from __future__ import annotations

import pytest

from conftest import reference_greedy
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences what a mutex is.",
    "Translate to German: The robot stops at the red line.",
]


@pytest.fixture(scope="module")
def real_stack(mosquitto):
    from specedge.demo import Stack
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET
    from specedge.loader import load_named

    draft, draft_tok = load_named(DEFAULT_DRAFT, "int8")
    target, target_tok = load_named(DEFAULT_TARGET, "bf16", batch_invariant=True)
    s = Stack(draft, draft_tok, target, target_tok, port=mosquitto.port)
    yield s, target
    s.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_pair_output_matches_target(real_stack, prompt):
    stack, target = real_stack
    tok = stack.tokenizer
    ids = tok.encode_chat(prompt)
    spec = stack.agent.generate(ids, SamplingParams(), 32, parse_policy("fixed:4"))
    base = stack.agent.generate(ids, SamplingParams(), 32, parse_policy("cloud-ar"))
    assert spec.tokens == base.tokens == reference_greedy(target, ids, 32, tok.stop_ids)
    summary = spec.stats.summary()
    assert summary["target_passes_per_token"] < 1.0
    print(prompt, {k: round(v, 3) for k, v in summary.items() if isinstance(v, float)})
