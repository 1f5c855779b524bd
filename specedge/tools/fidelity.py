"""`specedge fidelity EMULATED.json REAL.json [REAL.json ...]`: does emulated compute reproduce
real runs of the same bench? Per channel and policy: each real run's tokens/s and time to first
token (measured), the emulated run's (emulated, its own columns), the emulated over the real
runs' median, and the spread of the real runs themselves, since the emulator cannot be expected
to be closer to this machine than the machine is to itself. Bounds: tokens/s within 10 %, time to
first token within 15 %.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from specedge.tools.compare import rows_of

BOUNDS = {"tokens_per_s": 0.10, "ttft_s": 0.15}  # specedge bench, per device
VERIFIER_BOUNDS = {"tokens_per_s": 0.15}  # specedge bench-verifier, all devices together


def _rows(report: dict) -> dict[str, dict]:
    """rows_of a bench report; a bench-verifier report's aggregate tokens/s per mode and device count."""
    if "speedup" in report and isinstance(report.get("runs"), list):
        return {f"{r['mode']} r{r['replicas']} x{r['devices']} devices": {"tokens_per_s": r["tokens_per_s"],
                                                                          "prompt_tokens": [], "outputs": None}
                for r in report["runs"]}
    return rows_of(report)


def fidelity(emulated: dict, reals: list[dict]) -> list[dict]:
    """One row per label the emulated run and every real run hold."""
    if not emulated.get("emulated"):
        raise ValueError("the first report is not an emulated run (`specedge bench --emulate`)")
    if any(r.get("emulated") for r in reals):
        raise ValueError("a real run is emulated: measured and emulated are compared, never mixed")
    emu, measured = _rows(emulated), [_rows(r) for r in reals]
    bounds = VERIFIER_BOUNDS if "speedup" in emulated else BOUNDS
    table = []
    for label in (k for k in emu if all(k in m for m in measured)):
        row = {"label": label, "prompt_tokens": emu[label]["prompt_tokens"],
               "same_outputs": all(m[label]["outputs"] == emu[label]["outputs"] for m in measured)}
        for key, bound in bounds.items():
            real = [m[label][key] for m in measured]
            mid = statistics.median(real)
            spread = (max(real) - min(real)) / mid if mid else None
            ratio = emu[label][key] / mid if mid else None
            row[key] = {"measured": real, "measured_median": mid, "measured_spread": spread,
                        "emulated": emu[label][key], "emulated_over_measured": ratio,
                        "within_bound": ratio is not None and abs(ratio - 1) <= bound,
                        "spread_over_bound": spread is not None and spread > bound}
        table.append(row)
    return table


def _print(table: list[dict], names: list[str]) -> None:
    print("emulated: " + names[0] + "\nmeasured: " + ", ".join(names[1:]))
    print(f"{'':28} {'tok/s measured':>22} {'spread':>7} | {'emulated':>8} {'ratio':>6} {'ok':>3} || "
          f"{'TTFT measured':>18} {'spread':>7} | {'emulated':>8} {'ratio':>6} {'ok':>3}  same outputs")
    for row in table:
        cells = []
        for key, width in (("tokens_per_s", 22), ("ttft_s", 18)):
            f = row.get(key)
            if f is None:
                cells.append("-")
                continue
            measured = " ".join(f"{v:.2f}" for v in f["measured"])
            flag, ok = "!" if f["spread_over_bound"] else " ", "yes" if f["within_bound"] else "NO"
            cells.append(f"{measured:>{width}} {f['measured_spread'] or 0:6.1%}{flag}| "
                         f"{f['emulated']:8.2f} {f['emulated_over_measured'] or 0:6.2f} {ok:>3}")
        print(f"{row['label']:28} {cells[0]} || {cells[1]}  {row['same_outputs']}")
    print("bounds: bench tokens/s within 10 %, TTFT within 15 %, bench-verifier tokens/s within 15 % of the "
          "measured median; '!': the measured runs' own spread exceeds the bound")


def _plot(table: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in table]
    x = range(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) + 4), 4.4))
    for ax, key, unit in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "ttft_s", "time to first token (s)")):
        if key not in table[0]:
            ax.set_visible(False)
            continue
        mids = [row[key]["measured_median"] for row in table]
        lows = [m - min(row[key]["measured"]) for m, row in zip(mids, table)]
        highs = [max(row[key]["measured"]) - m for m, row in zip(mids, table)]
        ax.bar([i - 0.2 for i in x], mids, 0.4, yerr=[lows, highs], capsize=3, label="measured (median, range)",
               color="#999999")
        ax.bar([i + 0.2 for i in x], [row[key]["emulated"] for row in table], 0.4, label="EMULATED", color="#ff7f0e",
               hatch="//")
        ax.set_xticks(list(x), labels, rotation=30, fontsize=7, ha="right")
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_parser(sub) -> None:
    p = sub.add_parser("fidelity", help="emulated compute against real runs of the same bench")
    p.add_argument("emulated", help="a `specedge bench --emulate` report")
    p.add_argument("measured", nargs="+", help="`specedge bench` reports of the same prompts, policies and channels")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--plot", help="measured and emulated bars side by side")
    p.set_defaults(func=run)


def run(args) -> int:
    paths = [args.emulated] + args.measured
    try:
        reports = [json.loads(Path(p).read_text()) for p in paths]
        table = fidelity(reports[0], reports[1:])
    except (OSError, ValueError, KeyError) as exc:
        print(f"specedge fidelity: {exc}", file=sys.stderr)
        return 2
    names = [f"{p} ({r.get('git_revision') or r.get('git') or '?'})"[:120] for p, r in zip(paths, reports)]
    _print(table, names)
    profiles = reports[0]["emulation"]
    keys = [k for k in BOUNDS if table and k in table[0]]
    out = {"emulated": names[0], "measured": names[1:], "bounds": BOUNDS if "ttft_s" in keys else VERIFIER_BOUNDS,
           "profiles": [profiles[k] for k in ("target_profile", "draft_profile") if profiles.get(k)], "rows": table,
           "all_within_bounds": all(r[k]["within_bound"] for r in table for k in keys)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        _plot(table, args.plot, "EMULATED compute vs measured runs\nprofiles: " + ", ".join(
            Path(p).name for p in out["profiles"]))
    return 0
