"""The target's logprobs (issue 36): at every answered position, the target's own log-softmax,
bitwise, whether the token came from a verdict or a stream, greedy or sampled, coupled or not;
checked against the target's own decoding outside every service. Through device, Mosquitto and
verifier, the wire's cost per token, and the OpenAI shapes through the official client."""
from __future__ import annotations

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import alone, device_node, reference_greedy
from specedge.device.openai_api import parse_request, token_text
from specedge.device.policy import parse_policy
from specedge.protocol import wire
from specedge.speculative import SamplingParams, TokenLogprob, token_logprobs

WORDS = ["the", "cat", "robot", "turn", "left", "stop", "sensor", "arm", "go", "?", "é"]
FLEET = "logprobs"


def reference(tiny_models, prompt: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """The target's own log-softmax at each of `tokens`' positions: every position fed alone."""
    _, _, target, _ = tiny_models
    rows = alone(target, prompt + tokens)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return [token_logprobs(row.float().numpy(), t, top) for row, t in zip(rows, tokens)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=6),
       policy=st.sampled_from(["fixed:1", "fixed:4", "fixed:6+pipelined", "cloud-ar", "adaptive"]),
       sampling=st.sampled_from(["greedy", "sampled", "seeded"]), top=st.integers(0, 20), max_new=st.integers(1, 16))
def test_logprobs_are_the_targets_own_log_softmax_at_every_answered_position(
        stack, tiny_models, words, policy, sampling, top, max_new):
    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat(" ".join(words))
    temperature, seed = {"greedy": (0.0, None), "sampled": (1.0, None), "seeded": (1.0, 3)}[sampling]
    params = SamplingParams.seeded(temperature, 0, 1.0, seed)
    params = SamplingParams(params.temperature, 0, 1.0, params.seed, params.coupled, logprobs=top)
    result = stack.agent.generate(prompt, params, max_new, parse_policy(policy))
    assert result.logprobs == reference(tiny_models, prompt, result.tokens, top)  # bitwise: float32 values


def test_without_logprobs_asked_nothing_more_crosses_and_each_asked_one_costs_what_is_stated():
    """Per answered token: 5 bytes (its logprob f32, a count u8) and 8 per top entry (id u32, f32)."""
    plain = wire.Verdict(1, 1, 10, 3, 7, 100)
    assert len(wire.encode(plain)) == 10 + 19
    for top in (0, 5, 20):
        lp = TokenLogprob(-0.5, tuple((i, -1.0 - i) for i in range(top)))
        verdict = wire.Verdict(1, 1, 10, 3, 7, 100, logprobs=[lp] * 4)
        assert len(wire.encode(verdict)) == 10 + 19 + 4 * (5 + 8 * top)
        assert wire.decode(wire.encode(verdict)).logprobs == [lp] * 4
        tokens = wire.Tokens(1, 1, 5, [7], logprobs=[lp])
        assert len(wire.encode(tokens)) == len(wire.encode(wire.Tokens(1, 1, 5, [7]))) + 5 + 8 * top
    opened = wire.decode(wire.encode(wire.Open(1, 1, [1, 2], SamplingParams(logprobs=20))))
    assert opened.params.logprobs == 20 and wire.decode(wire.encode(wire.Open(1, 1, [1, 2]))).params.logprobs is None


def test_a_malformed_logprobs_section_is_a_wire_error():
    good = wire.encode(wire.Verdict(1, 1, 10, 0, 7, 100, logprobs=[TokenLogprob(-0.5, ((3, -1.0),))]))
    with pytest.raises(wire.WireError):
        wire.decode(good[:-2])  # cut inside the section
    with pytest.raises(wire.WireError):
        wire.decode(good[:29] + wire.LOGPROB.pack(-0.5, 21) + b"\0" * 8 * 21)  # more than 20 top entries
    raw = bytearray(wire.encode(wire.Open(1, 1, [1, 2], SamplingParams(logprobs=3))))
    raw[-1] = 21
    with pytest.raises(wire.WireError):
        wire.decode(bytes(raw))


# -- through the HTTP API and the official client ----------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_models, mosquitto):
    with device_node(tiny_models, mosquitto.port, FLEET, {
            "device": {"id": "lp"}, "generation": {"max_new_tokens": 16},
            "speculation": {"policy": "fixed:4"}, "api": {"http_port": 0}}) as node:
        yield node, openai.OpenAI(base_url=f"http://127.0.0.1:{node.http.port}/v1", api_key="unused",
                                  max_retries=0, timeout=120)


def _prompt(node, body: dict, chat: bool) -> list[int]:
    return parse_request(body, chat, node.service)["prompt"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_in_openais_shape_are_the_targets(client, tiny_models, stream):
    node, api = client
    _, tok, _, _ = tiny_models
    messages = [{"role": "user", "content": "turn left"}]
    answer = api.chat.completions.create(model="specedge", messages=messages, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=3, stream=stream)
    chunks = list(answer) if stream else [answer]
    content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    prompt = _prompt(node, {"messages": messages}, True)
    tokens = reference_greedy(tiny_models[2], prompt, 12, tok.stop_ids)  # the answer: the target's own
    assert [bytes(e.bytes) for e in content] == [tok.token_bytes(t) for t in tokens]
    want = reference(tiny_models, prompt, tokens, 3)
    assert [e.logprob for e in content] == [w.logprob for w in want]
    assert [[(t.bytes, t.logprob) for t in e.top_logprobs] for e in content] == [
        [(list(tok.token_bytes(i)), v) for i, v in w.top] for w in want]


def test_completions_logprobs_in_the_legacy_shape(client, tiny_models):
    node, api = client
    _, tok, _, _ = tiny_models
    answer = api.completions.create(model="specedge", prompt="def f():", max_tokens=8, temperature=0, logprobs=2)
    lp = answer.choices[0].logprobs
    prompt = _prompt(node, {"prompt": "def f():"}, False)
    tokens = reference_greedy(tiny_models[2], prompt, 8, tok.stop_ids)
    assert lp.tokens == [token_text(tok.token_bytes(t)) for t in tokens]  # "bytes:\\xNN" for part of a character
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    want = reference(tiny_models, prompt, tokens, 2)
    assert lp.token_logprobs == [w.logprob for w in want] and all(len(top) == 2 for top in lp.top_logprobs)


@pytest.mark.parametrize("chat, extra, param", [
    (True, {"top_logprobs": 3}, "top_logprobs"), (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (True, {"logprobs": 1}, "logprobs"), (False, {"logprobs": 6}, "logprobs")])
def test_bad_logprobs_requests_get_400_naming_the_parameter(client, chat, extra, param):
    _, api = client
    with pytest.raises(openai.BadRequestError) as refused:
        if chat:
            api.chat.completions.create(model="specedge", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        **extra)
        else:
            api.completions.create(model="specedge", prompt="x", max_tokens=2, **extra)
    assert refused.value.param == param


def test_under_a_grammar_every_token_has_its_logprob_forced_or_not(stack, tiny_models):
    """A token the grammar forces is drafted and verified when logprobs are asked (no forcing):
    its row is the target's too. The logprobs are the unmasked model's, as OpenAI's are."""
    from specedge import grammar
    from test_structured_api import ACTION

    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat("grip it")
    result = stack.agent.generate(prompt, SamplingParams(logprobs=2), 40, parse_policy("fixed:4"),
                                  grammar=grammar.json_schema(ACTION))
    assert result.stats.forced_tokens == 0 and None not in result.logprobs
    assert result.logprobs == reference(tiny_models, prompt, result.tokens, 2)
