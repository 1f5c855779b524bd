"""`specedge bench-draft`: the draft backends side by side on the same prompts.

Per backend: prefill time, milliseconds per drafted token (greedy, single-token steps as the
agent drafts), and whether its greedy drafts equal the torch reference's token for token.
Backends run one after the other in one process, so the ratios are fair on a noisy machine.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from specedge.tools.bench import load_prompts, prompts_file
from specedge.config import DraftConfig
from specedge.speculative import SamplingParams


def measure(engine, prompts: list[list[int]], tokens: int) -> dict:
    prefill_s, step_s, drafts = [], [], []
    for prompt in prompts:
        engine.start(prompt[:1])  # warm: the first call of a session allocates
        engine.draft(2, SamplingParams(), np.random.default_rng(0))
        t0 = time.perf_counter()
        engine.start(prompt, reuse=False)  # the whole prompt: the warm-up above shares its first token
        prefill_s.append(time.perf_counter() - t0)
        drafted = engine.draft(tokens, SamplingParams(), np.random.default_rng(0))
        step_s.append(drafted.seconds / max(len(drafted.tokens), 1))
        drafts.append(drafted.tokens)
    return {"prefill_ms": 1000 * float(np.median(prefill_s)), "ms_per_token": 1000 * float(np.median(step_s)),
            "tokens_per_s": 1 / float(np.median(step_s)), "drafts": drafts}


def run(args) -> int:
    from specedge.tools.demo import machine
    from specedge.device.backends import open_engine, unavailable

    args.prompts = prompts_file(args.prompts)
    say = lambda line: print(line, file=sys.stderr, flush=True)
    base = DraftConfig(model=args.draft)
    results, reference = [], None
    for spec in args.backends.split(","):
        backend, _, weights = spec.partition(":")
        weights = weights or "int8"
        reason = unavailable(backend, replace(base, backend=backend, weights=weights))
        if reason:
            say(f"{spec}: skipped ({reason})")
            continue
        engine, tok = open_engine(replace(base, backend=backend, weights=weights), say)
        prompts = [tok.encode_chat(p) for p in load_prompts(args.prompts, args.max_prompts)]
        say(f"{spec}: {len(prompts)} prompts, {args.tokens} drafted tokens each")
        row = {"backend": spec, "weights": weights, **measure(engine, prompts, args.tokens)}
        reference = reference or row
        row["speedup_vs_first"] = reference["ms_per_token"] / row["ms_per_token"]
        results.append(row)
        del engine
    # Greedy drafts are compared with torch on the same weights: the same numbers in, the same
    # tokens out. Different quantisers (torch int8 against onnxruntime's 8-bit blocks, llama.cpp's
    # Q4_K dot products against torch's dequantised weights) may part.
    torch_rows = {r["weights"]: r for r in results if r["backend"].startswith("torch")}
    for r in results:
        same = torch_rows.get(r["weights"])
        r["same_greedy_drafts_as_torch"] = (sum(a == b for a, b in zip(r["drafts"], same["drafts"]))
                                            if same else None)
    report = {"draft": args.draft, "prompts": args.max_prompts, "tokens": args.tokens, "machine": machine(),
              "results": [{k: v for k, v in r.items() if k != "drafts"} for r in results]}
    print(f"{'backend':22}{'prefill ms':>12}{'ms/token':>10}{'tokens/s':>10}{'vs first':>10}"
          f"{'same greedy drafts as torch, same weights':>44}")
    for r in report["results"]:
        same = r["same_greedy_drafts_as_torch"]
        shown = "-" if same is None else f"{same}/{len(results[0]['drafts'])}"
        print(f"{r['backend']:22}{r['prefill_ms']:>12.0f}{r['ms_per_token']:>10.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['speedup_vs_first']:>9.2f}x{shown:>44}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [r["backend"] for r in report["results"]]
        ax.bar(names, [r["ms_per_token"] for r in report["results"]], color="tab:blue")
        ax.set_ylabel("ms per drafted token (median)")
        ax.set_title(f"draft backends: {args.draft}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench-draft", help="draft backends side by side: prefill, ms/token, same drafts (JSON + plot)")
    b.add_argument("--draft", default="qwen2.5-coder-0.5b")
    b.add_argument("--backends", default="torch:int8,llama.cpp,onnxruntime:int8,torch:fp32,onnxruntime:fp32",
                   help="BACKEND[:WEIGHTS] list; the first is the reference (llama.cpp reads the GGUF's own "
                        "quantisation, whatever WEIGHTS says)")
    b.add_argument("--prompts", default=None)
    b.add_argument("--max-prompts", type=int, default=4)
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--json")
    b.add_argument("--plot")
    b.set_defaults(func=run)
