"""`specedge cloud`: the verifier service and the target's offline tools.

`cloud run` starts the verifier (cloud/verifier.py) and serves until SIGINT or SIGTERM;
`self-test` runs the verifier's start-up exactness check alone; the exit-head and layer
commands are specedge/exit_head.py's.
"""
from __future__ import annotations

import argparse
import json
import logging

from specedge import exit_head, systemd
from specedge.config import TARGET_ENGINES
from specedge.fetch import DEFAULT_TARGET


def add_parser(sub) -> None:
    c = sub.add_parser("cloud", help="the verifier service")
    csub = c.add_subparsers(dest="cloud_command", required=True)
    cr = csub.add_parser("run")
    cr.add_argument("--config", help="TOML file (see firmware_config/cloud.toml)")
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
    pl = csub.add_parser("prune-layers", help="pick the layers a pruned target version leaves out (block influence)")
    pl.add_argument("--target", default=DEFAULT_TARGET)
    pl.add_argument("--drop", type=int, default=2, help="how many layers to leave out")
    pl.add_argument("--corpus", action="append", help="text file(s); default: the Python standard library")
    pl.add_argument("--passages", type=int, default=8)
    pl.add_argument("--length", type=int, default=128)
    pl.add_argument("--name", default="", help="version name for the registry entry it prints")
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
    ea = csub.add_parser("exit-agreement", help="per-layer early-exit agreement on token sequences")
    ea.add_argument("--target", default=DEFAULT_TARGET)
    ea.add_argument("--target-weights", default="bf16", choices=["bf16", "fp32"])
    ea.add_argument("--sequences", required=True, help='JSON list of {"tokens": [...], "skip": N}')
    ea.add_argument("--layers", help="comma-separated (default: every 4th, 3/4 and n-2)")
    ea.add_argument("--exit-head", help="also a trained head (its own layer)")
    c.set_defaults(func=run)


def run(args) -> int:
    commands = {"run": serve, "train-exit-head": exit_head.train_exit_head_command,
                "prune-layers": exit_head.prune_layers_command, "self-test": self_test,
                "exit-agreement": exit_head.exit_agreement_command}
    return commands[args.cloud_command](args)


def serve(args) -> int:
    """The verifier, from its config file, until SIGINT or SIGTERM."""
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
    systemd.serve_until_signal(f"verifier {cfg.verifier.id} serving {target.name}", verifier.problem,
                               verifier.stop)
    return 0


def self_test(args) -> int:
    """The verifier's start-up exactness check on one target, alone; exit 1 when it is not exact."""
    from specedge.cloud.registry import TargetSpec, load_target
    from specedge.exactness import establish

    target = load_target(TargetSpec(args.target, args.target, args.weights, engine=args.engine), args.batch_invariant)
    result = establish(target.model, args.block)
    spec = target.spec
    print(json.dumps({"target": args.target, "weights": spec.weights, **result.describe()})
          if args.json else f"{args.target} ({spec.engine}, {spec.weights}): {result.summary()}")
    return 0 if result.exact else 1
