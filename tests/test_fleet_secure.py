"""Issue 8's end-to-end proof: Mosquitto with TLS client certificates and the ACL `specedge certs`
writes, a verifier and two devices on it, driven through `specedge fleet` and the local HTTP API."""
from __future__ import annotations

import json
import queue
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from specedge import certs, cli
from specedge.broker import MosquittoBroker, free_port
from specedge.cloud.registry import Target
from specedge.config import CloudConfig, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.node import DeviceNode
from conftest import mqtt_connects, reference_greedy

FLEET = "plant"


@dataclass
class Secure:
    folder: object
    broker: MosquittoBroker
    verifier: object
    nodes: dict
    operator_port: int

    def mqtt(self, role: str, name: str) -> dict:
        return {"port": self.broker.port, "host": "localhost", "tls_ca": str(self.folder / "ca.crt"),
                "tls_cert": str(self.folder / role / f"{name}.crt"), "tls_key": str(self.folder / role / f"{name}.key")}

    def fleet_cli(self, capsys, *argv) -> tuple[int, str]:
        code = cli.main(["fleet", "--host", "localhost", "--port", str(self.operator_port), "--fleet", FLEET,
                         "--ca", str(self.folder / "ca.crt"), "--cert", str(self.folder / "operators/op.crt"),
                         "--key", str(self.folder / "operators/op.key"), "--timeout", "10", *argv])
        return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def secure(tiny_models, tmp_path_factory):
    from specedge.cloud.verifier import Verifier

    draft, tok, target, target_tok = tiny_models
    folder = tmp_path_factory.mktemp("pki")
    # d3 has no node: a raw client with its certificate would take a running device's session.
    certs.make(folder, FLEET, devices=["d1", "d2", "d3"], verifiers=["v1"], operators=["op"])
    port, operator_port = free_port(), free_port()
    broker = MosquittoBroker(port, listener=certs.mosquitto_conf(folder, port, "127.0.0.1", operator_port)).start()
    s = Secure(folder, broker, None, {}, operator_port)
    s.verifier = Verifier(build(CloudConfig, {"mqtt": s.mqtt("verifiers", "v1"), "verifier": {
        "id": "v1", "fleet": FLEET, "group": FLEET, "metrics_port": 0}}), Target.in_memory("tiny", target, target_tok))
    s.verifier.start()
    for name in ("d1", "d2"):
        cfg = build(DeviceConfig, {"device": {"id": name, "fleet": FLEET}, "mqtt": s.mqtt("devices", name),
                                   "energy": {"meter": "estimated"}, "api": {"http_port": 0},
                                   "fleet": {"telemetry_interval_s": 0.3}, "generation": {"max_new_tokens": 16}})
        s.nodes[name] = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    yield s
    for node in s.nodes.values():
        node.stop()
    s.verifier.stop()
    broker.stop()


def client(secure: Secure, role: str | None, name: str | None, protocol=MQTTProtocolVersion.MQTTv5):
    """A raw paho client: with the named certificate, or (role None) with the CA only."""
    got: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{name}-{time.monotonic_ns()}", protocol=protocol)
    c.tls_set(ca_certs=str(secure.folder / "ca.crt"),
              certfile=str(secure.folder / role / f"{name}.crt") if role else None,
              keyfile=str(secure.folder / role / f"{name}.key") if role else None, cert_reqs=ssl.CERT_REQUIRED)
    c.on_message = lambda client, userdata, msg: got.put((msg.topic, msg.payload))
    c.suback = queue.Queue()
    c.on_subscribe = lambda client, userdata, mid, codes, props: c.suback.put([int(x.value) for x in codes])
    c.puback = queue.Queue()
    c.on_publish = lambda client, userdata, mid, code, props: c.puback.put(int(code.value))
    c.got = got
    c.connect("localhost", secure.operator_port if role == "operators" else secure.broker.port)
    c.loop_start()
    return c


def drain(q: queue.Queue, seconds: float) -> list:
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(q.get(timeout=left))
        except queue.Empty:
            break
    return out


def http(port: int, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def retained(secure: Secure, topic: str) -> dict:
    c = client(secure, "operators", "op")
    try:
        c.subscribe(topic, qos=1)
        messages = drain(c.got, 1.0)
    finally:
        c.loop_stop()
        c.disconnect()
    return json.loads(messages[-1][1]) if messages else {}


def test_operator_drives_two_tls_devices_through_the_fleet_cli_and_apps_through_http(secure, capsys, tiny_models):
    _, tok, target, _ = tiny_models
    time.sleep(0.5)  # a first telemetry from each device
    code, out = secure.fleet_cli(capsys, "ls")
    assert code == 0, out
    assert "2 device(s), 2 up" in out and "d1" in out and "d2" in out and "v1 online" in out

    code, out = secure.fleet_cli(capsys, "cmd", "d1", "set_budget", "budget_j_per_token=2.5")
    assert code == 0, out
    assert secure.nodes["d1"].service.cfg.energy.budget_j_per_token == 2.5
    assert secure.nodes["d1"].service.agent.status().objective.budget_j_per_token == 2.5
    assert retained(secure, f"specedge/v1/{FLEET}/d1/status")["energy"]["budget_j_per_token"] == 2.5

    code, out = secure.fleet_cli(capsys, "cmd", "d2", "drain")
    assert code == 0 and '"draining"' in out
    assert retained(secure, f"specedge/v1/{FLEET}/d2/status")["state"] == "draining"
    d2 = secure.nodes["d2"].http.port
    status, body = http(d2, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and json.loads(body)["error"]["code"] == "draining"
    code, out = secure.fleet_cli(capsys, "cmd", "d2", "resume")
    assert code == 0
    assert retained(secure, f"specedge/v1/{FLEET}/d2/status")["state"] == "online"

    messages = [{"role": "user", "content": "def add(a, b):"}]
    status, body = http(d2, "/v1/chat/completions", {"model": "specedge", "messages": messages, "stream": True,
                                                     "max_tokens": 12, "stream_options": {"include_usage": True}})
    assert status == 200
    events = body.decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    prompt = tok.encode(tok.apply_chat_template(messages))
    expected = reference_greedy(target, prompt, 12, tok.stop_ids)
    assert usage["completion_tokens"] == len(expected) and usage["prompt_tokens"] == len(prompt)
    assert text == tok.decode(expected).rstrip("\ufffd")[:len(text)] and len(text) >= len(tok.decode(expected)) - 3

    code, out = secure.fleet_cli(capsys, "config", "set", "speculation.policy=fixed:2", "energy.profile=x86-host")
    assert code == 0, out
    assert "d1: applied" in out and "d2: applied" in out and "needs restart ['energy.profile']" in out
    for node in secure.nodes.values():
        assert node.service.policy.name == "fixed:2"
    applied = retained(secure, f"specedge/v1/{FLEET}/d2/config/applied")
    assert applied["applied"] == {"speculation.policy": "fixed:2"} and applied["rejected"] == {}

    code, out = secure.fleet_cli(capsys, "config", "set", "--device", "d1", "speculation.max_draft=999")
    assert code == 1 and "speculation.max_draft" in out  # refused, nothing applied
    secure.fleet_cli(capsys, "config", "set", "--device", "d1", "--replace")

    time.sleep(0.8)
    telemetry = retained(secure, f"specedge/v1/{FLEET}/d2/telemetry")
    assert telemetry["device"] == "d2" and telemetry["queue_depth"] == 0 and "j_per_token" in telemetry
    code, out = secure.fleet_cli(capsys, "--json", "ls")
    rows = {r["device"]: r for r in json.loads(out)["devices"]}
    assert rows["d2"]["policy"] == "fixed:2" and rows["d1"]["budget_j_per_token"] == 2.5
    code, out = secure.fleet_cli(capsys, "watch", "--count", "1", "--interval", "0.5")
    assert code == 0 and "TOK/S" in out


def test_two_operator_commands_at_once_with_one_certificate_keep_their_connections(secure, capsys):
    """Devices' and verifiers' client ids are bound to their certificates; operators' are not
    (their own listener), so two `specedge fleet` commands with one certificate do not take
    each other's session."""
    from argparse import Namespace

    from specedge.fleet_cli import Operator

    args = Namespace(host="localhost", port=secure.operator_port, fleet=FLEET, ca=str(secure.folder / "ca.crt"),
                     cert=str(secure.folder / "operators/op.crt"), key=str(secure.folder / "operators/op.key"),
                     operator="")
    with Operator(args) as first, Operator(args) as second:
        time.sleep(2.5)  # long enough for reconnects to have kicked each other
        assert [op.link.connects for op in (first, second)] == [1, 1]
    code, out = secure.fleet_cli(capsys, "cmd", "d1", "report")
    assert code == 0, out


def test_status_is_born_on_connect_and_the_will_says_offline_on_loss(secure):
    watcher = client(secure, "operators", "op")
    watcher.subscribe(f"specedge/v1/{FLEET}/d1/status", qos=1)
    drain(watcher.got, 0.5)  # the retained one
    link = secure.nodes["d1"].link
    link._client.socket().close()  # the connection dies without a DISCONNECT: the broker sends the will
    states, deadline = [], time.monotonic() + 15
    while not ("offline" in states and states[-1] == "online") and time.monotonic() < deadline:
        states += [json.loads(p)["state"] for _, p in drain(watcher.got, 0.2)]
    watcher.loop_stop()
    watcher.disconnect()
    assert "offline" in states and states[-1] == "online", states
    assert link.connected.wait(10)


def test_a_device_can_neither_read_nor_write_another_devices_topics(secure):
    d3 = client(secure, "devices", "d3")
    op = client(secure, "operators", "op")
    try:
        # Mosquitto grants the subscriptions but delivers nothing the ACL does not let d3 read.
        for leaf in ("cmd", "config", "telemetry"):
            d3.subscribe(f"specedge/v1/{FLEET}/d2/{leaf}", qos=1)
        d3.subscribe(f"sv/{FLEET}/d2", qos=1)  # d2's answers from the verifier
        d3.subscribe(f"specedge/v1/{FLEET}/targets", qos=1)  # the fleet's announcement: d3 may read it
        op.subscribe(f"specedge/v1/{FLEET}/d2/status", qos=1)
        drain(op.got, 0.5)
        drain(d3.got, 1.0)  # retained messages d3 may not read do not come either
        d3.publish(f"specedge/v1/{FLEET}/d2/status", b'{"state": "forged"}', qos=1)
        assert d3.puback.get(timeout=5) == 135  # not authorised
        op.publish(f"specedge/v1/{FLEET}/d2/cmd", b'{"command": "report"}', qos=1)
        assert op.puback.get(timeout=5) == 0
        assert drain(op.got, 0.5) == [] and drain(d3.got, 0.5) == []
        op.publish(f"specedge/v1/{FLEET}/targets", b'{"default": "tiny"}', qos=1)
        assert op.puback.get(timeout=5) == 0
        assert [t for t, _ in drain(d3.got, 2.0)] == [f"specedge/v1/{FLEET}/targets"]
        # An operator cannot pose as a device either.
        op.publish(f"specedge/v1/{FLEET}/d2/draft", b"x", qos=1)
        assert op.puback.get(timeout=5) == 135
    finally:
        for c in (d3, op):
            c.loop_stop()
            c.disconnect()


def connects(secure: Secure, tls: bool, role: str | None = None, name: str | None = None) -> bool:
    """Whether a client gets a successful CONNACK within 2 s."""
    files = (secure.folder / "ca.crt",) if tls else ()
    if tls and role:
        files += (secure.folder / role / f"{name}.crt", secure.folder / role / f"{name}.key")
    return mqtt_connects(secure.broker.port, *files, wait=2)


def test_a_client_without_a_certificate_is_refused(secure):
    assert connects(secure, tls=True, role="devices", name="d3")  # the control: with its certificate
    assert not connects(secure, tls=True)  # TLS, but no client certificate
    assert not connects(secure, tls=False)  # plain TCP to the TLS listener


def test_an_oversized_payload_is_dropped(secure):
    op = client(secure, "operators", "op")
    d3 = client(secure, "devices", "d3")
    try:
        op.subscribe(f"specedge/v1/{FLEET}/d3/reply/op", qos=1)
        assert op.suback.get(timeout=5) == [1]
        d3.publish(f"specedge/v1/{FLEET}/d3/reply/op", b"small", qos=1)  # the control
        assert [p for _, p in drain(op.got, 3)] == [b"small"]
        d3.publish(f"specedge/v1/{FLEET}/d3/reply/op", b"x" * (certs.MAX_PACKET + 1), qos=1)
        assert drain(op.got, 1.5) == []
    finally:
        for c in (d3, op):
            c.loop_stop()
            c.disconnect()


def test_verifier_serves_prometheus_metrics(secure):
    status, body = http(secure.verifier.metrics_port, "/metrics")
    text = body.decode()
    assert status == 200 and "specedge_verifier_batch_size_bucket" in text
    assert 'specedge_acceptance_rate{draft=' in text and "specedge_verifier_passes_total" in text
    assert "specedge_verifier_share_held_total" in text and "specedge_verifier_share_yields_total" in text
    status, body = http(secure.nodes["d2"].http.port, "/metrics")
    text = body.decode()
    for name in ("specedge_round_latency_seconds_bucket", "specedge_draft_len_bucket", "specedge_wire_bytes_total",
                 "specedge_joules_per_token", "specedge_acceptance_rate", "specedge_mean_accepted_len",
                 "specedge_tokens_per_second", "specedge_queue_depth"):
        assert name in text, name
