"""`specedge device`: the device agent's commands.

`run` generates for prompts on the command line or stdin (here); `serve` is the device
service (device/node.py); `build-engine` builds the draft's ONNX file and TensorRT engine
ahead of time (device/backends.py); `apply-power-profile` sets the board's power mode
(device/profiles.py).
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
    from specedge.device.profiles import apply_power_profile_command

    commands = {"run": generate_command, "serve": serve_command, "build-engine": build_engine_command,
                "apply-power-profile": apply_power_profile_command}
    return commands[args.device_command](args)


def generate_command(args) -> int:
    """Each --prompt, else each stdin line, generated in turn and streamed to stdout; a summary line
    per request on stderr. Exit 1 when any request failed (the others still run)."""
    from specedge.device import checks
    from specedge.device.agent import Agent, RequestFailed
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
