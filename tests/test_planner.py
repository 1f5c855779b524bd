"""The planner (specedge/tools/planner.py): rounds on virtual time with the product's own scheduler, the
assumed profiles' roofline, and `specedge plan` / `regimes` end to end on the tiny pair."""
import json
import subprocess
import sys

import pytest

from specedge.tools.assumed import assumed_profile, pass_ms
from specedge.emulation import PROFILE_FORMAT, Recording
from specedge.tools.planner import Setup, acceptance_by_position, devices_at_floor, one_way_s, simulate
from specedge.tools.channel import preset


def profile(kind, decode_ms, per_row: bool):
    """A target whose pass costs `decode_ms` a row (a CPU) or per pass whatever the rows (a GPU)."""
    grid = [1, 2, 4, 8, 16, 32, 64]
    cost = (lambda s, k: decode_ms * s * k) if per_row else (lambda s, k: decode_ms)
    p = {"format": PROFILE_FORMAT, "kind": kind, "engine": "synthetic", "decode_ms": {"0": decode_ms},
         "prefill_ms_per_token": {"1": decode_ms / 10}, "bytes_per_position": 100, "base_context": 0,
         "context_cost": "per_row" if per_row else "per_session", "prompt_batch": 0}
    if kind == "target":
        p["verify"] = {"context": 0, "sessions": grid, "rows": grid, "skipped": {},
                       "ms": [[cost(s, k) for k in grid] for s in grid]}
    return p


STOP = 99


def recording(prompt_len=20, path_len=200, miss_every=12):
    """A path the draft follows except every `miss_every`-th position (acceptance ~ 1 - 1/12)."""
    prompt = list(range(1, prompt_len + 1))
    path = [(7 * k) % 50 + 1 for k in range(path_len)]
    steps = [(path[k] if k % miss_every else 0, 0.9) for k in range(path_len)] + [(STOP, 0.5)]
    after = {k: [(0, 0.9)] + [(0, 0.5)] * 40 for k in range(0, path_len, miss_every)}
    return Recording(prompt, path, steps, after)


def setup(target, draft, channel="ideal", devices=1, max_new=64, max_draft=16, **kw):
    return Setup(target, draft, [recording()], preset(channel), devices=devices, max_new=max_new,
                 max_draft=max_draft, stop_ids=frozenset({STOP}), **kw)


def test_a_fixed_policy_commits_the_recorded_path_and_accepts_as_far_as_the_draft_follows_it():
    s = setup(profile("target", 20, per_row=False), profile("draft", 2, per_row=False))
    out = simulate(s, "fixed:4")
    # From position p a draft of 4 is accepted up to the next miss (every 12th position).
    rec, p, accepted, drafted = recording(), 0, 0, 0
    while p < 64:
        run = next(i for i in range(5) if i == 4 or rec.steps[p + i][0] != rec.path[p + i])
        k = min(4, 64 - p - 1)
        accepted, drafted, p = accepted + min(run, k), drafted + k, p + min(run, k) + 1
    assert out["acceptance"] == pytest.approx(accepted / drafted)
    assert out["streamed_share"] == 0 and out["target_passes"] > 0


def test_one_streaming_device_gets_a_token_a_pass_after_the_prompt():
    target = profile("target", 20, per_row=False)
    out = simulate(setup(target, profile("draft", 2, per_row=False), max_new=50), "cloud-ar")
    prompt_ms = 19 * 20 / 10  # the prompt's rows but the last at 2 ms, then the last's pass (20 ms)
    assert out["ttft_s"] == pytest.approx((prompt_ms + 20) / 1000, rel=0.05)
    assert out["tokens_per_s"] == pytest.approx(50 / (out["ttft_s"] + 49 * 0.020), rel=0.02)


def test_where_a_pass_costs_a_row_each_adaptive_streams_and_where_it_is_flat_it_drafts_past_8():
    """The regime: a CPU target (every verified row a decode step) and a draft nearly as slow ->
    stream; a GPU target (k rows cost one) and a fast draft with this acceptance -> speculate, long."""
    cpu = setup(profile("target", 100, per_row=True), profile("draft", 40, per_row=True), "lte", warmup=1)
    gpu = setup(profile("target", 60, per_row=False), profile("draft", 3, per_row=False), "lte", warmup=1)
    on_cpu = {p: simulate(cpu, p) for p in ("cloud-ar", "fixed:4", "adaptive")}
    on_gpu = {p: simulate(gpu, p) for p in ("cloud-ar", "fixed:16", "adaptive")}
    assert on_cpu["cloud-ar"]["tokens_per_s"] > on_cpu["fixed:4"]["tokens_per_s"]
    assert on_cpu["adaptive"]["streamed_share"] > 0.9
    assert on_cpu["adaptive"]["tokens_per_s"] >= 0.95 * on_cpu["cloud-ar"]["tokens_per_s"]
    assert on_gpu["fixed:16"]["tokens_per_s"] > 2 * on_gpu["cloud-ar"]["tokens_per_s"]
    assert on_gpu["adaptive"]["mean_draft_len"] > 8 and on_gpu["adaptive"]["streamed_share"] < 0.1
    assert on_gpu["adaptive"]["tokens_per_s"] >= 0.95 * on_gpu["fixed:16"]["tokens_per_s"]


def test_devices_at_the_floor_is_the_most_devices_that_each_keep_it():
    s = setup(profile("target", 5, per_row=True), profile("draft", 2, per_row=False), max_new=32)
    floor = 20.0
    most, at = devices_at_floor(s, "cloud-ar", floor, most=64)
    assert 1 <= most < 64 and at["tokens_per_s"] >= floor
    from dataclasses import replace

    assert simulate(replace(s, devices=most + 1), "cloud-ar")["tokens_per_s"] < floor


def test_a_blackout_holds_a_message_until_the_link_comes_back():
    varying = preset("varying")
    start, phase = next((s, p) for s, p in varying.phases if p.name == "blackout")
    end = next(s for s, _ in varying.phases if s > start)
    assert one_way_s(varying, start + 0.5, 100, True) >= end - (start + 0.5)
    assert one_way_s(preset("ideal"), 0.0, 100, True) == 0.0


def test_acceptance_by_position_reads_the_recordings_runs():
    acc = acceptance_by_position([recording()], 4)
    assert 0.85 < acc[0] < 0.95 and all(0.8 < a <= 1.0 for a in acc)


def test_an_assumed_profile_is_the_roofline_of_its_datasheet_and_says_it_is_an_assumption():
    p = assumed_profile("target", "h100-sxm", "qwen2.5-7b", "bf16")
    assert p["assumed"] and "datasheet" in p["assumption"]["source"] and p["weights"].startswith("none")
    # Decode reads every weight once: ~15 GB at 70 % of 3.35 TB/s, plus the pass's overhead.
    assert 6.5 < p["decode_ms"]["128"] < 9.0
    grid = p["verify"]["ms"]
    assert grid[0][3] == pytest.approx(grid[0][0], rel=0.01)  # 8 rows cost one: memory-bound
    assert pass_ms(__import__("specedge.tools.assumed", fromlist=["SHAPES"]).SHAPES["qwen2.5-7b"], "h100-sxm",
                   "bf16", 64, 64, 128) > 4 * grid[0][0]  # 4096 rows: compute-bound


def test_plan_and_regimes_run_on_the_tiny_pair_and_label_every_figure_emulated(tiny_files, tmp_path):
    """`specedge plan` records the tiny pair through the real engines, plans from `specedge profile
    --assumed` profiles, saves the recordings; `regimes` plans again from them alone."""
    draft, target = tiny_files
    t, d = tmp_path / "t.json", tmp_path / "d.json"
    for kind, path, hw, shape in (("target", t, "l4", "qwen2.5-1.5b"), ("draft", d, "agx-orin-64gb", "qwen2.5-0.5b")):
        proc = subprocess.run([sys.executable, "-m", "specedge.cli", "profile", kind, "--assumed", hw, "--shape", shape,
                               "--dtype", "bf16" if kind == "target" else "q4_k_m", "--json", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    recs, report = tmp_path / "recs.json", tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "plan", "--draft", str(draft), "--target", str(target),
         "--target-profile", str(t), "--draft-profile", str(d), "--prompts", "code_edits", "--max-prompts", "2",
         "--max-new-tokens", "12", "--max-draft", "4", "--channel", "lte", "--devices", "1,2", "--floor", "5",
         "--policies", "cloud-ar,fixed:2,adaptive", "--save-recordings", str(recs), "--json", str(report),
         "--plot", str(tmp_path / "plan.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMULATED" in proc.stdout and "ASSUMED" in proc.stdout
    out = json.loads(report.read_text())
    assert out["emulated"] and out["target_profile"]["assumed"]
    floors = [c for c in out["cells"] if "devices_at_floor" in c]
    assert {c["policy"] for c in floors} == {"cloud-ar", "fixed:2", "adaptive"}
    assert (tmp_path / "plan.png").stat().st_size > 0
    saved = json.loads(recs.read_text())
    assert saved["stop_ids"] and len(saved["recordings"]) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "regimes", "--pairs", f"tiny={t}:{d}:1", "--recordings-sets",
         str(recs), "--max-new-tokens", "12", "--max-draft", "4", "--channel", "lte",
         "--policies", "cloud-ar,fixed:2,adaptive", "--json", str(tmp_path / "r.json"), "--map",
         str(tmp_path / "map.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    regimes = json.loads((tmp_path / "r.json").read_text())
    assert regimes["emulated"] and len(regimes["rows"]) == 1 and (tmp_path / "map.png").stat().st_size > 0
    assert proc.returncode == (0 if regimes["all_within"] else 1)
