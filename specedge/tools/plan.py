"""`specedge plan` and `specedge regimes`: what a deployment gains, planned on virtual time
(specedge/tools/planner.py) from engine profiles and a recording of the real pair. Every figure here is
emulated (planned, not measured) and says so, with the profiles it came from.

  plan     one target profile, one draft profile, channels, a prompt set's recordings: per policy
           and device count, tokens/s per device, TTFT, estimated J/token, the target's load; with
           --floor, how many devices one target serves with each at or above it.
  regimes  the sweep: pairs x prompt sets x channels x device counts, whether `adaptive` is within
           5 % of the better of cloud-ar and the best fixed length in every cell, and the regime map
           (where speculation beats streaming across target and draft per-token time and RTT, at the
           recordings' acceptance) with every cell marked.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from specedge.emulation import Recording, read_json, read_profile

RECORDINGS_FORMAT = "specedge-recordings/1"
POLICIES = "cloud-ar,fixed:2,fixed:4,fixed:8,fixed:16,adaptive"
LABEL = "EMULATED (planned on virtual time from profiles, not measured)"


# -- recordings -------------------------------------------------------------------------------------
def load_recordings(path: str | Path) -> dict:
    data = read_json(path, RECORDINGS_FORMAT, "recordings file", "`specedge plan --save-recordings`")
    data["recordings"] = [Recording.from_json(r) for r in data["recordings"]]
    return data


def record_prompts(args) -> dict:
    """The real pair's recordings of --prompts (cached, as `bench --emulate` records them), with the
    target's stop tokens: what the planner needs, and nothing of the models."""
    from specedge.loader import read_tokenizer
    from specedge.tools.bench import load_prompts, prompts_file
    from specedge.tools.emulate import recordings

    prompts = load_prompts(prompts_file(args.prompts), args.max_prompts)
    recs, about_target, about_draft = recordings(args, prompts)
    stop_ids = sorted(read_tokenizer(about_target["tokenizer"]).stop_ids)
    return {"format": RECORDINGS_FORMAT, "prompts": args.prompts, "max_new": args.max_new_tokens,
            "max_draft": args.max_draft, "stop_ids": stop_ids,
            "target": {k: about_target[k] for k in ("model", "engine", "exactness")},
            "draft": {k: about_draft[k] for k in ("model", "backend")}, "recordings": recs}


def save_recordings(data: dict, path: str | Path) -> None:
    out = dict(data, recordings=[r.to_json() for r in data["recordings"]])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out) + "\n")


def _check_lengths(data: dict, max_new: int, max_draft: int, where: str) -> None:
    if max_new > data["max_new"] or max_draft > data["max_draft"]:
        raise SystemExit(f"specedge plan: {where} was recorded for --max-new-tokens {data['max_new']} and "
                         f"--max-draft {data['max_draft']}; record it again for more")


# -- one plan -------------------------------------------------------------------------------------------
def plan_cells(target: dict, draft: dict, data: dict, channels: list, policies: list[str], devices: list[int],
               max_new: int, max_draft: int, board_name: str, floor: float | None, passes: int = 1,
               warmup: int = 0, max_batch: int | None = None, overheads=None) -> list[dict]:
    """Every (channel, policy, device count) of one pair on one prompt set's recordings."""
    from dataclasses import replace

    from specedge.config import VerifierIdentity
    from specedge.device.agent import scheduler_prior
    from specedge.device.profiles import get_profile
    from specedge.tools.planner import Overheads, Setup, devices_at_floor, simulate
    from specedge.tools.bench import CHANNEL_RADIO

    board = get_profile(board_name)
    out = []
    for cfg in channels:
        radio = board.radio(CHANNEL_RADIO.get(cfg.name, "lte"))
        setup = Setup(target, draft, data["recordings"], cfg, max_new=max_new, max_draft=max_draft,
                      prior=scheduler_prior(board, radio), stop_ids=frozenset(data["stop_ids"]), passes=passes,
                      warmup=warmup, verifier=VerifierIdentity(max_batch=max_batch or VerifierIdentity.max_batch),
                      overheads=overheads or Overheads())
        for policy in policies:
            runs = {n: simulate(replace(setup, devices=n), policy, board, radio) for n in devices}
            out += [{"channel": cfg.name, **row} for row in runs.values()]
            if floor:
                most, at = devices_at_floor(setup, policy, floor, max(devices), board, radio, runs)
                out.append({"channel": cfg.name, "policy": policy, "floor_tokens_per_s": floor,
                            "devices_at_floor": most, "at_floor": at})
    return out


def add_parser(sub) -> None:
    from specedge.options import model_options

    p = sub.add_parser("plan", help="EMULATED: tokens/s, TTFT, J/token and devices per target from profiles")
    _common(p)
    p.add_argument("--target-profile", required=True, help="`specedge profile target` JSON")
    p.add_argument("--draft-profile", required=True, help="`specedge profile draft` JSON")
    p.add_argument("--devices", default="1,4,16,64", help="device counts sharing the one target")
    p.add_argument("--floor", type=float, help="tokens/s each device must keep: how many devices a target serves")
    p.add_argument("--recordings", help="a recordings file (`--save-recordings`); else the real pair is recorded")
    p.add_argument("--prompts", default="code_edits", help="with no --recordings: the prompt set to record")
    p.add_argument("--max-prompts", type=int, default=4)
    p.add_argument("--save-recordings", help="write the recordings here (no model needed to plan again)")
    p.add_argument("--plot", help="write a PNG here")
    model_options(p)
    p.set_defaults(func=run)

    r = sub.add_parser("regimes", help="EMULATED: the regime sweep and map (adaptive against the best of the rest)")
    _common(r)
    r.add_argument("--pairs", required=True,
                   help="NAME=TARGET.json:DRAFT.json[:DEVICES], comma-separated (devices default 1,4,16,64)")
    r.add_argument("--recordings-sets", required=True, help="recordings files, comma-separated (prompt sets)")
    r.add_argument("--tolerance", type=float, default=0.05, help="adaptive within this of the best of the rest")
    r.add_argument("--map", help="write the regime map PNG here")
    r.set_defaults(func=run_regimes)


def _common(p) -> None:
    """The options `plan` and `regimes` share."""
    p.add_argument("--channel", default="lte", help="presets or trace: specs, comma-separated (as `bench`)")
    p.add_argument("--policies", default=POLICIES)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-draft", type=int, default=16, help="the devices' speculation.max_draft")
    p.add_argument("--profile", default="orin-nano-15w", help="device power profile (profiles.toml) for J/token")
    p.add_argument("--passes", type=int, default=2, help="each device runs the prompts this many times, counted")
    p.add_argument("--warmup", type=int, default=1,
                   help="... after this many passes not counted (its scheduler's estimates kept throughout)")
    p.add_argument("--max-batch", type=int, default=16, help="the verifier's [verifier] max_batch")
    p.add_argument("--overheads-from", metavar="EMULATED.json:TARGET.json:DRAFT.json",
                   help="the product's own overheads on a host, read from an emulated bench run and its profiles "
                        "(its first channel): per drafted token, per message, per pass (specedge/tools/planner.py)")
    p.add_argument("--json", help="write the report here")


def _channels(spec: str) -> list:
    from specedge.tools.channel import channel_config, split_channels

    try:
        return [channel_config(s) for s in split_channels(spec)]
    except ValueError as exc:
        raise SystemExit(f"specedge plan: --channel: {exc}") from None


def _ints(text: str) -> list[int]:
    from specedge.options import positive_ints

    return positive_ints(text, "plan")


def _policies(text: str, max_draft: int) -> list[str]:
    from specedge.device.policy import parse_policy

    policies = [p for p in text.split(",") if p]
    for p in policies:
        try:
            policy = parse_policy(p, max_draft)
        except ValueError as exc:
            raise SystemExit(f"specedge plan: {exc}") from None
        if policy.pipelined or policy.early_exit or policy.overrides.get("mode", "throughput") != "throughput":
            raise SystemExit(f"specedge plan: {p}: the planner runs cloud-ar, fixed:G and adaptive (throughput), "
                             "not pipelined, early-exit or energy policies")
    return policies


def _recordings(args) -> dict:
    if args.recordings:
        try:
            data = load_recordings(args.recordings)
        except ValueError as exc:
            raise SystemExit(f"specedge plan: {exc}") from None
        where = args.recordings
    else:
        data, where = record_prompts(args), f"the recording of {args.prompts}"
    _check_lengths(data, args.max_new_tokens, args.max_draft, where)
    if args.save_recordings:
        save_recordings(data, args.save_recordings)
    return data


def _profiles(target_path: str, draft_path: str) -> tuple[dict, dict]:
    try:
        return read_profile(target_path, "target"), read_profile(draft_path, "draft")
    except ValueError as exc:
        raise SystemExit(f"specedge plan: {exc}") from None


def _overheads(args):
    """--overheads-from's: the product's own costs on the host of an emulated run (none without)."""
    from dataclasses import asdict

    from specedge.tools.planner import overheads_of
    from specedge.tools.channel import channel_config

    if not args.overheads_from:
        return None
    parts = args.overheads_from.split(":")
    if len(parts) != 3:
        raise SystemExit("specedge plan: --overheads-from EMULATED.json:TARGET.json:DRAFT.json")
    try:
        report = json.loads(Path(parts[0]).read_text())
        target, draft = _profiles(parts[1], parts[2])
        channel = channel_config(next(iter(report["channels"])))
        out = overheads_of(report, target, draft, channel)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"specedge plan: --overheads-from: {exc}") from None
    args.overheads = asdict(out)
    return out


def _about(profile: dict, path: str) -> dict:
    return {"path": path, "engine": profile.get("engine"), "model": profile.get("model"),
            "machine": profile.get("machine", {}).get("gpu") or profile.get("machine", {}).get("cpu"),
            "assumed": bool(profile.get("assumed")), "source": profile.get("assumption", {}).get("source")}


def run(args) -> int:
    if not 1 <= args.max_draft <= 64:
        raise SystemExit("specedge plan: --max-draft must be in 1..64")
    policies = _policies(args.policies, args.max_draft)
    channels, devices = _channels(args.channel), _ints(args.devices)
    target, draft = _profiles(args.target_profile, args.draft_profile)
    data = _recordings(args)
    cells = plan_cells(target, draft, data, channels, policies, devices, args.max_new_tokens, args.max_draft,
                       args.profile, args.floor, args.passes, args.warmup, args.max_batch, _overheads(args))
    report = {"emulated": True, "planned": True, "label": LABEL,
              "target_profile": _about(target, args.target_profile), "draft_profile": _about(draft, args.draft_profile),
              "recorded": {"target": data["target"], "draft": data["draft"], "prompts": data["prompts"],
                           "acceptance_of": "the recorded pair's greedy acceptance"},
              "max_new_tokens": args.max_new_tokens, "max_draft": args.max_draft, "device_profile": args.profile,
              "passes": args.passes, "warmup_passes": args.warmup, "max_batch": args.max_batch,
              "overheads": getattr(args, "overheads", None),
              "j_per_token": "estimated: the device profile's board and radio power over modelled busy and idle time",
              "cells": cells}
    _print_plan(report)
    _write_json(report, args.json)
    if args.plot:
        plot_plan(report, args.plot)
    return 0


def _write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


def _print_plan(report: dict) -> None:
    t, d = report["target_profile"], report["draft_profile"]
    print(f"{LABEL}\ntarget profile {t['path']} ({t['model']}, {t['engine']}{', ASSUMED' if t['assumed'] else ''}); "
          f"draft profile {d['path']} ({d['model']}, {d['engine']}{', ASSUMED' if d['assumed'] else ''}); "
          f"acceptance of {report['recorded']['draft']['model']} -> {report['recorded']['target']['model']} "
          f"on {report['recorded']['prompts']}")
    print(f"{'channel':8} {'policy':10} {'devices':>7} {'tok/s each':>10} {'TTFT s':>7} {'J/tok est':>9} "
          f"{'total tok/s':>11} {'draft len':>9} {'streamed':>8} {'target busy':>11}")
    for c in report["cells"]:
        if "devices_at_floor" in c:
            print(f"{c['channel']:8} {c['policy']:10} devices per target at {c['floor_tokens_per_s']:g} tok/s each: "
                  f"{c['devices_at_floor']}")
            continue
        j = c["j_per_token_estimated"]
        print(f"{c['channel']:8} {c['policy']:10} {c['devices']:7d} {c['tokens_per_s']:10.2f} {c['ttft_s']:7.2f} "
              f"{j if j is not None else float('nan'):9.3f} {c['aggregate_tokens_per_s']:11.1f} "
              f"{c['mean_draft_len']:9.2f} {c['streamed_share']:8.0%} {c['target_busy']:11.0%}")


def plot_plan(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if "devices" in c]
    channels = list(dict.fromkeys(c["channel"] for c in cells))
    keys = (("tokens_per_s", "tokens/s per device"), ("ttft_s", "TTFT, s"),
            ("j_per_token_estimated", "J/token (estimated)"))
    fig, axes = plt.subplots(len(channels), 3, figsize=(15, 3.6 * len(channels)), squeeze=False)
    for row, channel in zip(axes, channels):
        for ax, (key, title) in zip(row, keys):
            for policy in dict.fromkeys(c["policy"] for c in cells):
                pts = [(c["devices"], c[key]) for c in cells if c["channel"] == channel and c["policy"] == policy
                       and c[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=policy)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("devices sharing one target")
            ax.set_title(f"{channel}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
        for c in report["cells"]:
            if c.get("channel") == channel and "devices_at_floor" in c:
                row[0].axhline(c["floor_tokens_per_s"], color="grey", ls=":", lw=1)
        row[0].legend(fontsize=7)
    t, d = report["target_profile"], report["draft_profile"]
    fig.suptitle(f"{LABEL}\ntarget {t['model']} ({t['engine']}{', assumed' if t['assumed'] else ''} "
                 f"on {t['machine']}), "
                 f"draft {d['model']} ({d['engine']}{', assumed' if d['assumed'] else ''} on {d['machine']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the regime sweep -------------------------------------------------------------------------------
def _pairs(text: str) -> list[tuple[str, str, str, list[int]]]:
    out = []
    for item in filter(None, text.split(",")):
        name, _, rest = item.partition("=")
        parts = rest.split(":")
        if not name or len(parts) not in (2, 3):
            raise SystemExit(f"specedge regimes: --pairs item {item!r}: NAME=TARGET.json:DRAFT.json[:DEVICES]")
        devices = _ints(parts[2].replace("+", ",")) if len(parts) == 3 else [1, 4, 16, 64]
        out.append((name, parts[0], parts[1], devices))
    return out


def judge(cells: list[dict], tolerance: float) -> list[dict]:
    """One row per (pair, prompts, channel, devices): adaptive against the better of cloud-ar and the
    best fixed length."""
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["pair"], c["prompts"], c["channel"], c["devices"]), {})[c["policy"]] = c
    rows = []
    for (pair, prompts, channel, devices), by in groups.items():
        fixed = {p: c for p, c in by.items() if p.startswith("fixed:")}
        best_fixed = max(fixed, key=lambda p: fixed[p]["tokens_per_s"]) if fixed else None
        rest = max([by["cloud-ar"]["tokens_per_s"]] + ([fixed[best_fixed]["tokens_per_s"]] if fixed else []))
        a = by["adaptive"]
        rows.append({"pair": pair, "prompts": prompts, "channel": channel, "devices": devices,
                     "cloud_ar": by["cloud-ar"]["tokens_per_s"], "best_fixed": best_fixed,
                     "best_fixed_tokens_per_s": fixed[best_fixed]["tokens_per_s"] if fixed else None,
                     "adaptive": a["tokens_per_s"], "adaptive_over_best": a["tokens_per_s"] / rest,
                     "within": a["tokens_per_s"] >= (1 - tolerance) * rest,
                     "speculation_pays": bool(fixed)
                     and fixed[best_fixed]["tokens_per_s"] > by["cloud-ar"]["tokens_per_s"],
                     "adaptive_mean_draft_len": a["mean_draft_len"], "adaptive_streamed_share": a["streamed_share"],
                     "target_decode_ms": a["target_decode_ms"], "draft_decode_ms": a["draft_decode_ms"],
                     "verify_flat": a["verify_flat"], "rtt_ms": a["rtt_ms"]})
    return rows


def run_regimes(args) -> int:
    from specedge.emulation import decode_ms, verify_ms

    policies = _policies(args.policies, args.max_draft)
    if "adaptive" not in policies or "cloud-ar" not in policies:
        raise SystemExit("specedge regimes: --policies needs cloud-ar and adaptive")
    channels = _channels(args.channel)
    sets = []
    for path in filter(None, args.recordings_sets.split(",")):
        try:
            data = load_recordings(path)
        except ValueError as exc:
            raise SystemExit(f"specedge regimes: {exc}") from None
        _check_lengths(data, args.max_new_tokens, args.max_draft, path)
        sets.append(data)
    cells, pairs, overheads = [], {}, _overheads(args)
    for name, tpath, dpath, devices in _pairs(args.pairs):
        target, draft = _profiles(tpath, dpath)
        base = target.get("base_context", 128)
        flat = verify_ms(target, 1, 8) < 2 * verify_ms(target, 1, 1)  # 8 rows cost about one: memory-bound
        pairs[name] = {"target": _about(target, tpath), "draft": _about(draft, dpath), "devices": devices,
                       "target_decode_ms": decode_ms(target, base), "draft_decode_ms": decode_ms(draft, base),
                       "verify_flat": flat}
        for data in sets:
            for c in plan_cells(target, draft, data, channels, policies, devices, args.max_new_tokens,
                                args.max_draft, args.profile, None, args.passes, args.warmup, args.max_batch,
                                overheads):
                cfg = next(ch for ch in channels if ch.name == c["channel"])
                cells.append(dict(c, pair=name, prompts=data["prompts"], verify_flat=flat,
                                  target_decode_ms=pairs[name]["target_decode_ms"],
                                  draft_decode_ms=pairs[name]["draft_decode_ms"], rtt_ms=_rtt_ms(cfg)))
            print(f"regimes: {name} on {data['prompts']} done", file=sys.stderr, flush=True)
    rows = judge(cells, args.tolerance)
    report = {"emulated": True, "planned": True, "label": LABEL, "pairs": pairs, "tolerance": args.tolerance,
              "passes": args.passes, "warmup_passes": args.warmup, "max_batch": args.max_batch,
              "overheads": getattr(args, "overheads", None),
              "max_new_tokens": args.max_new_tokens, "max_draft": args.max_draft,
              "prompts": [d["prompts"] for d in sets], "recorded": [{"target": d["target"], "draft": d["draft"]}
                                                                    for d in sets],
              "acceptance_by_position": {d["prompts"]: _acceptance(d, args.max_draft) for d in sets},
              "all_within": all(r["within"] for r in rows), "rows": rows, "cells": cells}
    _print_regimes(report)
    _write_json(report, args.json)
    if args.map:
        regime_map(report, args.map)
    return 0 if report["all_within"] else 1


def _acceptance(data: dict, positions: int) -> list[float]:
    from specedge.tools.planner import acceptance_by_position

    return [round(a, 4) for a in acceptance_by_position(data["recordings"], positions)]


def _rtt_ms(cfg) -> float:
    """The channel's round trip as the map places it: twice the one-way delay (a phased channel's
    over its phases, blackouts left out, weighted by their length up to 10 s)."""
    if not cfg.phases:
        return 2 * cfg.up.delay_ms
    total = weight = 0.0
    for i, (start, phase) in enumerate(cfg.phases):
        end = cfg.phases[i + 1][0] if i + 1 < len(cfg.phases) else 10.0
        if phase.name != "blackout":
            total += (end - start) * 2 * phase.up.delay_ms
            weight += end - start
    return total / weight if weight else 0.0


def _print_regimes(report: dict) -> None:
    print(f"{LABEL}; adaptive within {report['tolerance']:.0%} of the better of cloud-ar and the best fixed length?")
    print(f"{'pair':14} {'prompts':13} {'channel':8} {'dev':>3} {'cloud-ar':>8} {'best fixed':>16} {'adaptive':>8} "
          f"{'ratio':>6} {'ok':>3} {'pays':>4} {'draft len':>9} {'streamed':>8}")
    for r in report["rows"]:
        bf = f"{r['best_fixed']} {r['best_fixed_tokens_per_s']:.2f}" if r["best_fixed"] else "-"
        print(f"{r['pair']:14} {r['prompts']:13} {r['channel']:8} {r['devices']:3d} {r['cloud_ar']:8.2f} {bf:>16} "
              f"{r['adaptive']:8.2f} {r['adaptive_over_best']:6.3f} {'yes' if r['within'] else 'NO':>3} "
              f"{'yes' if r['speculation_pays'] else 'no':>4} {r['adaptive_mean_draft_len']:9.2f} "
              f"{r['adaptive_streamed_share']:8.0%}")
    print(f"every cell within: {report['all_within']}")


def _mark_cells(ax, rows: list[dict], first_set: str) -> None:
    """Each sweep cell of one panel where its devices sit: the target's ms per token as their
    stream gives it (the load of the other devices included), their draft's ms per token; o where
    speculation paid, x where streaming won; black the first prompt set, blue the second (drawn a
    little higher, so the two do not hide each other)."""
    named = set()
    for r in rows:
        colour = "k" if r["prompts"] == first_set else "b"
        x, y = 1000 / r["cloud_ar"], r["draft_decode_ms"] * (1 if colour == "k" else 1.25)
        size = 18 * (1 + math.log2(r["devices"]))
        if r["speculation_pays"]:
            ax.scatter(x, y, marker="o", s=size, facecolors="none", edgecolors=colour)
        else:
            ax.scatter(x, y, marker="x", s=size, color=colour)
        if r["pair"] not in named and r["devices"] == 1:
            named.add(r["pair"])
            ax.annotate(r["pair"], (x, y), fontsize=6, xytext=(4, -9), textcoords="offset points")


def regime_map(report: dict, path: str) -> None:
    """Where speculation beats streaming for one device (the scheduler's own round model,
    device/scheduler.py best_rate), across target and draft ms per token, per RTT; a verification
    that costs one row whatever the rows (memory-bound: a GPU) or a row each (compute-bound: this
    CPU). The colour and the solid line are at the first prompt set's acceptance, the dashed line
    at the second's. Every sweep cell is marked where its devices sit (the target's ms per token
    as cloud-ar gave each of them, so load moves a cell right): o speculation paid (the best fixed
    length beat cloud-ar), x streaming won; black the first set, blue the second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from specedge.device.scheduler import Objective, State, best_rate

    sets = list(report["acceptance_by_position"])
    rtts = sorted({round(r["rtt_ms"]) for r in report["rows"]}) or [60]
    widest = max([400.0] + [1500 / r["cloud_ar"] for r in report["rows"] if r["cloud_ar"] > 0])
    xs = np.logspace(0, np.log10(widest), 60)  # target ms/token
    ys = np.logspace(0, np.log10(400), 60)  # draft ms/token

    def gain(accept, flat, rtt):
        out = np.zeros((len(ys), len(xs)))
        for i, d in enumerate(ys):
            for j, t in enumerate(xs):
                state = State(tuple(accept), draft_s=d / 1000, verify_base_s=t / 1000 if flat else 0.0,
                              verify_per_row_s=0.0 if flat else t / 1000, rtt_s=rtt / 1000, stream_token_s=t / 1000)
                out[i, j] = best_rate(state, Objective(), report["max_draft"])[0] * t / 1000
        return out

    fig, axes = plt.subplots(2, len(rtts), figsize=(4.6 * len(rtts), 8.4), squeeze=False)
    for row, flat in zip(axes, (True, False)):
        for ax, rtt in zip(row, rtts):
            first = gain(report["acceptance_by_position"][sets[0]], flat, rtt)
            mesh = ax.pcolormesh(xs, ys, first, cmap="RdYlGn", vmin=0, vmax=2, shading="auto")
            ax.contour(xs, ys, first, levels=[1.0], colors="k", linewidths=1)
            if len(sets) > 1:
                ax.contour(xs, ys, gain(report["acceptance_by_position"][sets[1]], flat, rtt), levels=[1.0],
                           colors="b", linewidths=1, linestyles="--")
            _mark_cells(ax, [r for r in report["rows"] if r["verify_flat"] == flat and round(r["rtt_ms"]) == rtt],
                        sets[0])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("target ms/token (a device's stream)", fontsize=8)
            ax.set_ylabel("draft ms/token", fontsize=8)
            regime = "flat (memory-bound)" if flat else "a row each (compute-bound)"
            ax.set_title(f"RTT {rtt} ms; verification {regime}", fontsize=8)
    fig.colorbar(mesh, ax=axes, label=f"speculation / streaming tokens/s, 1 device, at {sets[0]}'s acceptance")
    fig.suptitle(f"{LABEL}: regime map. Line: speculation = streaming at the acceptance of {sets[0]} (black)"
                 + (f" and {sets[1]} (blue, dashed)" if len(sets) > 1 else "")
                 + ";\nevery sweep cell (larger: more devices): o speculation paid, x streaming won (black "
                 + sets[0] + (f", blue {sets[1]}" if len(sets) > 1 else "") + ")", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
