"""Structured output and tool calls through the device's OpenAI-compatible HTTP API (issue 22):
response_format and tools become a grammar the answer follows, exactly the target's constrained
greedy output; tool answers come back as OpenAI's tool_calls, streamed and not; bad requests are
400s that name their parameter. On a real broker, verifier and tiny models."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from specedge import grammar
from specedge.device.openai_api import parse_request
from specedge.tokenizer import Tokenizer
from conftest import device_node
from test_fleet_secure import http

FLEET = "structured"
ACTION = {"type": "object", "properties": {
    "action": {"enum": ["move", "turn", "grip", "stop"]},
    "speed": {"type": "integer", "minimum": 0, "maximum": 20},
    "note": {"type": "string", "maxLength": 6}},
    "required": ["action", "speed", "note"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "move", "description": "drive the robot", "parameters": {
    "type": "object", "properties": {"speed": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["speed"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "halt", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
# The parts of Qwen2.5's chat template that render tools, an assistant's tool calls and a tool's
# result (the real one is in the Qwen GGUF files; the tiny models' template ignores tools).
QWEN_TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% for tool_call in message.tool_calls %}{% if tool_call.function is defined %}"
    "{% set tool_call = tool_call.function %}{% endif %}"
    "\n<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def node(tiny_models, mosquitto):
    with device_node(tiny_models, mosquitto.port, FLEET, {
            "device": {"id": "arm"}, "generation": {"max_new_tokens": 64},
            "speculation": {"policy": "fixed:4"}, "api": {"http_port": 0}}) as n:
        yield n


def chat(node, words: str = "turn the arm left", **body):
    return http(node.http.port, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": words}], "temperature": 0, **body})


def sse(raw: bytes) -> list[dict]:
    """The JSON events of a server-sent event stream, [DONE] left out."""
    return [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e.startswith("data: {")]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "action", "schema": schema, "strict": True}}


def reference(node, tiny_models, body: dict, max_new: int = 80) -> tuple[dict, str, list[int]]:
    """(the API's parsed request, the target's own constrained greedy answer to it as text and tokens),
    computed outside every service from the prompt and grammar the API builds."""
    _, tok, target, _ = tiny_models
    request = parse_request(body, True, node.service)
    tokens = grammar.reference_decode(target, tok, request["prompt"], max_new, request["grammar"])
    return request, tok.decode(tokens), tokens


def tokens_through(tok, tokens: list[int], lines: int) -> int:
    """How many of `tokens` make up their text's first `lines` lines (tool calls), no newline after."""
    text = "\n".join(tok.decode(tokens).split("\n")[:lines])
    return next(k for k in range(len(tokens) + 1) if tok.decode(tokens[:k]) == text)


def valid_action(action: dict) -> bool:
    props = ACTION["properties"]
    return (set(action) == set(props) and action["action"] in props["action"]["enum"]
            and 0 <= action["speed"] <= 20 and len(action["note"]) <= 6)


@pytest.mark.parametrize("words", ["grip it", "robot arm go"])
def test_a_json_schema_answer_follows_the_schema_and_is_the_targets_constrained_greedy_output(
        node, tiny_models, words):
    body = {"messages": [{"role": "user", "content": words}], "temperature": 0, "max_tokens": 60,
            "response_format": schema_format(ACTION)}
    request, want, _ = reference(node, tiny_models, body, 60)
    assert request["grammar"] == grammar.json_schema(ACTION) and not request["tools"]
    status, raw = http(node.http.port, "/v1/chat/completions", body)
    answer = json.loads(raw)
    choice = answer["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop" and choice["message"]["content"] == want
    assert valid_action(json.loads(want))
    assert answer["specedge"]["forced_tokens"] > 0  # the keys and punctuation cost no round trip
    status, raw = http(node.http.port, "/v1/chat/completions", {**body, "stream": True})  # streams as usual
    events = sse(raw)
    assert status == 200 and "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["specedge"]["forced_tokens"] > 0


def test_json_object_answers_are_json_objects_on_chat_and_completions(node, tiny_models):
    _, tok, target, _ = tiny_models
    status, raw = chat(node, "the cat", max_tokens=40, response_format={"type": "json_object"})
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    # Completions take response_format too; the tiny target does not close this one in 12 tokens.
    status, raw = http(node.http.port, "/v1/completions", {"prompt": "the cat", "max_tokens": 12, "temperature": 0,
                                                          "response_format": {"type": "json_object"}})
    choice = json.loads(raw)["choices"][0]
    text = grammar.json_schema({"type": "object"})
    want = tok.decode(grammar.reference_decode(target, tok, tok.encode("the cat"), 12, text))
    assert status == 200 and choice["text"] == want and want.startswith("{")


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"move", "halt"}), ({"type": "function", "function": {"name": "halt"}}, {"halt"})])
def test_a_required_or_named_tool_choice_answers_with_tool_calls(node, tiny_models, tool_choice, names):
    """The tiny target never ends its calls (it writes one more), so max_tokens ends the answer
    right after its first call: the target's own first call, as one OpenAI tool call."""
    _, tok, _, _ = tiny_models
    body = {"messages": [{"role": "user", "content": "stop now"}], "temperature": 0, "tools": TOOLS,
            "tool_choice": tool_choice}
    request, _, tokens = reference(node, tiny_models, body)
    assert request["tools"] and request["grammar"] == grammar.from_tools(TOOLS, tool_choice, hermes=False)
    n = tokens_through(tok, tokens, 1)
    status, raw = http(node.http.port, "/v1/chat/completions", {**body, "max_tokens": n})
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function" and call["function"]["name"] in names
    arguments = json.loads(call["function"]["arguments"])
    assert json.dumps({"name": call["function"]["name"], "arguments": arguments}) == tok.decode(tokens[:n])
    if call["function"]["name"] == "move":
        assert set(arguments) == {"speed"} and 0 <= arguments["speed"] <= 9
    else:
        assert arguments == {}


def test_streamed_tool_calls_come_whole_in_openai_chunks(node, tiny_models):
    _, tok, _, _ = tiny_models
    body = {"messages": [{"role": "user", "content": "grip it"}], "temperature": 0, "tools": TOOLS,
            "tool_choice": "required"}
    _, text, tokens = reference(node, tiny_models, body, 120)
    n = tokens_through(tok, tokens, 2)  # two calls
    status, raw = http(node.http.port, "/v1/chat/completions", {**body, "max_tokens": n, "stream": True})
    events = sse(raw)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert status == 200 and deltas[0] == {"role": "assistant", "content": ""}
    assert not any(d.get("content") for d in deltas)  # the calls were held back, never streamed as text
    calls = [c for d in deltas for c in d.get("tool_calls", ())]
    assert [c["index"] for c in calls] == [0, 1] and all(c["id"].startswith("call_") for c in calls)
    got = [json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
           for c in calls]
    assert got == text.split("\n")[:2]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and "forced_tokens" in events[-1]["specedge"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tools_answer_cut_mid_call_by_max_tokens_is_text_with_finish_length(node, tiny_models, stream):
    _, tok, _, _ = tiny_models
    body = {"messages": [{"role": "user", "content": "stop now"}], "temperature": 0, "tools": TOOLS,
            "tool_choice": "required", "stream": stream}
    _, _, tokens = reference(node, tiny_models, body)
    n = tokens_through(tok, tokens, 1) - 3
    status, raw = http(node.http.port, "/v1/chat/completions", {**body, "max_tokens": n})
    if stream:
        events = sse(raw)
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        finish = events[-1]["choices"][0]["finish_reason"]
        assert sum(bool(e["choices"][0]["delta"].get("content")) for e in events) == 1  # said whole, once
    else:
        message = json.loads(raw)["choices"][0]["message"]
        content, finish = message["content"], json.loads(raw)["choices"][0]["finish_reason"]
        assert "tool_calls" not in message
    assert status == 200 and finish == "length" and content == tok.decode(tokens[:n])


def test_tool_choice_none_answers_with_plain_content(node):
    status, raw = chat(node, "grip it", max_tokens=12, tools=TOOLS, tool_choice="none")
    message = json.loads(raw)["choices"][0]["message"]
    assert status == 200 and "tool_calls" not in message and isinstance(message["content"], str)
    status, raw = chat(node, "grip it", max_tokens=12)  # no grammar: the answer without tools
    assert json.loads(raw)["choices"][0]["message"]["content"] == message["content"]


BAD_TOOL = [{"type": "function", "function": {"parameters": {"type": "object"}}}]
UNCOMPILABLE_TOOL = [{"type": "function", "function": {"name": "fly", "parameters": {"type": "no-such-type"}}}]


@pytest.mark.parametrize("path, body, param", [
    ("chat", {"response_format": "json"}, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat", {"response_format": schema_format({"type": "no-such-type"})}, "response_format"),
    ("completions", {"response_format": schema_format({"type": "no-such-type"})}, "response_format"),
    ("chat", {"response_format": {"type": "json_object"}, "tools": TOOLS}, "response_format"),
    ("chat", {"tools": BAD_TOOL}, "tools"),
    ("chat", {"tools": UNCOMPILABLE_TOOL}, "tools"),
    ("completions", {"tools": TOOLS}, "tools"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ("chat", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "move", "arguments": "{not json"}}]}]}, "messages[0].tool_calls"),
])
def test_bad_structured_requests_get_400_naming_the_parameter(node, path, body, param):
    if path == "chat":
        status, raw = chat(node, **body)
    else:
        status, raw = http(node.http.port, "/v1/completions", {"prompt": "x", **body})
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and set(error) == {"message", "type", "param", "code"}


TOOL_TURNS = [{"role": "user", "content": "drive"},
              {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                  "name": "move", "arguments": '{"speed": 3}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "moved 3 m"},
              {"role": "user", "content": "again"}]


def test_a_tool_conversation_renders_with_its_calls_results_and_tools(node, tiny_models):
    """Assistant tool_calls (content null) and tool results are taken; a template that knows tools
    (Qwen's) gets them in the shape it reads: the call's arguments as an object, written as the
    model was trained (HF's tojson: keys in order), and the tools list."""
    _, tok, _, _ = tiny_models
    status, raw = chat(node, messages=TOOL_TURNS, max_tokens=8, tools=TOOLS, tool_choice="auto")
    assert status == 200, raw  # the tiny template renders the turns' content alone
    qwen = SimpleNamespace(tokenizer=Tokenizer(tok.hf, tok.eos_id, tok.bos_id, QWEN_TOOLS_TEMPLATE),
                           cfg=node.service.cfg, engine=node.service.engine, hermes=False,
                           check_grammar=node.service.check_grammar)
    request = parse_request({"messages": TOOL_TURNS, "tools": TOOLS}, True, qwen)
    prompt = tok.decode(request["prompt"])
    assert '<tool_call>\n{"name": "move", "arguments": {"speed": 3}}\n</tool_call>' in prompt
    assert "<tool_response>\nmoved 3 m\n</tool_response>" in prompt
    assert all(json.dumps(tool) in prompt for tool in TOOLS)
    request = parse_request({"messages": TOOL_TURNS, "tools": TOOLS, "tool_choice": "none"}, True, qwen)
    assert "<tools>" not in tok.decode(request["prompt"])  # shown no tools, it writes no calls
