"""The local HTTP API on the device: OpenAI-compatible completions, /metrics, /health, and a
chat page at / ([api] web_page).

Robot stacks and voice assistants talk to the device with the OpenAI clients
they already have (`base_url="http://127.0.0.1:8080/v1"`). Streaming uses
server-sent events ending in `data: [DONE]`. Unset sampling parameters take the
device's [generation] defaults (greedy unless configured otherwise: exactly the
target's output). A full queue answers 429, a draining device or one without a
broker 503, a body over [api] max_body_kb 413, a bad parameter 400; errors have
OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Structured output (docs/apps.md): `response_format` (json_object, json_schema) and, on chat,
`tools` with `tool_choice` become one grammar (specedge/grammar.py) that the answer follows; a
tools answer is parsed into OpenAI's `tool_calls`.

Any local process and any web page the device's browser opens can reach this port, so each
request is checked before it is read (docs/security.md): its Host (DNS rebinding), its Origin
(cross-site requests), the API key when [api] api_key_file sets one, then a JSON Content-Type
and a plain Content-Length. Connections are capped ([api] max_connections) and time out
([api] timeout_s); a request must fit the draft engine's positions. The chat page's files hold
nothing and need no key (as llama.cpp's server serves its page); the calls the page makes are
checked like any app's, and its Content-Security-Policy lets it load and call this origin only.
"""
from __future__ import annotations

import codecs
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import replace
from pathlib import Path

from specedge import grammar
from specedge.config import ConfigError
from specedge.device.service import DeviceService, Job, Outcome, Rejected
from specedge.exporter import CONTENT_TYPE, render
from specedge.resources import resource
from specedge.speculative import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger("specedge.http")

MODEL_ID = "specedge"
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # each: the device holds back text while it could still become one
MAX_DEPTH = 32  # JSON nesting; OpenAI's request shapes need a handful of levels
DEFAULT_POSITIONS = 32768  # for an engine that does not say how many positions it holds
CLIENT_POLL_S = 0.25  # how often a non-streamed request looks whether its app is still there
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound (chat's top_logprobs: MAX_TOP_LOGPROBS)
UNSUPPORTED = {"presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, "")}
# The chat page (specedge/data/web): path -> (file, Content-Type). No build step, no framework.
PAGE = {"/": ("index.html", "text/html; charset=utf-8"), "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
        "/chat.css": ("chat.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {  # its own origin only: no inline script, no other host, never framed by another page
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
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


# -- who may call: pure checks on the request's headers ----------------------------------------
def _hostname(netloc: str) -> str:
    """The host of `host[:port]` or `[v6 address][:port]`, lower-case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def host_allowed(host: str | None, bind_host: str) -> bool:
    """Whether a Host header names this API: a loopback name or address, or the address it is bound
    to. A page that rebinds its own DNS name to 127.0.0.1 still sends that name here."""
    if host is None:
        return True  # not a browser: browsers always send Host
    name = _hostname(host)
    if name in ("localhost", bind_host.lower()):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    # Bound to every interface, any address of the device is its own; an address cannot be rebound.
    return address.is_loopback or bind_host in ("", "0.0.0.0", "::")


def origin_allowed(origin: str | None, host: str | None, allowed: set[str]) -> bool:
    """Whether a browser's Origin may call: the API's own (same host and port) or one in [api]
    allowed_origins. No Origin: not a cross-site browser request. "null" (sandboxed frames, files)
    is nobody's origin."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    return origin in allowed or (host is not None and origin == "http://" + host.strip().lower())


def bearer_ok(authorization: str | None, key: bytes) -> bool:
    scheme, _, token = (authorization or "").strip().partition(" ")
    # compare_digest: how long a wrong key matched must not show in the time it takes to refuse it.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


def is_json(content_type: str | None) -> bool:
    """application/json, parameters (charset) aside. The types a page may POST across sites without
    a CORS preflight (text/plain, forms) are not it; this server answers no preflight."""
    return (content_type or "").partition(";")[0].strip().lower() == "application/json"


def read_api_key(path: str) -> bytes | None:
    """The key in [api] api_key_file (surrounding whitespace dropped); None without one."""
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"api.api_key_file: cannot read {path}: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"api.api_key_file: {path} is empty")
    return key


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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalHttpApi"
    server_version = "specedge"

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def setup(self):
        # Every socket read and write times out: an idle keep-alive connection, a stalled body or an
        # app that stops reading a stream frees its thread.
        self.timeout = self.server.timeout_s
        super().setup()

    # -- plumbing ------------------------------------------------------------------------------
    def send_json(self, status: int, data: dict, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, err: ApiError) -> None:
        headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if err.status >= 400 and self.command == "POST" and not getattr(self, "_body_read", True):
            headers["Connection"] = "close"  # the body was not read: the connection cannot be reused
            self.close_connection = True
        self.send_json(err.status, err.body(), headers)

    def check_caller(self, path: str) -> None:
        """Browsers only from this host and allowed origins, then the API key (but for /health)."""
        server, host = self.server, self.headers.get("Host")
        if not host_allowed(host, server.bind_host):
            raise ApiError(403, f"Host {host!r} does not name this device's API: call it as 127.0.0.1 or localhost",
                           kind="permission_error", code="host_not_allowed")
        origin = self.headers.get("Origin")
        if not origin_allowed(origin, host, server.origins):
            raise ApiError(403, f"web pages from {origin!r} may not call this API ([api] allowed_origins)",
                           kind="permission_error", code="origin_not_allowed")
        if server.api_key is not None and path != "/health" and path not in server.page \
                and not bearer_ok(self.headers.get("Authorization"), server.api_key):
            raise ApiError(401, "this API needs its key: Authorization: Bearer <the key in [api] api_key_file>",
                           kind="authentication_error", code="invalid_api_key")

    def read_json(self):
        self._body_read = False
        if not is_json(self.headers.get("Content-Type")):
            raise ApiError(415, "Content-Type must be application/json")
        if "Transfer-Encoding" in self.headers:  # chunked: its length is unknown until read
            raise ApiError(411, "chunked request bodies are not accepted: send Content-Length")
        lengths = set(self.headers.get_all("Content-Length") or ())
        if not lengths:
            raise ApiError(411, "Content-Length is required")
        length = lengths.pop().strip()
        # Plain digits only: int() also takes "-1" (read to the end of the stream), "+5" and "1_0".
        if lengths or not (length.isascii() and length.isdigit()):
            raise ApiError(400, "Content-Length must be one number of bytes (digits only)")
        limit = self.server.service.cfg.api.max_body_kb * 1024
        length = int(length) if len(length) < 16 else limit + 1  # int() refuses over 4,300 digits
        if length > limit:
            raise ApiError(413, f"the request body has {length} bytes; the limit is {limit} ([api] max_body_kb)")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.server.timeout_s} s "
                                "([api] timeout_s)") from None
        self._body_read = len(raw) == length
        return json_body(raw)

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        service = self.server.service
        path = self.path.split("?")[0]
        try:
            self.check_caller(path)
        except ApiError as err:
            self.send_error_json(err)
            return
        if path == "/metrics":
            body = render(service.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/health":
            connected = service.agent.status().connected
            ok = connected and not service.draining
            self.send_json(200 if ok else 503, {"status": "ok" if ok else service.state if connected else
                                                "broker_unreachable", "queue_depth": service.queue_depth,
                                                "policy": service.policy.name})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path == f"/v1/models/{MODEL_ID}":
            self.send_json(200, self.server.model_card())
        elif path in self.server.page:
            body, content_type = self.server.page[path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in PAGE_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error_json(ApiError(404, f"no route GET {path}", kind="not_found_error"))

    def do_POST(self):
        path = self.path.split("?")[0]
        chat = path == "/v1/chat/completions"
        self._body_read = False
        try:
            self.check_caller(path)
            if not chat and path != "/v1/completions":
                raise ApiError(404, f"no route POST {path}", kind="not_found_error")
            request = parse_request(self.read_json(), chat, self.server.service)
            job = submit(self.server.service, request)
        except ApiError as err:
            self.send_error_json(err)
            return
        (self.stream if request["stream"] else self.respond)(job, request, chat)

    def respond(self, job: Job, request: dict, chat: bool) -> None:
        while not job.done.wait(CLIENT_POLL_S):
            if self.client_gone():  # nobody will read the answer: stop generating it
                job.cancel()
                self.close_connection = True
                return
        outcome = job.outcome
        if outcome.finish_reason in ("error", "cancelled"):
            self.send_error_json(outcome_error(outcome))
            return
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.send_json(200, {"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": request["model"],
                             "choices": [answer_choice(outcome, request, chat, self.server.service.tokenizer)],
                             "usage": usage(outcome), "specedge": spec_summary(outcome)})

    def stream(self, job: Job, request: dict, chat: bool) -> None:
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": request["model"]}

        tok, said = self.server.service.tokenizer, [0]  # said: characters sent (completions' text_offset)
        logprobs: list = []  # (token, TokenLogprob) of the tokens the next text came from

        def chunk(text: str | None, finish: str | None, first: bool = False, delta: dict | None = None) -> dict:
            if chat:
                if delta is None:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                if logprobs:
                    choice["logprobs"] = chat_logprobs(tok, logprobs)
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": completion_logprobs(tok, logprobs, said[0]) if logprobs else None}
                said[0] += len(text or "")
            logprobs.clear()
            return {**base, "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        held_unverified = False  # with tools: the held text has text of tokens the target never saw
        try:
            if chat:
                self.event(chunk(None, None, first=True))
            for kind, value in job.events():
                if kind == "logprobs":  # they go with the text they made, in its chunk
                    logprobs += value
                    continue
                if kind in ("text", "unverified") and request["tools"]:  # it may be calls: said whole at the end
                    held_unverified |= kind == "unverified"
                    continue
                if kind == "text":
                    self.event(chunk(value, None))
                    continue
                if kind == "unverified":  # text of tokens the target never saw: said so in the chunk
                    self.event({**chunk(value, None), "specedge": {"unverified": True}})
                    continue
                outcome: Outcome = value
                if outcome.finish_reason in ("error", "cancelled"):
                    self.event(outcome_error(outcome).body())
                else:
                    finish = outcome.finish_reason
                    if request["tools"]:
                        finish = self.send_held(chunk, outcome, held_unverified)
                    self.event({**chunk(None, finish), "specedge": spec_summary(outcome)})
                    if request["include_usage"]:
                        self.event({**base, "choices": [], "usage": usage(outcome)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the app went away or stopped reading
            job.cancel()
            self.close_connection = True

    def send_held(self, chunk, outcome: Outcome, unverified: bool) -> str:
        """A streamed tools answer, held back whole: its tool calls in OpenAI's streaming shape (one
        chunk each, arguments whole) or its text in one chunk. Returns the finish reason."""
        mark = {"specedge": {"unverified": True}} if unverified else {}
        calls = openai_calls(outcome.text)
        if calls is None:
            if outcome.text:
                self.event({**chunk(outcome.text, None), **mark})
            return outcome.finish_reason
        for i, call in enumerate(calls):
            self.event({**chunk(None, None, delta={"tool_calls": [{"index": i, **call}]}), **mark})
        return "tool_calls"

    def client_gone(self) -> bool:
        """Whether the app closed its connection: what there is to read is its end. A peek, so
        bytes it sent meanwhile (a pipelined request) stay for the next request."""
        sock = self.connection
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing to read: still there
            return False
        except OSError:  # reset
            return True
        finally:
            sock.settimeout(self.server.timeout_s)

    def event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()


def refuse(sock: socket.socket, err: ApiError) -> None:
    """Answer a connection that gets no handler: one non-blocking send, so a client that reads
    nothing cannot stall the accepting thread."""
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:
        pass


class LocalHttpApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: DeviceService, host: str, port: int):
        self.service = service
        api = service.cfg.api  # read once: [api] changes take a restart
        self.bind_host, self.timeout_s, self.origins = host, api.timeout_s, api.origins()
        self.api_key = read_api_key(api.api_key_file)
        self.page = {path: (resource("data", "web", name).read_bytes(), kind)
                     for path, (name, kind) in PAGE.items()} if api.web_page else {}
        self._slots = threading.BoundedSemaphore(api.max_connections)
        super().__init__((host, port), Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="specedge-http", daemon=True)

    # Each open connection holds a thread: past [api] max_connections, new ones are refused at once
    # (on the accepting thread, without reading them) rather than wait for a thread.
    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            refuse(request, ApiError(503, "too many open connections to this API ([api] max_connections); "
                                          "retry shortly", kind="service_unavailable", code="too_many_connections"))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def model_card(self) -> dict:
        status = self.service.agent.status()
        return {"id": MODEL_ID, "object": "model", "created": int(self.service.started_s), "owned_by": "specedge",
                "draft": status.draft, "target": status.target or None}

    def start(self) -> "LocalHttpApi":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

