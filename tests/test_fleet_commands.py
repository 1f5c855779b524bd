"""Fleet commands and desired configs: validation, authorisation, both MQTT versions, and what
changes live; `specedge certs` and the new configuration sections."""
from __future__ import annotations

import json
import queue
import time

import pytest

from specedge import certs
from specedge.config import ConfigError, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.fleet import config_changes
from specedge.device.node import DeviceNode
from specedge.mqtt import Link, ReplyTo

FLEET = "ops"


@pytest.fixture(scope="module")
def device(tiny_models, mosquitto, tmp_path_factory):
    draft, tok, _, _ = tiny_models
    path = tmp_path_factory.mktemp("cfg") / "device.toml"
    path.write_text(f'[device]\nid = "arm"\nfleet = "{FLEET}"\n[mqtt]\nport = {mosquitto.port}\n'
                    f'[energy]\nmeter = "estimated"\n[api]\nhttp_port = -1\n'
                    f'[fleet]\nallowed_commands = "report,set_policy,reload_config,drain,resume"\n')
    from specedge.config import load

    node = DeviceNode(load(DeviceConfig, path), TorchDraftEngine(draft), tok, str(path)).start()
    node.path = path
    yield node
    node.stop()


@pytest.fixture
def operator(mosquitto):
    links = []

    def connect(protocol: str = "5"):
        got: queue.Queue = queue.Queue()
        link = Link(build(DeviceConfig, {"mqtt": {"port": mosquitto.port, "protocol": protocol}}).mqtt,
                    f"op-{protocol}-{time.monotonic_ns()}", lambda t, p: got.put((t, json.loads(p)))).start()
        link.got = got
        links.append(link)
        return link
    yield connect
    for link in links:
        link.stop()


def ask(link, command, args=None, protocol="5", reply_to=None, raw: bytes | None = None) -> dict | None:
    reply = reply_to or f"specedge/v1/{FLEET}/arm/reply/tester"
    link.subscribe(reply)
    time.sleep(0.1)
    body = {"command": command, "args": args or {}, "id": "q1"}
    if protocol == "3.1.1":
        body["reply_to"] = reply
    link.publish(f"specedge/v1/{FLEET}/arm/cmd", raw if raw is not None else json.dumps(body).encode(),
                 reply_to=ReplyTo(reply, b"q1"))
    deadline = time.monotonic() + 5
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = link.got.get(timeout=left)[1]
        except queue.Empty:
            break
        if message.get("id") == "q1" or "error" in message:
            return message
    return None


def test_commands_answer_on_both_mqtt_versions_and_refuse_what_is_not_allowed(device, operator):
    for protocol in ("5", "3.1.1"):
        link = operator(protocol)
        answer = ask(link, "report", protocol=protocol)
        assert answer["ok"] and answer["id"] == "q1" and answer["device"] == "arm"
        assert answer["result"]["status"]["state"] == "online"
    link = operator()
    refused = ask(link, "set_budget", {"budget_j_per_token": 1})
    assert not refused["ok"] and "unauthorised" in refused["error"]
    assert "unknown command" in ask(link, "reboot")["error"]
    assert "bad arguments" in ask(link, "set_policy", {"colour": "red"})["error"]
    assert "unknown policy" in ask(link, "set_policy", {"policy": "fastest"})["error"].lower() or \
        not ask(link, "set_policy", {"policy": "fastest"})["ok"]
    assert "malformed" in ask(link, "x", raw=b"\xff{")["error"]
    assert "malformed" in ask(link, "x", raw=b"[1, 2]")["error"]
    assert "malformed" in ask(link, "x", raw=b"{" + b" " * 70000 + b"}")["error"]
    # An answer goes only under the device's own reply topics: it cannot be turned into a forger.
    assert ask(link, "report", reply_to=f"sv/{FLEET}/arm") is None
    assert ask(link, "set_policy", {"policy": "fixed:3"})["result"] == {"policy": "fixed:3"}
    assert device.service.policy.name == "fixed:3"


def test_desired_config_applies_live_keys_and_reports_the_rest(device, operator):
    link = operator()
    acks = f"specedge/v1/{FLEET}/arm/config/applied"
    link.subscribe(acks)
    time.sleep(0.1)
    while not link.got.empty():
        link.got.get()
    desired = {"generation": {"max_new_tokens": 7}, "draft": {"q_top_k": 4},
               "fleet": {"allowed_commands": "set_budget"}, "mqtt": {"tls_ca": "/etc/evil.pem"}}
    link.publish(f"specedge/v1/{FLEET}/arm/config", json.dumps(desired).encode(), retain=True)
    ack = link.got.get(timeout=5)[1]
    assert ack["applied"] == {"generation.max_new_tokens": 7} and ack["needs_restart"] == ["draft.q_top_k"]
    assert set(ack["rejected"]) == {"fleet.allowed_commands", "mqtt.tls_ca"}
    assert device.service.cfg.generation.max_new_tokens == 7
    assert "set_budget" not in device.service.cfg.fleet.allowed()
    link.publish(f"specedge/v1/{FLEET}/arm/config", b'{"generation": {"max_new_tokens": -1}}', retain=True)
    ack = link.got.get(timeout=5)[1]
    assert ack["applied"] == {} and "generation.max_new_tokens" in ack["rejected"]["config"]
    assert device.service.cfg.generation.max_new_tokens == 7  # nothing of a bad config is applied
    link.publish(f"specedge/v1/{FLEET}/arm/config", b"not json", retain=True)
    assert "not JSON" in link.got.get(timeout=5)[1]["rejected"]["device"]
    link.publish(f"specedge/v1/{FLEET}/arm/config", b"", retain=True)  # cleared: back to the file
    assert link.got.get(timeout=5)[1]["applied"] == {"generation.max_new_tokens": 256}
    # reload_config re-reads the file
    device.path.write_text(device.path.read_text().replace("[energy]", "[generation]\nmax_new_tokens = 9\n[energy]"))
    answer = ask(link, "reload_config")
    assert answer["ok"] and answer["result"]["applied"]["generation.max_new_tokens"] == 9
    assert answer["result"]["reread_file"] is True


def test_config_changes_split_live_keys_from_restart_keys():
    a = build(DeviceConfig, {})
    b = build(DeviceConfig, {"speculation": {"policy": "fixed:2"}, "energy": {"budget_j_per_token": 2.0,
                                                                               "profile": "x86-host"},
                             "mqtt": {"port": 1884}})
    live, restart = config_changes(a, b)
    assert live == {"speculation.policy": "fixed:2", "energy.budget_j_per_token": 2.0}
    assert restart == ["energy.profile", "mqtt.port"]
    assert config_changes(a, a) == ({}, [])


def test_certs_keep_the_ca_add_names_and_write_an_acl_for_everyone(tmp_path):
    certs.make(tmp_path, "f", devices=["a"], operators=["op"])
    ca = (tmp_path / "ca.crt").read_bytes()
    everyone = certs.make(tmp_path, "f", devices=["b"], verifiers=["v"])
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert everyone == {"devices": ["a", "b"], "verifiers": ["v"], "operators": ["op"]}
    acl = (tmp_path / "acl").read_text()
    assert "user a\ntopic write specedge/v1/f/a/draft/#" in acl and "user b\n" in acl
    assert "topic read specedge/v1/f/+/reply/op" in acl
    assert (tmp_path / "devices/a.key").stat().st_mode & 0o077 == 0
    conf = (tmp_path / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and f"max_packet_size {certs.MAX_PACKET}" in conf
    with pytest.raises(ValueError, match="one role"):
        certs.make(tmp_path, "f", operators=["a"])
    assert not (tmp_path / "operators/a.crt").exists()  # refused whole: nothing written for it


def test_new_config_sections_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="api.http_port"):
        build(DeviceConfig, {"api": {"http_port": 70000}})
    with pytest.raises(ConfigError, match="fleet.allowed_commands"):
        build(DeviceConfig, {"fleet": {"allowed_commands": "report,selfdestruct"}})
    with pytest.raises(ConfigError, match="tls_cert/tls_key"):
        build(DeviceConfig, {"mqtt": {"tls_cert": "x"}})
    with pytest.raises(ConfigError, match="does not exist"):
        build(DeviceConfig, {"mqtt": {"tls_ca": str(tmp_path / "missing.crt")}})
    with pytest.raises(ConfigError, match="draft.q_top_k"):  # was unreachable before issue 8
        build(DeviceConfig, {"draft": {"q_top_k": 0}})
    assert build(DeviceConfig, {"fleet": {"allowed_commands": "report, drain"}}).fleet.allowed() == ["report", "drain"]
