"""Command-line options that more than one command takes (`specedge demo`, `bench`, `power`)."""
from __future__ import annotations

import argparse

from specedge.config import TARGET_ENGINES
from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET


def model_options(p: argparse.ArgumentParser) -> None:
    """The draft and target models, their weights, the draft's backend and the target's engine."""
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


def positive_ints(text: str, command: str) -> list[int]:
    """A comma-separated list of positive integers (`--devices 1,4,16`), sorted; else the command
    exits naming the value."""
    try:
        values = sorted({int(v) for v in text.split(",") if v})
    except ValueError:
        raise SystemExit(f"specedge {command}: {text!r} is not a list of integers") from None
    if not values or values[0] < 1:
        raise SystemExit(f"specedge {command}: {text!r} needs positive integers")
    return values
