"""OpenAI's request and answer shapes, as the device's two front doors take and give them: the
local HTTP API (device/http_api.py) and the local MQTT API (device/local_mqtt.py), siblings that
both read requests with parse_request and write answers with the functions here.

A request is checked whole before it is queued (every parameter's range, the roles and contents
of the messages, the structured-output grammar compiled, the prompt within the draft engine's
positions); an error is an ApiError with OpenAI's shape {"error": {"message", "type", "param",
"code"}} and the HTTP status it maps to. Unset sampling parameters take the device's
[generation] defaults.
"""
from __future__ import annotations

import codecs
import json
import secrets
from dataclasses import replace

from specedge import grammar
from specedge.device.service import DeviceService, Job, Outcome, Rejected
from specedge.speculative import MAX_TOP_LOGPROBS, SamplingParams

MODEL_ID = "specedge"
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # each: the device holds back text while it could still become one
MAX_DEPTH = 32  # JSON nesting; OpenAI's request shapes need a handful of levels
DEFAULT_POSITIONS = 32768  # for an engine that does not say how many positions it holds
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound (chat's top_logprobs: MAX_TOP_LOGPROBS)
UNSUPPORTED = {"presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, "")}
ROLES = ("system", "user", "assistant", "developer", "tool")  # "developer": OpenAI's newer name for system


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], "
                            f"got {value!r}", key)
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", where)


def _template_calls(calls, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` as chat templates read them: arguments as an
    object, since Qwen's template writes them with `tojson` (OpenAI sends a JSON string)."""
    shape = (f'{where}.tool_calls must be a list of {{"type": "function", '
             '"function": {"name": ..., "arguments": ...}}')
    if not isinstance(calls, list):
        raise ApiError(400, shape, f"{where}.tool_calls")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, shape, f"{where}.tool_calls")
        arguments = fn.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ApiError(400, f"{where}.tool_calls: the arguments of {fn['name']} are not JSON",
                               f"{where}.tool_calls") from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _turn(m, i: int) -> dict:
    """One OpenAI chat message as the chat template's: a tool's result ("tool", with its
    tool_call_id) and an assistant's tool calls (its content may then be null) included."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"{where} needs a role of system, user, assistant or tool", where)
    role = "system" if m["role"] == "developer" else m["role"]
    if role == "assistant" and m.get("tool_calls"):
        content = "" if m.get("content") is None else _text(m["content"], f"{where}.content")
        return {"role": role, "content": content, "tool_calls": _template_calls(m["tool_calls"], where)}
    turn = {"role": role, "content": _text(m.get("content"), f"{where}.content")}
    if role == "tool":
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError(400, f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
        turn["tool_call_id"] = call_id or ""
    return turn


def chat_prompt(messages, tools: list | None, service: DeviceService) -> list[int]:
    """The prompt tokens of a chat request: its messages (and the tools the model is shown) through
    the chat template, after [generation] system_prompt where the request has no system message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    turns = [_turn(m, i) for i, m in enumerate(messages)]
    system = service.cfg.generation.system_prompt
    if system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    tok = service.tokenizer
    try:
        return tok.encode(tok.apply_chat_template(turns, tools=tools))
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages") from None


def _grammar(make, param: str):
    """make()'s grammar text; a GrammarError is the request's fault, named by `param`."""
    try:
        return make()
    except grammar.GrammarError as exc:
        raise ApiError(400, str(exc), param) from None


def _compiles(service: DeviceService, text: str | None, param: str) -> str | None:
    """`text` once it compiles for the device's vocabulary: a schema llguidance cannot compile is a
    400 now, not a failed job later."""
    if text is not None:
        _grammar(lambda: service.check_grammar(text), param)
    return text


def structured(body: dict, chat: bool, service: DeviceService) -> tuple[str | None, bool, list | None]:
    """What `response_format` or `tools` ask of the answer: (its grammar text or None, whether it is
    parsed for tool calls, the tools the chat template shows the model). One grammar per answer:
    both at once is a 400. Under tool_choice "none" the tools are not shown either: Qwen, shown
    them, writes calls that nothing would parse."""
    fmt = _grammar(lambda: grammar.from_response_format(body.get("response_format")), "response_format")
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:  # [] was accepted before tools were supported: still none
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        return _compiles(service, fmt, "response_format"), False, None
    if not chat:
        raise ApiError(400, "tools are taken by chat completions (/v1/chat/completions) only", "tools")
    _grammar(lambda: grammar.tool_functions(tools), "tools")
    calls = _grammar(lambda: grammar.from_tools(tools, choice, service.hermes), "tool_choice")
    if calls is None:
        return _compiles(service, fmt, "response_format"), False, None
    if fmt is not None:
        raise ApiError(400, "response_format and tools both constrain the answer: a request may use one",
                       "response_format")
    return _compiles(service, calls, "tools"), True, tools


def draft_positions(engine) -> int:
    """Positions (prompt plus completion) the draft engine holds; a request must fit them."""
    backend = getattr(engine, "backend", "")
    if backend == "tensorrt":  # its optimisation profile, not the model, sets the bound
        from specedge.device.trt_engine import MAX_CONTEXT
        return MAX_CONTEXT
    if backend == "llama.cpp":
        return engine.n_ctx
    model_cfg = getattr(engine, "cfg", None) or getattr(getattr(engine, "model", None), "cfg", None)
    return getattr(model_cfg, "max_seq_len", DEFAULT_POSITIONS)


def parse_request(body, chat: bool, service: DeviceService) -> dict:
    """The request's prompt tokens, sampling parameters, length, stop strings and grammar (with
    "tools": whether the answer is parsed for tool calls); ApiError if invalid."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    tok, gen = service.tokenizer, service.cfg.generation
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise ApiError(400, f"{key} is not supported by specedge", key, code="unsupported_parameter")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "n must be 1", "n")
    grammar_text, tools, shown = structured(body, chat, service)
    if chat:
        prompt = chat_prompt(body.get("messages"), shown, service)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str) or not text:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        prompt = tok.encode(text)
    positions = draft_positions(service.engine)
    limit = positions - len(prompt)
    if limit < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; the draft holds {positions} positions, "
                            "prompt and completion together", "messages" if chat else "prompt")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(key)
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > limit:
        raise ApiError(400, f"{key} is {asked}, but the draft holds {positions} positions and the prompt takes "
                            f"{len(prompt)}: at most {limit} are left", key)
    max_tokens = _number(body, key, 1, limit, min(gen.max_new_tokens, limit), integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at "
                            f"most {MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    params = SamplingParams.seeded(_number(body, "temperature", 0, 2, gen.temperature),
                                   _number(body, "top_k", 0, 1 << 20, gen.top_k, integer=True),
                                   _number(body, "top_p", 1e-9, 1, gen.top_p),
                                   _number(body, "seed", -(1 << 63), (1 << 64) - 1, gen.seed_or_none, integer=True))
    params = replace(params, logprobs=logprobs_asked(body, chat))
    return {"prompt": prompt, "params": params, "max_tokens": max_tokens, "stop": tuple(stop or ()),
            "grammar": grammar_text, "tools": tools, "stream": stream,
            "include_usage": bool(options.get("include_usage")),
            "model": body.get("model") if isinstance(body.get("model"), str) else MODEL_ID}


def logprobs_asked(body: dict, chat: bool) -> int | None:
    """How many top logprobs a request asks for with each token's own (0: its own only); None: no
    logprobs. Chat: `logprobs` true and `top_logprobs` 0..20; completions: `logprobs` 0..5."""
    if not chat:
        return _number(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None, integer=True)
    asked = body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise ApiError(400, "logprobs must be true or false", "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not asked:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if asked else None


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: its characters, or "bytes:\\xNN..." for a token that
    is only part of a character (so distinct tokens keep distinct names)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _token_entry(tok, token: int, logprob: float | None) -> dict:
    raw = tok.token_bytes(token)
    return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tok, logprobs: list | None) -> dict | None:
    """OpenAI's chat `logprobs`: {"content": [token, logprob, bytes, top_logprobs]} of (token,
    TokenLogprob) pairs; a token the target never saw (the `draft` fault policy) has logprob null."""
    if logprobs is None:
        return None
    return {"content": [{**_token_entry(tok, t, lp.logprob if lp else None),
                         "top_logprobs": [_token_entry(tok, i, v) for i, v in (lp.top if lp else ())]}
                        for t, lp in logprobs]}


def completion_logprobs(tok, logprobs: list | None, offset: int = 0) -> dict | None:
    """The legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    if logprobs is None:
        return None
    raws = [tok.token_bytes(t) for t, _ in logprobs]
    decoder, offsets = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    for raw in raws:  # where each token's text starts in the answer's characters
        offsets.append(offset)
        offset += len(decoder.decode(raw))
    return {"tokens": [token_text(raw) for raw in raws],
            "token_logprobs": [lp.logprob if lp else None for _, lp in logprobs],
            "top_logprobs": [{token_text(tok.token_bytes(i)): v for i, v in lp.top} if lp else None
                             for _, lp in logprobs],
            "text_offset": offsets}


def nesting(value) -> int:
    """How deep lists and objects nest in a parsed JSON value (a loop: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def json_body(raw: bytes):
    """The parsed body; 400 if it is not JSON or nests deeper than MAX_DEPTH."""
    try:
        body = json.loads(raw.decode("utf-8"))
        too_deep = nesting(body) > MAX_DEPTH
    except RecursionError:  # deeper than the parser's own stack: far past MAX_DEPTH
        too_deep = True
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None
    if too_deep:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels of JSON lists and objects")
    return body


def submit(service: DeviceService, request: dict) -> Job:
    """Queue a parsed request; a refusal becomes the error apps get (429 queue full, 503)."""
    try:
        return service.submit(request["prompt"], request["params"], request["max_tokens"], request["stop"],
                              request["grammar"])
    except Rejected as exc:
        raise ApiError(exc.status, str(exc), kind="rate_limit_error" if exc.status == 429 else "service_unavailable",
                       code=exc.kind) from None


def usage(outcome: Outcome) -> dict:
    """OpenAI's usage; cached_tokens: the conversation's history a kept session held on the
    verifier, not sent or prefilled again (docs/apps.md)."""
    cached = outcome.stats.cached_prompt_tokens if outcome.stats is not None else 0
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.tokens,
            "total_tokens": outcome.prompt_tokens + outcome.tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def spec_summary(outcome: Outcome) -> dict:
    """The speculative-decoding numbers of one request, beside OpenAI's fields."""
    if outcome.stats is None:
        return {}
    s = outcome.stats.summary()
    keys = ("policy", "rounds", "streamed_share", "mode_switches", "acceptance_rate", "mean_accepted_len",
            "mean_draft_len", "tokens_per_s", "ttft_s", "energy_j_per_token", "wire_bytes_per_token",
            "unverified_tokens", "exact", "lookup_rounds", "lookup_acceptance", "cached_prompt_tokens",
            "forced_tokens")
    return {**{k: s[k] for k in keys}, "target_version": outcome.stats.target_version}


def openai_calls(text: str) -> list[dict] | None:
    """The tool calls in a tools grammar's answer, in OpenAI's shape (arguments as a JSON string),
    or None where the answer is text (tool_choice "auto", or cut short by max_tokens)."""
    calls = grammar.parse_tool_calls(text)
    if calls is None:
        return None
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def answer_choice(outcome: Outcome, request: dict, chat: bool, tok) -> dict:
    """The one choice of a non-streamed answer: text, a chat message, or a chat message of tool calls."""
    if not chat:
        return {"index": 0, "text": outcome.text, "logprobs": completion_logprobs(tok, outcome.logprobs),
                "finish_reason": outcome.finish_reason}
    logprobs = chat_logprobs(tok, outcome.logprobs)
    calls = openai_calls(outcome.text) if request["tools"] else None
    if calls:
        return {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "logprobs": logprobs, "finish_reason": "tool_calls"}
    return {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": logprobs,
            "finish_reason": outcome.finish_reason}


def outcome_error(outcome: Outcome) -> ApiError:
    if outcome.error_kind == "verifier_unavailable":
        return ApiError(503, outcome.error, kind="service_unavailable", code="verifier_unavailable")
    if outcome.error_kind == "refused":
        return ApiError(400, outcome.error, code="refused_by_verifier")
    return ApiError(500, outcome.error, kind="server_error")
