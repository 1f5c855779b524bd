"""Early exits: exit heads (plain and trained), mid-pass hints through the verifier, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from specedge.cloud.registry import Target
from specedge.cloud.session import TargetSession
from specedge.exit_head import (ExitHead, ExitHeadError, corpus_passages, hidden_states, layer_agreement,
                                load_exit_head, train_exit_head)
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams, greedy_verify


def test_hint_is_the_verdict_the_intermediate_layer_predicts(tiny_models):
    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("the robot arm")
    draft = [5, 6, 7]
    states, _ = hidden_states(target, prompt + draft, [1])
    head = ExitHead(target, 1)
    guesses = head.logits(states[1][len(prompt) - 1:]).argmax(-1).tolist()
    hints = []
    session = TargetSession(Target.in_memory("t", target, tok), prompt, SamplingParams(), 1)
    verdict = session.verify(draft, None, head, lambda accepted, token, confidence: hints.append((accepted, token)))
    assert hints == [greedy_verify(draft, guesses)]
    # the hint changes nothing about the verdict
    plain = TargetSession(Target.in_memory("t", target, tok), prompt, SamplingParams(), 1)
    assert plain.verify(draft, None) == verdict


def test_agent_gets_a_hint_before_every_verdict_and_output_is_unchanged(stack, tiny_models, monkeypatch):
    from conftest import reference_greedy

    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("stop the wheel when the sensor is on")
    verifier = stack.verifier
    monkeypatch.setattr(verifier.cfg.target, "exit_threshold", 0.0)  # every hint leaves
    result = stack.agent.generate(prompt, SamplingParams(), 24, parse_policy("early-exit:3"))
    assert result.tokens == reference_greedy(target, prompt, 24, tok.stop_ids)
    stats = result.stats
    drafted_rounds = sum(1 for d in stats.draft_lens if d)
    assert stats.hints == drafted_rounds > 0  # hints that came after their verdict would not count
    assert stats.hint_layer == 1 and 0 <= stats.hints_agreed <= stats.hints
    monkeypatch.setattr(verifier.cfg.target, "exit_threshold", 1.0)  # none is that sure
    withheld = verifier.stats.hints_withheld
    result = stack.agent.generate(prompt, SamplingParams(), 24, parse_policy("early-exit:3"))
    assert result.stats.hints == 0 and verifier.stats.hints_withheld > withheld


def test_trained_head_agrees_more_than_the_plain_one_and_round_trips(tiny_models, tmp_path):
    _, tok, target, _ = tiny_models
    sequences = corpus_passages(tok, None, 40, 48)
    head, report = train_exit_head(target, sequences, 1, rank=8, steps=150)
    assert report["agreement_trained"] > report["agreement_plain"]
    path = tmp_path / "exit.safetensors"
    head.save(path, report)
    loaded = load_exit_head(target, 1, path)
    assert loaded.layer == 1 and torch.equal(loaded.down, head.down)
    held_out = [(s, 0) for s in sequences[:4]]
    assert layer_agreement(target, held_out, [1], heads={1: loaded}) == layer_agreement(target, held_out, [1],
                                                                                         heads={1: head})


def test_bad_exit_heads_are_refused_clearly(tiny_models, tmp_path):
    _, _, target, _ = tiny_models
    with pytest.raises(ExitHeadError, match="outside"):
        ExitHead(target, target.cfg.n_layers)
    with pytest.raises(ExitHeadError, match="does not exist"):
        load_exit_head(target, 1, tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ExitHeadError, match="unreadable"):
        load_exit_head(target, 1, corrupt)
    wrong = ExitHead(target, 1, torch.zeros(4, target.cfg.dim + 8), torch.zeros(target.cfg.dim + 8, 4))
    wrong.model = target
    path = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file
    save_file({"down": wrong.down, "up": wrong.up}, str(path), metadata={"layer": "1"})
    with pytest.raises(ExitHeadError, match="hidden size"):
        load_exit_head(target, 1, path)


def test_train_exit_head_command(tiny_files, tmp_path):
    _, target = tiny_files
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the robot arm turns left when the sensor is on and the wheel stops at the mat. " * 60)
    out = tmp_path / "head.safetensors"
    proc = subprocess.run([sys.executable, "-m", "specedge.cli", "cloud", "train-exit-head", "--target", str(target),
                           "--corpus", str(corpus), "--passages", "12", "--length", "32", "--rank", "4",
                           "--steps", "20", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["layer"] == 1 and out.stat().st_size > 0
    assert 0.0 <= report["agreement_trained"] <= 1.0
