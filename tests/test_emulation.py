"""Emulated compute (specedge/emulation.py): the recording answers exactly what the real models
would on the greedy path, acceptance never needs a row off it, and a pass takes the profile's time."""
import json
import random
import subprocess
import sys
import time

import pytest
import torch

from specedge.cloud.emulated_target import EmulatedTarget
from specedge.cloud.session import TargetSession
from specedge.device.emulated_draft import FILLER, EmulatedDraftEngine
from specedge.emulation import (PROFILE_FORMAT, Fed, Recording, decode_ms, draft_feed_ms, interpolate,
                                target_pass_ms, verify_ms)
from specedge.speculative import SamplingParams, greedy_verify

VOCAB = 50


def profile(kind="target", decode=0.2, per_token=0.05, grid=None):
    p = {"format": PROFILE_FORMAT, "kind": kind, "engine": "synthetic", "decode_ms": {"0": decode, "1000": 2 * decode},
         "prefill_ms_per_token": {"1": per_token, "512": per_token}, "bytes_per_position": 100, "base_context": 0,
         "context_cost": "per_row", "prompt_batch": 0}
    if grid is not None:
        p["verify"] = grid
    return p


def recording(seed=0, prompt_len=5, path_len=30):
    rng = random.Random(seed)
    prompt = [rng.randrange(1, VOCAB) for _ in range(prompt_len)]
    path = [rng.randrange(1, VOCAB) for _ in range(path_len)]
    # The draft agrees with the path two times in three; where it does not, its own next tokens.
    steps = [(path[k] if k < path_len and rng.random() < 0.67 else rng.randrange(1, VOCAB), 0.5)
             for k in range(path_len + 1)]
    after = {k: [steps[k]] + [(rng.randrange(1, VOCAB), 0.3) for _ in range(6)]
             for k in range(path_len) if steps[k][0] != path[k]}
    return Recording(prompt, path, steps, after)


def bundle(recs, target=None, draft=None):
    return {"target": {"vocab_size": VOCAB, "max_seq_len": 4096, "n_layers": 2, "tokenizer": ""},
            "draft": {"vocab_size": VOCAB, "tokenizer": ""},
            "target_profile": target or profile(), "draft_profile": draft or profile("draft"),
            "recordings": [r.to_json() for r in recs]}


def test_greedy_acceptance_never_reads_a_row_off_the_recorded_path():
    """Row i verifies draft[i] after committed + draft[:i]: it is on the path while draft[:i] is.
    Whatever the rows past the first drafted token off the path say, the verdict is the same."""
    rng = random.Random(1)
    for _ in range(2000):
        path = [rng.randrange(4) for _ in range(10)]
        draft = [t if rng.random() < 0.7 else rng.randrange(4) for t in path[:rng.randrange(0, 9)]]
        first_off = next((i for i, (d, p) in enumerate(zip(draft, path)) if d != p), len(draft))
        on_path = path[:first_off + 1]
        for _ in range(5):
            rows = on_path + [rng.randrange(4) for _ in range(len(draft) - first_off)]
            assert greedy_verify(draft, rows) == (first_off, path[first_off])


def test_a_recording_answers_the_targets_and_the_drafts_next_token_on_the_path_and_only_there():
    rec = recording()
    text = rec.prompt + rec.path[:7]
    assert rec.target_next(text) == rec.path[7]
    assert rec.draft_next(text) == rec.steps[7]
    assert rec.target_next(text[:-1] + [(text[-1] + 1) % VOCAB]) is None  # off the path
    m = next(iter(rec.after))
    off = rec.prompt + rec.path[:m] + [rec.after[m][0][0]]
    assert rec.target_next(off) is None
    assert rec.draft_next(off) == rec.after[m][1]  # the real draft's own next token there
    assert rec.draft_next(off + [rec.after[m][1][0]]) == rec.after[m][2]
    assert rec.draft_next(off + [(rec.after[m][1][0] + 1) % VOCAB]) is None  # never recorded
    assert Recording.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_the_emulated_target_verifies_like_the_greedy_rule_on_the_path_and_gives_nan_off_it():
    rec = recording()
    target = EmulatedTarget(bundle([rec]))
    rng = random.Random(2)
    for _ in range(30):
        k = rng.randrange(0, 20)
        session = TargetSession(type("T", (), {"model": target})(), rec.prompt + rec.path[:k], SamplingParams(), 1)
        draft = [t if rng.random() < 0.7 else rng.randrange(VOCAB) for t in rec.path[k:k + rng.randrange(1, 8)]]
        first_off = next((i for i, (d, p) in enumerate(zip(draft, rec.path[k:])) if d != p), len(draft))
        assert session.verify(draft) == (first_off, rec.path[k + first_off])
    cache = target.new_cache()
    rows = target.forward_batch([(rec.prompt + [(rec.path[0] + 1) % VOCAB, rec.path[1]], cache)], keep=[3])[0]
    assert int(rows[0].argmax()) == rec.path[0] and torch.isnan(rows[1:]).all()
    assert target.off_path_rows >= 2 and target.exactness.exact and target.cfg.vocab_size == VOCAB
    from specedge.cloud.session import BadRequest

    with pytest.raises(BadRequest, match="no recording"):  # it never makes tokens up
        TargetSession(type("T", (), {"model": target})(), [7, 7, 7], SamplingParams(), 2)


def test_the_emulated_draft_drafts_what_the_real_draft_did_and_filler_past_the_recording():
    rec = recording(seed=3)
    engine = EmulatedDraftEngine(bundle([rec]))
    greedy = SamplingParams()
    for k in (0, 4, 11):
        engine.start(rec.prompt + rec.path[:k])
        d = engine.draft(6, greedy, None)
        expected, text = [], rec.prompt + rec.path[:k]
        for _ in range(6):
            token = rec.draft_next(text)[0] if rec.draft_next(text) else FILLER
            expected.append(token)
            text = text + [token]
        assert d.tokens == expected
        assert d.confidences[0] == pytest.approx(rec.steps[k][1], rel=1e-4)
    engine.start([9, 9, 9])  # a prompt nobody recorded
    assert engine.draft(2, greedy, None).tokens == [FILLER, FILLER] and engine.unrecorded == 2


def test_a_pass_costs_the_profiles_prefill_verify_grid_and_longer_context():
    grid = {"context": 0, "sessions": [1, 2], "rows": [1, 4], "ms": [[1.0, 4.0], [2.0, None]], "skipped": {}}
    p = profile(grid=grid)
    assert verify_ms(p, 1, 4) == 4.0 and verify_ms(p, 2, 1) == 2.0
    assert verify_ms(p, 1, 2.5) == pytest.approx(2.5)  # between cells, linear
    assert verify_ms(p, 2, 4) == pytest.approx(8.0)  # a cell not measured: from the largest below, by rows
    assert verify_ms(p, 4, 4) == pytest.approx(16.0)  # past the grid: by rows
    assert interpolate({"0": 1.0, "10": 3.0}, 5) == 2.0 and interpolate({"0": 1.0, "10": 3.0}, 50) == 3.0
    # A cold session's 100 prompt rows (its kept row at a context of 100), and a warm one's 4 rows
    # at a context of 1000, where a row costs twice the grid's: the longer contexts add per row.
    ms = target_pass_ms(p, [Fed(0, 101, 1), Fed(1000, 4, 4)])
    assert ms == pytest.approx(100 * 0.05 + verify_ms(p, 2, 2.5) + 0.2 * 100 / 1000 + 4 * 0.2)
    assert draft_feed_ms(p, 0, 1) == 0.2 and draft_feed_ms(p, 0, 10) == pytest.approx(0.5)


def test_a_profile_times_each_figure_once_a_round_so_a_slow_spell_costs_every_figure_alike(tiny_models):
    """The grid's cells (and the decode rows, and the prompts) go round, one sample each per
    round: a 4-row cell's repeats never all fall in one slow spell of the host."""
    from specedge.tools.profile import _round_robin, _verify_grid

    order = []
    medians = _round_robin({k: (lambda k=k: order.append(k)) for k in "abc"}, 3, before=lambda k: order.append("+"),
                           samples={"a": [1e6] * 4})
    assert order == ["+", "a", "+", "b", "+", "c"] * 3 and medians["a"] == 1e6  # earlier samples count

    target = tiny_models[2]
    fed = []

    class Spy:  # the real engine; only what each pass fed is written down
        def __getattr__(self, name):
            return getattr(target, name)

        def forward_batch(self, sequences, **kw):
            fed.append((len(sequences), len(sequences[0][0])))
            return target.forward_batch(sequences, **kw)

    grid = _verify_grid(Spy(), list(range(1, 40)), [1, 2], [1, 4], base=8, budget_s=60, repeats=3)
    assert all(v is not None for row in grid["ms"] for v in row)
    passes = [f for f in fed if f[1] in (1, 4) and f != (1, 8)]  # the prefills to `base` are 8 rows
    # first each cell once, fewest rows first; then two rounds over all four
    assert passes == [(1, 1), (2, 1), (1, 4), (2, 4)] * 3


def test_profiles_taken_at_different_times_merge_into_their_medians_and_only_like_with_like(tmp_path):
    from specedge.tools.profile import merge_profiles

    grid = lambda a, b: {"context": 0, "sessions": [1, 2], "rows": [1], "ms": [[a], [b]], "skipped": {}}
    profs = [{**profile(decode=d, grid=grid(d, g)), "repeats": 3, "model": "m", "machine": {"cpu": "EPYC"},
              "measured_at": f"t{i}"} for i, (d, g) in enumerate([(1.0, None), (3.0, 8.0), (2.0, 4.0)])]
    merged = merge_profiles(profs, ["a", "b", "c"])
    assert merged["decode_ms"] == {"0": 2.0, "1000": 4.0} and merged["verify"]["ms"] == [[2.0], [6.0]]
    assert merged["repeats"] == 9 and [m["measured_at"] for m in merged["merged_from"]] == ["t0", "t1", "t2"]
    for bad, why in ((dict(engine="vllm"), "engine"), (dict(machine={"cpu": "Xeon"}), "another machine"),
                     (dict(assumed=True), "measured"), (dict(decode_ms={"0": 1.0}), "decode_ms")):
        with pytest.raises(ValueError, match=why):
            merge_profiles([profs[0], {**profs[1], **bad}], ["a", "b"])
    files = []
    for i, prof in enumerate([profs[0], {**profs[1], "kind": "draft"}]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(prof))
    proc = subprocess.run([sys.executable, "-m", "specedge.cli", "profile", "merge", *map(str, files),
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "its kind is 'draft'" in proc.stderr and not (tmp_path / "out.json").exists()


def test_a_reread_generated_text_costs_a_decode_step_a_row_where_the_engine_fed_it_so():
    """llama.cpp re-reads a session's text as its own generation fed it: the prompt in calls of
    many rows, each generated token in a call of its own (a decode step, not the prompt rate)."""
    from specedge.emulation import fed_alone

    assert fed_alone([3, 1, 1, 1], 6, 1, 512) == 2 and fed_alone(None, 4, 4, 512) == 0
    assert fed_alone(None, 5, 1, 512) == 4 and fed_alone([3, 1, 1, 1], 6, 1, 0) == 0
    p = profile()  # prompt rate 0.05 ms a token, a decode step 0.2 (0.4 at 1000)
    longer = decode_ms(p, 5) - decode_ms(p, 0)  # the kept row attends over 5 positions, the grid's over 0
    assert target_pass_ms(p, [Fed(0, 6, 1, 2)]) == pytest.approx(3 * 0.05 + 2 * decode_ms(p, 5) + verify_ms(p, 1, 1)
                                                                 + longer)
    rec = recording()
    target = EmulatedTarget(bundle([rec], target={**profile(decode=30.0), "prompt_batch": 512}))
    cache = target.new_cache()
    t0 = time.perf_counter()
    target.forward_batch([(rec.prompt + rec.path[:3], cache)], keep=[1], calls=[[len(rec.prompt), 1, 1, 1]])
    assert time.perf_counter() - t0 >= 2 * 0.03  # two generated tokens re-read alone, then the kept row


def test_an_emulated_pass_is_held_for_the_profiles_time():
    rec = recording()
    target = EmulatedTarget(bundle([rec], target=profile(decode=30.0)))  # 30 ms a row
    cache = target.new_cache()
    target.forward_batch([(rec.prompt, cache)], keep=[1])
    t0 = time.perf_counter()
    target.forward_batch([(rec.path[:3], cache)], keep=[3])
    assert time.perf_counter() - t0 >= 0.09
    assert target.emulation()["passes"] == 2 and target.emulation()["late_passes"] == 0


def test_profile_and_an_emulated_bench_run_on_the_tiny_pair_and_answer_what_the_real_target_does(
        tiny_files, tmp_path, mosquitto):
    """`specedge profile` on both tiny models (llama.cpp where installed), then `specedge bench
    --emulate` with them: the outputs are the real target's own greedy generation."""
    from specedge.cloud.engine import own_generation
    from specedge.cloud.registry import open_engine, resolve_engine
    from specedge.exactness import establish
    from specedge.tools.bench import load_prompts, prompts_file

    draft, target = tiny_files
    small = ["--contexts", "8,64", "--prefill-rows", "2,16", "--repeats", "1"]
    for kind, model in (("target", target), ("draft", draft)):
        out = tmp_path / f"{kind}.json"
        extra = ["--sessions", "1,2", "--rows", "1,3", "--budget-s", "20"] if kind == "target" else []
        proc = subprocess.run([sys.executable, "-m", "specedge.cli", "profile", kind, "--model", str(model),
                               "--json", str(out)] + small + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        prof = json.loads(out.read_text())
        assert prof["kind"] == kind and not prof["emulated"] and set(prof["decode_ms"]) == {"8", "64"}
        assert prof["bytes_per_position"] > 0 and prof["machine"]["cpus"]
    assert all(v is not None for row in json.loads((tmp_path / "target.json").read_text())["verify"]["ms"] for v in row)
    report_path = tmp_path / "emulated.json"
    proc = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench", "--draft", str(draft), "--target", str(target),
         "--emulate", f"{tmp_path / 'target.json'},{tmp_path / 'draft.json'}", "--channel", "lte",
         "--policies", "cloud-ar,fixed:3,adaptive", "--max-prompts", "2", "--max-new-tokens", "12",
         "--meter", "estimated", "--json", str(report_path), "--start-timeout", "120", "--run-timeout", "120"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMULATED compute, not measured" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["emulated"] and report["emulation"]["target_profile"].endswith("target.json")
    assert report["target_engine"] == "emulated" and report["draft_backend"] == "emulated"
    assert report["emulation"]["target"] and report["emulation"]["device"]["unrecorded_steps"] == 0
    assert all(v["off_path_rows"] >= 0 for v in report["emulation"]["target"].values())
    ch = report["channels"]["lte"]
    assert ch["outputs_identical"] is True and ch["policies"]["fixed:3"]["acceptance_rate"] > 0
    engine_name = resolve_engine("auto", target)
    real, tok = open_engine(engine_name, target, None, "bf16", True)
    establish(real)
    prompts = [tok.encode_chat(p) for p in load_prompts(prompts_file(None), 2)]
    want = own_generation(real, prompts, 12, tok.stop_ids)
    assert [r["tokens"] for r in ch["runs"]["fixed:3"]] == want


def _bench_report(tps: float, ttft: float, emulated: bool = False) -> dict:
    runs = [{"prompt_tokens": 90, "tokens": [1, 2, 3]}]
    about = {"target_profile": "t.json", "draft_profile": "d.json"}
    return {"emulated": emulated, "emulation": about if emulated else None,
            "channels": {"lte": {"policies": {"fixed:4": {"tokens_per_s": tps, "ttft_s": ttft}},
                                 "runs": {"fixed:4": runs}}}}


def test_fidelity_puts_emulated_beside_measured_runs_and_never_mixes_them():
    from specedge.tools.fidelity import fidelity

    rows = fidelity(_bench_report(10.5, 1.2, emulated=True), [_bench_report(10.0, 1.0), _bench_report(9.6, 1.05)])
    (row,) = rows
    assert row["tokens_per_s"]["measured"] == [10.0, 9.6] and row["tokens_per_s"]["emulated"] == 10.5
    assert row["tokens_per_s"]["within_bound"] and not row["ttft_s"]["within_bound"]  # 1.2 / 1.025 > 1.15
    assert row["tokens_per_s"]["measured_spread"] == pytest.approx(0.4 / 9.8) and row["same_outputs"]
    with pytest.raises(ValueError, match="not an emulated run"):
        fidelity(_bench_report(10, 1), [_bench_report(10, 1)])
    with pytest.raises(ValueError, match="never mixed"):
        fidelity(_bench_report(10, 1, True), [_bench_report(10, 1, True)])
