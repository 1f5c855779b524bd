"""`specedge compare BEFORE.json AFTER.json`: two runs of `specedge bench` or `specedge demo` on the
same machine side by side, time to first token and tokens/s per policy, the ratio after/before,
and whether the outputs stayed the same: the new figures next to the old, from their JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(report: dict) -> dict[str, dict]:
    """{label: {ttft_s, tokens_per_s, prompt_tokens, outputs}} of a bench or a demo report."""
    if "channels" in report:  # specedge bench
        out = {}
        for channel, result in report["channels"].items():
            for policy, summary in result["policies"].items():
                runs = result["runs"].get(policy, [])
                out[f"{channel} {policy}"] = {"ttft_s": summary["ttft_s"], "tokens_per_s": summary["tokens_per_s"],
                                              "prompt_tokens": [r["prompt_tokens"] for r in runs],
                                              "outputs": [r["tokens"] for r in runs]}
        base = report.get("local_target")
        if base:
            out["local-target"] = {"ttft_s": base["ttft_s"], "tokens_per_s": base["tokens_per_s"],
                                   "prompt_tokens": [], "outputs": [r["tokens"] for r in base["runs"]]}
        return out
    if "baseline_ttft_s" in report:  # specedge demo: its policy, then the cloud-ar baseline
        return {report["policy"]: {"ttft_s": report["ttft_s"], "tokens_per_s": report["tokens_per_s"],
                                   "prompt_tokens": [], "outputs": [report.get("text")]},
                "cloud-ar": {"ttft_s": report["baseline_ttft_s"], "tokens_per_s": report["baseline_tokens_per_s"],
                             "prompt_tokens": [], "outputs": []}}
    raise ValueError("neither a `specedge bench` nor a `specedge demo` report (no channels, no baseline_ttft_s)")


def compare(before: dict, after: dict) -> list[dict]:
    """One row per label both reports hold: the two runs' figures and after/before ratios."""
    old, new = rows_of(before), rows_of(after)
    table = []
    for label in (k for k in new if k in old):
        a, b = old[label], new[label]
        same = a["outputs"] == b["outputs"] if a["outputs"] and b["outputs"] else None
        table.append({"label": label, "prompt_tokens": b["prompt_tokens"] or a["prompt_tokens"],
                      "ttft_s": [a["ttft_s"], b["ttft_s"]], "tokens_per_s": [a["tokens_per_s"], b["tokens_per_s"]],
                      "ttft_shorter_x": a["ttft_s"] / b["ttft_s"] if b["ttft_s"] else None,
                      "tokens_per_s_x": b["tokens_per_s"] / a["tokens_per_s"] if a["tokens_per_s"] else None,
                      "same_outputs": same})
    return table


def _print(table: list[dict], names: tuple[str, str]) -> None:
    print(f"before: {names[0]}\nafter:  {names[1]}")
    print(f"{'':28} {'TTFT before':>11} {'after':>8} {'shorter':>8} {'tok/s before':>13} {'after':>8} {'x':>6}  "
          f"prompt tokens  same outputs")
    for row in table:
        lengths = row["prompt_tokens"]
        span = f"{min(lengths)}-{max(lengths)}" if lengths else "-"
        print(f"{row['label']:28} {row['ttft_s'][0]:11.2f} {row['ttft_s'][1]:8.2f} {row['ttft_shorter_x'] or 0:7.2f}x "
              f"{row['tokens_per_s'][0]:13.3f} {row['tokens_per_s'][1]:8.3f} {row['tokens_per_s_x'] or 0:5.2f}x  "
              f"{span:>13}  {row['same_outputs']}")


def _plot(table: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in table]
    x = range(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(labels) + 4), 4.2))
    for ax, key, unit in ((axes[0], "ttft_s", "time to first token (s)"), (axes[1], "tokens_per_s", "tokens/s")):
        ax.bar([i - 0.2 for i in x], [row[key][0] for row in table], 0.4, label="before", color="#999999")
        ax.bar([i + 0.2 for i in x], [row[key][1] for row in table], 0.4, label="after", color="#1f77b4")
        ax.set_xticks(list(x), labels, rotation=15, fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="two bench or demo JSON reports side by side (TTFT, tokens/s)")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--json", help="write the comparison here")
    p.add_argument("--plot", help="bar chart of both runs (matplotlib)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        reports = [json.loads(Path(p).read_text()) for p in (args.before, args.after)]
        table = compare(*reports)
    except (OSError, ValueError, KeyError) as exc:
        print(f"specedge compare: {exc}", file=sys.stderr)
        return 2
    names = tuple(f"{p} ({r.get('git_revision', '?')[:7]})" for p, r in zip((args.before, args.after), reports))
    _print(table, names)
    if args.json:
        Path(args.json).write_text(json.dumps({"before": names[0], "after": names[1], "rows": table}, indent=1) + "\n")
    if args.plot:
        _plot(table, args.plot, f"before {names[0]}\nafter {names[1]}")
    return 0
