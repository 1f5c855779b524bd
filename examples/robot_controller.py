#!/usr/bin/env python3
"""A robot controller that asks specedge's local API for its next action as JSON, under a latency
budget, and validates it before acting. An answer that is late, not JSON, or outside the action
schema is never executed: the controller falls back to a safe stop and says why.

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

SCHEMA = {  # action -> {field: (type, minimum, maximum)}
    "move": {"distance_m": (float, -5.0, 5.0), "speed": (float, 0.0, 1.0)},
    "turn": {"angle_deg": (float, -180.0, 180.0)},
    "grip": {}, "release": {}, "stop": {},
}
SAFE = {"action": "stop"}
SYSTEM = ("You control a mobile robot with a gripper. Reply with exactly one JSON object and nothing else. "
          'Allowed: {"action": "move", "distance_m": <-5..5>, "speed": <0..1>}, '
          '{"action": "turn", "angle_deg": <-180..180>}, {"action": "grip"}, {"action": "release"}, '
          '{"action": "stop"}.')


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
    for key, (typ, lo, hi) in fields.items():
        value = action.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidAction(f"{name}.{key} must be a number")
        if not lo <= value <= hi:
            raise InvalidAction(f"{name}.{key}={value} is outside [{lo}, {hi}]")
        out[key] = typ(value)
    return out


def ask(base_url: str, observation: str, budget_s: float, max_tokens: int) -> str:
    body = json.dumps({"model": "specedge", "max_tokens": max_tokens, "temperature": 0, "stop": ["\n\n"],
                       "messages": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": observation}]}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", body, {"Content-Type": "application/json"})
    # The socket timeout enforces the budget: a late answer is no answer.
    with urllib.request.urlopen(request, timeout=budget_s) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def decide(base_url: str, observation: str, budget_s: float, max_tokens: int) -> dict:
    start = time.perf_counter()
    try:
        text = ask(base_url, observation, budget_s, max_tokens)
        latency = time.perf_counter() - start
        if latency > budget_s:
            raise InvalidAction(f"answered in {latency:.2f}s, over the {budget_s}s budget")
        return {"action": validate(first_json_object(text)), "source": "model", "reason": "",
                "latency_s": round(latency, 3)}
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
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--strict", action="store_true", help="exit 1 if any decision fell back to stop")
    args = p.parse_args()
    fallbacks = 0
    for observation in args.observation or (line.strip() for line in sys.stdin):
        if observation:
            decision = decide(args.base_url, observation, args.budget_s, args.max_tokens)
            fallbacks += decision["source"] == "fallback"
            print(json.dumps({"observation": observation, **decision}), flush=True)
    return 1 if args.strict and fallbacks else 0


if __name__ == "__main__":
    sys.exit(main())
