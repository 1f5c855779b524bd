"""The local HTTP API's own defences (docs/security.md): request framing, timeouts and the
connection cap, Host/Origin/Content-Type against browsers, JSON nesting, per-request bounds and
the optional API key. Each test runs a real server on a free port over a real device service
that is not started: a request that passes every HTTP check reaches the queue and is refused
there with 503 broker_unreachable, which is how these tests tell "let through" from "stopped"."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from specedge.config import ConfigError, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.http_api import LocalHttpApi, host_allowed
from specedge.device.service import DeviceService

PROMPT = b'{"prompt": "x"}'  # 15 bytes
KEY = "s3cret-key"


@pytest.fixture
def api(tiny_models):
    """make(**[api] keys) -> a started LocalHttpApi; all are stopped at the end of the test."""
    draft, tok, _, _ = tiny_models
    made = []

    def make(**keys) -> LocalHttpApi:
        cfg = build(DeviceConfig, {"energy": {"meter": "estimated"}, "api": {"http_port": 0, **keys}}, env={})
        server = LocalHttpApi(DeviceService(cfg, TorchDraftEngine(draft), tok), "127.0.0.1", 0).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def call(port: int, method: str = "POST", path: str = "/v1/completions", body: bytes | None = PROMPT,
         **headers) -> tuple[int, dict, http.client.HTTPResponse]:
    """One request over http.client; a header given as None is left out."""
    defaults = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    given = {k.replace("_", "-"): v for k, v in headers.items()}
    sent = {k: v for k, v in {**defaults, **given}.items() if v is not None}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body if method == "POST" else None, sent)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}, response
    finally:
        conn.close()


def queued(status: int, body: dict) -> bool:
    """The request passed the HTTP checks and reached the (unconnected) service's queue."""
    return status == 503 and body["error"]["code"] == "broker_unreachable"


def raw(port: int, request: bytes, wait_s: float = 5.0) -> bytes:
    """Send bytes as they are and read until the server closes (or wait_s passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(request)
        return read_until_closed(s, wait_s)


def read_until_closed(s: socket.socket, wait_s: float) -> bytes:
    got, deadline = b"", time.monotonic() + wait_s
    while time.monotonic() < deadline:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            return got + b"<closed>"
        got += chunk
    return got


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


def post(port: int, headers: str, body: bytes = PROMPT) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{headers}\r\n").encode() + body


# -- 4: framing, timeouts, connections --------------------------------------------------------
@pytest.mark.parametrize("length", ["-1", "1_5", "+15"])
def test_a_content_length_that_is_not_plain_digits_gets_400(api, length):
    server = api()
    answer = raw(server.port, post(server.port, f"Content-Length: {length}\r\n"))
    assert status_of(answer) == 400 and b"Content-Length" in answer and answer.endswith(b"<closed>")


def test_two_different_content_lengths_get_400(api):
    server = api()
    answer = raw(server.port, post(server.port, "Content-Length: 15\r\nContent-Length: 2\r\n"))
    assert status_of(answer) == 400 and answer.endswith(b"<closed>")


def test_a_chunked_body_is_refused_unread_even_with_a_content_length(api):
    server = api()
    for headers in ("Transfer-Encoding: chunked\r\nContent-Length: 15\r\n", "Transfer-Encoding: chunked\r\n"):
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(PROMPT), PROMPT) if "Content-Length" not in headers else PROMPT
        answer = raw(server.port, post(server.port, headers, body))
        assert status_of(answer) == 411 and b"Content-Length" in answer and answer.endswith(b"<closed>")


def test_an_idle_keep_alive_connection_is_closed_after_timeout_s(api):
    server = api(timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        start = time.monotonic()
        answer = read_until_closed(s, 5)
        assert status_of(answer) == 200 and answer.endswith(b"<closed>") and time.monotonic() - start < 3


def test_a_stalled_body_is_answered_408_and_closed(api):
    server = api(timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(post(server.port, "Content-Length: 15\r\n", PROMPT[:5]))  # and then nothing
        answer = read_until_closed(s, 5)
    assert status_of(answer) == 408 and answer.endswith(b"<closed>")


def test_connections_past_max_connections_get_503_and_a_freed_slot_serves_again(api):
    server = api(max_connections=2, timeout_s=30)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    time.sleep(0.3)  # both accepted: each holds a handler thread, waiting for its request line
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            answer = read_until_closed(s, 5)
        assert status_of(answer) == 503 and b"too_many_connections" in answer and answer.endswith(b"<closed>")
    finally:
        held.pop().close()
    deadline = time.monotonic() + 5  # the closed connection's thread frees its slot when it reads the end
    while (status := call(server.port, "GET", "/v1/models")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200
    held[0].close()


# -- 5: browsers: Content-Type, Host (DNS rebinding), Origin (CSRF) -----------------------------
def test_a_post_that_is_not_application_json_gets_415(api):
    port = api().port
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, body, _ = call(port, Content_Type=content_type)
        assert status == 415 and "application/json" in body["error"]["message"], content_type
    assert queued(*call(port, Content_Type="Application/JSON; charset=utf-8")[:2])


def test_a_host_that_is_not_loopback_or_the_bind_address_gets_403(api):
    port = api().port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        status, body, _ = call(port, Host=host)
        assert status == 403 and body["error"]["code"] == "host_not_allowed", host
        assert call(port, "GET", "/v1/models", Host=host)[0] == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.0.0.2"):
        assert queued(*call(port, Host=host)[:2]), host


def test_the_bind_address_is_a_host_too_and_bound_to_all_any_address_but_no_name():
    assert host_allowed("192.168.1.5:8080", "192.168.1.5") and not host_allowed("192.168.1.6", "192.168.1.5")
    assert host_allowed("robot.local:8080", "robot.local") and not host_allowed("evil.example", "robot.local")
    assert host_allowed("192.168.1.6:8080", "0.0.0.0") and host_allowed("[fe80::1]:8080", "::")
    assert not host_allowed("evil.example:8080", "0.0.0.0")  # a name can be rebound; an address cannot


def test_an_origin_other_than_this_host_or_allowed_origins_gets_403(api):
    port = api(allowed_origins="http://localhost:3000, https://ui.robot.local").port
    for origin in ("http://evil.example", "null", f"https://127.0.0.1:{port}", "http://localhost:3001"):
        status, body, _ = call(port, Origin=origin)
        assert status == 403 and body["error"]["code"] == "origin_not_allowed", origin
    for origin in (f"http://127.0.0.1:{port}", "http://localhost:3000", "https://ui.robot.local"):
        assert queued(*call(port, Origin=origin)[:2]), origin


def test_allowed_origins_must_be_bare_origins():
    with pytest.raises(ConfigError, match="api.allowed_origins"):
        build(DeviceConfig, {"api": {"allowed_origins": "http://localhost:3000/app"}}, env={})


# -- 6: JSON nesting ----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_json_gets_400_naming_the_limit(api, depth):
    port = api().port
    status, body, _ = call(port, body=b'{"prompt": "x", "metadata": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and "nests deeper than 32" in body["error"]["message"]


# -- 7: bounds per request ----------------------------------------------------------------------
def test_prompt_plus_max_tokens_beyond_the_draft_context_gets_400_naming_it(api):
    port = api().port  # the tiny draft holds 2,048 positions
    status, body, _ = call(port, body=b'{"prompt": "x", "max_tokens": 3000}')
    assert status == 400 and body["error"]["param"] == "max_tokens" and "2048" in body["error"]["message"]
    assert queued(*call(port, body=b'{"prompt": "x", "max_tokens": 2000}')[:2])


def test_stop_strings_over_256_characters_get_400(api):
    port = api().port
    status, body, _ = call(port, body=json.dumps({"prompt": "x", "stop": ["y" * 257]}).encode())
    assert status == 400 and body["error"]["param"] == "stop" and "256" in body["error"]["message"]
    assert queued(*call(port, body=json.dumps({"prompt": "x", "stop": ["y" * 256] * 4}).encode())[:2])


# -- 8: the API key -----------------------------------------------------------------------------
def test_an_api_key_is_required_everywhere_but_health(api, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    port = api(api_key_file=str(tmp_path / "key")).port
    for auth in (None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
        status, body, response = call(port, Authorization=auth)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", auth
        assert response.getheader("WWW-Authenticate") == "Bearer"
        assert call(port, "GET", "/metrics", Authorization=auth)[0] == 401
        assert call(port, "GET", "/v1/models", Authorization=auth)[0] == 401
    assert queued(*call(port, Authorization=f"Bearer {KEY}")[:2])
    assert call(port, "GET", "/v1/models", Authorization=f"Bearer {KEY}")[0] == 200
    assert call(port, "GET", "/health")[0] == 503  # open: it says broker_unreachable, not 401


def _page(port: int, path: str, **headers) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, None, {"Host": f"127.0.0.1:{port}", **headers})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def test_the_chat_page_needs_no_key_but_its_calls_do_and_its_policy_keeps_it_to_this_origin(api, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")
    port = api(api_key_file=str(tmp_path / "key")).port
    for path, kind in (("/", "text/html"), ("/chat.js", "text/javascript"), ("/chat.css", "text/css")):
        status, body, response = _page(port, path)
        assert status == 200 and body and response.getheader("Content-Type").startswith(kind), path
        policy = response.getheader("Content-Security-Policy")
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert b"<script" in _page(port, "/")[1] and b"<script>" not in _page(port, "/")[1]  # no inline script
    assert _page(port, "/v1/models")[0] == 401  # what the page calls needs the key
    assert _page(port, "/", Host="attacker.example")[0] == 403  # DNS rebinding: as for the API
    assert _page(port, "/index.html")[0] == 401  # only the page's own paths are open


def test_web_page_false_serves_no_page(api):
    port = api(web_page=False).port
    assert _page(port, "/")[0] == 404 and _page(port, "/chat.js")[0] == 404


def test_a_missing_or_empty_api_key_file_is_a_config_error(api, tmp_path):
    with pytest.raises(ConfigError, match="api.api_key_file"):
        build(DeviceConfig, {"api": {"api_key_file": str(tmp_path / "nope")}}, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="api.api_key_file.*empty"):
        api(api_key_file=str(tmp_path / "empty"))
