#!/usr/bin/env python3
"""A robot controller that asks specedge's local API for its next action under a latency budget.

It sends the action table as a JSON schema (`response_format` json_schema): the device and the
verifier constrain the answer to it token by token, so a malformed action cannot occur. Every
field is bounded, numbers included: they are integers (centimetres, degrees, percent) with a
minimum and a maximum, so an answer is always a whole action in a few dozen tokens; the keys and
punctuation the schema fixes are forced and cost no round trip. The controller still validates
the action before acting (a defence; it never fires under the grammar). Only a request that
fails (the device or verifier unreachable, an HTTP error, an answer over the budget) falls back
to a safe stop, and says why.

--free-text is the baseline without a grammar: the action table in the prompt, the first {...}
of the answer taken and validated; anything not JSON or outside the table falls back to stop.

    specedge demo --serve
    python examples/robot_controller.py "the box is 2 m ahead, slightly to the left" --budget-s 8

Prints one JSON line per observation: {"action": {...}, "source": "model" | "fallback", "reason",
"latency_s"}. --strict exits 1 when any fallback was used.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

# action -> {field: (minimum, maximum)}, integers. specedge/tools/bench_apps.py mirrors it.
SCHEMA = {
    "move": {"distance_cm": (-500, 500), "speed_pct": (0, 100)},
    "turn": {"angle_deg": (-180, 180)},
    "grip": {}, "release": {}, "stop": {},
}
SAFE = {"action": "stop"}
SYSTEM = ("You control a mobile robot with a gripper. Reply with exactly one JSON object and nothing else. "
          'Allowed: {"action": "move", "distance_cm": <-500..500>, "speed_pct": <0..100>}, '
          '{"action": "turn", "angle_deg": <-180..180>}, {"action": "grip"}, {"action": "release"}, '
          '{"action": "stop"}. All numbers are integers.')


def action_schema() -> dict:
    """SCHEMA as a JSON schema: one object per action, its name a constant, every field required
    and bounded, nothing else allowed."""
    def one(name: str, fields: dict) -> dict:
        properties = {"action": {"const": name}}
        properties.update({key: {"type": "integer", "minimum": lo, "maximum": hi} for key, (lo, hi) in fields.items()})
        return {"type": "object", "properties": properties, "required": list(properties),
                "additionalProperties": False}
    return {"anyOf": [one(name, fields) for name, fields in SCHEMA.items()]}


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "action", "schema": action_schema(), "strict": True}}


class InvalidAction(ValueError):
    pass


def first_json_object(text: str) -> dict:
    """The first {...} in the text (models like to wrap JSON in prose or code fences)."""
    start = text.find("{")
    if start < 0:
        raise InvalidAction("no JSON object in the answer")
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError as exc:
        raise InvalidAction(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidAction("the JSON is not an object")
    return value


def validate(action: dict) -> dict:
    name = action.get("action")
    if name not in SCHEMA:
        raise InvalidAction(f"unknown action {name!r}; allowed: {', '.join(SCHEMA)}")
    fields = SCHEMA[name]
    extra = set(action) - set(fields) - {"action"}
    if extra:
        raise InvalidAction(f"unexpected fields {sorted(extra)} for {name}")
    out = {"action": name}
    for key, (lo, hi) in fields.items():
        value = action.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise InvalidAction(f"{name}.{key} must be an integer")
        if not lo <= value <= hi:
            raise InvalidAction(f"{name}.{key}={value} is outside [{lo}, {hi}]")
        out[key] = int(value)
    return out


def ask(base_url: str, observation: str, budget_s: float, max_tokens: int, free_text: bool) -> str:
    request = {"model": "specedge", "max_tokens": max_tokens, "temperature": 0,
               "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": observation}]}
    if free_text:
        request["stop"] = ["\n\n"]
    else:
        request["response_format"] = RESPONSE_FORMAT
    http = urllib.request.Request(f"{base_url}/chat/completions", json.dumps(request).encode(),
                                  {"Content-Type": "application/json"})
    # The socket timeout enforces the budget: a late answer is no answer.
    with urllib.request.urlopen(http, timeout=budget_s) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def parse(text: str, free_text: bool) -> dict:
    """The action in an answer: under the grammar the answer is the object itself; free text is
    searched for its first {...}. Validated either way."""
    if free_text:
        return validate(first_json_object(text))
    try:
        action = json.loads(text)
    except ValueError as exc:  # the grammar rules this out: only a cut answer (--max-tokens) gets here
        raise InvalidAction(f"not valid JSON: {exc}") from None
    if not isinstance(action, dict):
        raise InvalidAction("the JSON is not an object")
    return validate(action)


def decide(base_url: str, observation: str, budget_s: float, max_tokens: int, free_text: bool = False) -> dict:
    start = time.perf_counter()
    try:
        text = ask(base_url, observation, budget_s, max_tokens, free_text)
        latency = time.perf_counter() - start
        if latency > budget_s:
            raise InvalidAction(f"answered in {latency:.2f}s, over the {budget_s}s budget")
        return {"action": parse(text, free_text), "source": "model", "reason": "", "latency_s": round(latency, 3)}
    except urllib.error.HTTPError as exc:  # the device said no (429 queue full, 503 draining, ...)
        reason = f"HTTP {exc.code}: {json.loads(exc.read() or b'{}').get('error', {}).get('message', '')}"
    except (TimeoutError, urllib.error.URLError) as exc:
        reason = f"no answer within the {budget_s}s budget ({exc})"
    except InvalidAction as exc:
        reason = str(exc)
    return {"action": SAFE, "source": "fallback", "reason": reason,
            "latency_s": round(time.perf_counter() - start, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("observation", nargs="*", help="what the robot sees (default: one per stdin line)")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--budget-s", type=float, default=5.0, help="latency budget per decision")
    p.add_argument("--max-tokens", type=int, default=48, help="room for the longest action (about 25 tokens "
                                                              "with Qwen's tokenizer)")
    p.add_argument("--free-text", action="store_true",
                   help="the baseline: no response_format; take the answer's first {...} and validate it")
    p.add_argument("--strict", action="store_true", help="exit 1 if any decision fell back to stop")
    args = p.parse_args()
    fallbacks = 0
    for observation in args.observation or (line.strip() for line in sys.stdin):
        if observation:
            decision = decide(args.base_url, observation, args.budget_s, args.max_tokens, args.free_text)
            fallbacks += decision["source"] == "fallback"
            print(json.dumps({"observation": observation, **decision}), flush=True)
    return 1 if args.strict and fallbacks else 0


if __name__ == "__main__":
    sys.exit(main())
