"""`specedge bench-verifier`: one verifier (or a replica group) under many device sessions.

Each device is the real agent (its own MQTT client, binding, failover) with a
replayed draft engine: the drafts the real draft model makes after every
prefix of the target's own greedy output are recorded once, so a hundred
devices cost no drafting. If a session's text leaves the recording (another
target version), the real draft model drafts for it instead. Every session's
output is checked against the target's own greedy decoding.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from specedge.tools.bench import (StatsWatch, _git_revision, _read_json, _split_cores, _stop, load_prompts,
                                  near_ties, pinned_here, prompts_file, spawn_verifier)
from specedge.broker import MosquittoBroker
from specedge.cloud.engine import own_generation
from specedge.device.draft import Drafted, TorchDraftEngine
from specedge.fetch import cache_dir, sha256_file
from specedge.loader import CONVERSION
from specedge.metrics import percentile

FLEET = "bench"


def target_decode(model, prompts: list[list[int]], max_new: int, stop_ids) -> list[list[int]]:
    """The target's own greedy generation of each prompt (cloud/engine.py own_generation), once its
    self-test has fixed how it computes. A verifier compared with it must compute with the same
    product block: pin `[target] block = model.block`."""
    from specedge.exactness import establish

    establish(model)
    return own_generation(model, prompts, max_new, stop_ids)


def record(target, draft_engine, prompts: list[list[int]], max_new: int, draft_len: int, stop_ids) -> list[dict]:
    """Per prompt: the target's output and the draft the engine makes after each prefix of it."""
    from specedge.speculative import SamplingParams

    recordings = []
    for prompt, output in zip(prompts, target_decode(target, prompts, max_new, stop_ids)):
        drafts = []
        draft_engine.start(prompt)
        for k in range(len(output) + 1):
            draft_engine.commit(prompt + output[:k])  # keeps the cache's valid prefix: no re-prefill
            drafts.append(draft_engine.draft(draft_len, SamplingParams(), None, stop_ids).tokens)
        recordings.append({"prompt": prompt, "output": output, "drafts": drafts})
    return recordings


class ReplayDraftEngine:
    """The draft engine interface, answered from a recording where the text matches it and by the
    real draft model where it does not."""

    backend = "replay"

    def __init__(self, recording: dict, fallback: TorchDraftEngine):
        self.prompt, self.output, self.drafts = recording["prompt"], recording["output"], recording["drafts"]
        self.fallback = fallback
        self.committed: list[int] = []
        self.replayed = self.drafted_live = 0

    @property
    def vocab_size(self) -> int:
        return self.fallback.vocab_size

    def start(self, committed: list[int], reuse: bool = True) -> None:
        self.committed = list(committed)
        self._live = False

    def commit(self, committed: list[int]) -> None:
        self.committed = list(committed)

    def _recorded(self) -> list[int] | None:
        k = len(self.committed) - len(self.prompt)
        if 0 <= k < len(self.drafts) and self.committed == self.prompt + self.output[:k]:
            return self.drafts[k]
        return None

    def draft(self, draft_len, params, rng, stop_ids=frozenset(), keep_going=None) -> Drafted:
        recorded = self._recorded()
        if recorded is not None:
            self.replayed += 1
            tokens = recorded[:draft_len]
            self.committed += tokens
            return Drafted(tokens, None, [1.0] * len(tokens))
        self.drafted_live += 1
        if self.fallback.cache is None:
            self.fallback.start(self.committed)
        else:
            self.fallback.commit(self.committed)
        out = self.fallback.draft(draft_len, params, rng, stop_ids, keep_going)
        self.committed += out.tokens
        return out


def _verifier_config(folder: Path, name: str, port: int, args, max_batch: int, block: int) -> Path:
    path = folder / f"{name}.toml"
    registry = f'registry = "{args.registry}"\nversion = "{args.target_version}"\n' if args.registry else ""
    path.write_text(f"""[verifier]
id = "{name}"
max_batch = {max_batch}
batch_window_ms = {args.window_ms}
kv_budget_mb = {args.kv_budget_mb}
stats_interval_s = 0.5

[mqtt]
port = {port}
protocol = "5"

[target]
model = "{args.target}"
engine = "{args.engine}"
batch_invariant = {str(args.batch_invariant).lower()}
weights = "{args.target_weights}"
block = {block}
{registry}""")
    return path


def _replica_cores(cores: list[int], replicas: int) -> list[list[int]]:
    """The verifier's cores dealt out to the replicas, a share each where there are enough (they
    share them all where there are not; none given: unpinned)."""
    if len(cores) >= replicas > 0:
        share = len(cores) // replicas
        return [cores[i * share:(i + 1) * share] for i in range(replicas)]
    return [list(cores)] * replicas


def _start_verifiers(folder: Path, port: int, args, replicas: int, max_batch: int, tag: str, block: int,
                     cores: list[int]) -> list:
    procs = []
    threads = max(1, (os.cpu_count() or 2) // replicas)
    for i, mine in enumerate(_replica_cores(cores, replicas)):
        name = f"{tag}-r{i}"
        cfg = _verifier_config(folder, name, port, args, max_batch, block)
        proc = spawn_verifier(cfg, folder / f"{name}.log", threads, mine)
        proc.replica = name
        procs.append(proc)
    for proc in procs:
        _read_json(proc, f"verifier {proc.replica}", args.start_timeout)
    return procs


def _agents(n: int, port: int, recordings, drafts: list[tuple[str, TorchDraftEngine, object]], args):
    from specedge.config import DeviceConfig, build
    from specedge.device.agent import Agent

    agents = []
    for i in range(n):
        name, engine, tok = drafts[i % len(drafts)]
        cfg = build(DeviceConfig, {"device": {"id": f"dev{i}", "fleet": FLEET}, "mqtt": {"port": port, "protocol": "5"},
                                   "draft": {"name": name}, "energy": {"meter": "estimated", "link": "none"},
                                   "faults": {"round_timeout_s": args.round_timeout}})
        recording = recordings[name][i % len(recordings[name])]
        # Each device its own fallback engine (its own KV cache) over the shared draft weights.
        agents.append((Agent(cfg, ReplayDraftEngine(recording, TorchDraftEngine(engine.model)), tok).start(),
                       recording))
    return agents


def _run_sessions(agents, args, events=(), policy_name: str = "") -> dict:
    """Every agent generates its prompt's continuation at once; `events` are (seconds, callable)."""
    from specedge.device.policy import fixed_policy, parse_policy
    from specedge.speculative import SamplingParams

    results: list = [None] * len(agents)
    policy = parse_policy(policy_name) if policy_name else fixed_policy(args.draft_len)

    def one(i, agent, recording):
        try:
            results[i] = agent.generate(recording["prompt"], SamplingParams(), args.tokens, policy)
        except Exception as exc:  # reported, not raised: a lost session is what the bench looks for
            results[i] = exc
    threads = [threading.Thread(target=one, args=(i, a, r)) for i, (a, r) in enumerate(agents)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for at, action in sorted(events, key=lambda e: e[0]):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        action()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    rounds, tokens, lost, wrong, failovers, versions, differing = [], 0, 0, 0, 0, {}, []
    for (agent, recording), result in zip(agents, results):
        if isinstance(result, Exception):
            lost += 1
            continue
        tokens += len(result.tokens)
        rounds += result.stats.round_trip_s
        failovers += result.stats.failovers
        versions[result.stats.target_version] = versions.get(result.stats.target_version, 0) + 1
        want = recording["output"][:args.tokens]
        if result.tokens != want and not result.stats.version_switches:
            wrong += 1
            at = next((i for i, (a, b) in enumerate(zip(result.tokens, want)) if a != b),
                      min(len(result.tokens), len(want)))
            differing.append({"prompt": recording["prompt"], "reference": want, "position": at})
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "rounds": len(rounds),
            "round_s_p50": percentile(rounds, 0.5), "round_s_p99": percentile(rounds, 0.99),
            "round_s_max": max(rounds) if rounds else None,
            "per_device_tokens_per_s": tokens / wall / len(agents),
            "sessions_lost": lost, "outputs_wrong": wrong, "failovers": failovers, "final_versions": versions,
            "differing": differing,
            "errors": [repr(r) for r in results if isinstance(r, Exception)][:5]}


def _delta(before: dict, after: dict) -> dict:
    passes = sum(s["passes"] for s in after.values()) - sum(s["passes"] for s in before.values())
    tokens = sum(s["tokens"] for s in after.values()) - sum(s["tokens"] for s in before.values())
    rounds = sum(s["rounds"] for s in after.values()) - sum(s["rounds"] for s in before.values())
    return {"target_passes": passes, "verifier_rounds": rounds, "passes_per_token": passes / tokens if tokens else None,
            "sessions_per_pass": rounds / passes if passes else None,
            "queue_s_p99": max((s["queue_s_p99"] or 0) for s in after.values()),
            "compute_s_p99": max((s["compute_s_p99"] or 0) for s in after.values())}


def add_parser(sub) -> None:
    from specedge.config import TARGET_ENGINES
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET

    bv = sub.add_parser("bench-verifier", help="one verifier or a replica group under many devices (JSON + plot)")
    bv.add_argument("--devices", default="1,2,4,8,16,32", help="device counts, comma-separated")
    bv.add_argument("--replicas", default="1,2", help="replica counts, comma-separated")
    bv.add_argument("--cloud-ar", action=argparse.BooleanOptionalAction, default=True,
                    help="also the same verifier decoding for every device (batched cloud-ar): the capacity "
                         "speculation has to beat")
    bv.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the unbatched verifier (max_batch = 1)")
    bv.add_argument("--baseline-devices", type=lambda s: [int(x) for x in s.split(",")],
                    help="device counts for the unbatched baseline (default: all)")
    bv.add_argument("--draft", default=DEFAULT_DRAFT)
    bv.add_argument("--small-draft-head", help="also devices with the draft's first N layers and this trained head")
    bv.add_argument("--target", default=DEFAULT_TARGET)
    bv.add_argument("--registry", default="", help='target registry ("shipped" = cloud/targets.toml)')
    bv.add_argument("--target-version", default="")
    bv.add_argument("--target-weights", default="auto", choices=["auto", "bf16", "fp32"],
                    help="without --registry (a registry names each version's weights)")
    bv.add_argument("--engine", default="auto", choices=TARGET_ENGINES,
                    help="the replicas' target engine (docs/engines.md); every output is compared token for token "
                         "with the engine's own decoding")
    bv.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="--no-batch-invariant: llama.cpp batching rows freely (numerical)")
    bv.add_argument("--prompts", default=None)
    bv.add_argument("--max-prompts", type=int, default=8)
    bv.add_argument("--tokens", type=int, default=32, help="new tokens a session")
    bv.add_argument("--draft-len", type=int, default=4)
    bv.add_argument("--max-batch", type=int, default=16)
    bv.add_argument("--window-ms", type=float, default=5.0)
    bv.add_argument("--kv-budget-mb", type=float, default=4096.0)
    bv.add_argument("--round-timeout", type=float, default=60.0)
    bv.add_argument("--start-timeout", type=float, default=600.0)
    bv.add_argument("--kill-replica-at", type=float, help="seconds into a run: kill -9 one replica (2+ replicas)")
    bv.add_argument("--switch-at", type=float, help="seconds into a run: announce --switch-to for the fleet")
    bv.add_argument("--switch-to", default="", help="the target version to announce")
    bv.add_argument("--emulate", metavar="TARGET.json",
                    help="emulated compute: the replicas answer from the target's recorded greedy path, each pass "
                         "held for this `specedge profile target` profile's time (docs/capacity.md)")
    bv.add_argument("--json")
    bv.add_argument("--plot")
    bv.set_defaults(func=run)


def run(args) -> int:
    """Every replica count x mode (batched, cloud-ar, unbatched) x device count, the devices replaying
    recorded drafts against real verifier processes; the rows, the speedups, JSON and plot."""
    args.prompts = prompts_file(args.prompts)
    devices = [int(d) for d in args.devices.split(",")]
    replica_counts = [int(r) for r in args.replicas.split(",")]
    modes = ["batched"] + (["cloud-ar"] if args.cloud_ar else []) + (["unbatched"] if args.baseline else [])
    print(f"loading {args.draft} and the target for the recording", file=sys.stderr)
    drafts, trained_heads, draft_tok = _load_drafts(args)
    recordings, block, exactness = _recordings(args, drafts, trained_heads, draft_tok)
    folder = Path(tempfile.mkdtemp(prefix="specedge-bench-verifier-"))
    emulation = _emulate(args, draft_tok, folder) if args.emulate else None
    # The devices (this process, its broker) and the replicas on cores of their own, as `specedge
    # bench` pins them: a replica's rows then cost what a profile pinned to its cores measured.
    device_cores, verifier_cores, pinning = _split_cores()
    report = {"machine": {"cpus": os.cpu_count(), "pinning": pinning,
                          "torch_threads_per_replica": "its cores" if verifier_cores else "cores / replicas"},
              "git": _git_revision(), "args": {k: v for k, v in vars(args).items() if k != "func"},
              # Emulated compute: every figure is emulated, from the profile named here.
              "emulated": emulation is not None, "emulation": emulation,
              "drafts": [d[0] for d in drafts], "runs": []}
    with pinned_here(device_cores):
        broker = MosquittoBroker().start()
        watch = StatsWatch(broker.port)
        setup = _Setup(args, folder, broker.port, watch, recordings, drafts, block, exactness, verifier_cores)
        try:
            for replicas in replica_counts:
                for mode in modes:
                    _measure_configuration(setup, replicas, mode, devices, report["runs"])
        finally:
            watch.link.stop()
            broker.stop()
    report["speedup"] = _speedups(report["runs"])
    report["speedup_vs_cloud_ar"] = _speedups(report["runs"], "cloud-ar")
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    if args.plot:
        plot(report, args.plot)
    print(json.dumps({"speedup": report["speedup"], "speedup_vs_cloud_ar": report["speedup_vs_cloud_ar"]}, indent=1))
    return 0


def _load_drafts(args) -> tuple[list, dict, object]:
    """(drafts as (name, engine, tokenizer), sha256 of each trained head by draft name, the draft's
    tokenizer): the draft, and with --small-draft-head its first layers reading out through that head."""
    from specedge.config import model_label
    from specedge.exit_head import load_exit_head
    from specedge.loader import load_named

    draft_model, draft_tok = load_named(args.draft, "int8")
    drafts = [(model_label(args.draft), TorchDraftEngine(draft_model), draft_tok)]
    trained_heads = {}  # draft name -> sha256 of its trained head: part of its recording's key
    if args.small_draft_head:
        head = load_exit_head(draft_model, 1, args.small_draft_head)
        small = draft_model.layer_subset(list(range(head.layer)), (head.down, head.up))
        name = f"{model_label(args.draft)}-l{head.layer}"
        drafts.append((name, TorchDraftEngine(small), draft_tok))
        trained_heads[name] = sha256_file(Path(args.small_draft_head))
    return drafts, trained_heads, draft_tok


def _recordings(args, drafts: list, trained_heads: dict, draft_tok) -> tuple[dict, int, dict]:
    """(recordings by draft name, the product block they were made with, the target's exactness):
    each draft's drafts along the target's output, from the cache when this exact setup was
    recorded before (the target is loaded only when one is missing)."""
    from specedge.cloud.registry import load_target, registry_for
    from specedge.config import TargetConfig
    from specedge.loader import resolve_weights

    tcfg = TargetConfig(model=args.target, engine=args.engine, weights=args.target_weights, registry=args.registry,
                        version=args.target_version)
    specs, default = registry_for(tcfg)
    # The recording is the target's output at the precision the replicas will load.
    specs[default] = replace(specs[default], weights=resolve_weights(specs[default].weights))
    target = None
    prompts = [draft_tok.encode_chat(p) for p in load_prompts(args.prompts, args.max_prompts)]
    recordings, blocks = {}, {}
    for name, engine, tok in drafts:
        key = hashlib.sha256(json.dumps(["blocked", CONVERSION, name, trained_heads.get(name), args.batch_invariant,
                                         specs[default].recipe(), prompts, args.tokens,
                                         args.draft_len]).encode()).hexdigest()[:16]
        path = cache_dir() / "bench" / f"replay-{key}.json"
        if not path.exists():
            target = target or load_target(specs[default], args.batch_invariant)
            print(f"recording {name}'s drafts along {target.name}'s output ({len(prompts)} prompts)", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            recorded = record(target.model, engine, prompts, args.tokens, args.draft_len, draft_tok.stop_ids)
            # The replicas compute with the product block the recording's target decoding used.
            path.write_text(json.dumps({"block": target.model.block, "exactness": target.model.exactness.describe(),
                                        "recordings": recorded}))
        saved = json.loads(path.read_text())
        recordings[name], blocks[name], exactness = saved["recordings"], saved["block"], saved["exactness"]
    if len(set(blocks.values())) > 1:  # recordings cached by runs whose self-tests chose differently
        raise SystemExit(f"recordings made with different product blocks {blocks}: delete {cache_dir() / 'bench'}")
    return recordings, next(iter(blocks.values())), exactness


def _emulate(args, draft_tok, folder: Path) -> dict:
    """Point the replicas at the emulated target (cloud/emulated_target.py) on the real target's
    paths (cached like the drafts' recordings); what the report says about the emulation."""
    from specedge.cloud.registry import load_target, registry_for
    from specedge.config import TargetConfig
    from specedge.emulation import Recording, bundle, read_profile, record_paths

    if args.registry:
        raise SystemExit("specedge bench-verifier: --emulate stands for one target, not a registry")
    try:
        profile = read_profile(args.emulate, "target")
    except ValueError as exc:
        raise SystemExit(f"specedge bench-verifier: {exc}") from None
    tcfg = TargetConfig(model=args.target, engine=args.engine, weights=args.target_weights)
    specs, default = registry_for(tcfg)
    prompts = [draft_tok.encode_chat(p) for p in load_prompts(args.prompts, args.max_prompts)]
    key = hashlib.sha256(json.dumps(["paths", CONVERSION, args.batch_invariant, specs[default].recipe(), prompts,
                                     args.tokens, args.draft_len]).encode()).hexdigest()[:16]
    path = cache_dir() / "bench" / f"paths-{key}.json"
    if not path.exists():
        target = load_target(specs[default], args.batch_invariant)
        print(f"recording {target.name}'s paths for the emulated target", file=sys.stderr)
        recs = record_paths(target.model, prompts, args.tokens, args.draft_len, target.tokenizer.stop_ids)
        about = {"model": args.target, "engine": target.spec.engine, "tokenizer": str(_model_file(args.target)),
                 "vocab_size": target.model.cfg.vocab_size, "max_seq_len": target.model.cfg.max_seq_len,
                 "n_layers": target.model.cfg.n_layers}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"target": about, "recordings": [r.to_json() for r in recs]}))
    saved = json.loads(path.read_text())
    emulation_file = folder / "emulation.json"
    recs = [Recording.from_json(r) for r in saved["recordings"]]
    emulation_file.write_text(json.dumps(bundle(recs, profile, None, saved["target"], None)))
    about = {"emulated": True, "target_profile": args.emulate, "target_profile_machine": profile["machine"]["cpu"],
             "target_profile_engine": profile["engine"], "recorded": {"target": args.target,
                                                                     "engine": saved["target"]["engine"]}}
    args.target, args.engine, args.target_weights = str(emulation_file), "emulated", "auto"
    return about


def _model_file(model: str) -> Path:
    from specedge.fetch import resolve

    return resolve(model)[0]


@dataclass
class _Setup:
    """What every measurement of one bench run shares."""
    args: object
    folder: Path
    port: int  # the broker's
    watch: "StatsWatch"
    recordings: dict
    drafts: list
    block: int
    exactness: dict
    verifier_cores: list[int]  # the replicas' (empty: unpinned, shared with the devices)


def _measure_configuration(setup: _Setup, replicas: int, mode: str, devices: list[int], rows: list) -> None:
    """One replica count in one mode: its verifier processes, then each device count against them
    (a fault run: only the first), a row each appended to `rows`."""
    args = setup.args
    tag = f"{mode[0]}{replicas}x{int(time.time()) % 100000}"
    max_batch = 1 if mode == "unbatched" else args.max_batch  # cloud-ar batches its steps too
    procs = _start_verifiers(setup.folder, setup.port, args, replicas, max_batch, tag, setup.block,
                             setup.verifier_cores)
    try:
        for n in devices:
            if mode == "unbatched" and args.baseline_devices and n not in args.baseline_devices:
                continue
            rows.append(_measure_devices(setup, procs, replicas, mode, n))
            if args.kill_replica_at is not None or args.switch_at is not None:
                _announce(setup.port, None)
                break  # one fault run per configuration
    finally:
        for proc in procs:
            _stop(proc)


def _measure_devices(setup: _Setup, procs: list, replicas: int, mode: str, n: int) -> dict:
    """`n` devices generating at once against `procs` (with the fault events asked for): one row."""
    args, watch = setup.args, setup.watch
    agents = _agents(n, setup.port, setup.recordings, setup.drafts, args)
    events = []
    if args.kill_replica_at is not None and replicas > 1:
        events.append((args.kill_replica_at, lambda p=procs[0]: p.kill()))
    if args.switch_at is not None:
        events.append((args.switch_at, lambda: _announce(setup.port, args.switch_to)))
    watch.follow({p.replica for p in procs})
    before = watch.snapshot()
    result = _run_sessions(agents, args, events, "cloud-ar" if mode == "cloud-ar" else "")
    differing = result.pop("differing")
    # An emulated target answers from the real one's recording: a difference there is no near tie.
    result["near_ties"] = near_ties(differing, args.target, args.target_weights,
                                    setup.exactness) if differing and not args.emulate else None
    time.sleep(1.2)  # the replicas' next statistics
    row = {"mode": mode, "engine": "emulated" if args.emulate else setup.exactness["engine"],
           "exactness_class": "exact" if setup.exactness["exact"] else "numerical",
           "replicas": replicas, "devices": n, **result,
           **_delta(before, watch.snapshot()), "peak_cache_mb": watch.peak_cache_bytes / 2**20,
           "pairs": [p for s in watch.snapshot().values() for p in s["pairs"]]}
    emulated = [e for s in watch.snapshot().values() for e in (s.get("emulation") or {}).values()]
    if emulated:  # whether this host kept the profile's times (cloud/emulated_target.py)
        row["emulation"] = emulated
        row["host_kept_up"] = all(e["late_s"] <= 0.05 * e["held_s"] for e in emulated)
    _print_row(row, mode, replicas, n)
    for agent, _ in agents:
        agent.stop()
    return row


def _print_row(row: dict, mode: str, replicas: int, n: int) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"{mode:9s} replicas={replicas} devices={n:3d}: {f(row['tokens_per_s'], '7.2f')} tok/s, "
          f"{f(row['passes_per_token'], '.3f')} passes/token, round p50 "
          f"{f(row['round_s_p50'], '.2f')}s p99 {f(row['round_s_p99'], '.2f')}s, cache peak "
          f"{row['peak_cache_mb']:.0f} MB, lost {row['sessions_lost']}, wrong {row['outputs_wrong']}, "
          f"failovers {row['failovers']} {' '.join(row['errors'])}", file=sys.stderr)


def _announce(port: int, version: str | None) -> None:
    from specedge.protocol.announce import Announcement
    from specedge.config import MqttConfig
    from specedge.mqtt import Link
    from specedge.protocol import topics

    link = Link(MqttConfig(port=port, protocol="5"), f"bench-operator-{os.getpid()}", lambda *_: None).start()
    payload = Announcement(version).encode() if version else b""
    link.publish(topics.fleet(FLEET, "targets"), payload, retain=True)
    time.sleep(0.2)
    link.stop()


def _speedups(runs: list[dict], over: str = "unbatched") -> dict:
    """Batched speculation's verified tokens/s over the `over` mode's, at each replica and device count:
    "unbatched" (one session a pass) or "cloud-ar" (the same verifier decoding for every device)."""
    out = {}
    for row in runs:
        if row["mode"] != "batched":
            continue
        base = next((r for r in runs if r["mode"] == over and r["replicas"] == row["replicas"]
                     and r["devices"] == row["devices"]), None)
        if base:
            out[f"{row['replicas']}x{row['devices']}"] = row["tokens_per_s"] / base["tokens_per_s"]
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["mode"], r["replicas"]) for r in report["runs"]})
    for mode, replicas in series:
        rows = sorted((r for r in report["runs"] if (r["mode"], r["replicas"]) == (mode, replicas)),
                      key=lambda r: r["devices"])
        label = f"{mode}, {replicas} replica{'s' if replicas > 1 else ''}"
        ax1.plot([r["devices"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=label)
        ax2.plot([r["devices"] for r in rows], [r["round_s_p99"] for r in rows], "o-", label=label)
    for ax, title in ((ax1, "verified tokens/s (all devices)"), (ax2, "p99 round latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend()
    if report.get("emulated"):
        fig.suptitle(f"EMULATED compute (profile {Path(report['emulation']['target_profile']).name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
