"""The self-test's verdict reaches everyone who relays an answer: the verifier's retained status,
its Prometheus metrics and OPENED, then the device's API answer, telemetry and `specedge fleet ls`.
A target that has not shown bitwise exactness is never reported exact."""
from __future__ import annotations

import json
import time

import pytest

from specedge import cli
from specedge.cloud.registry import Target
from specedge.config import CloudConfig, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.node import DeviceNode
from specedge.loader import load_model
from test_fleet_secure import http


@pytest.fixture(scope="module", params=[True, False], ids=["self-tested", "not-invariant"])
def served(request, tiny_models, tiny_files, mosquitto):
    """A verifier and a device service; the target batch-invariant (the self-test passes) or
    loaded without batch invariance (never claimed exact)."""
    from specedge.cloud.verifier import Verifier

    draft, tok, _, target_tok = tiny_models
    target, _ = load_model(tiny_files[1], dtype="bf16", batch_invariant=request.param)
    fleet = f"exact-{request.param}".lower()
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": f"v-{fleet}", "fleet": fleet, "metrics_port": 0}}), Target.in_memory("tiny", target, target_tok)).start()
    cfg = build(DeviceConfig, {"device": {"id": "d1", "fleet": fleet}, "mqtt": {"port": mosquitto.port},
                               "energy": {"meter": "estimated"}, "generation": {"max_new_tokens": 12},
                               "fleet": {"telemetry_interval_s": 0.2}, "api": {"http_port": 0}})
    node = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    yield request.param, verifier, node, fleet
    node.stop()
    verifier.stop()


def test_the_verdict_travels_from_the_self_test_to_the_app_and_the_operator(served, mosquitto, capsys):
    exact, verifier, node, fleet = served
    assert json.loads(verifier._status("online"))["exact"] == {"tiny": exact}
    metric = f'specedge_verifier_target_exact{{target="tiny"}} {float(exact)}'.encode()
    assert metric in http(verifier.metrics_port, "/metrics")[1]

    status, raw = http(node.http.port, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "the robot turns"}]})
    assert status == 200 and json.loads(raw)["specedge"]["exact"] is exact

    deadline = time.monotonic() + 10
    while (node.fleet.last_request() or {}).get("exact") is not exact and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.fleet.last_request()["exact"] is exact
    time.sleep(0.5)  # a telemetry interval: ls reads the retained telemetry
    rc = cli.main(["fleet", "--port", str(mosquitto.port), "--fleet", fleet, "--json", "ls", "--wait", "1"])
    rows = json.loads(capsys.readouterr().out)["devices"]
    assert rc == 0 and [r["exact"] for r in rows] == [exact]
