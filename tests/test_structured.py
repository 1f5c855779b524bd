"""Structured output under speculation (issue 22, points 1 and 2): the grammar masks the draft on
the device and the target on the verifier; greedy output is the target's own grammar-constrained
greedy decoding, sampled output follows its constrained distribution, and forced tokens commit
with no round trip, checked by the verifier."""
from __future__ import annotations

import json

import numpy as np
import pytest

from specedge import grammar
from specedge.cloud.registry import Target
from specedge.cloud.session import BadRequest, TargetSession
from specedge.device.draft import TorchDraftEngine
from specedge.device.policy import parse_policy
from specedge.protocol import wire
from specedge.speculative import SamplingParams, target_distribution

ACTION = {"type": "object", "properties": {
    "action": {"enum": ["move", "turn", "grip", "stop"]},
    "speed": {"type": "integer", "minimum": 0, "maximum": 20},
    "note": {"type": "string", "maxLength": 12}},
    "required": ["action", "speed", "note"], "additionalProperties": False}


@pytest.mark.parametrize("policy", ["fixed:0", "fixed:1", "fixed:3", "fixed:6", "adaptive", "cloud-ar"])
def test_constrained_greedy_output_is_the_targets_constrained_decoding(stack, tiny_models, policy):
    _, tok, target, _ = tiny_models
    text = grammar.json_schema(ACTION)
    for words in ("robot arm go left", "stop the wheel now please", "grip it"):
        prompt = tok.encode_chat(words)
        got = stack.agent.generate(prompt, SamplingParams(), 60, parse_policy(policy), grammar=text)
        want = grammar.reference_decode(target, tok, prompt, 60, text)
        assert got.tokens == want
        if got.stopped:  # a whole object: valid under the schema
            action = json.loads(tok.decode(got.tokens))
            assert action["action"] in ACTION["properties"]["action"]["enum"]
        if policy != "cloud-ar":
            assert got.stats.forced_tokens > 0  # '{"', 'action', '": "', ... never cost a round
        else:
            assert got.stats.forced_tokens == 0


def test_a_perfect_draft_under_a_grammar_is_always_accepted(stack, tiny_models):
    """The target as its own draft: after forced tokens the draft goes on from the whole committed
    text, so every drafted token is accepted."""
    _, tok, target, _ = tiny_models
    real_engine = stack.agent.engine
    stack.agent.engine = TorchDraftEngine(target)
    try:
        got = stack.agent.generate(tok.encode_chat("turn the wheel"), SamplingParams(), 50, parse_policy("fixed:4"),
                                   grammar=grammar.json_schema(ACTION))
    finally:
        stack.agent.engine = real_engine
    assert got.stats.forced_tokens > 0 and got.stats.drafted_tokens > 0
    assert got.stats.accepted_tokens == got.stats.drafted_tokens


def test_prompt_lookup_drafts_under_a_grammar_stay_exact(stack, tiny_models):
    _, tok, target, _ = tiny_models
    text = grammar.json_schema({"type": "object", "properties": {"echo": {"type": "string"}},
                                "required": ["echo"], "additionalProperties": False})
    prompt = tok.encode_chat('repeat {"echo": "the cat is on the mat"} {"echo": "the cat')
    stack.agent.cfg.draft.sources = "lookup,model"
    try:
        got = stack.agent.generate(prompt, SamplingParams(), 40, parse_policy("fixed:4"), grammar=text)
    finally:
        stack.agent.cfg.draft.sources = "model"
    assert got.tokens == grammar.reference_decode(target, tok, prompt, 40, text)


def test_a_forced_run_to_the_end_finishes_without_a_round(stack, tiny_models):
    """A grammar with one string to say forces every token: the request ends before any DRAFT."""
    _, tok, target, _ = tiny_models
    text = grammar._llg().LLMatcher.grammar_from_regex("the cat")
    prompt = tok.encode_chat("say it")
    got = stack.agent.generate(prompt, SamplingParams(), 20, parse_policy("fixed:4"), grammar=text)
    assert tok.decode(got.tokens) == "the cat"
    assert got.stats.forced_tokens == len(got.tokens) and got.stats.rounds == 0
    assert got.tokens == grammar.reference_decode(target, tok, prompt, 20, text)


def _first_tokens(target_model, tok, draft_model, prompt, text, params, trials, masked_target=True):
    """The first committed token of `trials` speculative rounds (draft 2 tokens under the grammar,
    verify with the real session code): its empirical counts."""
    target = Target.in_memory("tiny", target_model, tok)
    compiled = grammar.Compiled(tok, target_model.cfg.vocab_size, text)
    engine = TorchDraftEngine(draft_model)
    rng = np.random.default_rng(7)
    counts = {}
    for i in range(trials):
        engine.start(prompt, reuse=True)
        constraint = compiled.start()
        drafted = engine.draft(2, params, rng, tok.stop_ids, constraint=constraint)
        session = TargetSession(target, prompt, params, i, constraint=compiled.start() if masked_target else None,
                                grammar_from=len(prompt))
        accepted, token = session.verify(drafted.tokens, drafted.q)
        first = drafted.tokens[0] if accepted else token
        counts[first] = counts.get(first, 0) + 1
    return counts


@pytest.mark.integration
def test_constrained_speculative_sampling_follows_the_constrained_target(tiny_models):
    """Chi-square: the first token's distribution is the target's masked and renormalised one; the
    same rounds with an unmasked target visibly are not (the test can fail)."""
    from scipy.stats import chisquare

    draft, tok, target, _ = tiny_models
    text = grammar._llg().LLMatcher.grammar_from_regex("[a-e][a-z ]{0,6}")
    prompt = tok.encode_chat("spell")
    params = SamplingParams(temperature=1.0, seed=3)
    c = grammar.Compiled(tok, target.cfg.vocab_size, text).start()
    cache = target.new_cache()
    row = target.forward(prompt, cache)[-1]
    p = target_distribution(c.mask(row).numpy(), params)
    support = np.nonzero(p > 0)[0]
    assert len(support) >= 5  # a real choice, not a forced token

    def p_value(counts):
        n = sum(counts.values())
        big = [t for t in support if p[t] * n >= 5]
        observed = [counts.get(t, 0) for t in big] + [n - sum(counts.get(t, 0) for t in big)]
        expected = [p[t] * n for t in big] + [n - sum(p[t] * n for t in big)]
        return chisquare(observed, expected).pvalue

    assert p_value(_first_tokens(target, tok, draft, prompt, text, params, 1500)) > 1e-3
    assert p_value(_first_tokens(target, tok, draft, prompt, text, params, 300, masked_target=False)) < 1e-6


def test_the_verifier_checks_forced_tokens_against_its_grammar(tiny_models):
    _, tok, target_model, _ = tiny_models
    target = Target.in_memory("tiny", target_model, tok)
    text = grammar.json_schema(ACTION)
    compiled = grammar.Compiled(tok, target_model.cfg.vocab_size, text)
    prompt = tok.encode_chat("go")
    session = TargetSession(target, prompt, SamplingParams(), 1, constraint=compiled.start(),
                            grammar_from=len(prompt))
    forced = compiled.start().forced()
    assert forced is not None  # '{"' opens every object of this schema
    with pytest.raises(BadRequest, match="not the only one"):
        session.force([(forced + 1) % target_model.cfg.vocab_size])
    session.force([forced])
    assert session.committed[-1] == forced
    plain = TargetSession(target, prompt, SamplingParams(), 2)
    with pytest.raises(BadRequest, match="without a grammar"):
        plain.force([forced])
    with pytest.raises(BadRequest, match="no next turn"):
        session.extend(tok.encode("more"))


def test_a_resync_open_states_the_generated_text_under_its_grammar(tiny_models):
    """A resync's OPEN carries generated tokens after grammar_from: the new session's grammar
    state consumes them, and text the grammar refuses is a bad request."""
    _, tok, target_model, _ = tiny_models
    target = Target.in_memory("tiny", target_model, tok)
    compiled = grammar.Compiled(tok, target_model.cfg.vocab_size, grammar.json_schema(ACTION))
    prompt = tok.encode_chat("go")
    generated = tok.encode('{"action": "mo')
    session = TargetSession(target, prompt + generated, SamplingParams(), 1, constraint=compiled.start(),
                            grammar_from=len(prompt))
    assert session.constraint.length == len(generated)
    with pytest.raises(BadRequest, match="breaks the session's grammar"):
        TargetSession(target, prompt + tok.encode("hello"), SamplingParams(), 2, constraint=compiled.start(),
                      grammar_from=len(prompt))


def test_open_names_its_grammar_by_hash_with_or_without_its_text():
    text = grammar.json_schema(ACTION)
    digest = grammar.grammar_hash(text)
    msg = wire.Open(5, 1, [1, 2, 3], grammar_hash=digest, grammar=text, grammar_from=2)
    assert wire.decode(wire.encode(msg)) == msg
    by_hash = wire.Open(5, 1, [1, 2, 3], grammar_hash=digest, grammar_from=2)
    assert wire.decode(wire.encode(by_hash)) == by_hash
    assert len(wire.encode(msg)) - len(wire.encode(by_hash)) == len(text.encode())
    raw = bytearray(wire.encode(msg))
    raw[-3] ^= 1  # one byte of the text: its hash no longer matches
    with pytest.raises(wire.WireError, match="hash"):
        wire.decode(bytes(raw))
    with pytest.raises(wire.WireError, match="hash"):
        wire.encode(wire.Open(5, 1, [1], grammar_hash=digest, grammar="{}"))
    long = "x" * (grammar.MAX_GRAMMAR + 1)
    with pytest.raises(wire.Oversized):
        wire.encode(wire.Open(5, 1, [1], grammar_hash=grammar.grammar_hash(long), grammar=long))


def test_a_grammar_travels_once_then_by_hash_and_again_when_the_verifier_lost_it(stack, tiny_models):
    """The first request sends the grammar's text; the next names it by hash (a smaller OPEN). A
    verifier that no longer holds it answers UNKNOWN_GRAMMAR, and the device opens again with the
    text: the output is the constrained target's all along."""
    _, tok, target, _ = tiny_models
    text = grammar.json_schema({"type": "object", "properties": {"go": {"enum": ["left", "right", "back"]}},
                                "required": ["go"], "additionalProperties": False})
    prompt = tok.encode_chat("which way")
    want = grammar.reference_decode(target, tok, prompt, 20, text)
    agent, policy = stack.agent, parse_policy("fixed:3")
    uplink = []
    for lose in (False, False, True):
        if lose:
            stack.verifier.table.grammars = grammar.Cache()  # a restarted replica, or evicted from its cache
        sent0 = agent.status().bytes_sent
        got = agent.generate(prompt, SamplingParams(), 20, policy, grammar=text)
        uplink.append(agent.status().bytes_sent - sent0)
        assert got.tokens == want
    assert uplink[1] < uplink[0] - len(text) // 2
    assert uplink[2] > uplink[1] + len(text) // 2 and got.stats.resyncs == 1


def test_a_draft_with_forced_tokens_is_its_own_type_and_a_plain_one_pays_nothing():
    plain = wire.Draft(5, 2, 10, [7, 8], None, wire.text_hash([1]))
    forced = wire.Draft(5, 2, 10, [7, 8], None, wire.text_hash([1]), [3, 4, 5])
    assert wire.encode(plain)[1] == wire.Draft.TYPE and wire.encode(forced)[1] == wire.Draft.TYPE_FORCED
    assert len(wire.encode(forced)) == len(wire.encode(plain)) + 1 + 3 * 3
    assert wire.decode(wire.encode(forced)) == forced


@pytest.mark.parametrize("response_format,error", [
    ("json", "must be an object"),
    ({"type": "xml"}, "expected text"),
    ({"type": "json_schema", "json_schema": {"schema": "nope"}}, "json_schema needs"),
])
def test_a_bad_response_format_is_the_requests_fault(response_format, error):
    with pytest.raises(grammar.GrammarError, match=error):
        grammar.from_response_format(response_format)


def test_a_schema_that_does_not_compile_names_the_fault(tiny_models):
    _, tok, target, _ = tiny_models
    with pytest.raises(grammar.GrammarError):
        grammar.Compiled(tok, target.cfg.vocab_size, grammar.json_schema({"type": "no-such-type"}))


def test_tool_choice_required_gives_calls_and_auto_may_give_text(tiny_models):
    _, tok, target, _ = tiny_models
    tools = [{"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}},
             {"type": "function", "function": {"name": "stop"}}]
    required = grammar.Compiled(tok, target.cfg.vocab_size, grammar.from_tools(tools, "required", hermes=False))
    auto = grammar.Compiled(tok, target.cfg.vocab_size, grammar.from_tools(tools, "auto", hermes=False))
    call = tok.encode('{"name": "move", "arguments": {"x": 1.5}}')
    assert required.start().accept(call) and auto.start().accept(call)
    assert not required.start().accept(tok.encode("hello"))
    assert auto.start().accept(tok.encode("hello"))
    assert grammar.from_tools(tools, "none", hermes=False) is None
    named = grammar.from_tools(tools, {"type": "function", "function": {"name": "stop"}}, hermes=False)
    assert not grammar.Compiled(tok, target.cfg.vocab_size, named).start().accept(call)
    assert grammar.parse_tool_calls('{"name": "move", "arguments": {"x": 1.5}}') == [
        {"name": "move", "arguments": {"x": 1.5}}]
    assert grammar.parse_tool_calls("hello") is None
    with pytest.raises(grammar.GrammarError, match="not among the tools"):
        grammar.from_tools(tools, {"type": "function", "function": {"name": "fly"}}, hermes=False)


def test_a_rollback_past_a_stop_token_leaves_the_grammar_where_the_text_is(tiny_models):
    """cloud-ar re-asks from what the device holds: the session cuts its text back, across a stop
    token the grammar never consumed, and its grammar state follows the shorter text."""
    _, tok, target_model, _ = tiny_models
    target = Target.in_memory("tiny", target_model, tok)
    text = grammar._llg().LLMatcher.grammar_from_regex("the cat")
    compiled = grammar.Compiled(tok, target_model.cfg.vocab_size, text)
    prompt = tok.encode_chat("say it")
    said = tok.encode("the cat")
    session = TargetSession(target, prompt + said, SamplingParams(), 1, constraint=compiled.start(),
                            grammar_from=len(prompt))
    session.committed.append(tok.eos_id)  # the stream's last token: the stop the device did not commit
    session.sync(len(prompt) + 2, allow_rollback=True)
    assert session.constraint.length == 2
    assert session.constraint.forced() == said[2]
