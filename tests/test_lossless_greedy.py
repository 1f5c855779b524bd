"""Greedy speculative decoding through device, Mosquitto and verifier equals the target's own decoding."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reference_greedy
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams

WORDS = ["the", "cat", "robot", "turn", "left", "stop", "on", "mat", "in", "at", "is", "it", "for",
         "when", "sensor", "arm", "wheel", "go", "hello", "?", "!", "42", "é", "x"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
       draft_len=st.integers(0, 8), max_new=st.integers(1, 40),
       mode=st.sampled_from(["", "+pipelined", "+early-exit"]))
def test_output_equals_target_greedy(stack, tiny_models, words, draft_len, max_new, mode):
    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat(" ".join(words))
    result = stack.agent.generate(prompt, SamplingParams(), max_new, parse_policy(f"fixed:{draft_len}{mode}"))
    assert result.tokens == reference_greedy(target, prompt, max_new, tok.stop_ids)
    stats = result.stats.summary()
    assert stats["generated_tokens"] == len(result.tokens)
    if draft_len == 0:
        assert stats["acceptance_rate"] == 0.0


class RejectAt:
    """A test instrument: drafts the target's own tokens (a perfect draft) but corrupts
    the token at `position` of every draft, forcing rejection exactly there."""

    backend = "test"

    def __init__(self, engine, position: int, vocab: int):
        self.engine, self.position, self.vocab = engine, position, vocab
        self.vocab_size = vocab
        self.rounds = []

    def start(self, committed, reuse=True):
        self.engine.start(committed, reuse)

    def commit(self, committed):
        self.engine.commit(committed)

    def draft(self, draft_len, params, rng, stop_ids=frozenset(), keep_going=None):
        drafted = self.engine.draft(draft_len, params, rng, frozenset(), keep_going)
        if self.position < len(drafted.tokens):
            drafted.tokens[self.position] = (drafted.tokens[self.position] + 1) % self.vocab
        self.rounds.append(len(drafted.tokens))
        return drafted


@pytest.mark.parametrize("draft_len", [1, 2, 4, 8])
def test_forced_rejection_at_every_position(stack, tiny_models, draft_len):
    from specedge.device.draft import TorchDraftEngine

    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("the robot arm turns left")
    expected = reference_greedy(target, prompt, 24, tok.stop_ids)
    real_engine = stack.agent.engine
    try:
        for position in range(draft_len):
            instrument = RejectAt(TorchDraftEngine(target), position, target.cfg.vocab_size)
            stack.agent.engine = instrument
            result = stack.agent.generate(prompt, SamplingParams(), 24, parse_policy(f"fixed:{draft_len}"))
            assert result.tokens == expected
            # A round accepts exactly the tokens before the corrupted one (all, if it is shorter).
            assert result.stats.accepted_tokens == sum(min(n, position) for n in instrument.rounds)
    finally:
        stack.agent.engine = real_engine


def test_perfect_draft_needs_few_target_passes(stack, tiny_models):
    from specedge.device.draft import TorchDraftEngine

    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("hello robot")
    real_engine = stack.agent.engine
    stack.agent.engine = TorchDraftEngine(target)
    try:
        result = stack.agent.generate(prompt, SamplingParams(), 30, parse_policy("fixed:4"))
    finally:
        stack.agent.engine = real_engine
    assert result.tokens == reference_greedy(target, prompt, 30, tok.stop_ids)
    summary = result.stats.summary()
    assert summary["acceptance_rate"] == 1.0 or result.stopped
    assert summary["target_passes_per_token"] <= 0.3


def test_cloud_ar_baseline_streams_target_decoding(stack, tiny_models):
    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("stop the wheel")
    seen = []
    result = stack.agent.generate(prompt, SamplingParams(), 30, parse_policy("cloud-ar"), on_tokens=lambda tokens, verified: seen.extend(tokens))
    assert result.tokens == seen == reference_greedy(target, prompt, 30, tok.stop_ids)
    assert result.stats.summary()["target_passes_per_token"] >= 1.0 or result.stopped
    # Every token of the answer was streamed, and nothing else: not a stop token, nor tokens past max_tokens.
    for max_new in (30, 3):
        result = stack.agent.generate(prompt, SamplingParams(), max_new, parse_policy("cloud-ar"))
        assert result.stats.streamed_tokens == len(result.tokens) and result.stats.summary()["streamed_share"] == 1.0


@pytest.mark.parametrize("sources", ["lookup", "lookup,model"])
def test_prompt_lookup_drafts_keep_the_output_the_targets(stack, tiny_models, sources):
    """Drafts copied from the text (device/lookup.py), alone or before the model's, under a fixed
    and the adaptive policy: greedy output is the target's own decoding, and lookups did draft."""
    _, tok, target, _ = tiny_models
    draft_cfg, before = stack.agent.cfg.draft, stack.agent.cfg.draft.sources
    draft_cfg.sources = sources
    try:
        for words in ("the cat is on the mat the cat is on the mat", "robot arm go left stop"):
            prompt = tok.encode_chat(words)
            for policy in ("fixed:4", "adaptive+no-stream"):
                result = stack.agent.generate(prompt, SamplingParams(), 48, parse_policy(policy))
                assert result.tokens == reference_greedy(target, prompt, 48, tok.stop_ids)
                assert result.stats.lookup_rounds > 0, (words, policy)
                summary = result.stats.summary()
                assert summary["lookup_rounds"] == result.stats.lookup_rounds
                assert 0 <= summary["lookup_acceptance"] <= 1
        # Sampled, a lookup's q is a point mass on the wire (its chi-square: test_speculative_rules.py).
        # Sampled text is random (a stop may come early): a few tries find a repeat to look up.
        prompt = tok.encode_chat("the cat is on the mat the cat is on the mat")
        for _ in range(8):
            sampled = stack.agent.generate(prompt, SamplingParams(0.3, seed=3), 48, parse_policy("fixed:4"))
            if sampled.stats.lookup_rounds:
                break
        assert sampled.stats.lookup_rounds > 0 or "model" in sources
    finally:
        draft_cfg.sources = before


@pytest.mark.parametrize("policy", ["fixed:3", "cloud-ar"])
def test_the_next_turn_of_a_conversation_sends_only_its_new_tokens_and_stays_exact(stack, tiny_models, policy):
    """The second turn goes on in the first's session (EXTEND): the verifier and the draft keep
    the history's cache, the uplink carries the new turn only, and the output is the target's."""
    _, tok, target, _ = tiny_models
    turn1 = tok.encode_chat("robot arm go left " * 8)
    first = stack.agent.generate(turn1, SamplingParams(), 16, parse_policy(policy))
    history = turn1 + first.tokens
    turn2 = history + tok.encode_chat("stop")[1:]
    extended = stack.verifier.stats.extended
    second = stack.agent.generate(turn2, SamplingParams(), 16, parse_policy(policy))
    assert second.tokens == reference_greedy(target, turn2, 16, tok.stop_ids)
    assert stack.verifier.stats.extended == extended + 1 and second.stats.resyncs == 0
    # Up to what the target's own generation had fed: not an answer's last token that max_tokens cut.
    assert second.stats.cached_prompt_tokens == len(history) - (0 if first.stopped else 1)
    if policy != "cloud-ar":
        assert second.stats.draft_reused_tokens >= len(turn1)  # the history stayed in the draft's cache
    # The same second turn from scratch (after a sampled request, whose session it cannot go on
    # in): a full OPEN, the history sent again.
    stack.agent.generate(tok.encode_chat("something else"), SamplingParams(0.5), 4, parse_policy(policy))
    again = stack.agent.generate(turn2, SamplingParams(), 16, parse_policy(policy))
    assert again.tokens == second.tokens and again.stats.cached_prompt_tokens == 0
    assert second.stats.wire_bytes + 3 * len(history) - 100 < again.stats.wire_bytes


def test_a_next_turn_the_verifier_no_longer_holds_resyncs_and_stays_exact(stack, tiny_models):
    _, tok, target, _ = tiny_models
    turn1 = tok.encode_chat("wheel sensor on")
    first = stack.agent.generate(turn1, SamplingParams(), 12, parse_policy("fixed:2"))
    stack.verifier.table.sessions.clear()  # expired, evicted, or the replica restarted
    turn2 = turn1 + first.tokens + tok.encode_chat("and off")[1:]
    second = stack.agent.generate(turn2, SamplingParams(), 12, parse_policy("fixed:2"))
    assert second.tokens == reference_greedy(target, turn2, 12, tok.stop_ids)
    assert second.stats.resyncs >= 1 and second.stats.cached_prompt_tokens == 0


def test_with_keep_session_off_every_request_opens_afresh(stack, tiny_models):
    _, tok, target, _ = tiny_models
    spec = stack.agent.cfg.speculation
    spec.keep_session = False
    try:
        turn1 = tok.encode_chat("arm up")
        first = stack.agent.generate(turn1, SamplingParams(), 8, parse_policy("fixed:2"))
        turn2 = turn1 + first.tokens + tok.encode_chat("down")[1:]
        second = stack.agent.generate(turn2, SamplingParams(), 8, parse_policy("fixed:2"))
    finally:
        spec.keep_session = True
    assert second.stats.cached_prompt_tokens == 0 and second.stats.draft_reused_tokens == 0
    assert stack.agent.kept is None
    assert second.tokens == reference_greedy(target, turn2, 8, tok.stop_ids)


def test_a_shared_system_prompt_is_prefilled_once_across_devices_and_stays_exact(stack, tiny_models, mosquitto):
    """A second device whose prompt begins with the first one's system prompt starts its session
    from a copy of the first session's cache (the verifier's prefix index), and its output is
    still the target's own."""
    from specedge.config import DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine

    draft, tok, target, _ = tiny_models
    system = "You drive a robot arm with a wheel and a sensor. " * 4
    first = tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                {"role": "user", "content": "go left"}]))
    second = tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": "stop it"}]))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 64
    scope = stack.verifier.cfg.verifier
    scope.share_prefixes = "fleet"  # a fleet whose devices share a system prompt (docs/security.md)
    other = Agent(build(DeviceConfig, {"device": {"fleet": "default", "id": "second-device"},
                                       "mqtt": {"port": mosquitto.port}, "energy": {"meter": "estimated"}}),
                  TorchDraftEngine(draft), tok).start()
    try:
        stack.agent.generate(first, SamplingParams(), 8, parse_policy("fixed:2"))  # its session is kept: warm
        hits, saved = stack.verifier.stats.prefix_hits, stack.verifier.stats.prefix_tokens
        got = other.generate(second, SamplingParams(), 16, parse_policy("fixed:3"))
    finally:
        scope.share_prefixes = "device"
        other.stop()
    assert got.tokens == reference_greedy(target, second, 16, tok.stop_ids)
    assert stack.verifier.stats.prefix_hits == hits + 1
    assert stack.verifier.stats.prefix_tokens - saved == shared // 32 * 32  # whole blocks of the shared part
