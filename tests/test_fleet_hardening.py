"""Issue 20's fleet findings, each against the real Mosquitto: what a report publishes, what a
remote config or command may set, remote paths, the verifier's statistics under many draft
names, and MQTT client ids bound to certificates."""
from __future__ import annotations

import json
import os
import queue
import threading
import time

import pytest

from specedge.config import DeviceConfig, build, load
from specedge.device.draft import TorchDraftEngine
from specedge.device.node import DeviceNode
from specedge.mqtt import Link, ReplyTo

FLEET = "hard"
PASSWORD = "hunter2-not-for-the-fleet"


@pytest.fixture(scope="module")
def device(tiny_models, mosquitto, tmp_path_factory):
    """A device whose own file holds an MQTT password, waits on a lost verifier and drafts
    alone (at most 16 tokens) on a lost broker."""
    draft, tok, _, _ = tiny_models
    path = tmp_path_factory.mktemp("cfg") / "device.toml"
    path.write_text(f'[device]\nid = "h1"\nfleet = "{FLEET}"\n'
                    f'[mqtt]\nport = {mosquitto.port}\nusername = "h1"\npassword = "{PASSWORD}"\n'
                    f'[energy]\nmeter = "estimated"\n[api]\nhttp_port = -1\n'
                    f'[faults]\non_verifier_loss = "wait"\non_broker_loss = "draft"\nunverified_max_tokens = 16\n')
    node = DeviceNode(load(DeviceConfig, path), TorchDraftEngine(draft), tok, str(path)).start()
    yield node
    node.stop()


@pytest.fixture
def operator(mosquitto):
    got: queue.Queue = queue.Queue()
    link = Link(build(DeviceConfig, {"mqtt": {"port": mosquitto.port}}).mqtt, f"op-{time.monotonic_ns()}",
                lambda t, p: got.put((t, p))).start()
    link.got = got
    yield link
    link.stop()


def ask(link, command: str, args: dict | None = None, raw: bytes | None = None) -> tuple[dict, bytes]:
    """The device's answer to one command, parsed and as the bytes that crossed the broker."""
    reply = f"specedge/v1/{FLEET}/h1/reply/tester"
    link.subscribe(reply)
    time.sleep(0.1)
    body = raw if raw is not None else json.dumps({"command": command, "args": args or {}, "id": "q"}).encode()
    link.publish(f"specedge/v1/{FLEET}/h1/cmd", body, reply_to=ReplyTo(reply, b"q"))
    topic, payload = link.got.get(timeout=10)
    assert topic == reply
    return json.loads(payload), payload


def desire(link, payload: bytes) -> dict:
    """Publish the device's desired config, return its acknowledgement."""
    acks = f"specedge/v1/{FLEET}/h1/config/applied"
    link.subscribe(acks)
    time.sleep(0.1)
    while not link.got.empty():
        link.got.get()
    link.publish(f"specedge/v1/{FLEET}/h1/config", payload, retain=True)
    deadline = time.monotonic() + 5
    while (left := deadline - time.monotonic()) > 0:
        try:
            topic, ack = link.got.get(timeout=left)
        except queue.Empty:
            break
        if topic == acks:
            return json.loads(ack)
    raise AssertionError("no acknowledgement in 5 s: the fleet thread is stuck")


@pytest.fixture
def clean_desired(device, operator):
    yield
    desire(operator, b"")  # back to the file for the next test


# -- A (issue 20, point 11): reports ----------------------------------------------------------
def test_report_publishes_no_mqtt_password(device, operator):
    answer, payload = ask(operator, "report")
    assert answer["ok"]
    assert PASSWORD.encode() not in payload
    assert answer["result"]["config"]["mqtt.password"] == "<redacted>"
    assert answer["result"]["config"]["mqtt.username"] == "h1"  # not a secret: the operator may need it
    assert device.service.cfg.mqtt.password == PASSWORD  # the device itself still has it


def test_redaction_hides_every_secret_key_and_keeps_empty_ones_visible():
    from specedge.device.fleet import redact

    flat = {"mqtt.password": "p", "api.api_key": "k", "x.client_secret": "s", "x.auth_token": "t",
            "generation.max_new_tokens": 8, "faults.unverified_max_tokens": 4, "mqtt.tls_key": "/etc/k.pem",
            "other.password": ""}
    out = redact(flat)
    assert {k for k, v in out.items() if v == "<redacted>"} == {
        "mqtt.password", "api.api_key", "x.client_secret", "x.auth_token"}
    assert out["other.password"] == ""  # "none set" is worth seeing
    assert out["generation.max_new_tokens"] == 8 and out["mqtt.tls_key"] == "/etc/k.pem"


# -- C (issue 20, point 10): numbers and fault policies from afar ------------------------------
@pytest.mark.parametrize("payload, key", [
    (b'{"faults": {"max_wait_s": Infinity}}', "Infinity"),
    (b'{"faults": {"max_wait_s": NaN}}', "NaN"),
    (b'{"faults": {"max_wait_s": "inf"}}', "faults.max_wait_s"),
    (b'{"faults": {"round_timeout_s": 1e-9}}', "faults.round_timeout_s"),
    (b'{"faults": {"round_timeout_s": 1e9}}', "faults.round_timeout_s"),
    (b'{"faults": {"max_retries": 100000}}', "faults.max_retries"),
    (b'{"fleet": {"telemetry_interval_s": 0.1}}', "fleet.telemetry_interval_s"),
    (b'{"energy": {"budget_j_per_token": 1e308}}', "energy.budget_j_per_token"),
    (b'{"faults": {"on_verifier_loss": "draft"}}', "faults.on_verifier_loss"),
    (b'{"faults": {"unverified_max_tokens": 17}}', "faults.unverified_max_tokens"),
])
def test_remote_config_rejects_non_finite_absurd_and_widening_values(device, operator, clean_desired, payload, key):
    before = device.service.cfg
    ack = desire(operator, payload)
    assert ack["applied"] == {}
    assert key in json.dumps(ack["rejected"]), ack["rejected"]
    assert device.service.cfg == before


def test_remote_config_may_make_fault_handling_stricter_within_the_local_bounds(device, operator, clean_desired):
    ack = desire(operator, b'{"faults": {"on_broker_loss": "fail", "unverified_max_tokens": 8, '
                           b'"round_timeout_s": 5, "max_wait_s": 60}}')
    assert ack["rejected"] == {}, ack
    faults = device.service.cfg.faults
    assert (faults.on_broker_loss, faults.unverified_max_tokens, faults.round_timeout_s) == ("fail", 8, 5.0)
    ack = desire(operator, b'{"faults": {"on_broker_loss": "draft"}}')  # the file's own choice: allowed
    assert ack["rejected"] == {} and device.service.cfg.faults.on_broker_loss == "draft"


@pytest.mark.parametrize("raw", [b'{"command": "drain", "args": {"wait_s": NaN}, "id": "q"}',
                                 b'{"command": "drain", "args": {"wait_s": "nan"}, "id": "q"}',
                                 b'{"command": "drain", "args": {"wait_s": -1}, "id": "q"}',
                                 b'{"command": "set_budget", "args": {"budget_j_per_token": Infinity}, "id": "q"}',
                                 b'{"command": "set_budget", "args": {"budget_j_per_token": "inf"}, "id": "q"}'])
def test_commands_refuse_non_finite_and_negative_numbers(device, operator, raw):
    budget = device.service.cfg.energy.budget_j_per_token
    answer, _ = ask(operator, "", raw=raw)
    device.service.resume()
    assert answer["ok"] is False, answer
    assert device.service.cfg.energy.budget_j_per_token == budget


def test_drain_still_waits_a_finite_time(device, operator):
    answer, _ = ask(operator, "drain", {"wait_s": 0.2})
    device.service.resume()
    assert answer["ok"] and answer["result"]["idle"] is True


# -- D (issue 20, point 9): remote paths --------------------------------------------------------
def test_remote_paths_are_refused_without_touching_the_file_system(device, operator, clean_desired, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    try:
        ack = desire(operator, json.dumps({"energy": {"profiles": str(fifo)}}).encode())
    finally:
        try:  # let a reader blocked on the FIFO go (today's code opens it)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert ack["applied"] == {} and "energy.profiles" in ack["rejected"]


def test_remote_paths_do_not_tell_whether_a_file_exists(device, operator, clean_desired, tmp_path):
    there = tmp_path / "profiles.toml"
    there.write_text("")
    answers = []
    for path in (str(there), str(tmp_path / "missing.toml")):
        for key in ("energy.profiles", "draft.head", "draft.model", "api.api_key_file"):
            section, name = key.split(".")
            ack = desire(operator, json.dumps({section: {name: path}}).encode())
            answers.append((key, json.dumps(ack["rejected"], sort_keys=True).replace(path, "PATH")))
            assert key in ack["rejected"], ack
    assert answers[:4] == answers[4:]


def test_remote_draft_model_may_still_name_a_registry_model(device, operator, clean_desired):
    ack = desire(operator, b'{"draft": {"model": "qwen2.5-coder-1.5b"}}')
    assert ack["rejected"] == {} and ack["needs_restart"] == ["draft.model"]
    ack = desire(operator, b'{"draft": {"model": "qwen2.5-coder-0.5b-mine"}}')  # a path relative to the cwd
    assert "draft.model" in ack["rejected"]


# -- B (issue 20, point 3): statistics under many draft names -----------------------------------
def test_verifier_statistics_keep_a_bounded_number_of_draft_names_and_count_the_rest_as_other():
    from specedge.cloud.verifier import MAX_DRAFT_NAMES, OTHER, VerifierStats

    stats = VerifierStats()
    for i in range(5000):
        pair = stats.pair(f"draft-{i}", "tiny")
        pair.rounds += 1
        pair.drafted += 4
        pair.accepted += 2
    drafts = {d for d, _ in stats.pairs}
    assert len(drafts) == MAX_DRAFT_NAMES + 1 and OTHER in drafts
    assert stats.pairs[(OTHER, "tiny")].rounds == 5000 - MAX_DRAFT_NAMES
    assert sum(p.rounds for p in stats.pairs.values()) == 5000  # nothing lost, only pooled
    assert stats.pair("draft-0", "other-version") is stats.pairs[("draft-0", "other-version")]  # a known name


def test_the_stats_message_stays_under_its_size_limit_and_keeps_the_busiest_pairs():
    from specedge.cloud.verifier import MAX_DRAFT_NAMES, MAX_STATS_BYTES, VerifierStats, stats_payload

    stats = VerifierStats()
    for version in range(40):  # every known draft against many target versions: still too big
        for i in range(MAX_DRAFT_NAMES):
            stats.pair(f"{i:02d}" + "x" * 62, f"version-{version}").rounds = 1 + i + version
    summary = {"replica": "v", **stats.summary()}
    assert len(json.dumps(summary)) > MAX_STATS_BYTES
    payload = stats_payload(summary)
    assert len(payload) <= MAX_STATS_BYTES
    sent = json.loads(payload)
    assert sent["pairs_omitted"] == len(summary["pairs"]) - len(sent["pairs"]) > 0
    fewest_sent = min(p["rounds"] for p in sent["pairs"])
    assert all(p in sent["pairs"] for p in summary["pairs"] if p["rounds"] > fewest_sent)
    small = {"replica": "v", **VerifierStats().summary()}
    assert json.loads(stats_payload(small)) == {**small, "pairs_omitted": 0}


def test_verifier_stays_connected_and_publishes_stats_after_thousands_of_draft_names(tiny_models):
    """Against the packet limit `specedge certs` gives Mosquitto: a stats message past it got the
    verifier disconnected at every stats interval."""
    from specedge import certs
    from specedge.broker import MosquittoBroker
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.protocol import topics
    from specedge.config import CloudConfig

    _, _, target, tok = tiny_models
    broker = MosquittoBroker(extra_conf=f"max_packet_size {certs.MAX_PACKET}\n").start()
    verifier = None
    watcher = Link(build(DeviceConfig, {"mqtt": {"port": broker.port}}).mqtt, "stats-watcher",
                   lambda t, p: got.put(p))
    got: queue.Queue = queue.Queue()
    try:
        verifier = Verifier(build(CloudConfig, {"mqtt": {"port": broker.port}, "verifier": {
            "id": "vstats", "fleet": FLEET, "stats_interval_s": 0.3}}), Target.in_memory("tiny", target, tok))
        for i in range(2000):  # what 2,000 devices naming their drafts at will leave behind
            verifier.stats.pair(f"device-{i:04d}-own-draft-name", "tiny").rounds += 1
        watcher.start()
        watcher.subscribe(topics.replica("vstats", "stats"))
        verifier.start()
        messages = [got.get(timeout=5) for _ in range(3)]
        assert verifier.link.connects == 1 and verifier.link.connected.is_set()
        assert all(len(m) <= certs.MAX_PACKET for m in messages)
        assert sum(p["rounds"] for p in json.loads(messages[-1])["pairs"]) == 2000
    finally:
        if verifier is not None:
            verifier.stop()
        watcher.stop()
        broker.stop()


def test_prometheus_labels_of_a_verifier_pool_draft_names_past_its_bound(tiny_models, mosquitto):
    """Real devices, real sessions: with room for one draft name, the second device's draft is
    counted under OTHER, in the stats and in /metrics."""
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import OTHER, Verifier
    from specedge.config import CloudConfig
    from specedge.device.agent import Agent
    from specedge.device.policy import parse_policy
    from specedge.exporter import render
    from specedge.speculative import SamplingParams

    draft, tok, target, _ = tiny_models
    fleet = "hard-metrics"
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": "vmetrics", "fleet": fleet, "group": fleet}}), Target.in_memory("tiny", target, tok))
    verifier.stats.max_drafts = 1
    verifier.start()
    agents = []
    try:
        for i, name in enumerate(("first", "second")):
            cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": f"m{i}"}, "mqtt": {"port": mosquitto.port},
                                       "draft": {"name": name}, "energy": {"meter": "estimated"}})
            agents.append(Agent(cfg, TorchDraftEngine(draft), tok).start())
            agents[-1].generate(tok.encode_chat("go"), SamplingParams(), 6, parse_policy("fixed:2"))
        assert {d for d, _ in verifier.stats.pairs} == {"first", OTHER}
        text = render(verifier.metrics.registry).decode()
        assert 'draft="first"' in text and f'draft="{OTHER}"' in text and 'draft="second"' not in text
    finally:
        for a in agents:
            a.stop()
        verifier.stop()


# -- E (issue 20, point 1): client ids bound to certificates ------------------------------------
@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    """Mosquitto as `specedge certs` configures it: devices and verifiers on one listener,
    operators on their own."""
    from specedge import certs
    from specedge.broker import MosquittoBroker, free_port

    folder = tmp_path_factory.mktemp("pki")
    certs.make(folder, FLEET, devices=["d1"], verifiers=["v1"], operators=["op"])
    port, operator_port = free_port(), free_port()
    broker = MosquittoBroker(port, listener=certs.mosquitto_conf(folder, port, "127.0.0.1", operator_port)).start()
    broker.folder, broker.operator_port = folder, operator_port
    yield broker
    broker.stop()


def tls_link(broker, role: str, name: str, client_id: str, port: int | None = None) -> Link:
    from specedge.config import MqttConfig

    folder = broker.folder
    cfg = MqttConfig(host="localhost", port=port or broker.port, tls_ca=str(folder / "ca.crt"),
                     tls_cert=str(folder / role / f"{name}.crt"), tls_key=str(folder / role / f"{name}.key"))
    got: queue.Queue = queue.Queue()
    link = Link(cfg, client_id, lambda t, p: got.put((t, p)))
    link.got = got
    return link


def test_a_device_certificate_cannot_take_over_the_verifiers_session(bound):
    verifier = tls_link(bound, "verifiers", "v1", "specedge-verifier-v1").start()
    thief = tls_link(bound, "devices", "d1", "specedge-verifier-v1")
    try:
        thief.start()  # connects, but as itself: its client id is its certificate's name
        time.sleep(2.5)  # long enough for reconnects to have kicked each other
        assert verifier.connects == 1 and verifier.connected.is_set()
        assert thief.connects == 1 and thief.connected.is_set()
    finally:
        thief.stop()
        verifier.stop()


def test_two_operator_commands_at_once_both_stay_connected_and_get_their_messages(bound):
    device = tls_link(bound, "devices", "d1", "specedge-device-d1").start()
    ops = [tls_link(bound, "operators", "op", f"specedge-operator-op-{i}", bound.operator_port).start()
           for i in range(2)]
    try:
        for op in ops:
            op.subscribe(f"specedge/v1/{FLEET}/d1/status")
        time.sleep(0.3)
        device.publish(f"specedge/v1/{FLEET}/d1/status", b'{"state": "online"}', retain=True)
        for op in ops:
            assert op.got.get(timeout=5)[1] == b'{"state": "online"}'
        time.sleep(1.5)
        assert [op.connects for op in ops] == [1, 1] and all(op.connected.is_set() for op in ops)
    finally:
        for link in (*ops, device):
            link.stop()


def test_only_operator_certificates_reach_the_operators_listener(bound):
    from specedge.mqtt import BrokerUnavailable

    for role, name in (("devices", "d1"), ("verifiers", "v1")):
        with pytest.raises((BrokerUnavailable, OSError)):  # the TLS handshake fails: not their CA
            tls_link(bound, role, name, "specedge-verifier-v1", bound.operator_port).start(timeout=3)


def test_a_flood_of_commands_while_the_fleet_thread_is_busy_is_bounded_and_counted(device, operator):
    """The fleet thread can sit in a drain for a minute; commands that arrive meanwhile queue up
    to MAX_FLEET_INBOX and the rest are dropped and counted, and the device answers afterwards."""
    from specedge.device.fleet import MAX_FLEET_INBOX

    member, release = device.fleet, threading.Event()
    handle = member.on_command
    member.on_command = lambda payload, reply_to: release.wait(30) and None
    try:
        before = device.service.agent.decode_errors.get("fleet_inbox_full", 0)
        body = json.dumps({"command": "report", "args": {}, "id": "x"}).encode()
        for _ in range(3 * MAX_FLEET_INBOX):
            operator.publish(f"specedge/v1/{FLEET}/h1/cmd", body)
        deadline = time.monotonic() + 10
        while device.service.agent.decode_errors.get("fleet_inbox_full", 0) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert member.inbox.qsize() <= MAX_FLEET_INBOX
        assert device.service.agent.decode_errors.get("fleet_inbox_full", 0) > before
    finally:
        member.on_command = handle
        release.set()
    while member.inbox.qsize():
        time.sleep(0.05)
    answer, _ = ask(operator, "report")
    assert answer["ok"]
