"""The device's HTTP API through the official `openai` Python client, as app developers call it:
chat (plain and streamed with usage), completions, json_schema, tools and the model card parse
as the client expects, answers are the target's own greedy output, and refusals are the client's
typed errors naming the parameter. On a real broker, verifier and the tiny pair."""
from __future__ import annotations

import json

import openai
import pytest
from conftest import device_node, reference_greedy
from specedge.device.openai_api import parse_request
from test_structured_api import ACTION, TOOLS, reference, schema_format, tokens_through, valid_action

FLEET = "openai-client"
MESSAGES = [{"role": "user", "content": "turn the arm left"}]


@pytest.fixture(scope="module")
def node(tiny_models, mosquitto):
    with device_node(tiny_models, mosquitto.port, FLEET, {
            "device": {"id": "app"}, "generation": {"max_new_tokens": 64},
            "speculation": {"policy": "fixed:4"}, "api": {"http_port": 0}}) as n:
        yield n


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{node.http.port}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_chat_plain_and_streamed_give_the_targets_answer_with_usage(node, client, tiny_models):
    _, tok, target, _ = tiny_models
    request = parse_request({"messages": MESSAGES, "temperature": 0}, True, node.service)
    tokens = reference_greedy(target, request["prompt"], 24, tok.stop_ids)
    want = tok.decode(tokens)
    answer = client.chat.completions.create(model="specedge", messages=MESSAGES, temperature=0, max_tokens=24)
    assert answer.choices[0].message.content == want and answer.usage.completion_tokens == len(tokens)
    assert answer.model_extra["specedge"]["exact"] is True  # the numbers of the request, beside OpenAI's
    stream = client.chat.completions.create(model="specedge", messages=MESSAGES, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_completions_answer_a_plain_prompt(client):
    answer = client.completions.create(model="specedge", prompt="def add(a, b):", temperature=0, max_tokens=8)
    assert answer.object == "text_completion" and answer.choices[0].text and answer.usage.completion_tokens == 8


def test_a_json_schema_answer_parses_and_is_the_targets_constrained_output(node, client, tiny_models):
    body = {"messages": [{"role": "user", "content": "grip it"}], "temperature": 0,
            "response_format": schema_format(ACTION)}
    _, want, _ = reference(node, tiny_models, body, 60)
    answer = client.chat.completions.create(model="specedge", max_tokens=60, **body)
    assert answer.choices[0].message.content == want and valid_action(json.loads(want))


def test_required_tools_come_back_as_the_clients_tool_calls(node, client, tiny_models):
    _, tok, _, _ = tiny_models
    body = {"messages": [{"role": "user", "content": "stop now"}], "temperature": 0, "tools": TOOLS,
            "tool_choice": "required"}
    _, _, tokens = reference(node, tiny_models, body)
    answer = client.chat.completions.create(model="specedge", max_tokens=tokens_through(tok, tokens, 1), **body)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0].function
    assert call.name in {"move", "halt"} and isinstance(json.loads(call.arguments), dict)


def test_the_model_card_names_the_draft_and_the_target_that_answered(client):
    cards = client.models.list().data
    assert [c.id for c in cards] == ["specedge"] and cards[0].model_extra["draft"]
    assert client.models.retrieve("specedge").id == "specedge"


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"temperature": 5}, "temperature")])
def test_refusals_are_the_clients_bad_request_errors_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="specedge", messages=MESSAGES, max_tokens=4, **extra)
    assert refused.value.param == param


def test_a_seed_gives_the_same_sampled_answer_and_none_draws_afresh(client):
    def ask(**extra) -> str:
        return client.chat.completions.create(model="specedge", messages=MESSAGES, temperature=1.0, max_tokens=24,
                                              **extra).choices[0].message.content

    assert len({ask(seed=7) for _ in range(3)}) == 1
    assert ask(seed=7, stream=False) != ask(seed=8)
    assert len({ask() for _ in range(3)}) == 3
