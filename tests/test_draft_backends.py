"""Draft backends: the ONNX export against PyTorch, onnxruntime drafting like torch, the agent on
onnxruntime giving the target's exact output, and which backend `auto` picks here."""
from __future__ import annotations

import numpy as np
import pytest

from specedge.config import ConfigError, DeviceConfig, DraftConfig, build
from specedge.device.backends import open_engine, unavailable
from specedge.device.draft import TorchDraftEngine
from specedge.device.onnx_export import LOGIT_TOLERANCE, check_export, export
from specedge.device.ort_engine import OrtDraftEngine
from specedge.loader import load_model
from specedge.speculative import SamplingParams


@pytest.fixture(scope="module")
def exported(tiny_files, tmp_path_factory):
    draft_path, _ = tiny_files
    model, tok = load_model(draft_path, dtype="fp32")
    path = export(model, tmp_path_factory.mktemp("onnx") / "draft.onnx")
    return model, tok, path


def test_onnx_logits_match_pytorch_over_prefill_and_decode(exported):
    model, tok, path = exported
    assert path.with_name("draft.onnx.data").exists()  # weights beside the graph
    worst = check_export(model, path, tok.encode("def f(x):\n    return x + 1"), steps=6)
    assert worst < LOGIT_TOLERANCE


def test_onnxruntime_drafts_what_torch_drafts_through_commits_and_rollbacks(exported):
    model, tok, path = exported
    torch_engine, ort_engine = TorchDraftEngine(model), OrtDraftEngine(path, model.cfg)
    assert ort_engine.provider == "CPUExecutionProvider"
    committed = tok.encode("import os\nprint(")
    rng = np.random.default_rng(0)
    for engine in (torch_engine, ort_engine):
        engine.start(committed)
    for round_ in range(6):
        a = torch_engine.draft(4, SamplingParams(), rng)
        b = ort_engine.draft(4, SamplingParams(), rng)
        assert a.tokens == b.tokens and np.allclose(a.confidences, b.confidences, atol=1e-4)
        # The verifier kept some and added its own token: both roll back the same way.
        committed = committed + a.tokens[: round_ % 3] + [7 + round_]
        torch_engine.commit(committed)
        ort_engine.commit(committed)
    sampled = SamplingParams(temperature=0.8, seed=3)
    x = torch_engine.draft(5, sampled, np.random.default_rng(1))
    y = ort_engine.draft(5, sampled, np.random.default_rng(1))
    assert x.tokens == y.tokens  # same draws; the quantised q may differ by a count where floats round apart
    assert all(set(a.ids.tolist()) == set(b.ids.tolist()) and np.abs(a.counts - b.counts).max() <= 2
               for a, b in zip(x.q, y.q))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_next_turn_of_a_conversation_feeds_only_its_new_tokens_and_drafts_as_a_fresh_start(exported, backend):
    model, tok, path = exported
    make = (lambda: TorchDraftEngine(model)) if backend == "torch" else (lambda: OrtDraftEngine(path, model.cfg))
    kept, fresh = make(), make()
    turn1 = tok.encode_chat("turn the arm left")
    kept.start(turn1)
    answer = kept.draft(6, SamplingParams(), np.random.default_rng(0)).tokens
    kept.commit(turn1 + answer)
    turn2 = turn1 + answer + tok.encode_chat("now right")[1:]  # the history, then the new turn
    kept.start(turn2)
    assert kept.reused == len(turn1 + answer) - 1  # all the history's keys and values stayed
    fresh.start(turn2)
    assert fresh.reused == 0
    a, b = (e.draft(5, SamplingParams(), np.random.default_rng(1)) for e in (kept, fresh))
    assert a.tokens == b.tokens and np.allclose(a.confidences, b.confidences, atol=1e-5)
    kept.start(tok.encode("something else entirely"))  # another text: nothing kept
    assert kept.reused == 0


def test_the_agent_on_onnxruntime_gives_the_targets_exact_output(exported, tiny_models, mosquitto):
    from conftest import reference_greedy

    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig
    from specedge.device.agent import Agent
    from specedge.device.policy import parse_policy

    model, tok, path = exported
    _, _, target, target_tok = tiny_models
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": "v-ort", "fleet": "ort", "group": "ort"}}), Target.in_memory("tiny", target, target_tok)).start()
    agent = Agent(build(DeviceConfig, {"device": {"fleet": "ort", "id": "d"}, "mqtt": {"port": mosquitto.port},
                                       "energy": {"meter": "estimated"}}), OrtDraftEngine(path, model.cfg), tok).start()
    try:
        prompt = tok.encode_chat("write a loop")
        result = agent.generate(prompt, SamplingParams(), 40, parse_policy("fixed:4"))
        assert result.tokens == reference_greedy(target, prompt, 40, tok.stop_ids)
        assert result.stats.accepted_tokens > 0
    finally:
        agent.stop()
        verifier.stop()


def test_onnxruntime_exports_on_first_use_and_names_what_it_skipped(tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path))
    draft_path, _ = tiny_files
    assert unavailable("torch") == "" and unavailable("onnxruntime") == ""
    assert unavailable("tensorrt")  # no TensorRT, pycuda or GPU on these machines
    said = []
    # weights int8: the 8-bit graph
    engine, tok = open_engine(DraftConfig(model=str(draft_path), backend="onnxruntime"), said.append)
    assert engine.backend == "onnxruntime"
    assert any("ONNX export checked against PyTorch" in line for line in said)
    assert any("8-bit ONNX draft checked against fp32 PyTorch" in line for line in said)
    said.clear()
    open_engine(DraftConfig(model=str(draft_path), weights="fp32"), said.append)
    assert not any("exporting" in line or "quantising" in line for line in said)  # both cached
    with pytest.raises(ConfigError, match="draft.backend = tensorrt"):
        open_engine(DraftConfig(model=str(draft_path), backend="tensorrt"))
    torch_engine, _ = open_engine(DraftConfig(model=str(draft_path), backend="torch"))
    assert torch_engine.backend == "torch"
    with pytest.raises(ConfigError, match="draft.backend"):
        build(DeviceConfig, {"draft": {"backend": "cuda"}})


@pytest.mark.slow
def test_real_draft_export_matches_pytorch_and_drafts_the_same_tokens():
    from specedge.device.onnx_export import cached_export
    from specedge.loader import load_named

    cfg = DraftConfig(weights="fp32")
    path = cached_export(cfg, print)
    model, tok = load_named(cfg.model, "fp32")
    assert check_export(model, path, tok.encode_chat("Write a binary search in Python."), steps=4) < LOGIT_TOLERANCE
    torch_engine, ort_engine = TorchDraftEngine(model), OrtDraftEngine(path, model.cfg)
    prompt = tok.encode_chat("Write a binary search in Python.")
    for engine in (torch_engine, ort_engine):
        engine.start(prompt)
    rng = np.random.default_rng(0)
    assert torch_engine.draft(16, SamplingParams(), rng).tokens == ort_engine.draft(16, SamplingParams(), rng).tokens


def test_bench_draft_reports_both_backends_and_their_agreement(tiny_files, tmp_path, monkeypatch):
    import argparse
    import json

    from specedge.tools import bench_draft

    monkeypatch.setenv("SPECEDGE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["def add(a, b):"]}\n{"turns": ["import os"]}\n')
    args = argparse.Namespace(draft=str(tiny_files[0]), backends="torch:fp32,onnxruntime:fp32,tensorrt",
                              prompts=str(prompts), max_prompts=2, tokens=6, json=str(tmp_path / "r.json"),
                              plot=str(tmp_path / "r.png"))
    assert bench_draft.run(args) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(rows) == {"torch:fp32", "onnxruntime:fp32"}  # tensorrt: skipped with its reason
    assert rows["onnxruntime:fp32"]["same_greedy_drafts_as_torch"] == 2
    assert rows["onnxruntime:fp32"]["ms_per_token"] > 0 and (tmp_path / "r.png").stat().st_size > 0
