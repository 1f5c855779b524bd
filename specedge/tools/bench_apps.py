"""`specedge bench-apps`: what a voice app sees over a conversation, on the real pair.

voice: a five-turn conversation in which every turn's prompt is the whole history, as OpenAI's
chat API sends it. It runs twice in the same process over the same channel: with kept sessions
(`[speculation] keep_session`, the default: the next turn goes up as EXTEND, both caches kept)
and with every turn opened afresh (the whole history sent and prefilled on both sides). Per
turn: time to first token, uplink bytes, prompt and cached tokens. Greedy, both runs must give
the same answers, the target's own.
"""
from __future__ import annotations

import json
import sys
import time

TURNS = (
    "What is a mutex?",
    "How is it different from a semaphore?",
    "Show a tiny Python example that uses one.",
    "What happens if a thread forgets to release it?",
    "Summarise the whole conversation in two sentences.",
)
SYSTEM = "You are a helpful voice assistant. Answer briefly."
MODES = {"kept": True, "afresh": False}  # the run's name -> [speculation] keep_session


def add_parser(sub) -> None:
    from specedge.options import model_options

    p = sub.add_parser("bench-apps", help="a voice conversation with kept sessions against opening each turn afresh")
    model_options(p)
    p.add_argument("--channel", default="lte", help="the device's link (a channel preset or trace spec)")
    p.add_argument("--policy", default="fixed:4")
    p.add_argument("--max-new-tokens", type=int, default=48)
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
    engine, tok, loaded = load_models(args)
    broker = MosquittoBroker().start()
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": broker.port, "protocol": "5"}}),
                        Target.in_memory(args.target, loaded.model, loaded.tokenizer)).start()
    runs = {}
    try:
        with ChannelEmulator(channel_cfg, ("127.0.0.1", broker.port)) as channel:
            for name, keep in MODES.items():
                cfg = build(DeviceConfig, {"device": {"id": f"voice-{name}"}, "energy": {"meter": "estimated"},
                                           "mqtt": {"port": channel.port, "protocol": "5"},
                                           "speculation": {"keep_session": keep}})
                agent = Agent(cfg, engine, tok).start()
                try:
                    print(f"bench-apps: voice, {len(TURNS)} turns, {name}", file=sys.stderr, flush=True)
                    runs[name] = conversation(agent, tok, policy, args.max_new_tokens)
                finally:
                    agent.stop()
    finally:
        verifier.stop()
        broker.stop()
    report = summarize(runs)
    report.update({"machine": machine(), "git_revision": _git_revision(), "draft": args.draft,
                   "target": args.target, "target_engine": loaded.spec.engine, "policy": args.policy,
                   "channel": channel_cfg.description, "max_new_tokens": args.max_new_tokens,
                   "time": time.time()})
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0 if report["outputs_identical"] else 1


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
