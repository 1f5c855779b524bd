"""`specedge soak`: several devices generate without pause against a verifier, over the channel
emulator, for a bounded time; memory, file descriptors, errors and throughput are sampled.

Every finished generation is checked against the target's own greedy decoding. The
verifier runs as its own process (`specedge cloud run`), the agents in this one.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from specedge.tools.bench import _read_json, _stop, spawn_verifier
from specedge.tools.bench_verifier import target_decode
from specedge.broker import MosquittoBroker
from specedge.tools.channel import ChannelEmulator, preset
from specedge.config import DeviceConfig, MqttConfig, build
from specedge.mqtt import Link
from specedge.protocol import topics

PROMPTS = ["robot go to the mat", "hello", "say hi to the user", "turn on the light", "go home"]


def proc_stats(pid: int | str = "self") -> tuple[float, int]:
    """(resident MB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0.0, -1
    return rss, fds


def _growth(samples: list[dict], key: str) -> float:
    """Growth of `key` from the end of the warm-up (the first quarter) to the last sample."""
    if len(samples) < 2:
        return 0.0
    return samples[-1][key] - samples[len(samples) // 4][key]


def run_soak(seconds: float, devices: int = 4, channel: str = "wifi", interval_s: float = 5.0, max_new: int = 32,
             draft: str | None = None, target: str | None = None, progress=None) -> dict:
    """`devices` agents generating back to back for `seconds` over the `channel` preset against one
    verifier process; a sample every `interval_s` (passed to `progress` too), then the report."""
    from specedge.tiny import write_pair

    tmp = tempfile.TemporaryDirectory(prefix="specedge-soak-")
    folder = Path(tmp.name)
    tiny = not (draft and target)
    if tiny:
        draft_path, target_path = write_pair(folder / "models", seed=0, noise=0.3)
        draft, target = str(draft_path), str(target_path)
    draft_model, tok, prompts, references, block = _load_models(draft, target, tiny, max_new)

    broker = MosquittoBroker().start()
    procs, agents, emulator = [], [], None
    tally = _Tally()
    verifier_stats: dict = {}
    stop = threading.Event()
    try:
        verifier = _spawn_soak_verifier(folder, broker.port, target, block)
        procs.append(verifier)
        _read_json(verifier, "the verifier", 120)
        watch = Link(MqttConfig(port=broker.port), "soak-watch", lambda t, p: verifier_stats.update(json.loads(p)))
        watch.subscribe(topics.replica("soak", "stats"))
        watch.start()
        emulator = ChannelEmulator(preset(channel), ("127.0.0.1", broker.port)).start()
        _start_agents(agents, devices, emulator.port, draft_model, tok)
        threads = [threading.Thread(target=_device_loop, args=(i, a, prompts, references, max_new, stop, tally),
                                    daemon=True) for i, a in enumerate(agents)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        samples = _sample_until(t0, seconds, interval_s, verifier.pid, tally, verifier_stats, agents, progress)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        hung = sum(t.is_alive() for t in threads)
        watch.stop()
    finally:
        stop.set()
        for agent in agents:
            agent.stop()
        if emulator is not None:
            emulator.stop()
        for proc in procs:
            _stop(proc)
        broker.stop()
        tmp.cleanup()
    return _report(seconds, devices, channel, max_new, samples, tally, hung)


def _load_models(draft: str, target: str, tiny: bool, max_new: int):
    """(draft model, tokenizer, prompts, the target's greedy output for each, the target's product
    block). The target is loaded only for the references and dropped again: the verifier process
    loads its own."""
    from specedge.loader import load_named

    draft_model, tok = load_named(draft, "bf16" if tiny else "int8")  # int8: the device default
    target_model, _ = load_named(target, "bf16", batch_invariant=True)
    prompts = [tok.encode_chat(p) for p in PROMPTS]
    references = target_decode(target_model, prompts, max_new, tok.stop_ids)
    block = target_model.block  # the verifier computes with the references' product block
    return draft_model, tok, prompts, references, block


def _spawn_soak_verifier(folder: Path, port: int, target: str, block: int):
    cfg_path = folder / "verifier.toml"
    cfg_path.write_text(f'[verifier]\nid = "soak"\nfleet = "soak"\nstats_interval_s = 1.0\n'
                        f'[mqtt]\nport = {port}\n[target]\nmodel = "{target}"\nengine = "torch"\n'
                        f'weights = "bf16"\nblock = {block}\n')
    return spawn_verifier(cfg_path, folder / "verifier.log")


def _start_agents(agents: list, devices: int, port: int, draft_model, tok) -> None:
    """`devices` agents started into `agents` (one by one, so the caller stops those that started
    when a later one fails), all on the emulated link's port."""
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine

    for i in range(devices):
        cfg = build(DeviceConfig, {"device": {"id": f"soak{i}", "fleet": "soak"},
                                   "mqtt": {"port": port},
                                   "faults": {"round_timeout_s": 5.0, "max_wait_s": 60.0}})
        engine = TorchDraftEngine(draft_model, cfg.draft.q_top_k, cfg.draft.q_top_p)
        agents.append(Agent(cfg, engine, tok).start())


class _Tally:
    """The devices' running counts, shared by their threads (under `lock`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {"tokens": 0, "requests": 0, "failed": 0, "wrong": 0}
        self.failures: list[str] = []


def _device_loop(i: int, agent, prompts, references, max_new: int, stop: threading.Event, tally: _Tally) -> None:
    """One device: the prompts in turn (starting at its own), each output checked against the
    target's, until `stop`."""
    from specedge.device.request import RequestFailed
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams

    n = i
    while not stop.is_set():
        k = n % len(prompts)
        n += 1
        try:
            result = agent.generate(prompts[k], SamplingParams(), max_new, parse_policy("fixed:3"))
        except RequestFailed as exc:
            with tally.lock:
                tally.counters["failed"] += 1
                tally.failures.append(str(exc))
            continue
        with tally.lock:
            tally.counters["requests"] += 1
            tally.counters["tokens"] += len(result.tokens)
            tally.counters["wrong"] += result.tokens != references[k]


def _sample_until(t0: float, seconds: float, interval_s: float, verifier_pid: int, tally: _Tally,
                  verifier_stats: dict, agents: list, progress) -> list[dict]:
    """A sample every `interval_s` until `seconds` after t0: throughput over the interval, both
    sides' memory and descriptors, threads, sessions and error counts."""
    samples, last_tokens = [], 0
    while time.monotonic() - t0 < seconds:
        time.sleep(min(interval_s, max(0.0, seconds - (time.monotonic() - t0))))
        v_rss, v_fds = proc_stats(verifier_pid)
        d_rss, d_fds = proc_stats()
        with tally.lock:
            tokens, snapshot = tally.counters["tokens"], dict(tally.counters)
        sample = {"t": round(time.monotonic() - t0, 1), "tokens_per_s": (tokens - last_tokens) / interval_s,
                  "verifier_rss_mb": round(v_rss, 1), "verifier_fds": v_fds,
                  "device_rss_mb": round(d_rss, 1), "device_fds": d_fds, "threads": threading.active_count(),
                  "verifier_sessions": verifier_stats.get("sessions", -1),
                  "verifier_errors": sum(verifier_stats.get("errors", {}).values()),
                  "device_decode_errors": sum(sum(a.decode_errors.values()) for a in agents), **snapshot}
        last_tokens = tokens
        samples.append(sample)
        if progress:
            progress(sample)
    return samples


def _report(seconds: float, devices: int, channel: str, max_new: int, samples: list[dict], tally: _Tally,
            hung: int) -> dict:
    """Passed: no failed or wrong request, no hung device, at least one request, and neither side's
    file descriptors grew after the warm-up."""
    counters = tally.counters
    report = {
        "seconds": seconds, "devices": devices, "channel": channel, "max_new": max_new, "samples": samples,
        **counters, "hung_devices": hung, "failures": tally.failures[:20],
        "verifier_rss_growth_mb": round(_growth(samples, "verifier_rss_mb"), 1),
        "device_rss_growth_mb": round(_growth(samples, "device_rss_mb"), 1),
        "verifier_fd_growth": _growth(samples, "verifier_fds"), "device_fd_growth": _growth(samples, "device_fds"),
        "mean_tokens_per_s": round(counters["tokens"] / seconds, 2),
    }
    report["passed"] = (not counters["failed"] and not counters["wrong"] and not hung and counters["requests"] > 0
                        and report["verifier_fd_growth"] <= 0 and report["device_fd_growth"] <= 0)
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    t = [x["t"] for x in s]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, keys, title in ((axes[0][0], ["tokens_per_s"], "verified tokens/s (all devices)"),
                            (axes[0][1], ["verifier_rss_mb", "device_rss_mb"], "resident memory (MB)"),
                            (axes[1][0], ["verifier_fds", "device_fds"], "open file descriptors"),
                            (axes[1][1], ["failed", "wrong", "verifier_errors", "device_decode_errors"], "errors")):
        for key in keys:
            ax.plot(t, [x[key] for x in s], label=key)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    fig.suptitle(f"specedge soak: {report['devices']} devices, {report['channel']}, {report['seconds']:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_parser(sub) -> None:
    so = sub.add_parser("soak", help="devices generating without pause over the channel emulator: memory, fds, "
                                     "errors and throughput over time (JSON + plot)")
    so.add_argument("--minutes", type=float, default=3.0, help="how long (30 for the long run)")
    so.add_argument("--devices", type=int, default=4)
    so.add_argument("--channel", default="wifi", help="a channel preset (specedge channels)")
    so.add_argument("--interval-s", type=float, default=5.0, help="sampling interval")
    so.add_argument("--tokens", type=int, default=32, help="new tokens a request")
    so.add_argument("--draft", default="", help="draft model (default: tiny generated models)")
    so.add_argument("--target", default="", help="target model (with --draft)")
    so.add_argument("--json", default="")
    so.add_argument("--plot", default="")
    so.set_defaults(func=run)


def run(args) -> int:
    def progress(x):
        print(f"{x['t']:7.1f}s {x['tokens_per_s']:7.1f} tok/s  verifier {x['verifier_rss_mb']:7.1f} MB "
              f"{x['verifier_fds']:4d} fds  device {x['device_rss_mb']:7.1f} MB {x['device_fds']:4d} fds  "
              f"requests {x['requests']} failed {x['failed']} wrong {x['wrong']}", file=sys.stderr, flush=True)
    report = run_soak(args.minutes * 60, args.devices, args.channel, args.interval_s, args.tokens,
                 args.draft or None, args.target or None, progress)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0 if report["passed"] else 1
