"""Decoders under fuzzing: every input is decoded or rejected with the decoder's own error.

Each target takes raw bytes and either returns or raises the error its callers
catch and count (WireError, ConfigError, AnnouncementError, ModelFileError);
anything else is a crash. The hypothesis tests (tests/test_fuzz.py) run them in
the default suite; `specedge fuzz TARGET --runs N` runs them coverage-guided
under atheris (libFuzzer), with memory and time limits per input.
"""
from __future__ import annotations

import sys
import tempfile
import tomllib
from pathlib import Path

from specedge.protocol import wire
from specedge.config import CloudConfig, ConfigError, DeviceConfig, build

MAX_INPUT = 64 * 1024


def wire_target(data: bytes) -> None:
    """The MQTT payload decoder both services run on every message."""
    try:
        msg = wire.decode(data)
    except wire.WireError:
        return
    # What decodes must survive encoding and decoding unchanged: no half-parsed state.
    canonical = wire.encode(msg)
    if wire.encode(wire.decode(canonical)) != canonical:
        raise AssertionError(f"{msg!r} does not survive encode + decode")


def config_target(data: bytes) -> None:
    """A config file as the services read it: TOML, then the schema of either service."""
    try:
        values = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    for cls in (DeviceConfig, CloudConfig):
        try:
            build(cls, values, "fuzz", env={})
        except ConfigError:
            pass


def announcement_target(data: bytes) -> None:
    """The retained targets announcement, the command the verifiers follow."""
    from specedge.protocol.announce import Announcement, AnnouncementError

    try:
        Announcement.decode(data).encode()
    except AnnouncementError:
        pass


def _gguf_seed() -> bytes:
    """A tiny valid GGUF file: a starting point the fuzzer mutates (its header, its tables)."""
    from specedge.tiny import write_pair

    with tempfile.TemporaryDirectory() as tmp:
        _, target = write_pair(tmp, n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=16)
        return Path(target).read_bytes()


def gguf_target(data: bytes) -> None:
    """A model file's header and tensor table, as the loader reads them."""
    from specedge.loader import ModelFileError, read_gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        try:
            read_gguf(f.name)
        except ModelFileError:
            pass


TARGETS = {"wire": wire_target, "config": config_target, "announcement": announcement_target,
           "gguf": gguf_target}


def seeds(name: str) -> list[bytes]:
    """Valid inputs for a target, for the fuzzer to start from."""
    if name == "wire":
        from specedge.grammar import grammar_hash
        from specedge.protocol.contract import Contract
        from specedge.speculative import SamplingParams, SparseDist

        import numpy as np

        q = SparseDist(np.array([3, 9], dtype=np.int32), np.array([40000, 25535], dtype=np.uint16))
        return [wire.encode(m) for m in (
            wire.Open(1, 0, [1, 2, 3], SamplingParams(0.7, 20, 0.9, 3), Contract.unchecked(), True, True, "d"),
            wire.Opened(1, 0, "r0", "v1"), wire.Draft(1, 2, 3, [4, 5]), wire.Draft(1, 2, 3, [3], [q]),
            wire.Generate(1, 3, 3, 10), wire.Close(1, 4), wire.Extend(1, 5, 3, [8, 9]), wire.Verdict(1, 2, 3, 1, 7, 99),
            wire.Hint(1, 2, 3, 1, 7, 14), wire.Tokens(1, 3, 0, [5, 6], True), wire.Error(1, 2, 3, "why"),
            wire.Open(1, 0, [1, 2, 3], grammar_hash=grammar_hash("{}"), grammar="{}", grammar_from=2),
            wire.Draft(1, 2, 3, [4, 5], forced=[6, 7]))]
    if name == "config":
        from specedge.resources import resource

        return [p.read_bytes() for p in sorted(resource("firmware_config").glob("*.toml"))]
    if name == "announcement":
        return [b'{"default": "v1", "pins": {"dev0": "v2"}, "versions": {"v1": {}}}']
    if name == "gguf":
        return [_gguf_seed()]
    raise ValueError(f"unknown fuzz target {name!r}; targets: {', '.join(TARGETS)}")


def _instrument_project(atheris) -> None:
    """Coverage for this project's functions only: instrumenting torch too takes minutes."""
    import gc
    import types

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith("specedge"):
            try:
                atheris.instrument_func(obj)
            except Exception:  # a function atheris cannot rewrite keeps running uninstrumented
                pass


def run_atheris(name: str, runs: int, corpus: str | None = None) -> int:
    """Coverage-guided fuzzing of one target under atheris; returns when `runs` inputs ran
    (libFuzzer exits the process with a crash report on the first failing input)."""
    import atheris

    target = TARGETS[name]
    folder = Path(corpus) if corpus else Path(tempfile.mkdtemp(prefix=f"specedge-fuzz-{name}-"))
    folder.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(name)):
        (folder / f"seed-{i}").write_bytes(seed)
    for module in ("specedge.cloud.registry", "specedge.loader"):  # what the targets import lazily
        __import__(module)
    _instrument_project(atheris)
    args = [sys.argv[0], f"-runs={runs}", f"-max_len={MAX_INPUT if name != 'gguf' else 1 << 20}",
            "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1", str(folder)]
    atheris.Setup(args, target)
    atheris.Fuzz()
    return 0


def add_parser(sub) -> None:
    fz = sub.add_parser("fuzz", help="coverage-guided fuzzing of a decoder under atheris (pip install atheris)")
    fz.add_argument("target", help="wire | config | announcement | gguf")
    fz.add_argument("--runs", type=int, default=100_000, help="inputs to run")
    fz.add_argument("--corpus", default="", help="corpus folder (kept between runs)")
    fz.set_defaults(func=run)


def run(args) -> int:
    if args.target not in TARGETS:
        print(f"unknown fuzz target {args.target!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    return run_atheris(args.target, args.runs, args.corpus or None)

