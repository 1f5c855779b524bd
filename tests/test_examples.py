"""examples/ run against the demo setup (Stack in serve mode: broker, verifier, device service)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specedge.config import CloudConfig, DeviceConfig, build

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def demo(tiny_models, mosquitto):
    from specedge.tools.demo import Stack

    s = Stack(*tiny_models, port=mosquitto.port, serve=True,
              device_cfg=build(DeviceConfig, {"device": {"fleet": "demo", "id": "speaker"}, "api": {"http_port": 0},
                                              "energy": {"meter": "estimated"}}),
              cloud_cfg=build(CloudConfig, {"verifier": {"fleet": "demo", "id": "v-demo", "group": "demo"}}))
    yield f"http://127.0.0.1:{s.node.http.port}/v1"
    s.close()


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120)


def test_voice_assistant_holds_a_conversation_and_speaks_the_streamed_answers(demo):
    done = run("voice_assistant.py", "--base-url", demo, "--tts", "print", "--max-tokens", "24", "What is a mutex?",
               "And a semaphore?")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stderr.strip().splitlines()[-2:])
    assert first["first_token_s"] is not None and first["sentences"] >= 1 and "[speak]" in done.stdout
    assert (first["turn"], second["turn"]) == (1, 2)
    # The second turn's history (the system prompt, the first question and answer) stayed on the
    # verifier: only the new turn went up.
    assert second["cached_tokens"] > first["cached_tokens"]


def test_robot_controller_acts_only_on_a_valid_action(demo):
    done = run("robot_controller.py", "--base-url", demo, "--budget-s", "30", "the box is 2 m ahead")
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout.strip())
    robot = _module("robot_controller.py")
    assert robot.validate(decision["action"]) == decision["action"]  # whatever came, it is a valid action
    assert decision["source"] in ("model", "fallback") and (decision["source"] == "model") == (not decision["reason"])
    late = run("robot_controller.py", "--base-url", "http://127.0.0.1:9/v1", "--strict", "x")  # nobody there
    assert late.returncode == 1 and json.loads(late.stdout)["action"] == {"action": "stop"}


def test_robot_controller_rejects_what_the_schema_does_not_allow():
    robot = _module("robot_controller.py")
    assert robot.validate(robot.first_json_object('Sure! ```json\n{"action": "move", "distance_m": 2, "speed": 0.5}```')) \
        == {"action": "move", "distance_m": 2.0, "speed": 0.5}
    for text in ('{"action": "fly"}', '{"action": "move", "distance_m": 50, "speed": 1}', '{"action": "turn"}',
                 '{"action": "stop", "force": 1}', "no json here", '{"action": "turn", "angle_deg": true}'):
        with pytest.raises(robot.InvalidAction):
            robot.validate(robot.first_json_object(text))


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
