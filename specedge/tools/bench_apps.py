"""`specedge bench-apps`: what a voice app or a robot sees, on the real pair.

--app voice (the default): a five-turn conversation in which every turn's prompt is the whole
history, as OpenAI's chat API sends it. It runs twice in the same process over the same channel:
with kept sessions (`[speculation] keep_session`, the default: the next turn goes up as EXTEND,
both caches kept) and with every turn opened afresh (the whole history sent and prefilled on both
sides). Per turn: time to first token, uplink bytes, prompt and cached tokens. Greedy, both runs
must give the same answers, the target's own.

--app robot: twenty robot instructions (data/prompts/robot_instructions.jsonl), each a request of
its own (keep_session off) for one action of examples/robot_controller.py's table. Two modes in
the same process over the same channel: "free-text" (the table in the system prompt, no grammar;
the answer's first {...} taken and validated, as the example's --free-text) and "grammar" (the
same prompt, the table's JSON schema as the request's grammar, specedge/grammar.py). Per action:
valid, round trips (DRAFT-to-VERDICT exchanges, stats.rounds: the OPEN goes out with the first
DRAFT and is not waited for, so it adds none, and an answer the grammar forces to its end costs
none), uplink bytes, forced tokens, latency; in grammar mode, whether the output is the target's
own grammar-constrained greedy decoding (grammar.reference_decode). Exit 1 if the grammar mode
finished an invalid action or parted from that decoding.
"""
from __future__ import annotations

import json
import sys
import time

from specedge.metrics import percentile
from specedge.resources import resource

TURNS = (
    "What is a mutex?",
    "How is it different from a semaphore?",
    "Show a tiny Python example that uses one.",
    "What happens if a thread forgets to release it?",
    "Summarise the whole conversation in two sentences.",
)
SYSTEM = "You are a helpful voice assistant. Answer briefly."
MODES = {"kept": True, "afresh": False}  # the run's name -> [speculation] keep_session

# The robot: a mirror of examples/robot_controller.py's SCHEMA and SYSTEM (action -> {field:
# (minimum, maximum)}, integers: every field bounded, so a constrained answer always ends).
ROBOT_ACTIONS = {
    "move": {"distance_cm": (-500, 500), "speed_pct": (0, 100)},
    "turn": {"angle_deg": (-180, 180)},
    "grip": {}, "release": {}, "stop": {},
}
ROBOT_SYSTEM = ("You control a mobile robot with a gripper. Reply with exactly one JSON object and nothing else. "
                'Allowed: {"action": "move", "distance_cm": <-500..500>, "speed_pct": <0..100>}, '
                '{"action": "turn", "angle_deg": <-180..180>}, {"action": "grip"}, {"action": "release"}, '
                '{"action": "stop"}. All numbers are integers.')
ROBOT_MODES = ("free-text", "grammar")
APPS = ("voice", "robot")


def add_parser(sub) -> None:
    from specedge.options import model_options

    p = sub.add_parser("bench-apps", help="a voice conversation with kept sessions against opening each turn afresh "
                                          "(--app voice), or robot actions asked for in free text against under "
                                          "the action schema's grammar (--app robot)")
    model_options(p)
    p.add_argument("--app", default="voice", choices=APPS,
                   help="voice: a five-turn conversation, kept and afresh; robot: twenty instructions, free text "
                        "and grammar")
    p.add_argument("--channel", default="lte", help="the device's link (a channel preset or trace spec)")
    p.add_argument("--policy", default="fixed:4")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompts", type=int, default=None, help="robot: only the first N instructions")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG here")
    p.set_defaults(func=run, broker="mosquitto")


def conversation(agent, tok, policy, max_new: int) -> list[dict]:
    """The five turns on `agent`, each prompt the whole history so far."""
    from specedge.speculative import SamplingParams

    history, turns = [{"role": "system", "content": SYSTEM}], []
    for question in TURNS:
        history.append({"role": "user", "content": question})
        prompt = tok.encode(tok.apply_chat_template(history))
        sent0 = agent.status().bytes_sent
        result = agent.generate(prompt, SamplingParams(), max_new, policy)
        stats = result.stats
        turns.append({"prompt_tokens": len(prompt), "cached_tokens": stats.cached_prompt_tokens,
                      "draft_reused_tokens": stats.draft_reused_tokens, "ttft_s": stats.ttft_s,
                      "total_s": stats.total_s, "uplink_bytes": agent.status().bytes_sent - sent0,
                      "generated_tokens": len(result.tokens), "exact": stats.exact, "tokens": result.tokens})
        history.append({"role": "assistant", "content": tok.decode(result.tokens)})
    return turns


def voice_runs(start_agent, tok, policy, max_new: int) -> dict[str, list[dict]]:
    """The conversation with kept sessions, then afresh: {mode: turns}."""
    runs = {}
    for name, keep in MODES.items():
        agent = start_agent(name, keep)
        try:
            print(f"bench-apps: voice, {len(TURNS)} turns, {name}", file=sys.stderr, flush=True)
            runs[name] = conversation(agent, tok, policy, max_new)
        finally:
            agent.stop()
    return runs


def run(args) -> int:
    from specedge.broker import MosquittoBroker
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.policy import parse_policy
    from specedge.tools.bench import _git_revision
    from specedge.tools.channel import ChannelEmulator, channel_config
    from specedge.tools.demo import load_models, machine

    channel_cfg = channel_config(args.channel)
    policy = parse_policy(args.policy)
    robot = args.app == "robot"
    engine, tok, loaded = load_models(args)
    broker = MosquittoBroker().start()
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": broker.port, "protocol": "5"}}),
                        Target.in_memory(args.target, loaded.model, loaded.tokenizer)).start()
    try:
        with ChannelEmulator(channel_cfg, ("127.0.0.1", broker.port)) as channel:
            def start_agent(name: str, keep: bool):
                cfg = build(DeviceConfig, {"device": {"id": f"{args.app}-{name}"}, "energy": {"meter": "estimated"},
                                           "mqtt": {"port": channel.port, "protocol": "5"},
                                           "speculation": {"keep_session": keep}})
                return Agent(cfg, engine, tok).start()

            if robot:
                runs = robot_runs(start_agent, tok, loaded, policy, args.max_new_tokens, args.max_prompts)
            else:
                runs = voice_runs(start_agent, tok, policy, args.max_new_tokens)
    finally:
        verifier.stop()
        broker.stop()
    report = summarize_robot(runs) if robot else summarize(runs)
    report.update({"app": args.app, "machine": machine(), "git_revision": _git_revision(), "draft": args.draft,
                   "target": args.target, "target_engine": loaded.spec.engine, "policy": args.policy,
                   "channel": channel_cfg.description, "max_new_tokens": args.max_new_tokens,
                   "time": time.time()})
    (print_robot_table if robot else print_table)(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        (plot_robot if robot else plot)(report, args.plot)
    return 0 if report["grammar_ok" if robot else "outputs_identical"] else 1


def summarize(runs: dict[str, list[dict]]) -> dict:
    kept, afresh = runs["kept"], runs["afresh"]
    return {"runs": runs,
            "outputs_identical": [t["tokens"] for t in kept] == [t["tokens"] for t in afresh],
            "exact": all(t["exact"] for turns in runs.values() for t in turns),
            "ttft_ratio_by_turn": [k["ttft_s"] / a["ttft_s"] if a["ttft_s"] else None for k, a in zip(kept, afresh)],
            "uplink_ratio_by_turn": [k["uplink_bytes"] / a["uplink_bytes"] for k, a in zip(kept, afresh)]}


def print_table(report: dict) -> None:
    kept, afresh = report["runs"]["kept"], report["runs"]["afresh"]
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT kept':>10} {'TTFT afresh':>12} {'ratio':>6} "
          f"{'up B kept':>10} {'up B afresh':>12}")
    for i, (k, a) in enumerate(zip(kept, afresh), 1):
        print(f"{i:>4} {k['prompt_tokens']:>7} {k['cached_tokens']:>7} {k['ttft_s']:>10.2f} {a['ttft_s']:>12.2f} "
              f"{k['ttft_s'] / a['ttft_s']:>6.2f} {k['uplink_bytes']:>10} {a['uplink_bytes']:>12}")
    print(f"outputs identical: {report['outputs_identical']}; exact: {report['exact']}; channel: {report['channel']}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, turns in report["runs"].items():
        xs = range(1, len(turns) + 1)
        ax1.plot(xs, [t["ttft_s"] for t in turns], marker="o", label=name)
        ax2.plot(xs, [t["uplink_bytes"] for t in turns], marker="o", label=name)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs))
    ax1.set(xlabel="turn", ylabel="time to first token (s)", title="TTFT per turn")
    ax2.set(xlabel="turn", ylabel="uplink bytes", title="uplink per turn")
    ax1.legend()
    fig.suptitle(f"voice conversation, {report['target']} / {report['draft']}, {report['policy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- the robot ---------------------------------------------------------------------------------
def action_schema() -> dict:
    """ROBOT_ACTIONS as a JSON schema (as the example's action_schema()): one object per action,
    its name a constant, every field required and bounded, nothing else allowed."""
    def one(name: str, fields: dict) -> dict:
        properties = {"action": {"const": name}}
        properties.update({key: {"type": "integer", "minimum": lo, "maximum": hi} for key, (lo, hi) in fields.items()})
        return {"type": "object", "properties": properties, "required": list(properties),
                "additionalProperties": False}
    return {"anyOf": [one(name, fields) for name, fields in ROBOT_ACTIONS.items()]}


def action_error(text: str, whole: bool) -> str:
    """Why `text` is not one action of ROBOT_ACTIONS ("" if it is), as the example's validate():
    `whole`, the text must be the object itself (the grammar's answer); else its first {...}."""
    start = 0 if whole else text.find("{")
    if start < 0:
        return "no JSON object"
    try:
        action, end = json.JSONDecoder().raw_decode(text[start:])
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    if whole and text[start + end:]:
        return "text after the object"
    if not isinstance(action, dict) or action.get("action") not in ROBOT_ACTIONS:
        return "not an object with a known action"
    fields = ROBOT_ACTIONS[action["action"]]
    if set(action) != set(fields) | {"action"}:
        return f"fields {sorted(action)}, expected {sorted(fields) + ['action']}"
    for key, (lo, hi) in fields.items():
        value = action[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return f"{key} is not an integer"
        if not lo <= value <= hi:
            return f"{key}={value} is outside [{lo}, {hi}]"
    return ""


def robot_instructions(limit: int | None) -> list[str]:
    lines = resource("data", "prompts", "robot_instructions.jsonl").read_text().splitlines()
    instructions = [json.loads(line)["instruction"] for line in lines if line.strip()]
    return instructions[:limit] if limit else instructions


def robot_runs(start_agent, tok, target, policy, max_new: int, limit: int | None) -> dict[str, list[dict]]:
    """Every instruction in free text, then under the action schema's grammar: {mode: actions}."""
    from specedge import grammar

    instructions = robot_instructions(limit)
    text = grammar.json_schema(action_schema())
    runs = {}
    for mode in ROBOT_MODES:
        agent = start_agent(mode, False)  # each instruction is a request of its own
        try:
            print(f"bench-apps: robot, {len(instructions)} instructions, {mode}", file=sys.stderr, flush=True)
            runs[mode] = [robot_action(agent, tok, target, policy, instruction, max_new,
                                       text if mode == "grammar" else None) for instruction in instructions]
        finally:
            agent.stop()
    return runs


def robot_action(agent, tok, target, policy, instruction: str, max_new: int, grammar_text: str | None) -> dict:
    """One instruction on `agent`, under `grammar_text` or none. `target` (load_models' third) is
    what the grammar's answer must equal: its own constrained greedy decoding."""
    from specedge import grammar
    from specedge.speculative import SamplingParams

    prompt = tok.encode(tok.apply_chat_template([{"role": "system", "content": ROBOT_SYSTEM},
                                                 {"role": "user", "content": instruction}]))
    sent0 = agent.status().bytes_sent
    result = agent.generate(prompt, SamplingParams(), max_new, policy, grammar=grammar_text)
    stats, n = result.stats, len(result.tokens)
    uplink = agent.status().bytes_sent - sent0
    text = tok.decode(result.tokens)
    error = action_error(text, whole=grammar_text is not None)
    action = {"instruction": instruction, "valid": not error, "error": error, "finished": result.stopped,
              "prompt_tokens": len(prompt), "rounds": stats.rounds, "uplink_bytes": uplink,
              "uplink_bytes_per_token": uplink / n if n else None,
              "forced_tokens": stats.forced_tokens, "forced_share": stats.forced_tokens / n if n else 0.0,
              "total_s": stats.total_s, "ttft_s": stats.ttft_s, "generated_tokens": n, "exact": stats.exact,
              "text": text, "tokens": result.tokens}
    if grammar_text is not None:
        want = grammar.reference_decode(target.model, target.tokenizer, prompt, max_new, grammar_text)
        action["constrained_exact"] = want == result.tokens
    return action


def summarize_robot(runs: dict[str, list[dict]]) -> dict:
    modes = {}
    for name, actions in runs.items():
        tokens = sum(a["generated_tokens"] for a in actions)
        latency = [a["total_s"] for a in actions]
        modes[name] = {"actions": len(actions), "valid": sum(a["valid"] for a in actions),
                       "finished": sum(a["finished"] for a in actions),
                       "mean_rounds": sum(a["rounds"] for a in actions) / len(actions),
                       "uplink_bytes_per_token": sum(a["uplink_bytes"] for a in actions) / tokens if tokens else None,
                       "forced_share": sum(a["forced_tokens"] for a in actions) / tokens if tokens else 0.0,
                       "latency_mean_s": sum(latency) / len(latency), "latency_p50_s": percentile(latency, 0.5),
                       "latency_max_s": max(latency), "exact": all(a["exact"] for a in actions)}
    constrained = runs["grammar"]
    modes["grammar"]["constrained_exact"] = sum(a["constrained_exact"] for a in constrained)
    # A cut answer (--max-new-tokens too small for the longest action) is invalid, not the grammar's fault.
    invalid = sum(a["finished"] and not a["valid"] for a in constrained)
    return {"runs": runs, "modes": modes, "grammar_invalid_finished": invalid,
            "grammar_ok": not invalid and all(a["constrained_exact"] for a in constrained)}


def print_robot_table(report: dict) -> None:
    free, constrained = report["runs"]["free-text"], report["runs"]["grammar"]
    print(f"{'#':>2} {'free valid':>10} {'rounds':>6} {'lat s':>6}   {'grammar valid':>13} {'rounds':>6} "
          f"{'forced':>6} {'lat s':>6}  instruction")
    for i, (f, g) in enumerate(zip(free, constrained), 1):
        print(f"{i:>2} {str(f['valid']):>10} {f['rounds']:>6} {f['total_s']:>6.2f}   {str(g['valid']):>13} "
              f"{g['rounds']:>6} {g['forced_tokens']:>6} {g['total_s']:>6.2f}  {g['instruction'][:48]}")
    print(f"{'mode':>9} {'valid':>7} {'rounds/action':>13} {'up B/token':>10} {'forced':>7} "
          f"{'lat mean':>8} {'p50':>6} {'max':>6}")
    for name, m in report["modes"].items():
        per_token = f"{m['uplink_bytes_per_token']:.1f}" if m["uplink_bytes_per_token"] is not None else "-"
        print(f"{name:>9} {m['valid']:>3}/{m['actions']:<3} {m['mean_rounds']:>13.2f} {per_token:>10} "
              f"{m['forced_share']:>7.0%} {m['latency_mean_s']:>8.2f} {m['latency_p50_s']:>6.2f} "
              f"{m['latency_max_s']:>6.2f}")
    g = report["modes"]["grammar"]
    if g["finished"] < g["actions"]:
        print(f"grammar: {g['actions'] - g['finished']} answer(s) cut at --max-new-tokens "
              f"{report['max_new_tokens']}: give the longest action room", file=sys.stderr)
    print(f"grammar: constrained exact {g['constrained_exact']}/{g['actions']}; invalid finished actions "
          f"{report['grammar_invalid_finished']}; channel: {report['channel']}")


def plot_robot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, actions in report["runs"].items():
        xs = list(range(1, len(actions) + 1))
        ax1.plot(xs, [a["total_s"] for a in actions], marker="o", label=name)
        ax2.plot(xs, [a["rounds"] for a in actions], marker="o", label=name)
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
    ax1.set(xlabel="instruction", ylabel="latency (s)", title="latency per action")
    ax2.set(xlabel="instruction", ylabel="round trips", title="round trips per action")
    ax1.legend()
    fig.suptitle(f"robot actions, free text vs grammar, {report['target']} / {report['draft']}, {report['policy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
