"""`specedge bench-engines`: every installed engine side by side, same prompts, same cores.

Terms:
  draft ms/token    a device backend drafting greedily one token at a time (bench_draft.measure);
  decode ms/token   a target engine decoding alone, one position after another (what cloud-ar and
                    `llama-cli` do);
  verify ms (k)     one target pass over the last committed token and k drafted ones, then rolled
                    back: what one speculative round costs the cloud;
  exactness class   what the self-test says (specedge.exactness): "exact" or "numerical";
  llama.cpp's own   llama-cpp-python's `Llama.eval`, one token per call, on the same file and
                    thread count: the loop llama-cli runs. `llama-bench` too, when it is on PATH.

Everything runs one after the other in one process, so the ratios hold on a noisy machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from specedge.tools.bench import load_prompts, prompts_file

KS = (1, 2, 4, 8, 16)


def target_timings(engine, prompts: list[list[int]], tokens: int, ks=KS) -> dict:
    """Median decode ms/token and verify-call ms by k over the prompts (after one warm-up prompt)."""
    decode, verify = [], {k: [] for k in ks}
    for n, prompt in enumerate([prompts[0]] + prompts):
        cache = engine.new_cache(capacity=len(prompt) + tokens + max(ks) + 2)
        last = int(torch.argmax(engine.forward(prompt, cache, last_only=True)[-1]))
        t0 = time.perf_counter()
        for _ in range(tokens):
            last = int(torch.argmax(engine.forward([last], cache)[-1]))
        per_k = {}
        held = cache.length
        for k in ks:
            fed = [last] + prompt[:k]  # what is drafted does not change what a pass costs
            t1 = time.perf_counter()
            engine.forward_batch([(fed, cache)], keep=[k + 1])
            per_k[k] = time.perf_counter() - t1
            cache.truncate(held)
        if n:  # the first pass over the first prompt only warms kernels and caches up
            decode.append((time.perf_counter() - t0 - sum(per_k.values())) / tokens)
            for k in ks:
                verify[k].append(per_k[k])
    ms = lambda xs: round(1000 * float(np.median(xs)), 2)  # noqa: E731
    return {"decode_ms_per_token": ms(decode), "decode_tokens_per_s": round(1000 / ms(decode), 2),
            "verify_ms": {str(k): ms(v) for k, v in verify.items()}}


def llama_cpp_own(path: Path, prompts: list[list[int]], tokens: int, threads: int) -> dict:
    """llama-cpp-python's Llama.eval, one token per call: llama.cpp's own decode loop."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    vocab = llm.n_vocab()
    step = []
    for n, prompt in enumerate([prompts[0]] + prompts):
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            llm.eval([int(row.argmax())])
        if n:
            step.append((time.perf_counter() - t0) / tokens)
    ms = round(1000 * float(np.median(step)), 2)
    return {"decode_ms_per_token": ms, "decode_tokens_per_s": round(1000 / ms, 2)}


def llama_bench(path: Path, tokens: int, threads: int) -> dict | None:
    """`llama-bench -n tokens` (text generation) when the binary is installed, else None."""
    binary = shutil.which("llama-bench")
    if binary is None:
        return None
    out = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    rows = json.loads(out.stdout)
    ts = float(rows[0]["avg_ts"])
    return {"decode_tokens_per_s": round(ts, 2), "decode_ms_per_token": round(1000 / ts, 2)}


def run(args) -> int:
    from specedge.tools.demo import machine

    args.prompts = prompts_file(args.prompts)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    texts = load_prompts(args.prompts, args.max_prompts)
    report = {"machine": machine(), "threads": threads, "prompts": len(texts), "tokens": args.tokens,
              "draft": args.draft, "target": args.target, "drafts": _drafts(args, texts, say),
              "targets": _targets(args, texts, threads, say), "llama_cpp_own": _llama_cpp_own(args, texts, threads, say)}
    _ratios(report)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        say(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        say(f"wrote {args.plot}")
    return 0


def _drafts(args, texts: list[str], say) -> list[dict]:
    """Each --draft-backends entry (backend[:weights]) that runs here: its ms and tokens per second."""
    from specedge.tools.bench_draft import measure
    from specedge.config import DraftConfig
    from specedge.device.backends import open_engine as open_draft
    from specedge.device.backends import unavailable

    rows, base = [], DraftConfig(model=args.draft)
    for spec in args.draft_backends.split(","):
        backend, _, weights = spec.partition(":")
        cfg = replace(base, backend=backend, weights=weights or "int8")
        reason = unavailable(backend, cfg)
        if reason:
            say(f"draft {spec}: skipped ({reason})")
            continue
        say(f"draft {spec} ...")
        engine, tok = open_draft(cfg, say)
        row = measure(engine, [tok.encode_chat(t) for t in texts], args.tokens)
        rows.append({"backend": spec, "ms_per_token": round(row["ms_per_token"], 2),
                     "tokens_per_s": round(row["tokens_per_s"], 2)})
        del engine
    return rows


def _targets(args, texts: list[str], threads: int, say) -> list[dict]:
    """Each --engines entry (engine[:batched]) installed here: its self-test and its timings."""
    from specedge.cloud.registry import installed, weights_held
    from specedge.cloud.registry import open_engine as open_target
    from specedge.exactness import establish
    from specedge.fetch import resolve

    rows, (path, sha256) = [], resolve(args.target)
    for spec in args.engines.split(","):
        name, _, mode = spec.partition(":")  # llama.cpp:batched = batch_invariant off
        if not installed(name):
            say(f"target {spec}: skipped ({name} is not installed)")
            continue
        weights = weights_held(name, args.target_weights)
        say(f"target {spec} ({weights}): self-test ...")
        engine, tok = open_target(name, path, sha256, weights, batch_invariant=mode != "batched", threads=threads)
        found = establish(engine)
        prompts = [tok.encode_chat(t) for t in texts]
        say(f"target {spec}: {found.summary()}; timing ...")
        rows.append({"engine": spec, "weights": weights, "exactness": "exact" if found.exact else "numerical",
                     "max_abs_dlogit": found.max_abs_diff, "block": found.block,
                     **target_timings(engine, prompts, args.tokens)})
        del engine
    return rows


def _llama_cpp_own(args, texts: list[str], threads: int, say) -> dict:
    """llama.cpp's own decode loop and llama-bench on each file, where llama.cpp is installed."""
    from specedge.cloud.registry import installed
    from specedge.fetch import resolve
    from specedge.loader import read_gguf_tokenizer

    own = {}
    if installed("llama.cpp"):
        for role, model in (("draft", args.draft), ("target", args.target)):
            file, _ = resolve(model)
            encode = read_gguf_tokenizer(file).encode_chat
            say(f"llama.cpp's own decode loop on the {role} ...")
            timings = llama_cpp_own(file, [encode(t) for t in texts], args.tokens, threads)
            own[role] = {"llama_eval": timings, "llama_bench": llama_bench(file, args.tokens, threads)}
    return own


def _ratios(report: dict) -> None:
    """Each engine's ms/token over llama.cpp's own loop on the same file: 1.0 = as fast."""
    own = report["llama_cpp_own"]
    for row in report["drafts"]:
        if "draft" in own:
            row["vs_llama_cpp_own"] = round(row["ms_per_token"] / own["draft"]["llama_eval"]["decode_ms_per_token"], 3)
    for row in report["targets"]:
        if "target" in own:
            row["vs_llama_cpp_own"] = round(
                row["decode_ms_per_token"] / own["target"]["llama_eval"]["decode_ms_per_token"], 3)


def _print(report: dict) -> None:
    print(f"{report['machine']['cpu']}, {report['threads']} threads, {report['prompts']} prompts x "
          f"{report['tokens']} tokens")
    print(f"{'draft backend':24}{'ms/token':>10}{'tokens/s':>10}{'x llama.cpp own':>17}")
    for r in report["drafts"]:
        print(f"{r['backend']:24}{r['ms_per_token']:>10.1f}{r['tokens_per_s']:>10.1f}"
              f"{r.get('vs_llama_cpp_own', float('nan')):>16.2f}x")
    ks = list(KS)
    print(f"{'target engine':24}{'class':>10}{'ms/token':>10}{'x llama.cpp own':>17}"
          + "".join(f"{'verify k=' + str(k):>12}" for k in ks))
    for r in report["targets"]:
        print(f"{r['engine'] + ' ' + r['weights']:24}{r['exactness']:>10}{r['decode_ms_per_token']:>10.1f}"
              f"{r.get('vs_llama_cpp_own', float('nan')):>16.2f}x"
              + "".join(f"{r['verify_ms'][str(k)]:>12.1f}" for k in ks))
    for role, own in report["llama_cpp_own"].items():
        bench = own["llama_bench"]
        shown = "not on PATH" if bench is None else bench.get("error") or f"{bench['decode_ms_per_token']:.1f} ms/token"
        print(f"llama.cpp's own on the {role}: Llama.eval {own['llama_eval']['decode_ms_per_token']:.1f} "
              f"ms/token; llama-bench: {shown}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"draft {r['backend']}" for r in report["drafts"]] + \
            [f"target {r['engine']} ({r['exactness']})" for r in report["targets"]] + \
            [f"{role}: llama.cpp own" for role in report["llama_cpp_own"]]
    values = [r["ms_per_token"] for r in report["drafts"]] + [r["decode_ms_per_token"] for r in report["targets"]] + \
             [o["llama_eval"]["decode_ms_per_token"] for o in report["llama_cpp_own"].values()]
    left.barh(names, values, color="tab:blue")
    left.set_xlabel("ms per token (median, one at a time)")
    for r in report["targets"]:
        right.plot(list(KS), [r["verify_ms"][str(k)] for k in KS], marker="o",
                   label=f"{r['engine']} ({r['exactness']})")
    right.set_xlabel("drafted tokens verified in one call (k)")
    right.set_ylabel("verify call ms (median)")
    right.legend()
    fig.suptitle(f"engines on {report['machine']['cpu']}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_parser(sub) -> None:
    b = sub.add_parser("bench-engines", help="every installed draft backend and target engine side by side, "
                                             "with llama.cpp's own decode loop on the same files (JSON + plot)")
    b.add_argument("--draft", default="qwen2.5-coder-0.5b")
    b.add_argument("--target", default="qwen2.5-coder-1.5b")
    b.add_argument("--draft-backends", default="llama.cpp,onnxruntime:int8,torch:int8")
    b.add_argument("--engines", default="llama.cpp,llama.cpp:batched,torch,vllm:batched",
                   help="target engines (those not installed are skipped); NAME:batched = batch "
                        "invariance off (numerical): several rows per llama.cpp call, vLLM without "
                        "VLLM_BATCH_INVARIANT (which starts on GPUs only)")
    b.add_argument("--target-weights", default="auto", help="the torch engine's")
    b.add_argument("--threads", type=int, default=0, help="0 = every core")
    b.add_argument("--prompts", default=None)
    b.add_argument("--max-prompts", type=int, default=3)
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--json")
    b.add_argument("--plot")
    b.set_defaults(func=run)
