"""`specedge profile target|draft`: what one engine costs where it runs, as one JSON with the
machine described: the input of emulated compute (specedge/emulation.py) and `specedge plan`.

  target  decode ms per row by context; prompt ms per token by prompt length (in the engine's
          own prompt calls); the ms of a verify pass of S sessions x k rows on a grid at
          base_context (cells past the time budget, or past what the engine holds, are left
          out with the reason); bytes per cached position.
  draft   the backend's feed: one token (a draft step) by context, and n tokens at once (a
          prefill, or the catch-up after a verdict) per token by n; bytes per cached position.

Each figure is the median of its repeats, measured in this process on the cores it may run on
(--cpus pins them: the bench pins the verifier and the device to a core each); the repeats go
round the figures (_round_robin). `merge` makes one profile of several taken at different times
(merge_profiles). `--random-shape`
profiles a real model's shape with random weights made here, where the weights cannot be, and
says so in the profile: with `--engine torch` the weights are made in memory on `--device` (a GPU
needs no file), with llama.cpp as a Q8_0 GGUF.
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

from specedge.tools.assumed import BYTES_PER_WEIGHT, HARDWARE, SHAPES, TIED, assumed_profile
from specedge.emulation import PROFILE_FORMAT

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


def _round_robin(fns: dict, repeats: int, before=None, samples: dict | None = None) -> dict:
    """{key: median ms of fns[key]} over `repeats` rounds, each round timing every fn once in turn
    (`before(key)`, untimed, first), with any `samples` already taken: a slow spell of a shared
    machine then costs every figure one sample, where a figure's repeats in a row once took all of
    it (a context's decode rows read 143 and 211 ms between 78 and 87; a 4-row and an 8-row
    verify 149 and 179 ms a row beside 133 for one, and an emulated bench then ran a fifth slow)."""
    samples = {key: list((samples or {}).get(key, ())) for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if before is not None:
                before(key)
            samples[key].append(_median_ms(fn, 1))
    return {key: round(statistics.median(v), 4) for key, v in samples.items()}


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
    """({context: ms of one row after it}, {n: ms per token of an n-token prompt}), each figure
    timed once a round (_round_robin), on caches that are gone when this returns (an engine holds
    only so many)."""
    caches = {}
    for context in contexts:
        caches[context] = cache = engine.new_cache(capacity=context + 8)
        _prefill(engine, cache, tokens, context)
        _step(engine, cache, tokens, context)  # warm: the first call at a length allocates
    decode = _round_robin({str(c): (lambda c=c: _step(engine, caches[c], tokens, c)) for c in contexts}, repeats)
    caches.clear()
    cache = engine.new_cache(capacity=len(tokens))
    prompt = _round_robin({n: (lambda n=n: _prefill(engine, cache, tokens, n)) for n in prefill_rows},
                          _prompt_repeats(repeats))
    cache.truncate(0)
    return decode, {str(n): round(ms / n, 4) for n, ms in prompt.items()}


def _step(engine, cache, tokens: list[int], context: int) -> None:
    engine.forward([tokens[context]], cache)
    cache.truncate(context)


def _verify_grid(engine, tokens, sessions, rows, base: int, budget_s: float, repeats: int) -> dict:
    """ms of S sessions x k rows at `base` cached positions each. Cells are taken fewest rows first
    while all their repeats fit the budget (the costliest row so far says what a cell will take),
    each timed once; then the rest of the repeats go round the cells taken (_round_robin)."""
    limit = getattr(engine, "max_sessions", None) or max(sessions)
    caches: list = []
    cells, skipped, first = {}, {}, {}  # first: each cell's sample as it was taken
    per_row, owed_s, t_start = 0.0, 0.0, time.perf_counter()  # owed: the repeats of cells taken

    def ready(cell) -> None:  # every session of the cell at `base` positions, untimed
        while len(caches) < cell[0]:
            caches.append(engine.new_cache(capacity=base + max(rows) + 8))
        for c in caches[:cell[0]]:
            if c.length != base:  # new, or its cells went to another session
                _prefill(engine, c, tokens, base)

    def verify(s, k) -> None:
        engine.forward_batch([(tokens[base:base + k], c) for c in caches[:s]], keep=[k] * s)
        for c in caches[:s]:
            c.truncate(base)

    for s, k in sorted(((s, k) for s in sessions for k in rows), key=lambda c: (c[0] * c[1], c[0])):
        if s > limit:
            skipped[f"{s}x{k}"] = f"the engine holds {limit} sessions at once"
            continue
        if time.perf_counter() - t_start + owed_s + per_row * s * k * repeats / 1000 > budget_s:
            skipped[f"{s}x{k}"] = "time budget"
            continue
        cells[s, k] = lambda s=s, k=k: verify(s, k)
        first[s, k] = [_round_robin({(s, k): cells[s, k]}, 1, ready)[s, k]]
        per_row = max(per_row, first[s, k][0] / (s * k))
        owed_s += first[s, k][0] * (repeats - 1) / 1000
    ms: list[list] = [[None] * len(rows) for _ in sessions]
    for (s, k), t in _round_robin(cells, repeats - 1, ready, first).items():
        ms[sessions.index(s)][rows.index(k)] = t
    return {"context": base, "sessions": list(sessions), "rows": list(rows), "ms": ms, "skipped": skipped}


def profile_draft(engine, contexts=CONTEXTS, prefill_rows=PREFILL_ROWS, repeats: int = 5) -> dict:
    """A draft backend's profile: its `_feed` of one token by context, of n tokens per token. A
    context's steps are timed in a row: the backend holds one cache, and going round the contexts
    would feed each again (up to 2,048 tokens) between its samples."""
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
    prompt = _round_robin({n: (lambda n=n: prefill(n)) for n in prefill_rows}, _prompt_repeats(repeats))
    per_token = {str(n): round(ms / n, 4) for n, ms in prompt.items()}
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


# What profiles merged must share: one engine, model and machine, measured the same way.
SAME = ("kind", "engine", "model", "weights", "bytes_per_position", "base_context", "context_cost",
        "prompt_batch", "shape")


def merge_profiles(profiles: list[dict], names: list[str]) -> dict:
    """One profile of several of the same engine on the same machine taken at different times:
    every figure the median of theirs. A shared host's speed drifts (a 1.5B row 111 ms in one
    quarter hour, 144 in the next), so an emulation held to real runs spread over an hour needs
    the host of that hour, not of one moment in it: profile between the runs and merge."""
    if len(profiles) < 2:
        raise ValueError("merging takes two profiles or more")
    first = profiles[0]
    for name, prof in zip(names, profiles):
        if prof.get("emulated") or prof.get("assumed"):
            raise ValueError(f"{name}: only measured profiles merge")
        for key in SAME:
            if prof.get(key) != first.get(key):
                raise ValueError(f"{name}: its {key} is {prof.get(key)!r}, {names[0]}'s {first.get(key)!r}")
        if (prof.get("machine") or {}).get("cpu") != (first.get("machine") or {}).get("cpu"):
            raise ValueError(f"{name}: measured on another machine than {names[0]}")
        for table in ("decode_ms", "prefill_ms_per_token"):
            if set(prof[table]) != set(first[table]):
                raise ValueError(f"{name}: its {table} has other points than {names[0]}'s")
        if bool(prof.get("verify")) != bool(first.get("verify")) or prof.get("verify") and any(
                prof["verify"][axis] != first["verify"][axis] for axis in ("context", "sessions", "rows")):
            raise ValueError(f"{name}: its verify grid has other cells than {names[0]}'s")

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 4) if values else None

    out = {**first, "merged_from": [{"file": n, "measured_at": p.get("measured_at")} for n, p in zip(names, profiles)],
           "repeats": sum(p.get("repeats", 1) for p in profiles)}
    for table in ("decode_ms", "prefill_ms_per_token"):
        out[table] = {k: median([p[table][k] for p in profiles]) for k in first[table]}
    if first.get("verify"):
        grid = first["verify"]
        out["verify"] = {**grid, "ms": [[median([p["verify"]["ms"][i][j] for p in profiles])
                                         for j in range(len(grid["rows"]))] for i in range(len(grid["sessions"]))],
                         "skipped": {k: v for p in profiles for k, v in p["verify"]["skipped"].items()}}
    out.pop("measured_at", None)
    return out


def random_model(shape: str, folder: Path) -> Path:
    """A GGUF of a real model's shape with random weights, written here: Q8_0 matrices (the tiny
    models' format), its tokenizer the tiny one's. Made in f32 first: the 7B's needs ~30 GB."""
    from specedge.tiny import tiny_vocab, tiny_weights, write_gguf

    dims = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size", len(tiny_vocab()[0]))
    context = 2048 if shape == "tiny" else 32768  # the real models' trained context
    return write_gguf(folder / f"random-{shape}.gguf", tiny_weights(0, vocab_size=vocab, **dims), **dims,
                      context=context)


def shape_params(shape: str) -> int:
    """Weights of a shape, counted: what its random model needs in memory (x 2 bytes in bf16)."""
    d = dict(SHAPES[shape])
    vocab = d.get("vocab_size", 512)
    kv = d["dim"] // d["n_heads"] * d["n_kv_heads"]
    layer = d["dim"] * (d["dim"] + 2 * kv) + d["dim"] ** 2 + 3 * d["dim"] * d["ffn_dim"]
    return d["n_layers"] * layer + vocab * d["dim"] * (1 if shape in TIED else 2)


class _Made(dict):
    """Weights made when the model asks for each, and not kept here: the model's own forms (its
    fused qkv and gate-up products) are then the only copies in memory, not twice a 32B's."""

    def __init__(self, shapes: dict, make):
        super().__init__()
        self.shapes, self.make = shapes, make

    def __getitem__(self, name):
        return self.make(name, self.shapes[name])

    def __contains__(self, name):
        return name in self.shapes

    def get(self, name, default=None):
        return self[name] if name in self.shapes else default


def random_qwen2(shape: str, device: str = "cpu", dtype=torch.bfloat16, seed: int = 0):
    """The torch engine on a real model's shape with random weights made where it computes (on a
    GPU straight in its memory: no file, no download, no 30 GB of f32 first). Compute does not
    depend on the weights' values; acceptance does, and comes from recordings of the real pair."""
    from specedge.model import ModelConfig, Qwen2

    d = dict(SHAPES[shape])
    cfg = ModelConfig(vocab_size=d.pop("vocab_size", 512), max_seq_len=32768, tie_embeddings=shape in TIED, **d)
    gen = torch.Generator(device=device).manual_seed(seed)
    dim, ffn, kv = cfg.dim, cfg.ffn_dim, cfg.head_dim * cfg.n_kv_heads
    shapes = {"token_embd.weight": (cfg.vocab_size, dim), "output_norm.weight": (dim,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, dim)
    for i in range(cfg.n_layers):
        p = f"blk.{i}"
        shapes.update({f"{p}.attn_q.weight": (dim, dim), f"{p}.attn_k.weight": (kv, dim), f"{p}.attn_v.weight": (kv, dim),
                       f"{p}.attn_q.bias": (dim,), f"{p}.attn_k.bias": (kv,), f"{p}.attn_v.bias": (kv,),
                       f"{p}.attn_output.weight": (dim, dim), f"{p}.ffn_gate.weight": (ffn, dim),
                       f"{p}.ffn_up.weight": (ffn, dim), f"{p}.ffn_down.weight": (dim, ffn),
                       f"{p}.attn_norm.weight": (dim,), f"{p}.ffn_norm.weight": (dim,)})

    def make(name, size):
        if name.endswith("norm.weight"):
            return torch.ones(size, device=device)
        return torch.randn(size, generator=gen, device=device, dtype=dtype) * 0.02

    return Qwen2(cfg, _Made(shapes, make), dtype, batch_invariant=True, device=device)


def machine_here() -> dict:
    from specedge.tools.demo import machine

    return {**machine(), "cpus": sorted(os.sched_getaffinity(0))}


def add_parser(sub) -> None:
    from specedge.config import TARGET_ENGINES
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET

    p = sub.add_parser("profile", help="measure what a target or draft engine costs here (JSON for emulation)")
    p.add_argument("kind", choices=["target", "draft", "merge"],
                   help="merge: one profile of the PROFILES given, every figure their median (merge_profiles)")
    p.add_argument("profiles", nargs="*", metavar="PROFILES", help="with merge: the profiles to merge")
    p.add_argument("--model", help=f"registry name or path (default: {DEFAULT_TARGET} / {DEFAULT_DRAFT})")
    p.add_argument("--random-shape", choices=sorted(SHAPES),
                   help="profile this real shape with random weights made here, not a model file")
    p.add_argument("--engine", default="auto", choices=TARGET_ENGINES, help="the target's engine")
    p.add_argument("--backend", default="auto", help="the draft's backend (docs/device.md)")
    p.add_argument("--weights", default="auto", help="the torch engine's weights (target), the draft's (int8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the torch engine computes (auto: a CUDA GPU where torch sees one)")
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

    if args.kind == "merge":
        from specedge.emulation import read_json

        try:
            profiles = [read_json(f, PROFILE_FORMAT, "profile", "`specedge profile`") for f in args.profiles]
            return _write(merge_profiles(profiles, args.profiles), args.json)
        except ValueError as exc:
            raise SystemExit(f"specedge profile merge: {exc}") from None
    if args.profiles:
        raise SystemExit(f"specedge profile {args.kind}: profiles are given to merge only")
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
    from specedge.loader import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"specedge profile: --device: {exc}") from None
    weights = "the model file's"
    if args.kind == "target" and args.random_shape and args.engine == "torch":
        # the torch engine takes its random weights in memory, on its device: no file, no f32 copy
        engine = random_qwen2(args.random_shape, device)
        out = profile_target(engine, sessions=_ints(args.sessions), rows=_ints(args.rows),
                             base_context=args.base_context, budget_s=args.budget_s, **grid)
        model, weights = args.random_shape, f"random, bf16 on {device} (made here: the shape only)"
    else:
        with tempfile.TemporaryDirectory(prefix="specedge-profile-") as tmp:
            model = str(random_model(args.random_shape, Path(tmp))) if args.random_shape else args.model
            if args.random_shape:
                weights = "random, Q8_0 (made here: the shape only)"
            out = _profile_file(args, model, device, grid)
    model = args.random_shape or model or (DEFAULT_TARGET if args.kind == "target" else DEFAULT_DRAFT)
    return _write(measured(out, model, weights, device, grid["repeats"]), args.json)


def measured(profile: dict, model: str, weights: str, device: str, repeats: int) -> dict:
    """A profile stamped with what was measured, where and when (measured, never emulated)."""
    profile.update(model=model, weights=weights, emulated=False, machine=machine_here(), device=device,
                   repeats=repeats, measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return profile


def _profile_file(args, model: str | None, device: str, grid: dict) -> dict:
    """The profile of an engine on a model file (a registry name or a path)."""
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET

    if args.kind == "target":
        from specedge.cloud.registry import open_engine, resolve_engine, weights_held
        from specedge.fetch import resolve

        path, sha = resolve(model or DEFAULT_TARGET)
        engine_name = resolve_engine(args.engine, path)
        if engine_name == "emulated":
            raise SystemExit("specedge profile: an emulated engine's profile is the one it was given")
        engine, _ = open_engine(engine_name, path, sha, weights_held(engine_name, args.weights, device), True,
                                device=device)
        return profile_target(engine, sessions=_ints(args.sessions), rows=_ints(args.rows),
                              base_context=args.base_context, budget_s=args.budget_s, **grid)
    from specedge.config import DraftConfig
    from specedge.device.backends import open_engine

    weights = "int8" if args.weights == "auto" else args.weights
    engine, _ = open_engine(DraftConfig(model=model or DEFAULT_DRAFT, weights=weights, backend=args.backend,
                                        device=device))
    return profile_draft(engine, **grid)


def _write(out: dict, path: str) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("kind", "engine", "decode_ms", "prefill_ms_per_token")}), file=sys.stdout)
    return 0
