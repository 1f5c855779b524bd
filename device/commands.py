"""`specedge device` and `specedge power`: the device's commands.

`device run` generates for prompts on the command line or stdin; `device serve` is the device
service (device/node.py); `device build-engine` builds the draft's ONNX file and TensorRT engine
ahead of time (device/backends.py); `device apply-power-profile` sets the board's power mode
(device/profiles.py); `power` reads the power meter or calibrates a profile (device/power.py).
The library modules hold no command: a command needs the config and the meters and profiles
together, which the library modules would otherwise import from each other.
"""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    dv = sub.add_parser("device", help="the device agent")
    dsub = dv.add_subparsers(dest="device_command", required=True)
    dr = dsub.add_parser("run", help="generate for --prompt (repeatable) or each stdin line")
    dr.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    dr.add_argument("--prompt", action="append")
    ds = dsub.add_parser("serve", help="the device service: local HTTP API (OpenAI-compatible), fleet topics, "
                                       "metrics (docs/fleet.md)")
    ds.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    be = dsub.add_parser("build-engine", help="export the draft to ONNX (checked against PyTorch) and build its "
                                              "TensorRT engine for this GPU, ahead of the first start")
    be.add_argument("--config", help="TOML file (see firmware_config/device.toml)")
    be.add_argument("--tensorrt", action="store_true", help="fail (exit 1) when no TensorRT engine can be built")
    ap = dsub.add_parser("apply-power-profile", help="set the board's power mode from its profile (nvpmodel, "
                                                     "jetson_clocks, fan); --dry-run prints the exact commands")
    ap.add_argument("--config", help="TOML file (its [energy] profile)")
    ap.add_argument("--profile", help="a profile name instead of the config's")
    ap.add_argument("--dry-run", action="store_true")
    dv.set_defaults(func=run)


def run(args) -> int:
    from specedge.device.backends import build_engine_command
    from specedge.device.node import serve_command

    commands = {"run": generate_command, "serve": serve_command, "build-engine": build_engine_command,
                "apply-power-profile": apply_power_profile_command}
    return commands[args.device_command](args)


def apply_power_profile_command(args) -> int:
    """The profile --profile names, or the device config's [energy] profile, applied."""
    from specedge.device import checks
    from specedge.device.profiles import apply_power_profile, get_profile

    cfg = checks.load(args.config)
    profile = get_profile(args.profile or cfg.energy.profile, cfg.energy.profiles or None)
    return apply_power_profile(profile, args.dry_run)


def generate_command(args) -> int:
    """Each --prompt, else each stdin line, generated in turn and streamed to stdout; a summary line
    per request on stderr. Exit 1 when any request failed (the others still run)."""
    from specedge.device import checks
    from specedge.device.agent import Agent
    from specedge.device.request import RequestFailed
    from specedge.device.backends import open_engine
    from specedge.device.policy import parse_policy
    from specedge.progress import say
    from specedge.speculative import SamplingParams

    cfg = checks.load(args.config)
    engine, tok = open_engine(cfg.draft, say)
    agent = Agent(cfg, engine, tok).start()
    gen = cfg.generation
    params = SamplingParams.seeded(gen.temperature, gen.top_k, gen.top_p, gen.seed_or_none)
    policy = parse_policy(cfg.speculation.policy, cfg.speculation.max_draft)
    print(f"device {cfg.device.fleet}/{cfg.device.id}: draft backend {engine.backend}, policy {policy.name}, "
          f"MQTT {agent.status().protocol}", file=sys.stderr)
    prompts = args.prompt or (line.strip() for line in sys.stdin)
    failed = 0
    try:
        for text in prompts:
            if not text:
                continue
            try:
                result = agent.generate(tok.encode_chat(text, gen.system_prompt or None), params,
                                        gen.max_new_tokens, policy, on_tokens=_printer(tok))
            except RequestFailed as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
                failed += 1
                continue
            print()
            print(json.dumps(result.stats.summary()), file=sys.stderr)
    finally:
        agent.stop()
    return 1 if failed else 0


def _printer(tok):
    """The token callback of one request: its text to stdout as it streams. Tokens the target never
    saw (the `draft` fault policy) are dimmed on a terminal, bracketed elsewhere."""
    from specedge.tokenizer import StreamDecoder

    stream = StreamDecoder(tok)

    def show(tokens, verified):
        text = stream.push(tokens)
        if not verified:
            text = f"\x1b[2m{text}\x1b[0m" if sys.stdout.isatty() else f"[[unverified: {text}]]"
        print(text, end="", flush=True)
    return show


# -- `specedge power` -------------------------------------------------------------------------------
def add_power_parser(sub) -> None:
    from specedge.options import model_options

    pw = sub.add_parser("power", help="read the power meter, or calibrate a device profile")
    pw.add_argument("--meter", default="auto", help="auto, jtop, ina3221, rapl or estimated")
    pw.add_argument("--profile", default="orin-nano-15w", help="the profile the estimate falls back to")
    pw.add_argument("--seconds", type=float, default=2.0, help="how long to measure (each phase)")
    pw.add_argument("--calibrate", action="store_true", help="measure idle and draft-decoding watts")
    model_options(pw)
    pw.set_defaults(func=power_command)


def power_command(args) -> int:
    """Read the power meter; with --calibrate, measure this board's idle and drafting watts."""
    from specedge.device.power import EstimatedMeter, calibrate, open_meter, read_watts
    from specedge.device.profiles import get_profile

    meter = open_meter(args.meter, get_profile(args.profile))
    try:
        if not args.calibrate:
            print(json.dumps(read_watts(meter, args.seconds), indent=2))
            return 0
        if isinstance(meter, EstimatedMeter):
            raise SystemExit("specedge power --calibrate needs a hardware meter (jtop, ina3221 or rapl); "
                             "this machine only has the estimate")
        from specedge.loader import load_named

        model, _ = load_named(args.draft, args.draft_weights)
        idle, active = calibrate(meter, model, args.seconds)
        print(json.dumps({"source": meter.source, "idle_w": round(idle, 2), "active_w": round(active, 2),
                          "note": "put these in your [profile.*] of firmware_config/profiles.toml"}, indent=2))
    finally:
        meter.close()
    return 0
