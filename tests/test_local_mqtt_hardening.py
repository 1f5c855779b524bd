"""The local MQTT topic API's boundaries (issue 20, point 12), on a real Mosquitto, verifier and
tiny models: answers go only under the device's own response topics, and a request is admitted
before any thread works on it."""
from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from specedge.cloud.registry import Target
from specedge.config import CloudConfig, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.node import DeviceNode
from specedge.mqtt import Link, ReplyTo

FLEET = "local-hardening"
PREFIX = "specedge/local/arm"


@pytest.fixture(scope="module")
def node(tiny_models, mosquitto):
    from specedge.cloud.verifier import Verifier

    draft, tok, target, target_tok = tiny_models
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": "v-local-hardening", "fleet": FLEET, "group": FLEET}}), Target.in_memory("tiny", target, target_tok))
    verifier.start()
    cfg = build(DeviceConfig, {"device": {"id": "arm", "fleet": FLEET}, "mqtt": {"port": mosquitto.port},
                               "energy": {"meter": "estimated"}, "generation": {"max_new_tokens": 8},
                               "api": {"http_port": -1, "queue_size": 1,
                                       "local_mqtt_host": "127.0.0.1", "local_mqtt_port": mosquitto.port}})
    n = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    yield n
    n.stop()
    verifier.stop()


class App:
    """An app on the device's broker: subscribes to `topics`, collects (topic, JSON) messages."""

    def __init__(self, mosquitto, protocol: str, *topics: str):
        self.got: queue.Queue = queue.Queue()
        self.link = Link(build(DeviceConfig, {"mqtt": {"port": mosquitto.port, "protocol": protocol}}).mqtt,
                         f"app-{protocol}-{time.monotonic_ns()}",
                         lambda topic, payload: self.got.put((topic, json.loads(payload)))).start()
        for t in topics:
            self.link.subscribe(t)
        time.sleep(0.2)  # the subscriptions reach the broker before the first request

    def request(self, body: dict, reply_to: ReplyTo | None = None) -> None:
        self.link.publish(f"{PREFIX}/request", json.dumps(body).encode(), reply_to=reply_to)

    def drain(self, seconds: float) -> list:
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.got.get(timeout=left))
            except queue.Empty:
                break
        return out

    def until_done(self, n: int, seconds: float = 30) -> list:
        out, deadline = [], time.monotonic() + seconds
        while sum(1 for _, m in out if m.get("done")) < n and time.monotonic() < deadline:
            out += self.drain(0.2)
        return out

    def stop(self) -> None:
        self.link.stop()


FOREIGN = ["robot/motor/cmd", "specedge/local/other/response/x", f"{PREFIX}/request", f"{PREFIX}/status",
           f"{PREFIX}/response/+"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_reply_topic_outside_the_devices_response_topics_gets_nothing_and_the_request_is_refused(
        node, mosquitto, protocol):
    """A request used to make the device publish its answer on any topic it named: a robot's
    motor commands, another device's answers, or the device's own request topic."""
    app = App(mosquitto, protocol, "robot/#", "specedge/local/other/#", f"{PREFIX}/#")
    try:
        done = node.service.requests_done
        for i, topic in enumerate(FOREIGN):
            body = {"id": f"foreign-{i}", "prompt": "def f():", "max_tokens": 3}
            if protocol == "5":
                app.request(body, ReplyTo(topic, b"c"))
            else:  # 3.1.1 has no response topic property: the payload names it
                app.request({**body, "reply_to": topic})
        messages = [(t, m) for t, m in app.until_done(len(FOREIGN), 15) if not t.endswith("/request")]
        answers = {m["id"]: (t, m) for t, m in messages}
        assert len(messages) == len(FOREIGN), messages  # one answer each, nowhere else
        for i, asked in enumerate(FOREIGN):
            topic, answer = answers[f"foreign-{i}"]
            assert topic == f"{PREFIX}/response/foreign-{i}"
            assert answer["done"] and answer["status"] == 400
            assert answer["error"]["code"] == "reply_to_not_allowed" and answer["error"]["param"] == "reply_to"
            assert f"{PREFIX}/response/" in answer["error"]["message"]
        assert node.service.requests_done == done  # refused before it ran
    finally:
        app.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_reply_topic_under_the_devices_response_topics_gets_the_answer(node, mosquitto, protocol):
    reply = f"{PREFIX}/response/app-{protocol.replace('.', '')}/answers"
    app = App(mosquitto, protocol, f"{PREFIX}/response/#")
    try:
        body = {"id": "mine", "prompt": "def f():", "max_tokens": 3, "stream": True}
        if protocol == "5":
            app.request(body, ReplyTo(reply, b"c"))
        else:
            app.request({**body, "reply_to": reply})
        messages = app.until_done(1)
        assert messages and {t for t, _ in messages} == {reply}
        assert messages[-1][1]["finish_reason"] in ("stop", "length")
    finally:
        app.stop()


def test_requests_beyond_what_the_device_can_hold_are_answered_busy_without_a_thread(node, mosquitto):
    """Every request used to get a thread before anything looked at it: a flood of them was a
    flood of threads. Now the device holds at most queue_size + 1 (one running, the rest
    waiting); more are answered 503 busy from the MQTT client's own thread."""
    service, api = node.service, node.local
    app = App(mosquitto, "5", f"{PREFIX}/response/#")
    started = []

    def trace(*_):  # runs first thing in every new thread: note the ones working for the API
        target = getattr(threading.current_thread(), "_target", None)
        if getattr(target, "__self__", None) is api:
            started.append(threading.current_thread().name)

    try:
        with service.agent._busy:  # the agent blocks: the first request runs, the second waits
            for i in range(2):
                app.request({"id": f"held-{i}", "prompt": "def f():", "max_tokens": 3})
            deadline = time.monotonic() + 10
            while service.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert service.in_flight == 2
            threading.settrace(trace)
            try:
                for i in range(20):
                    app.request({"id": f"extra-{i}", "prompt": "def f():", "max_tokens": 3})
                busy = app.until_done(20, 15)
            finally:
                threading.settrace(None)
            assert sorted(m["id"] for _, m in busy) == sorted(f"extra-{i}" for i in range(20))
            for topic, answer in busy:
                assert topic == f"{PREFIX}/response/{answer['id']}"
                assert answer["status"] == 503 and answer["error"]["code"] == "busy"
            assert started == []
        held = app.until_done(2)
        assert {m["id"] for _, m in held if m.get("done")} == {"held-0", "held-1"}
        assert all(m.get("finish_reason") in ("stop", "length") for _, m in held if m.get("done"))
        app.request({"id": "after", "prompt": "def f():", "max_tokens": 3})  # the slots came back
        assert app.until_done(1)[-1][1]["finish_reason"] in ("stop", "length")
    finally:
        app.stop()
