"""`specedge profile target|draft`: what one engine costs where it runs, as one JSON with the
machine described: the input of emulated compute (specedge/emulation.py) and `specedge plan`.

  target  decode ms per row by context; prompt ms per token by prompt length (in the engine's
          own prompt calls); the ms of a verify pass of S sessions x k rows on a grid at
          base_context (cells past the time budget, or past what the engine holds, are left
          out with the reason); bytes per cached position.
  draft   the backend's feed: one token (a draft step) by context, and n tokens at once (a
          prefill, or the catch-up after a verdict) per token by n; bytes per cached position.

Each figure is the median of its repeats, measured in this process on the cores it may run on
(--cpus pins them: the bench pins the verifier and the device to a core each). `--random-shape`
profiles a real model's shape with random weights made here, where the weights cannot be, and
says so in the profile.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from specedge.tools.assumed import BYTES_PER_WEIGHT, HARDWARE, assumed_profile
from specedge.emulation import PROFILE_FORMAT

# Real shapes (the models' config.json), for --random-shape.
SHAPES = {
    "tiny": dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128),
    "qwen2.5-0.5b": dict(n_layers=24, dim=896, n_heads=14, n_kv_heads=2, ffn_dim=4864, vocab_size=151936),
    "qwen2.5-1.5b": dict(n_layers=28, dim=1536, n_heads=12, n_kv_heads=2, ffn_dim=8960, vocab_size=151936),
    "qwen2.5-7b": dict(n_layers=28, dim=3584, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064),
}
GRID = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (32, 128, 512, 1024, 2048)
PREFILL_ROWS = (2, 4, 8, 32, 128, 512, 1024)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 4)


def _prompt_repeats(repeats: int) -> int:
    """Repeats of a prompt's timing: half a step's (a 1024-token prompt is a thousand steps)."""
    return max(1, repeats // 2)


def _canary(vocab: int, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def profile_target(engine, contexts=CONTEXTS, prefill_rows=PREFILL_ROWS, sessions=GRID, rows=GRID,
                   base_context: int = 128, budget_s: float = 300.0, repeats: int = 5) -> dict:
    """A target engine's profile (see the module's docstring)."""
    from specedge.cloud.session import position_bytes

    longest = max(list(contexts) + list(prefill_rows) + [base_context + max(rows)]) + 2
    tokens = _canary(engine.cfg.vocab_size, min(longest, engine.cfg.max_seq_len))
    contexts = [c for c in contexts if c + 1 < len(tokens)]
    decode, per_token = _decode_and_prefill(engine, tokens, contexts, [n for n in prefill_rows if n < len(tokens)],
                                            repeats)
    grid = _verify_grid(engine, tokens, sessions, rows, base_context, budget_s, repeats)
    return {"format": PROFILE_FORMAT, "kind": "target", "engine": engine.engine, "decode_ms": decode,
            "prefill_ms_per_token": per_token, "base_context": base_context, "verify": grid,
            # A longer context costs every row (the exact engines attend per row: llama.cpp a call a
            # row, the reference per query), or every session once (a batched engine's pass).
            "context_cost": "per_row" if engine.batch_invariant else "per_session",
            "prompt_batch": getattr(engine, "prompt_batch", 0),
            "bytes_per_position": position_bytes(engine),
            "shape": {"vocab_size": engine.cfg.vocab_size, "n_layers": engine.cfg.n_layers,
                      "max_seq_len": engine.cfg.max_seq_len}}


def _prefill(engine, cache, tokens: list[int], n: int) -> None:
    from specedge.cloud.engine import prefill_calls

    cache.truncate(0)
    engine.forward_batch([(tokens[:n], cache)], keep=[1], calls=[prefill_calls(engine, n)])


def _decode_and_prefill(engine, tokens, contexts, prefill_rows, repeats) -> tuple[dict, dict]:
    """({context: ms of one row after it}, {n: ms per token of an n-token prompt}), on caches that
    are gone when this returns (an engine holds only so many). The rows go round the contexts,
    one each per repeat: a slow spell of this shared machine then costs each context one sample,
    where a context's repeats in a row once read 143 and 211 ms between 78 and 87 (2 threads)."""
    caches = {}
    for context in contexts:
        caches[context] = cache = engine.new_cache(capacity=context + 8)
        _prefill(engine, cache, tokens, context)
        _step(engine, cache, tokens, context)  # warm: the first call at a length allocates
    samples = {context: [] for context in contexts}
    for _ in range(repeats):
        for context, cache in caches.items():
            samples[context].append(_median_ms(lambda: _step(engine, cache, tokens, context), 1))
    decode = {str(c): round(statistics.median(v), 4) for c, v in samples.items()}
    caches.clear()
    cache = engine.new_cache(capacity=len(tokens))
    per_token = {str(n): round(_median_ms(lambda: _prefill(engine, cache, tokens, n), _prompt_repeats(repeats)) / n, 4)
                 for n in prefill_rows}
    cache.truncate(0)
    return decode, per_token


def _step(engine, cache, tokens: list[int], context: int) -> None:
    engine.forward([tokens[context]], cache)
    cache.truncate(context)


def _verify_grid(engine, tokens, sessions, rows, base: int, budget_s: float, repeats: int) -> dict:
    """ms of S sessions x k rows at `base` cached positions each, cells fewest rows first, until the
    budget is spent (a cell is skipped when the costliest row so far says it would not fit)."""
    limit = getattr(engine, "max_sessions", None) or max(sessions)
    caches = []
    ms: list[list] = [[None] * len(rows) for _ in sessions]
    skipped = {}
    per_row, t_start = 0.0, time.perf_counter()
    for s, k in sorted(((s, k) for s in sessions for k in rows), key=lambda c: (c[0] * c[1], c[0])):
        if s > limit:
            skipped[f"{s}x{k}"] = f"the engine holds {limit} sessions at once"
            continue
        n = repeats if per_row * s * k < 1000 else 1
        if time.perf_counter() - t_start + per_row * s * k * n / 1000 > budget_s:
            skipped[f"{s}x{k}"] = "time budget"
            continue
        while len(caches) < s:
            caches.append(engine.new_cache(capacity=base + max(rows) + 8))
        for c in caches[:s]:
            if c.length != base:  # new, or its cells went to another session
                _prefill(engine, c, tokens, base)

        def verify():
            engine.forward_batch([(tokens[base:base + k], c) for c in caches[:s]], keep=[k] * s)
            for c in caches[:s]:
                c.truncate(base)
        ms[sessions.index(s)][rows.index(k)] = t = _median_ms(verify, n)
        per_row = max(per_row, t / (s * k))
    return {"context": base, "sessions": list(sessions), "rows": list(rows), "ms": ms, "skipped": skipped}


def profile_draft(engine, contexts=CONTEXTS, prefill_rows=PREFILL_ROWS, repeats: int = 5) -> dict:
    """A draft backend's profile: its `_feed` of one token by context, of n tokens per token."""
    contexts = [c for c in contexts if engine._room(c + 8)]
    prefill_rows = [n for n in prefill_rows if engine._room(n + 8)]
    tokens = _canary(engine.vocab_size, max(max(contexts), max(prefill_rows)) + 2)
    decode = {}
    for context in contexts:
        engine._reset(context + 8)
        engine._feed(tokens[:context])

        def step():
            engine._feed([tokens[context]])
            engine._truncate(context)
        step()
        decode[str(context)] = _median_ms(step, repeats)

    def prefill(n):
        engine._reset(n + 8)
        engine._feed(tokens[:n])
    per_token = {str(n): round(_median_ms(lambda: prefill(n), _prompt_repeats(repeats)) / n, 4) for n in prefill_rows}
    return {"format": PROFILE_FORMAT, "kind": "draft", "engine": engine.backend, "decode_ms": decode,
            "prefill_ms_per_token": per_token, "bytes_per_position": _draft_bytes(engine),
            "shape": {"vocab_size": engine.vocab_size}}


def _draft_bytes(engine) -> int:
    from specedge.cloud.session import position_bytes

    model = getattr(engine, "model", None)
    if model is not None:
        return position_bytes(model)
    llm = getattr(engine, "llm", None)
    if llm is not None:  # f16 keys and values: 2 x layers x kv heads x head dim x 2 bytes
        meta = llm.metadata
        arch = meta.get("general.architecture", "qwen2")
        layers, heads = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count_kv"])
        dim = int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])
        return 2 * layers * heads * dim * 2
    return 0


def random_model(shape: str, folder: Path) -> Path:
    """A GGUF of a real model's shape with random weights, written here: Q8_0 matrices (the tiny
    models' format), its tokenizer the tiny one's. Made in f32 first: the 7B's needs ~30 GB."""
    from specedge.tiny import tiny_vocab, tiny_weights, write_gguf

    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size", len(tiny_vocab()[0]))
    context = 2048 if shape == "tiny" else 32768  # the real models' trained context
    return write_gguf(folder / f"random-{shape}.gguf", tiny_weights(0, vocab_size=vocab, **dims), **dims,
                      context=context)


def machine_here() -> dict:
    from specedge.tools.demo import machine

    return {**machine(), "cpus": sorted(os.sched_getaffinity(0))}


def add_parser(sub) -> None:
    from specedge.config import TARGET_ENGINES
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET

    p = sub.add_parser("profile", help="measure what a target or draft engine costs here (JSON for emulation)")
    p.add_argument("kind", choices=["target", "draft"])
    p.add_argument("--model", help=f"registry name or path (default: {DEFAULT_TARGET} / {DEFAULT_DRAFT})")
    p.add_argument("--random-shape", choices=sorted(SHAPES),
                   help="profile this real shape with random weights made here, not a model file")
    p.add_argument("--engine", default="auto", choices=TARGET_ENGINES, help="the target's engine")
    p.add_argument("--backend", default="auto", help="the draft's backend (docs/device.md)")
    p.add_argument("--weights", default="auto", help="the torch engine's weights (target), the draft's (int8)")
    p.add_argument("--cpus", help="pin to these cores first (e.g. 1, or 0-3): the cores it will run on")
    p.add_argument("--sessions", default=",".join(map(str, GRID)))
    p.add_argument("--rows", default=",".join(map(str, GRID)))
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--prefill-rows", default=",".join(map(str, PREFILL_ROWS)))
    p.add_argument("--base-context", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for the verify grid")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--assumed", choices=sorted(HARDWARE),
                   help="measure nothing: the roofline of this machine's published figures for --shape "
                        "(specedge/tools/assumed.py), labelled an assumption")
    p.add_argument("--shape", choices=sorted(k for k, v in SHAPES.items() if "vocab_size" in v),
                   help="with --assumed: the model's shape")
    p.add_argument("--dtype", default="bf16", choices=sorted(BYTES_PER_WEIGHT), help="with --assumed: the weights'")
    p.add_argument("--json", required=True, help="write the profile here")
    p.set_defaults(func=run)


def _ints(text: str) -> list[int]:
    from specedge.options import positive_ints

    return positive_ints(text, "profile")


def _cpus(text: str) -> set[int]:
    out = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def run(args) -> int:
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET

    if args.assumed:
        if not args.shape:
            raise SystemExit("specedge profile: --assumed needs --shape")
        out = assumed_profile(args.kind, args.assumed, args.shape, args.dtype, _ints(args.contexts),
                              _ints(args.prefill_rows), _ints(args.sessions), args.base_context)
        return _write(out, args.json)

    if args.cpus:
        try:
            os.sched_setaffinity(0, _cpus(args.cpus))
        except (ValueError, OSError) as exc:
            raise SystemExit(f"specedge profile: --cpus {args.cpus}: {exc}") from None
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    grid = dict(contexts=_ints(args.contexts), prefill_rows=_ints(args.prefill_rows), repeats=max(1, args.repeats))
    with tempfile.TemporaryDirectory(prefix="specedge-profile-") as tmp:
        model = str(random_model(args.random_shape, Path(tmp))) if args.random_shape else args.model
        if args.kind == "target":
            from specedge.cloud.engine import open_engine, resolve_engine, weights_held
            from specedge.fetch import resolve

            path, sha = resolve(model or DEFAULT_TARGET)
            engine_name = resolve_engine(args.engine, path)
            if engine_name == "emulated":
                raise SystemExit("specedge profile: an emulated engine's profile is the one it was given")
            engine, _ = open_engine(engine_name, path, sha, weights_held(engine_name, args.weights), True)
            out = profile_target(engine, sessions=_ints(args.sessions), rows=_ints(args.rows),
                                 base_context=args.base_context, budget_s=args.budget_s, **grid)
        else:
            from specedge.config import DraftConfig
            from specedge.device.backends import open_engine

            weights = "int8" if args.weights == "auto" else args.weights
            engine, _ = open_engine(DraftConfig(model=model or DEFAULT_DRAFT, weights=weights, backend=args.backend))
            out = profile_draft(engine, **grid)
    out.update(repeats=grid["repeats"],
               model=args.random_shape or model or (DEFAULT_TARGET if args.kind == "target" else DEFAULT_DRAFT),
               weights="random, Q8_0 (made here: the shape only)" if args.random_shape else "the model file's",
               emulated=False, machine=machine_here())
    return _write(out, args.json)


def _write(out: dict, path: str) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("kind", "engine", "decode_ms", "prefill_ms_per_token")}), file=sys.stdout)
    return 0
