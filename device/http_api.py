"""The local HTTP API on the device: OpenAI-compatible completions, /metrics, /health.

Robot stacks and voice assistants talk to the device with the OpenAI clients
they already have (`base_url="http://127.0.0.1:8080/v1"`). Streaming uses
server-sent events ending in `data: [DONE]`. Unset sampling parameters take the
device's [generation] defaults (greedy unless configured otherwise: exactly the
target's output). A full queue answers 429, a draining device or one without a
broker 503, a body over [api] max_body_kb 413, a bad parameter 400; errors have
OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from specedge.device.service import DeviceService, Job, Outcome, Rejected
from specedge.exporter import CONTENT_TYPE, render
from specedge.speculative import SamplingParams

log = logging.getLogger("specedge.http")

MODEL_ID = "specedge"
MAX_STOP = 4  # stop strings per request, as OpenAI allows
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
               "best_of": (None, 1), "echo": (None, False), "suffix": (None, "")}


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


def parse_request(body, chat: bool, service: DeviceService) -> dict:
    """The request's prompt tokens, sampling parameters, length and stop strings; ApiError if invalid."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    tok, gen = service.tokenizer, service.cfg.generation
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise ApiError(400, f"{key} is not supported by specedge", key, code="unsupported_parameter")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "n must be 1", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}]")
            role = "system" if m["role"] == "developer" else m["role"]
            turns.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
        if gen.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": gen.system_prompt})
        try:
            prompt = tok.encode(tok.apply_chat_template(turns))
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str) or not text:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        prompt = tok.encode(text)
    limit = 32768 - len(prompt)
    if limit < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, more than the context allows", "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, limit, min(gen.max_new_tokens, limit), integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    params = SamplingParams(_number(body, "temperature", 0, 2, gen.temperature),
                            _number(body, "top_k", 0, 1 << 20, gen.top_k, integer=True),
                            _number(body, "top_p", 1e-9, 1, gen.top_p),
                            _number(body, "seed", -(1 << 63), (1 << 64) - 1, gen.seed, integer=True) % (1 << 63))
    return {"prompt": prompt, "params": params, "max_tokens": max_tokens, "stop": tuple(stop or ()),
            "stream": stream, "include_usage": bool(options.get("include_usage")),
            "model": body.get("model") if isinstance(body.get("model"), str) else MODEL_ID}


def json_body(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None


def submit(service: DeviceService, request: dict) -> Job:
    """Queue a parsed request; a refusal becomes the error apps get (429 queue full, 503)."""
    try:
        return service.submit(request["prompt"], request["params"], request["max_tokens"], request["stop"])
    except Rejected as exc:
        raise ApiError(exc.status, str(exc), kind="rate_limit_error" if exc.status == 429 else "service_unavailable",
                       code=exc.kind) from None


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.tokens,
            "total_tokens": outcome.prompt_tokens + outcome.tokens}


def spec_summary(outcome: Outcome) -> dict:
    """The speculative-decoding numbers of one request, beside OpenAI's fields."""
    if outcome.stats is None:
        return {}
    s = outcome.stats.summary()
    keys = ("acceptance_rate", "mean_accepted_len", "mean_draft_len", "tokens_per_s", "ttft_s",
            "energy_j_per_token", "wire_bytes_per_token", "unverified_tokens", "exact")
    return {**{k: s[k] for k in keys}, "target_version": outcome.stats.target_version}


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
        if err.status >= 400 and self.command == "POST" and not getattr(self, "_body_read", True):
            headers["Connection"] = "close"  # the body was not read: the connection cannot be reused
            self.close_connection = True
        self.send_json(err.status, err.body(), headers)

    def read_json(self):
        self._body_read = False
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length is required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        limit = self.server.service.cfg.api.max_body_kb * 1024
        if length > limit:
            raise ApiError(413, f"the request body has {length} bytes; the limit is {limit} ([api] max_body_kb)")
        raw = self.rfile.read(length)
        self._body_read = True
        return json_body(raw)

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self):
        service = self.server.service
        path = self.path.split("?")[0]
        if path == "/metrics":
            body = render(service.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/health":
            connected = service.agent.link.connected.is_set()
            ok = connected and not service.draining
            self.send_json(200 if ok else 503, {"status": "ok" if ok else service.state if connected else
                                                "broker_unreachable", "queue_depth": service.queue_depth,
                                                "policy": service.policy.name})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path == f"/v1/models/{MODEL_ID}":
            self.send_json(200, self.server.model_card())
        else:
            self.send_error_json(ApiError(404, f"no route GET {path}", kind="not_found_error"))

    def do_POST(self):
        path = self.path.split("?")[0]
        chat = path == "/v1/chat/completions"
        self._body_read = False
        try:
            if not chat and path != "/v1/completions":
                raise ApiError(404, f"no route POST {path}", kind="not_found_error")
            request = parse_request(self.read_json(), chat, self.server.service)
            job = submit(self.server.service, request)
        except ApiError as err:
            self.send_error_json(err)
            return
        (self.stream if request["stream"] else self.respond)(job, request, chat)

    def respond(self, job: Job, request: dict, chat: bool) -> None:
        outcome = job.wait()
        if outcome.finish_reason in ("error", "cancelled"):
            self.send_error_json(outcome_error(outcome))
            return
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        choice = ({"index": 0, "message": {"role": "assistant", "content": outcome.text}} if chat
                  else {"index": 0, "text": outcome.text, "logprobs": None})
        choice["finish_reason"] = outcome.finish_reason
        self.send_json(200, {"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": request["model"], "choices": [choice],
                             "usage": usage(outcome), "specedge": spec_summary(outcome)})

    def stream(self, job: Job, request: dict, chat: bool) -> None:
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": request["model"]}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if chat:
                self.event(chunk(None, None, first=True))
            for kind, value in job.events():
                if kind == "text":
                    self.event(chunk(value, None))
                    continue
                outcome: Outcome = value
                if outcome.finish_reason in ("error", "cancelled"):
                    self.event(outcome_error(outcome).body())
                else:
                    self.event({**chunk(None, outcome.finish_reason), "specedge": spec_summary(outcome)})
                    if request["include_usage"]:
                        self.event({**base, "choices": [], "usage": usage(outcome)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the app went away: stop generating for it
            job.cancel()

    def event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()


class LocalHttpApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: DeviceService, host: str, port: int):
        self.service = service
        super().__init__((host, port), Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="specedge-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def model_card(self) -> dict:
        return {"id": MODEL_ID, "object": "model", "created": int(self.service.started_s), "owned_by": "specedge",
                "draft": self.service.agent.draft_name}

    def start(self) -> "LocalHttpApi":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
