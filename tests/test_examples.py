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


def test_robot_controller_asks_with_its_schema_and_always_gets_a_valid_action(demo):
    """Under response_format the answer is an action of the table, whatever the (random) tiny model
    prefers: every field is bounded, so it ends within the token budget."""
    robot = _module("robot_controller.py")
    observations = ("the box is 2 m ahead", "turn around and grab the cup", "??")
    done = run("robot_controller.py", "--base-url", demo, "--budget-s", "60", "--max-tokens", "80", "--strict",
               *observations)
    assert done.returncode == 0, done.stdout + done.stderr
    decisions = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [d["observation"] for d in decisions] == list(observations)
    for decision in decisions:
        assert decision["source"] == "model" and decision["reason"] == ""
        assert robot.validate(decision["action"]) == decision["action"]
    # The baseline without a grammar: whatever came, what it acts on is a valid action.
    free = run("robot_controller.py", "--base-url", demo, "--budget-s", "60", "--free-text", "the box is 2 m ahead")
    assert free.returncode == 0, free.stderr
    decision = json.loads(free.stdout.strip())
    assert robot.validate(decision["action"]) == decision["action"]
    assert decision["source"] in ("model", "fallback") and (decision["source"] == "model") == (not decision["reason"])
    late = run("robot_controller.py", "--base-url", "http://127.0.0.1:9/v1", "--strict", "x")  # nobody there
    assert late.returncode == 1 and json.loads(late.stdout)["action"] == {"action": "stop"}


def test_robot_controller_schema_is_its_action_table_and_its_grammar_bounds_every_number(tiny_models):
    from specedge import grammar
    from specedge.tools import bench_apps

    robot = _module("robot_controller.py")
    schema = robot.action_schema()
    assert [one["properties"]["action"]["const"] for one in schema["anyOf"]] == list(robot.SCHEMA)
    move = schema["anyOf"][0]
    assert move["required"] == ["action", "distance_cm", "speed_pct"] and move["additionalProperties"] is False
    assert move["properties"]["distance_cm"] == {"type": "integer", "minimum": -500, "maximum": 500}
    assert robot.RESPONSE_FORMAT["json_schema"]["schema"] == schema
    assert bench_apps.action_schema() == schema and bench_apps.ROBOT_SYSTEM == robot.SYSTEM  # the bench's mirror
    _, tok, target, _ = tiny_models
    compiled = grammar.Compiled(tok, target.cfg.vocab_size, grammar.json_schema(schema))

    def whole(text):  # the grammar takes all of `text` and may end there
        c = compiled.start()
        return c.accept(tok.encode(text)) and c.m.is_accepting()

    assert whole('{"action": "move", "distance_cm": -500, "speed_pct": 100}')
    assert whole('{"action": "turn", "angle_deg": 7}') and whole('{"action": "stop"}')
    for text in ('{"action": "move", "distance_cm": 501, "speed_pct": 1}', '{"action": "turn", "angle_deg": 1800}',
                 '{"action": "turn", "angle_deg": 1.5}', '{"action": "turn", "angle_deg": 07}',
                 '{"action": "stop", "x": 1}', '{"action": "turn"}', '{"action": "fly"}'):
        assert not whole(text), text


def test_robot_controller_rejects_what_the_schema_does_not_allow():
    robot = _module("robot_controller.py")
    assert robot.validate(robot.first_json_object('Sure! ```json\n{"action": "move", "distance_cm": 200, '
                                                  '"speed_pct": 50.0}```')) \
        == {"action": "move", "distance_cm": 200, "speed_pct": 50}
    for text in ('{"action": "fly"}', '{"action": "move", "distance_cm": 5000, "speed_pct": 10}', '{"action": "turn"}',
                 '{"action": "stop", "force": 1}', "no json here", '{"action": "turn", "angle_deg": true}',
                 '{"action": "turn", "angle_deg": 12.5}'):
        with pytest.raises(robot.InvalidAction):
            robot.validate(robot.first_json_object(text))
    with pytest.raises(robot.InvalidAction):  # under the grammar the answer is the object, not prose around it
        robot.parse('{"action": "stop"', free_text=False)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
