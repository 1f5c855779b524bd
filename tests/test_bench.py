"""A short `specedge bench` with tiny models: separate processes, real Mosquitto, emulated channels."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specedge.tools.bench import (SHIPPED_PROMPTS, acceptance_by_position, bench_channels, fit_line, load_prompts,
                                   optimum, prompts_file)
from specedge.tools.channel import default_trace_dir
from specedge.device.scheduler import State


def expected_tokens(accept_by_position, draft_len):
    return State(tuple(accept_by_position), 0.0, 0.0, 0.0, 0.0).expected_tokens(draft_len)


def test_expected_tokens_from_per_position_acceptance():
    assert expected_tokens([0.0], 4) == 1.0
    assert expected_tokens([1.0], 4) == 5.0
    assert expected_tokens([0.5], 2) == pytest.approx(1.75)
    assert expected_tokens([0.8, 0.5], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)


def test_acceptance_by_position_counts_only_tested_positions():
    # Rounds (drafted, accepted): a rejection at j+1 tests j+1; later positions are untested.
    rates = acceptance_by_position([4, 4, 2, 4], [4, 1, 2, 0], positions=4)
    assert rates == pytest.approx([3 / 4, 2 / 3, 1 / 1, 1 / 1])


def test_fit_line_recovers_verify_cost():
    intercept, slope = fit_line([1, 2, 3, 5], [0.11, 0.12, 0.13, 0.15])
    assert intercept == pytest.approx(0.10) and slope == pytest.approx(0.01)
    assert fit_line([3, 3], [0.2, 0.4]) == pytest.approx((0.3, 0.0))


def test_optimum_draft_len_follows_the_link():
    # A slow round trip makes long drafts pay; a poor acceptance makes them useless.
    _, draft_len_far = optimum([0.8], 0.02, 0.05, 0.0, rtt=0.3, rate_up=None, rate_down=None)
    _, draft_len_near = optimum([0.8], 0.02, 0.05, 0.0, rtt=0.001, rate_up=None, rate_down=None)
    _, draft_len_bad = optimum([0.05], 0.02, 0.05, 0.0, rtt=0.3, rate_up=None, rate_down=None)
    assert draft_len_far > draft_len_near and draft_len_bad <= 1


def _trace_pair(folder, stem):
    for side in ("up", "down"):
        (folder / f"{stem}.{side}").write_text("1\n2\n")
    return str(folder / f"{stem}.up"), str(folder / f"{stem}.down")


def test_bench_channels_mix_presets_trace_specs_and_trace_flags(tmp_path):
    up, down = _trace_pair(tmp_path, "bus")
    assert [c.name for c in bench_channels(None, None, None)] == ["ideal", "lte", "umts"]
    assert [c.name for c in bench_channels(f"lte,trace:{up},{down},delay_ms=10,wifi", None, None)] == [
        "lte", "trace:bus,delay_ms=10", "wifi"]
    assert [c.name for c in bench_channels(None, up, down)] == ["trace:bus"]
    assert [c.name for c in bench_channels("ideal", up, down)] == ["ideal", "trace:bus"]
    with pytest.raises(ValueError, match="go together"):
        bench_channels(None, up, None)
    with pytest.raises(ValueError, match="appears twice"):
        bench_channels(f"trace:{up},{down}", up, down)
    with pytest.raises(ValueError, match="unknown channel '5g'"):
        bench_channels("lte,5g", None, None)


def test_every_shipped_prompt_set_loads_and_the_long_context_one_is_long():
    for name in SHIPPED_PROMPTS:
        assert load_prompts(prompts_file(name), None), name
    long = load_prompts(prompts_file("long_context"), None)
    # 740-790 tokens each with Qwen's tokenizer and chat template (about four characters a token
    # in English prose; the real tokenizer is not in the default run)
    assert len(long) == 6 and all(len(text) >= 2600 for text in long), [len(text) for text in long]
    assert sum("Question:" in text for text in long) == 3 and sum(text.startswith("Summarize") for text in long) == 3


def tiny_run(command: str, draft, target, *args: str) -> subprocess.CompletedProcess:
    """`specedge COMMAND` on the tiny pair, the draft and the target on torch."""
    return subprocess.run([sys.executable, "-m", "specedge.cli", command, "--draft", str(draft), "--target", str(target),
                           "--draft-weights", "bf16", "--draft-backend", "torch", "--engine", "torch", *args],
                          capture_output=True, text=True, timeout=600)


def test_tiny_bench_runs_end_to_end(tiny_files, tmp_path, mosquitto):
    draft, target = tiny_files
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = tiny_run(
        "bench", draft, target, "--channel", "ideal,lte", "--meter", "estimated",
        "--policies", "cloud-ar,fixed:1,fixed:3,adaptive,adaptive+no-stream,adaptive-energy:budget=50,pipelined:3,"
                      "adaptive+pipelined,early-exit:3",
        "--max-prompts", "2", "--max-new-tokens", "12", "--json", str(out), "--plot", str(png),
        "--start-timeout", "120", "--run-timeout", "120")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["outputs_identical"] is True
    assert report["git_revision"] and report["machine"]["cores"]
    for channel in ("ideal", "lte"):
        ch = report["channels"][channel]
        assert ch["outputs_identical"] is True
        for policy in ("cloud-ar", "fixed:1", "fixed:3", "adaptive", "adaptive-energy:budget=50", "pipelined:3",
                       "adaptive+pipelined", "early-exit:3"):
            m = ch["policies"][policy]
            for key in ("tokens_per_s", "ttft_s", "acceptance_rate", "mean_accepted_len", "target_passes_per_token",
                        "wire_bytes_per_token", "rounds", "draft_ms_per_token", "verify_ms_per_pass", "rtt_ms",
                        "energy_j_per_token", "energy_source", "speedup_vs_cloud_ar", "optimum_tokens_per_s"):
                assert key in m, (channel, policy, key)
            assert m["energy_source"].startswith("estimated:orin-nano-15w+radio-model:")
            assert m["wire_bytes_per_token"] > 0 and m["energy_j_per_token"] > 0
        assert ch["policies"]["cloud-ar"]["target_passes_per_token"] == pytest.approx(1.0, abs=0.1)
        assert ch["policies"]["fixed:3"]["target_passes_per_token"] < 1.0
        assert ch["policies"]["adaptive-energy:budget=50"]["within_budget"] in (True, False)
        assert ch["policies"]["fixed:3"]["ahead_hit_rate"] is None
        assert 0.0 <= ch["policies"]["pipelined:3"]["ahead_hit_rate"] <= 1.0
        assert 0.0 <= ch["policies"]["early-exit:3"]["early_exit_agreement"] <= 1.0
        assert ch["policies"]["early-exit:3"]["early_exit_layer"] == 1  # 3/4 of the tiny target's 2 layers
        # The adaptive policy streams while its draft prefills, unless the rounds its device
        # measured (the policies before it ran on the same agent) say speculating the whole
        # request pays (Scheduler.start_mode): then it drafts at once. On the tiny pair that is a
        # near tie the host's load decides. Without the stream it speculates from the start.
        assert 0.0 < ch["policies"]["adaptive"]["streamed_share"] <= 1.0
        first = ch["runs"]["adaptive"][0]
        assert first["modes"][0][1] in ("stream", "speculate")
        if first["modes"][0][1] == "speculate":
            assert first["draft_lens"][0] >= 1
        assert ch["policies"]["adaptive+no-stream"]["streamed_share"] == 0.0
        run = ch["runs"]["adaptive+no-stream"][0]
        assert len(run["draft_lens"]) == len(run["round_start_s"]) == len(run["link_down_bps"]) > 0
        # Each run opened its own session: none went on in the one its predecessor kept.
        assert all(r["summary"]["cached_prompt_tokens"] == 0 for runs in ch["runs"].values() for r in runs)
    assert report["channels"]["lte"]["policies"]["fixed:1"]["rtt_ms"] >= 50  # 2 x 30 ms one-way
    layers = report["early_exit_agreement"]
    assert layers["layers"] == 2 and set(layers["agreement"]) == {"1"} and layers["positions"] > 0
    assert png.stat().st_size > 10_000
    assert (tmp_path / "bench-draft-length.png").stat().st_size > 10_000
    assert "outputs identical to cloud-ar: True" in proc.stdout
    assert "Verizon-LTE-short.up (5.95 Mbit/s mean)" in report["channels"]["lte"]["description"]
    assert f"channel lte: {report['channels']['lte']['description']}" in proc.stdout
    # `specedge compare` puts a run next to another (here itself): every policy and the local target.
    from specedge.tools.compare import compare

    rows = compare(report, report)
    assert len(rows) == 2 * 9 + 1 and all(r["ttft_shorter_x"] == r["tokens_per_s_x"] == 1.0 for r in rows)
    assert all(r["same_outputs"] for r in rows) and rows[0]["prompt_tokens"]


def test_compare_puts_two_demo_reports_side_by_side_and_refuses_anything_else(tmp_path, capsys):
    from argparse import Namespace

    from specedge.tools.compare import run

    old = {"policy": "fixed:4", "ttft_s": 3.72, "tokens_per_s": 7.45, "baseline_ttft_s": 2.63,
           "baseline_tokens_per_s": 11.32, "text": "def f():", "git_revision": "deae8c2aa"}
    new = dict(old, ttft_s=2.31, tokens_per_s=8.28, baseline_ttft_s=1.47, baseline_tokens_per_s=11.88)
    paths = [tmp_path / "old.json", tmp_path / "new.json", tmp_path / "bad.json"]
    for path, report in zip(paths, (old, new, {"tokens": []})):
        path.write_text(json.dumps(report))
    out = tmp_path / "cmp.json"
    assert run(Namespace(before=str(paths[0]), after=str(paths[1]), json=str(out), plot=str(tmp_path / "c.png"))) == 0
    rows = {r["label"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["cloud-ar"]["ttft_s"] == [2.63, 1.47] and rows["fixed:4"]["same_outputs"] is True
    assert rows["fixed:4"]["ttft_shorter_x"] == pytest.approx(3.72 / 2.31)
    assert (tmp_path / "c.png").stat().st_size > 10_000 and "1.79x" in capsys.readouterr().out
    assert run(Namespace(before=str(paths[0]), after=str(paths[2]), json=None, plot=None)) == 2
    assert "neither a `specedge bench` nor a `specedge demo` report" in capsys.readouterr().err


def test_tiny_sampled_bench_counts_the_naive_wire_cost_over_a_custom_trace(tiny_files, tmp_path, mosquitto):
    draft, target = tiny_files
    out = tmp_path / "bench.json"
    # The lte preset's own traces, brought as a custom pair.
    up, down = (default_trace_dir() / f"Verizon-LTE-short.{side}" for side in ("up", "down"))
    channel = f"trace:{up},{down},delay_ms=30,jitter_ms=5"
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench", "--draft", str(draft), "--target", str(target),
         "--draft-weights", "bf16", "--channel", channel, "--meter", "estimated", "--temperature", "0.8",
         "--policies", "cloud-ar,fixed:3,pipelined:3", "--max-prompts", "1", "--max-new-tokens", "12",
         "--json", str(out), "--start-timeout", "120", "--run-timeout", "120"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["outputs_identical"] is None  # sampled: compared by distribution, in test_pipeline
    link = report["channels"]["trace:Verizon-LTE-short,delay_ms=30,jitter_ms=5"]
    assert link["link"]["up_trace"] == str(up) and link["description"].startswith("up Verizon-LTE-short.up (5.95")
    policies = link["policies"]
    assert policies["cloud-ar"]["naive_wire_bytes_per_token"] is None
    for name in ("fixed:3", "pipelined:3"):
        m = policies[name]
        # the naive baseline ships vocabulary-sized fp16 rows per drafted token (the tiny vocabulary: 2 x 256 B)
        assert m["naive_wire_bytes_per_token"] > 2 * m["wire_bytes_per_token"]


def test_a_bench_with_prompt_lookup_reports_each_sources_acceptance_and_stays_exact(tiny_files, tmp_path, mosquitto):
    draft, target = tiny_files
    out = tmp_path / "bench.json"
    proc = tiny_run(
        "bench", draft, target, "--channel", "ideal", "--meter", "estimated", "--draft-sources", "lookup,model",
        "--prompts", "code_edits", "--policies", "cloud-ar,fixed:3,adaptive", "--max-prompts", "2",
        "--max-new-tokens", "24", "--no-local-target", "--json", str(out), "--start-timeout", "120",
        "--run-timeout", "120")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["draft_sources"] == "lookup,model" and report["outputs_identical"] is True
    policies = report["channels"]["ideal"]["policies"]
    assert policies["cloud-ar"]["lookup_rounds"] == 0 and policies["cloud-ar"]["lookup_acceptance"] is None
    m = policies["fixed:3"]
    assert m["lookup_rounds"] > 0 and 0 <= m["lookup_acceptance"] <= 1
    assert "draft sources lookup,model" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "specedge.cli", "bench", "--draft-sources", "model,lookup"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "draft.sources: allowed values are model, lookup or lookup,model" in bad.stderr


def test_bench_apps_runs_a_conversation_kept_and_afresh_with_the_same_answers(tiny_files, tmp_path, mosquitto):
    draft, target = tiny_files
    out, png = tmp_path / "apps.json", tmp_path / "apps.png"
    proc = tiny_run("bench-apps", draft, target, "--channel", "ideal", "--max-new-tokens", "8", "--json", str(out),
                    "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["outputs_identical"] is True and report["exact"] is True
    kept, afresh = report["runs"]["kept"], report["runs"]["afresh"]
    assert len(kept) == len(afresh) == 5 and all(t["cached_tokens"] == 0 for t in afresh)
    for k, a in zip(kept[1:], afresh[1:]):  # from the second turn on, the history stays up
        assert 0 < k["cached_tokens"] < k["prompt_tokens"] == a["prompt_tokens"]
        assert k["uplink_bytes"] < a["uplink_bytes"]
    assert png.stat().st_size > 10_000 and "outputs identical: True" in proc.stdout


def test_bench_apps_robot_asks_in_free_text_and_under_the_grammar(tiny_files, tmp_path, mosquitto):
    """Under the action schema every answer of the (random) tiny target is a valid action, its own
    constrained greedy decoding, with the schema's keys forced; free text is measured beside it."""
    draft, target = tiny_files
    out, png = tmp_path / "robot.json", tmp_path / "robot.png"
    # The longest action is 54 tiny tokens: room for it, and its stop token.
    proc = tiny_run("bench-apps", draft, target, "--app", "robot", "--channel", "ideal", "--max-new-tokens", "64",
                    "--max-prompts", "3", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["app"] == "robot" and report["grammar_ok"] is True and set(report["runs"]) == {"free-text", "grammar"}
    for name, actions in report["runs"].items():
        assert len(actions) == 3 and [a["instruction"] for a in actions] == \
            [a["instruction"] for a in report["runs"]["free-text"]]
        for a in actions:
            for key in ("valid", "finished", "rounds", "uplink_bytes", "uplink_bytes_per_token", "forced_tokens",
                        "forced_share", "total_s", "generated_tokens", "exact", "text"):
                assert key in a, (name, key)
        mode = report["modes"][name]
        for key in ("valid", "actions", "mean_rounds", "uplink_bytes_per_token", "forced_share", "latency_mean_s",
                    "latency_p50_s", "latency_max_s"):
            assert key in mode, (name, key)
    for a in report["runs"]["grammar"]:
        assert a["finished"] and a["valid"] and a["constrained_exact"], a
        assert json.loads(a["text"])["action"] in ("move", "turn", "grip", "release", "stop")
        assert a["forced_tokens"] > 0 and a["rounds"] < a["generated_tokens"]
    assert report["modes"]["grammar"]["valid"] == 3 and report["modes"]["grammar"]["constrained_exact"] == 3
    assert all(a["forced_tokens"] == 0 for a in report["runs"]["free-text"])
    assert png.stat().st_size > 10_000 and "constrained exact 3/3" in proc.stdout


def test_a_numerical_engines_differences_are_shown_with_the_top2_gap_there(tiny_files, tiny_models):
    """The bench's check on a numerical engine: a run that parts from cloud-ar is named with the
    engine's top-2 gap at the first differing position, and passes only inside the near-tie limit."""
    from conftest import reference_greedy
    from specedge.tools.bench import divergences
    from specedge.cloud.registry import open_engine

    tok = tiny_models[1]
    engine = open_engine("llama.cpp", tiny_files[1], None, "gguf", True)[0]
    prompt = tok.encode_chat("write a loop")
    want = reference_greedy(engine, prompt, 8, ())
    parted = want[:3] + [(want[3] + 1) % 200] + want[4:]
    results = {"ideal": {"runs": {"cloud-ar": [{"tokens": want, "prompt": prompt}],
                                  "fixed:3": [{"tokens": parted, "prompt": prompt}]}}}
    measured = {"engine": "llama.cpp", "exact": False, "invariant": False}  # as Exactness.describe() says
    strict = divergences(results, str(tiny_files[1]), "gguf", {**measured, "trials": [{"max_abs_diff": 0.0}]})
    assert strict["runs"] == 2 and strict["differing_runs"] == 1
    [first] = strict["first_differences"]
    assert first["policy"] == "fixed:3" and first["position"] == 3 and first["top2_gap"] > 0
    assert strict["near_ties"] is False  # no rounding was seen, so no difference is excused
    loose = divergences(results, str(tiny_files[1]), "gguf", {**measured, "trials": [{"max_abs_diff": 1e9}]})
    assert loose["near_ties"] is True and loose["first_differences"] == strict["first_differences"]


def test_the_bench_on_batched_llama_cpp_says_numerical_and_which_engines_ran(tiny_files, tmp_path, mosquitto):
    draft, target = tiny_files
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench", "--draft", str(draft), "--target", str(target),
         "--no-batch-invariant", "--channel", "ideal", "--meter", "estimated", "--policies", "cloud-ar,fixed:3",
         "--max-prompts", "2",
         "--max-new-tokens", "12", "--json", str(out), "--start-timeout", "120", "--run-timeout", "120"],
        capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert (report["draft_backend"], report["target_engine"]) == ("llama.cpp", "llama.cpp")
    assert report["exactness_class"] == "numerical" and report["exact"] is False
    assert report["target_self_test"]["invariant"] is False
    if report["outputs_identical"] is False:
        assert "divergences" in report and "numerical engine:" in proc.stdout
    assert proc.returncode == (0 if report["outputs_identical"] or report["divergences"]["near_ties"] else 1)
    assert "target engine llama.cpp (numerical)" in proc.stdout
    base = report["local_target"]  # the same engine alone decodes what cloud-ar through the verifier did
    assert base["outputs_identical_to_cloud_ar"] is True and base["tokens_per_s"] > 0 and len(base["runs"]) == 2
    m = report["channels"]["ideal"]["policies"]["fixed:3"]
    assert m["speedup_vs_local_target"] == pytest.approx(m["tokens_per_s"] / base["tokens_per_s"])
    assert "ideal vs local-target: cloud-ar" in proc.stdout


def test_bench_verifier_sets_speculation_against_batched_cloud_ar_on_the_same_engine(tiny_files, tmp_path):
    """Two devices on a llama.cpp verifier: speculating (batched), decoding for each (cloud-ar) and one
    session a pass (unbatched); every output equal to the engine's own decoding."""
    draft, target = tiny_files
    out = tmp_path / "bv.json"
    env = {**os.environ, "SPECEDGE_CACHE": str(tmp_path / "cache")}  # recordings of its own
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench-verifier", "--draft", str(draft), "--target", str(target),
         "--engine", "llama.cpp", "--devices", "2", "--replicas", "1", "--max-prompts", "2", "--tokens", "12",
         "--start-timeout", "120", "--round-timeout", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["runs"]}
    assert set(rows) == {"batched", "cloud-ar", "unbatched"}
    for row in rows.values():
        assert row["engine"] == "llama.cpp" and row["exactness_class"] == "exact"
        assert row["sessions_lost"] == 0 and row["tokens"] > 0 and row["outputs_wrong"] == 0
        assert row["per_device_tokens_per_s"] == pytest.approx(row["tokens_per_s"] / 2)
    assert rows["batched"]["passes_per_token"] < rows["cloud-ar"]["passes_per_token"]
    cores = sorted(os.sched_getaffinity(0))
    assert report["machine"]["pinning"] == (f"device on cores {cores[:len(cores) // 2]}, verifier on cores "
                                            f"{cores[len(cores) // 2:]}" if len(cores) > 1 else
                                            "one core: device and verifier share it (not pinned)")
    assert report["speedup_vs_cloud_ar"]["1x2"] == pytest.approx(
        rows["batched"]["tokens_per_s"] / rows["cloud-ar"]["tokens_per_s"])


def test_bench_verifier_deals_the_verifier_cores_out_to_its_replicas():
    from specedge.tools.bench_verifier import _replica_cores

    assert _replica_cores([2, 3, 4, 5], 2) == [[2, 3], [4, 5]]
    assert _replica_cores([1], 1) == [[1]]
    assert _replica_cores([1], 2) == [[1], [1]]  # fewer cores than replicas: they share them
    assert _replica_cores([], 2) == [[], []]  # one-core host: unpinned


def test_bench_verifier_on_an_emulated_target_answers_what_the_real_one_did_and_says_emulated(tiny_files, tmp_path):
    """The replicas on the emulated target (a profile of the tiny target, its recorded paths):
    every output equals the real target's, and the report and rows say emulated."""
    draft, target = tiny_files
    env = {**os.environ, "SPECEDGE_CACHE": str(tmp_path / "cache")}
    prof = tmp_path / "target.json"
    subprocess.run([sys.executable, "-m", "specedge.cli", "profile", "target", "--model", str(target), "--sessions",
                    "1,2", "--rows", "1,5", "--contexts", "8,64", "--prefill-rows", "2,16", "--repeats", "1",
                    "--json", str(prof)], check=True, capture_output=True, timeout=300, env=env)
    out = tmp_path / "bv.json"
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench-verifier", "--draft", str(draft), "--target", str(target),
         "--engine", "llama.cpp", "--devices", "2", "--replicas", "1", "--max-prompts", "2", "--tokens", "12",
         "--no-baseline", "--emulate", str(prof), "--start-timeout", "120", "--round-timeout", "30",
         "--json", str(out), "--plot", str(tmp_path / "bv.png")],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["emulated"] and report["emulation"]["target_profile"] == str(prof)
    for row in report["runs"]:
        assert row["engine"] == "emulated" and row["outputs_wrong"] == 0 and row["sessions_lost"] == 0
        assert row["emulation"] and all(e["off_path_rows"] >= 0 for e in row["emulation"])
    assert {r["mode"] for r in report["runs"]} == {"batched", "cloud-ar"}
