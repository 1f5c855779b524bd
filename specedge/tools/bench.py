"""`specedge bench`: every policy against its baselines, over emulated channels, in one run.

Layout of a run: a real Mosquitto; the verifier (`specedge cloud run`) as one
process pinned to its own core(s); per channel, the channel emulator between
the device and the broker, and a device worker process (this module with
--worker) pinned to other core(s). The orchestrator sends the worker one
(prompt, policy) at a time over stdin, reads the result from stdout, and reads
the bytes that crossed the emulated link from the proxy. Before each run the
channel's clock restarts, so every policy meets the same stretch of the trace.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from specedge.broker import MosquittoBroker
from specedge.config import SpeculationConfig
from specedge.tools.channel import ChannelConfig, ChannelEmulator, channel_config, split_channels
from specedge.progress import bar as progress_bar
from specedge.resources import resource
from specedge.metrics import percentile
from specedge.protocol.wire import MAX_DRAFT as WIRE_MAX_DRAFT

MAX_DRAFT = SpeculationConfig.max_draft  # the bench device's, unless --max-draft says otherwise


def default_prompts() -> Path:
    return resource("data", "prompts", "spec_bench_dev.jsonl")


SHIPPED_PROMPTS = ("spec_bench_dev", "code_edits", "code_completion", "long_context")  # data/prompts/{name}.jsonl


def prompts_file(path: str | None) -> str:
    """--prompts as given, or a shipped set by name (code_edits: ten code edits that copy their
    input, for prompt lookup; code_completion: ten functions to complete, which the draft
    predicts almost surely; long_context: six 650-800-token prompts, three summaries and three
    questions over documents, from public-domain texts), or (None) the Spec-Bench prompts
    shipped with the package."""
    if path in SHIPPED_PROMPTS:
        return str(resource("data", "prompts", f"{path}.jsonl"))
    return str(default_prompts()) if path is None else path


def load_prompts(path: str | Path, limit: int | None) -> list[str]:
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompts.append(record["turns"][0] if "turns" in record else record["prompt"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with 'turns' or 'prompt'") from None
        if limit and len(prompts) >= limit:
            break
    return prompts


# The radio model each preset's device uses for its energy figures (a custom trace: lte).
CHANNEL_RADIO = {"ideal": "wifi", "wifi": "wifi", "lte": "lte", "lte-driving": "lte", "umts": "3g", "evdo": "3g",
                 "varying": "lte"}


# -- the analytical optimum of docs/design.md section 4, with per-position acceptance ---------
def acceptance_by_position(draft_lens: list[int], accepted: list[int], positions: int = MAX_DRAFT) -> list[float]:
    """c_j = P(drafted token j accepted | tokens before it accepted), from verdicts."""
    tested, passed = [0] * positions, [0] * positions
    for d, k in zip(draft_lens, accepted):
        for j in range(min(k + 1, d, positions)):
            tested[j] += 1
            passed[j] += j < k
    rates = []
    for t, a in zip(tested, passed):
        rates.append(a / t if t else (rates[-1] if rates else 0.0))
    return rates


def optimum(accept_by_position: list[float], t_draft: float, verify_base: float, verify_per_row: float,
            rtt: float, rate_up, rate_down, v5: bool = True, max_draft: int = MAX_DRAFT) -> tuple[float, int]:
    """(best tokens/s, its draft_len) over fixed draft_len in [0, max_draft] for greedy rounds on this wire:
    the scheduler's own round model (docs/design.md section 4) fed with the run's measurements."""
    from specedge.device.scheduler import Objective, State, best_rate
    from specedge.protocol import wire
    from specedge.mqtt import publish_packet_bytes
    from specedge.protocol import topics

    state = State(tuple(accept_by_position), t_draft, verify_base, verify_per_row, rtt,
                  up_bps=rate_up or math.inf, down_bps=rate_down or math.inf,
                  # drafts by topic alias on MQTT 5 (the broker sends verdicts with their topic)
                  up_bytes_base=publish_packet_bytes("" if v5 else topics.draft("bench", "device0"),
                                                     len(wire.encode(wire.Draft(0, 0, 0, []))), wire.ROUND_QOS,
                                                     v5, alias=v5),
                  up_bytes_per_token=3,
                  down_bytes=publish_packet_bytes(topics.answers("bench", "device0"),
                                                  len(wire.encode(wire.Verdict(0, 0, 0, 0, 0))), wire.ROUND_QOS, v5))
    return best_rate(state, Objective(), max_draft)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope >= 0) over every point alike; the mean when x never varied."""
    from specedge.device.scheduler import LinearFit

    fit = LinearFit(forget=1.0)
    for x, y in zip(xs, ys):
        fit.update(x, y)
    return fit.coefficients()


# -- the device worker: one process, one draft model, commands on stdin -------------------------
def worker_main(argv: list[str]) -> int:
    import argparse

    from specedge.config import DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.backends import open_engine
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--draft-weights", default="int8")
    p.add_argument("--draft-backend", default="auto")
    p.add_argument("--draft-sources", default="model")
    p.add_argument("--device-id", default="bench0")
    p.add_argument("--profile", default="orin-nano-15w")
    p.add_argument("--link", default="lte")
    p.add_argument("--meter", default="auto")
    p.add_argument("--max-draft", type=int, default=MAX_DRAFT)
    args = p.parse_args(argv)
    cfg = build(DeviceConfig, {"device": {"id": args.device_id, "fleet": "bench"},
                               "mqtt": {"port": args.port, "protocol": "5"},
                               "draft": {"model": args.draft, "weights": args.draft_weights,
                                         "backend": args.draft_backend, "sources": args.draft_sources},
                               # Every (prompt, policy) run on its own: no run goes on in the
                               # session the one before kept (`specedge bench-apps` measures that).
                               "speculation": {"max_draft": args.max_draft, "keep_session": False},
                               "energy": {"profile": args.profile, "link": args.link, "meter": args.meter},
                               "faults": {"round_timeout_s": 60.0}})
    engine, tok = open_engine(cfg.draft)
    agent = Agent(cfg, engine, tok).start()
    out = sys.stdout
    out.write(json.dumps({"ready": True, "backend": engine.backend, "protocol": agent.status().protocol,
                          "energy_source": agent.energy_source}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        params = SamplingParams(cmd.get("temperature", 0.0), cmd.get("top_k", 0), cmd.get("top_p", 1.0),
                                cmd.get("seed", 0))
        prompt = tok.encode_chat(cmd["prompt"])
        result = agent.generate(prompt, params, cmd["max_new_tokens"], parse_policy(cmd["policy"]))
        out.write(json.dumps(_run_record(result, prompt, engine, tok)) + "\n")
        out.flush()
    agent.stop()
    return 0


def _run_record(result, prompt: list[int], engine, tok) -> dict:
    """One run as the worker reports it: its tokens, text and every statistic the bench reads."""
    stats = result.stats
    return {"tokens": result.tokens, "summary": stats.summary(), "draft_s": stats.draft_s,
            "draft_prefill_s": stats.draft_prefill_s, "first_tokens": stats.first_tokens,
            "wait_s": stats.wait_s, "verify_s": stats.verify_s, "rounds": stats.rounds,
            "target_passes": stats.target_passes,
            "drafted": stats.drafted_tokens, "accepted": stats.accepted_tokens,
            "network_rtt_s": stats.network_rtt_s(), "draft_lens": stats.draft_lens,
            "accepted_lens": stats.accepted_lens, "round_start_s": stats.round_start_s,
            "verify_round_s": stats.verify_round_s, "energy_j": stats.energy_j,
            "energy_source": stats.energy_source, "prompt_tokens": len(prompt),
            "prompt": prompt, "q_wire_bytes": stats.q_wire_bytes,
            "dense_q_bytes": stats.dense_q_bytes, "ahead_s": stats.ahead_s,
            "ahead_tokens": stats.ahead_tokens, "ahead_kept": stats.ahead_kept,
            "ahead_hits": stats.ahead_hits, "hints": stats.hints,
            "hints_agreed": stats.hints_agreed, "hint_layer": stats.hint_layer,
            "lookup_rounds": stats.lookup_rounds, "lookup_drafted": stats.lookup_drafted,
            "lookup_accepted": stats.lookup_accepted,
            "streamed_tokens": stats.streamed_tokens, "modes": stats.modes,
            "emulation": engine.emulation() if hasattr(engine, "emulation") else None,
            "text": tok.decode(result.tokens)}


def local_target_main(argv: list[str]) -> int:
    """The local-target baseline: the target's own generation (the prompt in its prompt calls, then
    one position after another), on the cloud's cores and engine, no device and no network (what
    `llama-cli` on that machine does).
    Prompts arrive on stdin, one JSON line each; one JSON line answers each."""
    import argparse

    import torch

    from specedge.cloud.engine import prefill_calls
    from specedge.cloud.registry import TargetSpec, load_target
    from specedge.exactness import establish

    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--engine", default="auto")
    p.add_argument("--target-weights", default="auto")
    p.add_argument("--block", type=int, default=0, help="the verifier's product block")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    loaded = load_target(TargetSpec(args.target, args.target, args.target_weights, engine=args.engine),
                         args.batch_invariant)
    engine, tok, name = loaded.model, loaded.tokenizer, loaded.spec.engine
    establish(engine, args.block)
    sys.stdout.write(json.dumps({"ready": True, "engine": name}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        prompt = tok.encode_chat(cmd["prompt"])
        t0 = time.perf_counter()
        cache = engine.new_cache(capacity=len(prompt) + cmd["max_new_tokens"] + 1)
        row = engine.forward_batch([(prompt, cache)], keep=[1], calls=[prefill_calls(engine, len(prompt))])[0][-1]
        tokens, ttft = [], None
        while len(tokens) < cmd["max_new_tokens"]:
            token = int(torch.argmax(row))
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            if token in tok.stop_ids:
                break
            tokens.append(token)
            row = engine.forward([token], cache)[-1]
        total = time.perf_counter() - t0
        sys.stdout.write(json.dumps({"tokens": tokens, "ttft_s": ttft, "total_s": total,
                                     "tokens_per_s": len(tokens) / total if total else 0.0}) + "\n")
        sys.stdout.flush()
    return 0


def local_target(args, prompts: list[str], cores: list[int], block: int, logs: Path) -> dict:
    """Runs the local-target baseline over the bench's prompts; aggregate and raw runs."""
    proc = _spawn([sys.executable, "-m", "specedge.tools.bench", "--local-target", "--target", args.target,
                   "--engine", args.engine, "--target-weights", args.target_weights, "--block", str(block),
                   "--batch-invariant" if args.batch_invariant else "--no-batch-invariant"],
                  cores, {}, logs / "local-target.log")
    try:
        _read_json(proc, "the local-target baseline", args.start_timeout)
        runs = []
        for prompt in prompts:
            proc.stdin.write(json.dumps({"prompt": prompt, "max_new_tokens": args.max_new_tokens}) + "\n")
            proc.stdin.flush()
            runs.append(_read_json(proc, "the local-target baseline", args.run_timeout))
    finally:
        _stop(proc)
    total = sum(r["total_s"] for r in runs)
    return {"tokens_per_s": sum(len(r["tokens"]) for r in runs) / total if total else 0.0,
            "ttft_s": sum(r["ttft_s"] or 0.0 for r in runs) / len(runs), "runs": runs}


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _pinned(cores: list[int]):
    def pin():
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(cores))
    return pin


@contextlib.contextmanager
def pinned_here(cores: list[int]):
    """This process, and what it starts, on `cores` (none: as it is) for the block."""
    if not cores:
        yield
        return
    import torch

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(len(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def _spawn(cmd: list[str], cores: list[int], env_extra: dict, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
    log = open(log_path, "w")  # a file, not a pipe: a chatty child can never block on it
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=env, preexec_fn=_pinned(cores))
    proc.log_path = log_path
    log.close()
    return proc


def spawn_verifier(config: Path, log_path: Path, threads: int = 1, cores: list[int] = ()) -> subprocess.Popen:
    """`specedge cloud run --config CONFIG` as a child process (pinned to `cores` where given, as
    many threads as those cores); `_read_json` waits until it serves."""
    return _spawn([sys.executable, "-m", "specedge.cli", "cloud", "run", "--config", str(config)], list(cores),
                  {} if cores else {"OMP_NUM_THREADS": str(threads)}, log_path)


def _read_json(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    err = Path(proc.log_path).read_text()[-2000:]
    state = "exited" if proc.poll() is not None else "is still running"
    raise RuntimeError(f"{what} gave no answer within {timeout:.0f}s and {state}; its log ends:\n{err}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StatsWatch:
    """Follows the replicas' statistics topic: the latest of each replica of the current run, and
    their peak cache memory."""

    def __init__(self, port: int, every: bool = False):
        """every: every replica counts (one verifier), not only those `follow` names."""
        from specedge.config import MqttConfig
        from specedge.mqtt import Link
        from specedge.protocol import topics

        self.latest: dict[str, dict] = {}
        self.replicas: set[str] | None = None if every else set()
        self.peak_cache_bytes = 0
        self.lock = threading.Lock()
        self.link = Link(MqttConfig(port=port, protocol="5"), f"bench-stats-{os.getpid()}", self._on)
        self.link.subscribe(topics.replica(topics.ANY, "stats"))
        self.link.start()

    def _on(self, topic: str, payload: bytes) -> None:
        stats = json.loads(payload)
        with self.lock:
            if self.replicas is not None and stats["replica"] not in self.replicas:
                return  # a replica of an earlier run, saying goodbye
            self.latest[stats["replica"]] = stats
            self.peak_cache_bytes = max(self.peak_cache_bytes, sum(s["cache_bytes"] for s in self.latest.values()))

    def snapshot(self) -> dict:
        with self.lock:
            return {r: dict(s) for r, s in self.latest.items()}

    def follow(self, replicas: set[str]) -> None:
        """A new run: only these replicas count, the peak starts again."""
        with self.lock:
            self.replicas = set(replicas)
            self.latest = {r: s for r, s in self.latest.items() if r in self.replicas}
            self.peak_cache_bytes = 0


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def aggregate(runs: list[dict]) -> dict:
    """One policy on one channel, pooled over prompts (token-weighted)."""
    tokens = sum(len(r["tokens"]) for r in runs)
    total_s = sum(r["summary"]["total_s"] for r in runs)
    drafted = sum(r["drafted"] for r in runs)
    accepted = sum(r["accepted"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    passes = sum(r["target_passes"] for r in runs)
    wire = sum(r["proxy_bytes"] for r in runs)
    verify_s = sum(r["verify_s"] for r in runs)
    rtt_p50 = percentile([rtt for r in runs for rtt in r["network_rtt_s"]], 0.5)
    energy = sum(r["energy_j"] for r in runs)
    gen = max(tokens, 1)
    dense = sum(r.get("dense_q_bytes", 0) for r in runs)
    hints = sum(r.get("hints", 0) for r in runs)
    ahead = sum(r.get("ahead_tokens", 0) + r.get("ahead_hits", 0) for r in runs)
    looked_up = sum(r.get("lookup_drafted", 0) for r in runs)  # drafted by prompt lookup, not the model
    ttft = sum(r["summary"]["ttft_s"] for r in runs)
    later = tokens - sum(r.get("first_tokens", 1) for r in runs)  # tokens after each request's first answer
    return {
        "tokens_per_s": tokens / total_s if total_s else 0.0,
        "ttft_s": ttft / len(runs),
        # After each request's first token: the rounds' (or the stream's) rate, without the prefills.
        "decode_tokens_per_s": later / (total_s - ttft) if total_s > ttft and later > 0 else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_len": (accepted + rounds) / rounds if rounds else 0.0,
        "target_passes_per_token": passes / gen,
        "wire_bytes_per_token": wire / gen,
        "rounds": rounds,
        "generated_tokens": tokens,
        "drafted_tokens": drafted,
        "draft_ms_per_token": (1000 * sum(r["draft_s"] - r.get("draft_prefill_s", 0.0) for r in runs)
                               / (drafted - looked_up) if drafted > looked_up else 0.0),
        "lookup_rounds": sum(r.get("lookup_rounds", 0) for r in runs),
        "lookup_acceptance": sum(r.get("lookup_accepted", 0) for r in runs) / looked_up if looked_up else None,
        "model_acceptance": ((accepted - sum(r.get("lookup_accepted", 0) for r in runs)) / (drafted - looked_up)
                             if drafted > looked_up else None),
        "verify_ms_per_pass": 1000 * verify_s / rounds if rounds else 0.0,
        "rtt_ms": 1000 * rtt_p50 if rtt_p50 is not None else None,
        "energy_j_per_token": energy / gen,
        "energy_source": runs[0]["energy_source"],
        "mean_draft_len": drafted / rounds if rounds else 0.0,
        # Adaptive policies: the share of tokens the cloud streamed, and mode switches per request.
        "streamed_share": sum(r.get("streamed_tokens", 0) for r in runs) / gen,
        "mode_switches_per_request": sum(max(len(r.get("modes", [])) - 1, 0) for r in runs) / len(runs),
        # Sampled runs: the same run had it shipped full fp16 draft distributions instead of sparse q.
        "naive_wire_bytes_per_token": (wire - sum(r.get("q_wire_bytes", 0) for r in runs) + dense) / gen
        if dense else None,
        "ahead_hit_rate": sum(r.get("ahead_hits", 0) for r in runs) / rounds if ahead and rounds else None,
        "ahead_kept_per_round": sum(r.get("ahead_kept", 0) for r in runs) / rounds if ahead and rounds else None,
        "early_exit_agreement": sum(r.get("hints_agreed", 0) for r in runs) / hints if hints else None,
        "early_exit_layer": max(r.get("hint_layer", 0) for r in runs) if hints else None,
        "early_exit_hints_per_round": hints / rounds if hints and rounds else None,
        # Every run's tokens were all verified by a target that passed its bitwise self-test.
        "exact": all(r["summary"].get("exact", False) for r in runs),
    }


DEFAULT_CHANNELS = "ideal,lte,umts"


def bench_channels(channel: str | None, up_trace: str | None, down_trace: str | None,
                   seed: int = 0) -> list[ChannelConfig]:
    """--channel's presets and trace: specs, then --up-trace/--down-trace as one more channel;
    without either, the default presets."""
    if bool(up_trace) != bool(down_trace):
        raise ValueError("--up-trace and --down-trace go together")
    specs = split_channels(channel if channel is not None else "" if up_trace else DEFAULT_CHANNELS)
    if up_trace:
        specs.append(f"trace:{up_trace},{down_trace}")
    configs = [channel_config(spec, seed) for spec in specs]
    names = [cfg.name for cfg in configs]
    if not names:
        raise ValueError("no channel to run")
    if len(set(names)) < len(names):  # the report is keyed by channel name
        raise ValueError(f"a channel appears twice: {', '.join(names)}")
    return configs


def add_parser(sub) -> None:
    from specedge.options import model_options

    be = sub.add_parser("bench", help="policies vs baselines over emulated channels (JSON + plot)")
    be.add_argument("--channel", default=None,
                    help="comma-separated presets (ideal, wifi, lte, lte-driving, umts, evdo) and custom "
                         "Mahimahi trace pairs, trace:UP,DOWN[,delay_ms=MS][,jitter_ms=MS][,loss=P]; "
                         "default ideal,lte,umts (none with --up-trace)")
    be.add_argument("--up-trace", help="Mahimahi trace for device -> broker: one more channel, with --down-trace")
    be.add_argument("--down-trace", help="Mahimahi trace for broker -> device")
    be.add_argument("--policies", default="cloud-ar,fixed:1,fixed:2,fixed:4,fixed:8,adaptive,adaptive-energy")
    be.add_argument("--prompts", default=None, help="JSONL (Spec-Bench format: first turn is used), or a "
                    "shipped set: " + ", ".join(SHIPPED_PROMPTS))
    be.add_argument("--draft-sources", default="model",
                    help="the device's [draft] sources: model, lookup (prompt lookup) or lookup,model")
    be.add_argument("--max-prompts", type=int, default=8)
    be.add_argument("--max-new-tokens", type=int, default=64)
    be.add_argument("--temperature", type=float, default=0.0)
    model_options(be)
    be.add_argument("--json", help="write the report here")
    be.add_argument("--plot", help="write a PNG here")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--max-draft", type=int, default=MAX_DRAFT,
                    help=f"the device's [speculation] max_draft, 1..{WIRE_MAX_DRAFT} (default {MAX_DRAFT})")
    be.add_argument("--profile", default="orin-nano-15w", help="device profile for energy (profiles.toml)")
    be.add_argument("--meter", default="auto", help="power meter of the device worker (auto, estimated, ...)")
    be.add_argument("--exit-layer", type=int, default=0, help="early-exit hints after this layer (0 = 3/4)")
    be.add_argument("--exit-head", help="a trained exit head for the verifier (train-exit-head)")
    be.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a process to load its model")
    be.add_argument("--run-timeout", type=float, default=900.0, help="seconds for one generation")
    be.add_argument("--emulate", metavar="TARGET.json,DRAFT.json",
                    help="emulated compute: the real product on a recording of the real pair, each pass held "
                         "for the time these `specedge profile` profiles give it (greedy; docs/capacity.md)")
    be.add_argument("--local-target", action=argparse.BooleanOptionalAction, default=True,
                    help="also the target decoding alone on the verifier's cores, as llama-cli would (greedy only)")
    be.set_defaults(func=run)


def run(args) -> int:
    """The whole bench: every prompt under every policy on every channel against one verifier
    process, the baselines, the report (table, JSON, plots). Exit 1 when greedy outputs differ
    from cloud-ar's and no near tie explains it."""
    from specedge.device.policy import parse_policy
    from specedge.tools.demo import machine

    configs, policies = _checked_args(args)
    prompts = load_prompts(args.prompts, args.max_prompts)
    device_cores, verifier_cores, pinning = _split_cores()
    print(f"specedge bench: {len(prompts)} prompts x {len(policies)} policies x {len(configs)} channels, "
          f"{args.max_new_tokens} new tokens each; {pinning}", file=sys.stderr, flush=True)

    # A terminated bench still stops its broker and children (the finally in _run_channels).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = Path(tempfile.mkdtemp(prefix="specedge-bench-"))
    models = {"draft": args.draft, "target": args.target}
    emulation = _emulate(args, prompts, logs) if args.emulate else None
    served, draft_backend, results = _run_channels(args, configs, policies, prompts, (device_cores, verifier_cores),
                                                   logs)
    self_test = served["exactness"]
    exit_agreement = None
    if any(parse_policy(p).early_exit for p in policies):
        exit_agreement = _exit_agreement(results, args, logs)
    baseline = None
    if args.local_target and args.temperature == 0:
        baseline = _local_target_baseline(args, prompts, verifier_cores, self_test["block"], logs, results)
    if emulation is not None:
        emulation.update(_emulation_outcome(served, results))
    report = {
        "machine": machine(), "git_revision": _git_revision(), "pinning": pinning,
        # Emulated compute: every figure below is emulated, from the profiles named here.
        "emulated": emulation is not None, "emulation": emulation,
        **models, "draft_weights": args.draft_weights,
        "draft_sources": args.draft_sources,
        "draft_backend": draft_backend, "target_engine": served["engine"],
        "exactness_class": "exact" if self_test["exact"] else "numerical",
        "target_weights": args.target_weights, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "max_draft": args.max_draft,
        "temperature": args.temperature, "energy_profile": args.profile,
        "channels": results,
        # The target alone on the cloud's cores and engine, no device, no network: what llama-cli does.
        "local_target": baseline,
        # Per layer: how often an exit head there names the target's next token, teacher-forced over
        # the generated text (the early-exit policies' live rate is per channel and policy).
        "early_exit_agreement": exit_agreement,
        "outputs_identical": all(r.get("outputs_identical") is not False for r in results.values())
        if args.temperature == 0 else None,
        # The verifier's own claim: every run verified by a target that passed its bitwise self-test.
        "exact": all(m["exact"] for ch in results.values() for m in ch["policies"].values()),
        "target_self_test": self_test,
    }
    if report["exactness_class"] == "numerical" and report["outputs_identical"] is False:
        report["divergences"] = divergences(results, args.target, args.target_weights, self_test)
    _print_table(report)
    _write_outputs(report, args)
    return 0 if report["outputs_identical"] in (True, None) or report.get("divergences", {}).get("near_ties") else 1


def _checked_args(args) -> tuple[list[ChannelConfig], list[str]]:
    """(the channels, the policies) the arguments name, each checked; SystemExit names a wrong one.
    `args.prompts` becomes the prompt file's path."""
    from specedge.config import ConfigError, DraftConfig
    from specedge.device.policy import parse_policy

    args.prompts = prompts_file(args.prompts)
    try:
        configs = bench_channels(args.channel, args.up_trace, args.down_trace, args.seed)
    except ValueError as exc:
        raise SystemExit(f"specedge bench: {exc}") from None
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        parse_policy(p)
    if not 1 <= args.max_draft <= WIRE_MAX_DRAFT:
        raise SystemExit(f"specedge bench: --max-draft must be in 1..{WIRE_MAX_DRAFT}")
    try:
        DraftConfig(sources=args.draft_sources).validate()
    except ConfigError as exc:
        raise SystemExit(f"specedge bench: --draft-sources: {exc}") from None
    return configs, policies


def _emulate(args, prompts: list[str], logs: Path) -> dict:
    """Point the bench at emulated engines on the real pair's recording (specedge/tools/emulate.py);
    what the report says about the emulation."""
    from specedge.tools.emulate import emulation_file

    if args.temperature != 0:
        raise SystemExit("specedge bench: --emulate is greedy only (a recording holds the target's argmax)")
    try:
        path, about = emulation_file(args, prompts, logs)
    except ValueError as exc:
        raise SystemExit(f"specedge bench: {exc}") from None
    args.target = args.draft = str(path)
    args.engine, args.draft_backend, args.local_target = "emulated", "emulated", False
    return about


def _emulation_outcome(served: dict, results: dict) -> dict:
    """Whether this host kept the profiles' times: the verifier's last statistics and the device's
    (kept: the time passes and feeds ran past their profile's is under 5 % of the time they held)."""
    device = [r["emulation"] for ch in results.values() for runs in ch["runs"].values() for r in runs
              if r.get("emulation")]
    target = {version: stats for versions in (served.get("emulation_stats") or {}).values()
              for version, stats in (versions or {}).items()}
    counters = list(target.values()) + device[-1:]
    kept = bool(target) and all(c["late_s"] <= 0.05 * c["held_s"] for c in counters)
    return {"target": target, "device": device[-1] if device else None, "host_kept_up": kept}


def _split_cores() -> tuple[list[int], list[int], str]:
    """(device cores, verifier cores, how they were pinned): half the cores each, so the device's
    drafting and the verifier's passes do not slow each other; one core: shared, not pinned."""
    cores = _cores()
    if len(cores) >= 2:
        half = len(cores) // 2
        device_cores, verifier_cores = cores[:half], cores[half:]
        return device_cores, verifier_cores, f"device on cores {device_cores}, verifier on cores {verifier_cores}"
    return [], [], "one core: device and verifier share it (not pinned)"


def _run_channels(args, configs: list[ChannelConfig], policies: list[str], prompts: list[str],
                  cores: tuple[list[int], list[int]], logs: Path) -> tuple[dict, str, dict]:
    """(what the verifier serves, the device's draft backend, per channel its report): a broker and
    the verifier for the whole run, then each channel in turn; everything stopped on the way out."""
    device_cores, verifier_cores = cores
    broker = MosquittoBroker().start()
    procs = []
    results: dict = {}
    watch = None
    try:
        if args.engine == "emulated":  # the verifier's statistics say whether it kept the profile's times
            watch = StatsWatch(broker.port, every=True)
        verifier = _spawn([sys.executable, "-m", "specedge.cli", "cloud", "run"], verifier_cores, {
            **({"SPECEDGE_VERIFIER_STATS_INTERVAL_S": "1"} if watch else {}),
            "SPECEDGE_MQTT_PORT": str(broker.port), "SPECEDGE_TARGET_MODEL": args.target,
            "SPECEDGE_TARGET_WEIGHTS": args.target_weights, "SPECEDGE_TARGET_ENGINE": args.engine,
            "SPECEDGE_TARGET_BATCH_INVARIANT": str(args.batch_invariant).lower(),
            "SPECEDGE_VERIFIER_FLEET": "bench",
            "SPECEDGE_TARGET_EXIT_LAYER": str(args.exit_layer), "SPECEDGE_TARGET_EXIT_HEAD": args.exit_head or ""},
            logs / "verifier.log")
        procs.append(verifier)
        served = _read_json(verifier, "the verifier", args.start_timeout)["target"]
        bar = progress_bar(len(configs) * len(prompts) * len(policies), "bench", "runs")
        for cfg in configs:
            with ChannelEmulator(cfg, ("127.0.0.1", broker.port)) as channel:
                hello, runs = _run_channel(args, cfg, channel, policies, prompts, device_cores, logs, procs, bar)
            draft_backend = hello["backend"]
            results[cfg.name] = _channel_report(runs, cfg, hello.get("protocol") == "5", args)
        bar.close()
        if watch is not None:
            time.sleep(2.0)  # one more statistics message, after the last pass
            served["emulation_stats"] = {r: s.get("emulation") for r, s in watch.snapshot().items()}
    finally:
        if watch is not None:
            watch.link.stop()
        for proc in procs:
            _stop(proc)
        broker.stop()
    return served, draft_backend, results


def _run_channel(args, cfg: ChannelConfig, channel: ChannelEmulator, policies: list[str], prompts: list[str],
                 device_cores: list[int], logs: Path, procs: list, bar) -> tuple[dict, dict[str, list]]:
    """(the device worker's hello, per policy its runs): a worker process behind `channel`, every
    prompt under every policy, each run on the trace from its start (the clock restarted)."""
    worker = _spawn([sys.executable, "-m", "specedge.tools.bench", "--worker", "--port", str(channel.port),
                     "--draft", args.draft, "--draft-weights", args.draft_weights,
                     "--draft-backend", args.draft_backend, "--draft-sources", args.draft_sources,
                     "--profile", args.profile, "--meter", args.meter, "--max-draft", str(args.max_draft),
                     "--link", CHANNEL_RADIO.get(cfg.name, "lte")],
                    device_cores, {}, logs / f"device-{cfg.name}.log")
    procs.append(worker)
    hello = _read_json(worker, "the device worker", args.start_timeout)
    runs: dict[str, list] = {p: [] for p in policies}
    for i, prompt in enumerate(prompts):
        for policy in policies:
            bar.set_postfix_str(f"{cfg.name} {policy} prompt {i + 1}")
            runs[policy].append(_one_run(args, cfg, channel, worker, prompt, policy))
            bar.update()
    worker.stdin.close()
    _stop(worker)
    return hello, runs


def _one_run(args, cfg: ChannelConfig, channel: ChannelEmulator, worker, prompt: str, policy: str) -> dict:
    """One generation by the worker, with the bytes that crossed the emulated link and the rates the
    trace offered when each round started."""
    channel.restart_clock()
    before = channel.bytes_up + channel.bytes_down
    worker.stdin.write(json.dumps({"prompt": prompt, "policy": policy, "max_new_tokens": args.max_new_tokens,
                                   "temperature": args.temperature}) + "\n")
    worker.stdin.flush()
    r = _read_json(worker, f"{policy} on {cfg.name}", args.run_timeout)
    r["proxy_bytes"] = channel.bytes_up + channel.bytes_down - before
    # What the trace (of the phase then in force) offered when each round started (the clock restarted above).
    rates = [cfg.rates_at(t) for t in r["round_start_s"]]
    r["link_up_bps"], r["link_down_bps"] = [up for up, _ in rates], [down for _, down in rates]
    return r


def _local_target_baseline(args, prompts: list[str], cores: list[int], block: int, logs: Path,
                           results: dict) -> dict:
    """The local-target baseline, whether its outputs equal cloud-ar's, and every policy's speedup
    over it (written into `results`)."""
    print("local-target baseline: the target alone on the verifier's cores ...", file=sys.stderr, flush=True)
    baseline = local_target(args, prompts, cores, block, logs)
    reference = next(iter(results.values()))["runs"].get("cloud-ar") if results else None
    baseline["outputs_identical_to_cloud_ar"] = ([r["tokens"] for r in baseline["runs"]] ==
                                                 [r["tokens"] for r in reference]) if reference else None
    for ch in results.values():
        for m in ch["policies"].values():
            m["speedup_vs_local_target"] = m["tokens_per_s"] / baseline["tokens_per_s"]
    return baseline


def _write_outputs(report: dict, args) -> None:
    """--json, and --plot with its draft-length timeline next to it."""
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        timeline = str(Path(args.plot).with_name(Path(args.plot).stem + "-draft-length.png"))
        plot_draft_lens(report, timeline)
        print(f"wrote {args.plot} and {timeline}", file=sys.stderr)


def top2_gap(engine, prompt: list[int], prefix: list[int]) -> float:
    """The engine's top-2 logit gap for the token after prompt + prefix, as its own generation
    computes it: how near a tie the position where an output parted was."""
    from specedge.cloud.engine import own_rows

    top = own_rows(engine, prompt + prefix, len(prompt))[-1].topk(2).values
    return round(float(top[0] - top[1]), 4)


def near_ties(cases: list[dict], target: str, weights: str, self_test: dict) -> dict:
    """Outputs that parted from the engine's own decoding, each a case {"prompt", "reference",
    "position", labels...}: the engine's top-2 logit gap at the first differing position, as its
    own generation computes it. A gap within twice the self-test's largest block-vs-alone logit difference
    is a near-tie that rounding can flip; an exact engine excuses none, and a wider gap is a bug.
    `self_test` is the verifier's Exactness.describe(); the engine is loaded as it described."""
    from specedge.cloud.registry import TargetSpec, load_target

    worst = max((t["max_abs_diff"] for t in self_test["trials"]), default=0.0)
    limit = 0.0 if self_test["exact"] else 2 * worst
    engine = load_target(TargetSpec(target, target, weights, engine=self_test["engine"]),
                         self_test["invariant"]).model if cases else None
    found = [{**{k: v for k, v in case.items() if k not in ("prompt", "reference")},
              "top2_gap": top2_gap(engine, case["prompt"], case["reference"][:case["position"]])} for case in cases]
    return {"differing_runs": len(found), "near_tie_limit": round(limit, 4), "first_differences": found,
            "near_ties": all(g["top2_gap"] <= limit for g in found)}


def divergences(results: dict, target: str, weights: str, self_test: dict) -> dict:
    """Where a numerical engine's speculative output parted from its own cloud-ar decoding, with
    the top-2 gap there (near_ties)."""
    cases, runs = [], 0
    for channel in results.values():
        reference = [r["tokens"] for r in channel["runs"].get("cloud-ar", [])]
        for name, rs in channel["runs"].items():
            for run, want in zip(rs, reference):
                runs += 1
                at = next((i for i, (a, b) in enumerate(zip(run["tokens"], want)) if a != b), None)
                if at is not None:
                    cases.append({"policy": name, "position": at, "prompt": run["prompt"], "reference": want})
    return {"runs": runs, **near_ties(cases, target, weights, self_test)}


def _exit_agreement(results: dict, args, logs: Path) -> dict:
    sequences = [{"tokens": r["prompt"] + r["tokens"], "skip": r["prompt_tokens"]}
                 for res in results.values() for r in res["runs"].get("cloud-ar") or next(iter(res["runs"].values()))]
    seen, unique = set(), []
    for seq in sequences:  # every channel generates the same greedy text: measure it once
        key = tuple(seq["tokens"])
        if key not in seen:
            seen.add(key)
            unique.append(seq)
    path = logs / "sequences.json"
    path.write_text(json.dumps(unique))
    cmd = [sys.executable, "-m", "specedge.cli", "cloud", "exit-agreement", "--target", args.target,
           "--target-weights", args.target_weights, "--sequences", str(path)]
    if args.exit_head:
        cmd += ["--exit-head", args.exit_head]
    print("measuring early-exit agreement per layer ...", file=sys.stderr, flush=True)
    proc = _spawn(cmd, _cores(), {}, logs / "exit-agreement.log")
    try:
        return _read_json(proc, "the exit-agreement sweep", args.run_timeout)
    finally:
        _stop(proc)


def _channel_report(runs: dict[str, list], cfg, v5: bool, args) -> dict:
    policies = {name: aggregate(rs) for name, rs in runs.items()}
    rate_up, rate_down = cfg.up.mean_rate_bps(), cfg.down.mean_rate_bps()
    # The optimum is the best fixed draft length under the measured costs: acceptance per
    # position from the fixed-length runs (an adaptive policy's early stops bias it), draft
    # and verify costs and network RTT from every speculative run of this channel.
    speculative = [r for name, rs in runs.items() if name != "cloud-ar" for r in rs]
    fixed = [r for name, rs in runs.items() if name.startswith("fixed:") for r in rs] or speculative
    out = {"description": cfg.description,
           "link": {"up_mean_bps": rate_up, "down_mean_bps": rate_down, "one_way_delay_ms": cfg.up.delay_ms,
                    "up_trace": cfg.up.trace_file, "down_trace": cfg.down.trace_file}}
    best = None
    if speculative:
        accept = acceptance_by_position([d for r in fixed for d in r["draft_lens"]],
                                        [k for r in fixed for k in r["accepted_lens"]], args.max_draft)
        drafted = sum(r["drafted"] - r.get("lookup_drafted", 0) for r in speculative)
        t_draft = sum(r["draft_s"] - r.get("draft_prefill_s", 0.0) for r in speculative) / drafted if drafted else 0.0
        # A request's first round also carries the verifier's prefill of the prompt (unless a
        # stream came first): left out, or its seconds would pass for a round's fixed cost.
        warm = [(d + 1, v) for r in speculative
                for d, v in list(zip(r["draft_lens"], r["verify_round_s"]))[0 if _streamed_first(r) else 1:]]
        verify_base, verify_row = fit_line([x for x, _ in warm], [y for _, y in warm])
        rtt = percentile([x for r in speculative for x in r["network_rtt_s"]], 0.5) or 0.0
        best, best_draft_len = optimum(accept, t_draft, verify_base, verify_row, rtt, rate_up, rate_down, v5,
                                       args.max_draft)
        out["optimum"] = {"tokens_per_s": best, "draft_len": best_draft_len, "acceptance_by_position": accept,
                          "draft_ms_per_token": 1000 * t_draft, "verify_ms_base": 1000 * verify_base,
                          "verify_ms_per_row": 1000 * verify_row, "rtt_ms": 1000 * rtt}
    base = policies.get("cloud-ar")
    fixed_rates = {n: m["tokens_per_s"] for n, m in policies.items() if n.startswith("fixed:")}
    best_fixed = max(fixed_rates, key=fixed_rates.get) if fixed_rates else None
    for name, m in policies.items():
        m["optimum_tokens_per_s"] = best
        # The optimum is a rate of rounds: it is compared with the rate after the first token (a
        # whole request's also carries the prefills on both sides, which no draft length changes).
        m["efficiency"] = m["decode_tokens_per_s"] / best if best else None
        m["speedup_vs_cloud_ar"] = m["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        if best_fixed:
            m["vs_best_fixed"] = m["tokens_per_s"] / fixed_rates[best_fixed]
        budget = _budget(name)
        if budget is not None:
            m["energy_budget_j_per_token"] = budget
            m["within_budget"] = m["energy_j_per_token"] <= budget
    out["best_fixed"] = best_fixed
    out["policies"] = policies
    # Raw per-run numbers, so a report can be recomputed without re-running.
    out["runs"] = {name: [{k: v for k, v in r.items() if k != "text"} for r in rs] for name, rs in runs.items()}
    if "cloud-ar" in runs and args.temperature == 0:
        reference = [r["tokens"] for r in runs["cloud-ar"]]
        out["outputs_identical"] = all([r["tokens"] for r in rs] == reference for rs in runs.values())
    return out


def _streamed_first(run: dict) -> bool:
    return bool(run.get("modes")) and run["modes"][0][1] == "stream"


def _budget(policy: str) -> float | None:
    from specedge.device.policy import parse_policy

    return parse_policy(policy).overrides.get("budget_j_per_token")


def _print_table(report: dict) -> None:
    cols = ["tokens_per_s", "speedup_vs_cloud_ar", "vs_best_fixed", "streamed_share", "mean_draft_len",
            "acceptance_rate", "mean_accepted_len", "target_passes_per_token", "wire_bytes_per_token", "rtt_ms",
            "energy_j_per_token", "efficiency", "ahead_hit_rate", "early_exit_agreement", "naive_wire_bytes_per_token",
            "lookup_rounds", "lookup_acceptance"]
    heads = ["tok/s", "vs AR", "vs best", "streamed", "draft", "accept", "acc.len", "passes/t", "bytes/t", "RTT ms",
             "J/tok", "eff.", "ahead", "exit agr", "naive B/t", "lookups", "lk.acc"]
    width = max([12] + [len(p) + 2 for ch in report["channels"].values() for p in ch["policies"]])
    emulation = report.get("emulation")
    if emulation:
        print(f"\nEMULATED compute, not measured: profiles {emulation['target_profile']} (target) and "
              f"{emulation['draft_profile']} (draft) on a recording of {emulation['recorded']['target']} and "
              f"{emulation['recorded']['draft']}; host kept the profiles' times: {emulation.get('host_kept_up')}")
    print(f"\n{'channel':12}{'policy':{width}}" + "".join(f"{h:>9}" for h in heads))
    for name, ch in report["channels"].items():
        for policy, m in ch["policies"].items():
            cells = []
            for c in cols:
                v = m.get(c)
                cells.append(f"{v:>9.3f}" if isinstance(v, float) and v < 1e5 else
                             f"{v:>9.3g}" if isinstance(v, float) else f"{'-' if v is None else v:>9}")
            print(f"{name:12}{policy:{width}}" + "".join(cells))
        if "outputs_identical" in ch:
            print(f"{'':12}outputs identical to cloud-ar: {ch['outputs_identical']}")
    print(f"draft sources {report['draft_sources']}; draft backend {report['draft_backend']}, target engine {report['target_engine']} "
          f"({report['exactness_class']}); exact (every run verified by a target that passed its bitwise "
          f"self-test): {report['exact']}")
    base = report.get("local_target")
    if base:
        print(f"local-target (the target alone on the verifier's cores, {report['target_engine']}): "
              f"{base['tokens_per_s']:.2f} tok/s, ttft {base['ttft_s']:.2f} s; outputs identical to cloud-ar: "
              f"{base['outputs_identical_to_cloud_ar']}")
        for name, ch in report["channels"].items():
            ratios = ", ".join(f"{p} {m['speedup_vs_local_target']:.2f}x" for p, m in ch["policies"].items())
            print(f"{'':12}{name} vs local-target: {ratios}")
    found = report.get("divergences")
    if found:
        print(f"numerical engine: {found['differing_runs']} of {found['runs']} runs part from cloud-ar; top-2 gaps "
              f"there {[g['top2_gap'] for g in found['first_differences']]} (near-tie limit {found['near_tie_limit']}, "
              f"all near-ties: {found['near_ties']})")
    for name, ch in report["channels"].items():
        print(f"channel {name}: {ch['description']}")
    sources = {m["energy_source"] for ch in report["channels"].values() for m in ch["policies"].values()}
    print(f"energy (J/tok) source: {', '.join(sorted(sources))} (estimated unless it names a meter); efficiency = "
          f"tok/s after the first answer over the analytical optimum (best fixed draft length, not pipelined, "
          f"under the measured per-position acceptance and costs); "
          f"ahead = rounds whose drafted-ahead block was kept; exit agr = rounds whose verdict the early-exit "
          f"hint predicted; naive B/t = bytes/token had full fp16 draft distributions been sent")
    layers = report.get("early_exit_agreement")
    if layers:
        cells = ", ".join(f"layer {k}: {v:.3f}" for k, v in layers["agreement"].items())
        print(f"early-exit next-token agreement per layer (of {layers['layers']}, teacher-forced over "
              f"{layers['positions']} generated positions): {cells}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = list(report["channels"])
    policies = list(next(iter(report["channels"].values()))["policies"]) if channels else []
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    width = 0.8 / max(len(policies), 1)
    # Like with like: end-to-end tokens/s (the time to first token in), and the rate after the
    # first answer, which is what the analytical optimum (a rate of rounds) is a rate of.
    panels = ((axes[0], "tokens_per_s", "tokens/s, end to end (TTFT included)"),
              (axes[1], "decode_tokens_per_s", "tokens/s after the first answer"),
              (axes[2], "wire_bytes_per_token", "bytes/token"))
    for ax, key, label in panels:
        for j, policy in enumerate(policies):
            values = [report["channels"][c]["policies"][policy].get(key) or 0.0 for c in channels]
            ax.bar([i + j * width for i in range(len(channels))], values, width, label=policy)
        if key == "decode_tokens_per_s":
            optimum_values = [report["channels"][c].get("optimum", {}).get("tokens_per_s", 0.0) for c in channels]
            ax.scatter([i + 0.4 - width / 2 for i in range(len(channels))], optimum_values, marker="_", s=900,
                       color="black", label="analytical optimum (after the first answer)", zorder=3)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(channels))], channels)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    emulated = ""
    if report.get("emulated"):
        names = (Path(report["emulation"][k]).name for k in ("target_profile", "draft_profile"))
        emulated = f"EMULATED compute (profiles: {', '.join(names)}): "
    fig.suptitle(f"{emulated}specedge bench: {report['draft']} -> {report['target']}, {report['prompts']} prompts x "
                 f"{report['max_new_tokens']} tokens ({report['machine']['cpu']}, {report['pinning']})", fontsize=9)
    links = "\n".join(f"{name}: {report['channels'][name]['description']}" for name in channels)
    fig.text(0.01, 0.01, links, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(channels) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_draft_lens(report: dict, path: str) -> None:
    """Per channel: the draft length each adaptive round chose against the time since the request
    started, over the link rate the trace offered at that moment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = list(report["channels"])
    fig, axes = plt.subplots(len(channels), 1, figsize=(11, 3.2 * max(len(channels), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], channels):
        runs = report["channels"][name]["runs"]
        rates = sorted((t, u, d) for rs in runs.values() for r in rs
                       for t, u, d in zip(r["round_start_s"], r["link_up_bps"], r["link_down_bps"]))
        for policy, rs in runs.items():
            if not policy.startswith("adaptive"):
                continue
            xs = [t for r in rs for t in r["round_start_s"]]
            ys = [draft_len for r in rs for draft_len in r["draft_lens"]]
            dots = ax.scatter(xs, ys, s=10, alpha=0.45, label=f"{policy}: draft length")
            # Where it streamed instead: a bar below zero from each switch to the stream until the
            # next switch (or the request's end); a tick at every switch.
            for r in rs:
                modes = r.get("modes", [])
                ends = [t for t, _ in modes[1:]] + [r["summary"]["total_s"]]
                for (t, mode), end in zip(modes, ends):
                    if mode == "stream":
                        ax.hlines(-1, t, end, color=dots.get_facecolor()[0], lw=4, alpha=0.3)
                ax.scatter([t for t, _ in modes[1:]], [-1] * (len(modes) - 1), marker="|", s=60,
                           color=dots.get_facecolor()[0])
        ax.set_ylabel("draft length (-1: streaming)")
        drawn = [d for policy, rs in runs.items() if policy.startswith("adaptive") for r in rs for d in r["draft_lens"]]
        ax.set_ylim(bottom=-1.5, top=max(drawn, default=0) + 1.5)
        ax.set_title(textwrap.fill(f"{name}: {report['channels'][name]['description']}", 150), fontsize=8)
        ax.grid(alpha=0.3)
        if rates and rates[0][1] is not None:
            twin = ax.twinx()
            twin.plot([r[0] for r in rates], [r[1] / 1e6 for r in rates], color="gray", lw=1, label="uplink Mbit/s")
            twin.plot([r[0] for r in rates], [r[2] / 1e6 for r in rates], color="black", lw=1, ls=":",
                      label="downlink Mbit/s")
            twin.set_ylabel("link rate (Mbit/s, 1 s window)")
            twin.legend(loc="upper right", fontsize=7)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the request started (trace time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--local-target":
        sys.exit(local_target_main(sys.argv[2:]))
    sys.exit("usage: specedge bench ... (this module's --worker mode is started by the bench)")
