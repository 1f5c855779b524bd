"""The device's local APIs for apps: OpenAI-compatible HTTP (errors, queue, streaming, stop strings)
and the MQTT topic API, on a real broker, verifier and tiny models."""
from __future__ import annotations

import json
import queue
import socket
import time

import pytest

from specedge.config import DeviceConfig, build
from specedge.mqtt import Link, ReplyTo
from conftest import device_node
from test_fleet_secure import http

FLEET = "apps"


@pytest.fixture(scope="module")
def node(tiny_models, mosquitto):
    with device_node(tiny_models, mosquitto.port, FLEET, {
            "device": {"id": "robot"}, "generation": {"max_new_tokens": 24},
            "api": {"http_port": 0, "queue_size": 1, "max_body_kb": 4,
                    "local_mqtt_host": "127.0.0.1", "local_mqtt_port": mosquitto.port}}) as n:
        yield n


def raw_post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def chat(node, **body):
    return http(node.http.port, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "def f():"}], **body})


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"), ({"stream": "yes"}, "stream"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"max_tokens": 2.5}, "max_tokens")])
def test_bad_parameters_get_400_naming_the_parameter(node, body, param):
    status, raw = chat(node, **body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_bodies_and_routes_get_clear_errors(node):
    port = node.http.port
    status, raw = http(port, "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "max_body_kb" in json.loads(raw)["error"]["message"]
    assert http(port, "/v1/nothing", {})[0] == 404
    assert http(port, "/nothing")[0] == 404
    with socket.create_connection(("127.0.0.1", port)) as s:  # not JSON
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5\r\n\r\n{nope")
        assert b" 400 " in s.recv(4096).split(b"\r\n")[0]


def test_non_streamed_completion_has_openai_shape_and_spec_numbers(node):
    status, raw = http(node.http.port, "/v1/completions", {"prompt": "def f():", "max_tokens": 6})
    body = json.loads(raw)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 6
    assert body["specedge"]["target_version"] == "tiny" and 0 <= body["specedge"]["acceptance_rate"] <= 1
    status, raw = http(node.http.port, "/v1/models")
    card = json.loads(raw)["data"][0]
    assert status == 200 and card["id"] == "specedge"
    # what is loaded: the draft as its OPENs name it, the target version that answered
    assert card["target"] == "tiny" and card["draft"] == node.service.agent.draft_name


def test_a_conversations_next_turn_reports_its_history_as_cached_tokens(node):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: the history a kept session held on the
    verifier (docs/apps.md); the first turn has none."""
    turn1 = [{"role": "user", "content": "the robot arm"}]
    status, raw = chat(node, messages=turn1, max_tokens=8, temperature=0)
    first = json.loads(raw)
    assert status == 200 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    history = turn1 + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "and then"}]
    status, raw = chat(node, messages=history, max_tokens=8, temperature=0)
    usage = json.loads(raw)["usage"]
    assert status == 200
    assert first["usage"]["prompt_tokens"] <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_prompt_lookup_drafts_are_reported_in_the_answer(node):
    """[draft] sources = lookup,model: the answer's specedge object counts the lookup's rounds and
    their acceptance (docs/apps.md)."""
    draft_cfg = node.service.agent.cfg.draft
    draft_cfg.sources = "lookup,model"
    node.service.set_policy("adaptive+no-stream")  # streaming, the tiny pair would draft nothing
    try:
        status, raw = http(node.http.port, "/v1/completions",
                           {"prompt": "the cat is on the mat the cat is on the mat the cat", "max_tokens": 24})
    finally:
        draft_cfg.sources = "model"
        node.service.set_policy("adaptive")
    numbers = json.loads(raw)["specedge"]
    assert status == 200 and numbers["lookup_rounds"] > 0 and 0 <= numbers["lookup_acceptance"] <= 1
    status, raw = http(node.http.port, "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"


def test_a_stop_string_ends_the_text_before_it(node, tiny_models):
    _, tok, _, _ = tiny_models
    status, raw = chat(node, max_tokens=24)
    full = json.loads(raw)["choices"][0]["message"]["content"]
    stop = full[5:8]
    assert len(stop) == 3 and full.find(stop) == 5
    status, raw = chat(node, max_tokens=24, stop=[stop, "\x00never"])
    body = json.loads(raw)
    assert body["choices"][0]["message"]["content"] == full[:5] and body["choices"][0]["finish_reason"] == "stop"
    status, raw = chat(node, max_tokens=24, stop=stop, stream=True)  # the stop string split over chunks
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                   for e in raw.decode().split("\n\n") if e.startswith("data: {"))
    assert text == full[:5]


def test_a_full_queue_answers_429_and_a_draining_device_503(node):
    service = node.service
    with service.agent._busy:  # the worker holds one request, blocked inside the agent
        first = service.submit([1, 2, 3], max_new_tokens=2)
        deadline = time.monotonic() + 5
        while service.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)
        second = service.submit([1, 2, 3], max_new_tokens=2)  # queue_size = 1: one may wait
        status, raw = chat(node)
        assert status == 429 and json.loads(raw)["error"]["code"] == "queue_full"
        service.drain()
        status, raw = chat(node)
        assert status == 503 and json.loads(raw)["error"]["code"] == "draining"
        assert http(node.http.port, "/health")[0] == 503
        service.resume()
    assert first.wait(30).finish_reason in ("stop", "length") and second.wait(30).finish_reason in ("stop", "length")
    assert b'specedge_requests_total{outcome="rejected"} 2.0' in http(node.http.port, "/metrics")[1]


def test_a_client_that_goes_away_cancels_its_request(node):
    service = node.service
    done = service.requests_done
    with socket.create_connection(("127.0.0.1", node.http.port)) as s:
        s.sendall(raw_post({"prompt": "def f():", "max_tokens": 2000, "stream": True}))
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 60
    while service.requests_done == done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.requests_done == done + 1
    assert service.agent.current.stats.generated_tokens < 2000


def test_a_non_streamed_request_whose_client_goes_away_is_cancelled(node):
    service = node.service
    done = service.requests_done
    with service.agent._busy:  # the request waits for the agent while its app gives up
        with socket.create_connection(("127.0.0.1", node.http.port)) as s:
            s.sendall(raw_post({"prompt": "def f():", "max_tokens": 2000}))
            deadline = time.monotonic() + 10
            while service._running is None and time.monotonic() < deadline:
                time.sleep(0.01)
            job = service._running
        deadline = time.monotonic() + 10
        while not job.cancelled.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.cancelled.is_set()
    assert job.wait(30).finish_reason == "cancelled" and service.requests_done == done + 1


def test_local_mqtt_api_streams_to_the_response_topic(node, mosquitto):
    got: queue.Queue = queue.Queue()
    for protocol in ("5", "3.1.1"):
        link = Link(build(DeviceConfig, {"mqtt": {"port": mosquitto.port, "protocol": protocol}}).mqtt,
                    f"app-{protocol}", lambda topic, payload: got.put((topic, json.loads(payload)))).start()
        try:
            reply = f"specedge/local/robot/response/app-{protocol}"
            link.subscribe(reply)
            time.sleep(0.2)
            request = {"id": "r1", "prompt": "def f():", "max_tokens": 5, "stream": True}
            if protocol == "3.1.1":
                request["reply_to"] = reply  # no response topic property in 3.1.1
            link.publish("specedge/local/robot/request", json.dumps(request).encode(), reply_to=ReplyTo(reply, b"c1"))
            messages = []
            while not messages or not messages[-1][1].get("done"):
                messages.append(got.get(timeout=30))
            assert {t for t, _ in messages} == {reply} and all(m["id"] == "r1" for _, m in messages)
            last = messages[-1][1]
            assert last["finish_reason"] in ("stop", "length")
            assert "".join(m.get("delta", "") for _, m in messages[:-1]) == last["text"]
            if protocol == "5":  # a payload that is not JSON can name no reply topic of its own
                link.publish("specedge/local/robot/request", b"{not json", reply_to=ReplyTo(reply, None))
                topic, answer = got.get(timeout=10)
                assert answer["status"] == 400 and "not JSON" in answer["error"]["message"]
        finally:
            link.stop()


def test_local_mqtt_api_answers_with_the_targets_logprobs_when_asked(node, mosquitto):
    got: queue.Queue = queue.Queue()
    link = Link(build(DeviceConfig, {"mqtt": {"port": mosquitto.port}}).mqtt, "app-logprobs",
                lambda topic, payload: got.put(json.loads(payload))).start()
    try:
        reply = "specedge/local/robot/response/app-logprobs"
        link.subscribe(reply)
        request = {"id": "lp", "prompt": "def f():", "max_tokens": 5, "logprobs": 2, "stream": True}
        link.publish("specedge/local/robot/request", json.dumps(request).encode(), reply_to=ReplyTo(reply, b"c"))
        messages = [got.get(timeout=30)]
        while not messages[-1].get("done"):
            messages.append(got.get(timeout=30))
        last = messages[-1]
        content = last["logprobs"]["content"]  # with the answer, in chat's shape
        assert len(content) == last["usage"]["completion_tokens"] and all(len(e["top_logprobs"]) == 2 for e in content)
        assert all(e["logprob"] <= 0 for e in content) and "logprobs" not in messages[0]
    finally:
        link.stop()
