"""The local HTTP API on the device: OpenAI-compatible completions, /metrics, /health, and a
chat page at / ([api] web_page).

Robot stacks and voice assistants talk to the device with the OpenAI clients
they already have (`base_url="http://127.0.0.1:8080/v1"`). Streaming uses
server-sent events ending in `data: [DONE]`. Unset sampling parameters take the
device's [generation] defaults (greedy unless configured otherwise: exactly the
target's output). A full queue answers 429, a draining device or one without a
broker 503, a body over [api] max_body_kb 413, a bad parameter 400; errors have
OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Requests are read and answers written in OpenAI's shapes by device/openai_api.py, which the
local MQTT API shares. Structured output (docs/apps.md): `response_format` (json_object,
json_schema) and, on chat, `tools` with `tool_choice` become one grammar (specedge/grammar.py)
that the answer follows; a tools answer is parsed into OpenAI's `tool_calls`.

Any local process and any web page the device's browser opens can reach this port, so each
request is checked before it is read (docs/security.md): its Host (DNS rebinding), its Origin
(cross-site requests), the API key when [api] api_key_file sets one, then a JSON Content-Type
and a plain Content-Length. Connections are capped ([api] max_connections) and time out
([api] timeout_s); a request must fit the draft engine's positions. The chat page's files hold
nothing and need no key (as llama.cpp's server serves its page); the calls the page makes are
checked like any app's, and its Content-Security-Policy lets it load and call this origin only.
"""
from __future__ import annotations

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
from pathlib import Path

from specedge.config import ConfigError
from specedge.device.openai_api import (MODEL_ID, ApiError, answer_choice, chat_logprobs, completion_logprobs,
                                        json_body, openai_calls, outcome_error, parse_request, spec_summary, submit,
                                        usage)
from specedge.device.service import DeviceService, Job, Outcome
from specedge.exporter import CONTENT_TYPE, render
from specedge.resources import resource

log = logging.getLogger("specedge.http")

CLIENT_POLL_S = 0.25  # how often a non-streamed request looks whether its app is still there
# The chat page (specedge/data/web): path -> (file, Content-Type). No build step, no framework.
PAGE = {"/": ("index.html", "text/html; charset=utf-8"), "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
        "/chat.css": ("chat.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {  # its own origin only: no inline script, no other host, never framed by another page
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


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

        self.start_events()
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
                self.end_events(value, request, base, chunk, held_unverified)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the app went away or stopped reading
            job.cancel()
            self.close_connection = True

    def start_events(self) -> None:
        """The head of a server-sent event stream; the connection closes after it."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def end_events(self, outcome: Outcome, request: dict, base: dict, chunk, held_unverified: bool) -> None:
        """A streamed answer's last events: its error, or its finish (the held tool calls first,
        where tools were offered) and, where asked, its usage."""
        if outcome.finish_reason in ("error", "cancelled"):
            self.event(outcome_error(outcome).body())
            return
        finish = outcome.finish_reason
        if request["tools"]:
            finish = self.send_held(chunk, outcome, held_unverified)
        self.event({**chunk(None, finish), "specedge": spec_summary(outcome)})
        if request["include_usage"]:
            self.event({**base, "choices": [], "usage": usage(outcome)})

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

