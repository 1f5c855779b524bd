"""Drafting ahead (device/pipeline.py): kept only when its bet on the verdict holds, so sampled
output keeps the target's distribution and greedy output the target's tokens."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from specedge.device.draft import Drafted
from specedge.device.pipeline import Ahead
from specedge.speculative import Q_ONE, SamplingParams, quantize, sample_sparse, softmax, speculative_verify
from test_speculative_rules import VOCAB, _tables


class TableDraftEngine:
    """A test instrument with the draft engine's interface (commit / draft): the draft model is a
    table q(x | previous token), so tens of thousands of generations take seconds."""

    def __init__(self, q_table):
        self.q_table, self.text = q_table, []
        self.vocab_size = VOCAB

    def commit(self, committed):
        self.text = list(committed)

    def draft(self, draft_len, params, rng, stop_ids=frozenset(), keep_going=None):
        out = Drafted.empty(params)
        for _ in range(draft_len):
            q = self.q_table[self.text[-1]]
            token = int(q.ids[np.argmax(q.counts)]) if params.greedy else sample_sparse(q, int(rng.integers(Q_ONE)))
            out.tokens.append(token)
            out.confidences.append(q.prob(token))
            if out.q is not None:
                out.q.append(q)
            self.text.append(token)
        return out


def generate(engine, p_table, draft_len, params, device_rng, cloud_rng, redirect_rate, n_tokens):
    """The agent's pipelined round loop without the network: the verdict arrives after a random
    amount of drafting ahead, sometimes after a (random) early-exit hint redirected the bet."""
    committed = [0]
    engine.commit(committed)
    carried = None
    kept = 0
    while len(committed) - 1 < n_tokens:
        drafted = carried if carried is not None else Drafted([], [], [])
        if len(drafted.tokens) < draft_len:
            drafted.extend(engine.draft(draft_len - len(drafted.tokens), params, device_rng))
        ahead = Ahead(engine, list(committed), list(drafted.tokens), params, device_rng, frozenset(),
                      lambda accepted: draft_len)
        for _ in range(int(device_rng.integers(0, draft_len + 3))):
            if ahead.wants_more():
                ahead.step()
        if device_rng.random() < redirect_rate:
            ahead.redirect(int(device_rng.integers(0, len(drafted.tokens) + 1)), int(device_rng.integers(VOCAB)))
            for _ in range(int(device_rng.integers(0, draft_len + 2))):
                if ahead.wants_more():
                    ahead.step()
        contexts = [committed[-1]] + drafted.tokens
        accepted, token = speculative_verify(drafted.tokens, drafted.q, p_table[contexts], cloud_rng)
        committed += drafted.tokens[:accepted] + [token]
        carried = ahead.resolve(accepted, token, committed)
        kept += carried is not None and len(carried.tokens) > 0
        assert engine.text == committed + (carried.tokens if carried else [])
    return committed[1:], kept


@pytest.mark.parametrize("draft_len,redirect_rate", [(1, 0.0), (2, 0.3), (3, 0.5)])
def test_pipelined_sampling_reproduces_the_target_distribution(draft_len, redirect_rate):
    """Chi-square over generated tokens 3 and 4 (36 cells): by then most rounds start from a kept block."""
    params = SamplingParams(1.0)
    p_logits, q_logits = _tables(draft_len + 10)
    p_table = np.stack([softmax(row) for row in p_logits])
    q_table = [quantize(softmax(row), 4, 1.0) for row in q_logits]
    engine = TableDraftEngine(q_table)
    device_rng, cloud_rng = np.random.default_rng(7 + draft_len), np.random.default_rng(99 + draft_len)
    trials, counts, kept = 12000, np.zeros((VOCAB, VOCAB)), 0
    for _ in range(trials):
        out, k = generate(engine, p_table, draft_len, params, device_rng, cloud_rng, redirect_rate, 4)
        counts[out[2], out[3]] += 1
        kept += k
    assert kept > trials // 10  # the pipelined path really ran: thousands of kept blocks
    marginal = p_table[0] @ p_table  # token 2's distribution (token 1 follows the start token 0)
    expected = (marginal @ p_table)[:, None] * p_table  # p(x3 = a) p(x4 = b | a)
    stat, pvalue = chisquare(counts.ravel(), expected.ravel() * trials)
    assert pvalue > 1e-3, f"chi-square {stat:.1f}, p = {pvalue:.2e}"


def test_a_block_is_kept_only_when_the_verdict_matches_the_bet():
    _, q_logits = _tables(3)
    q_table = [quantize(softmax(row), 4, 1.0) for row in q_logits]
    engine = TableDraftEngine(q_table)
    rng = np.random.default_rng(0)
    committed, draft = [0], [1, 2]
    engine.commit(committed + draft)
    ahead = Ahead(engine, committed, draft, SamplingParams(1.0), rng, frozenset(), lambda a: 3)
    while ahead.wants_more():
        ahead.step()
    accepted, guess = ahead.branch
    assert accepted == 2 and len(ahead.block.tokens) == 3  # the bet, then a full next block
    # the verdict disagrees: nothing is kept and the engine is back on the committed text
    assert ahead.resolve(2, (guess + 1) % VOCAB, [0, 1, 2, (guess + 1) % VOCAB]) is None
    assert engine.text == [0, 1, 2, (guess + 1) % VOCAB]
    # the bet holds: the block is the next draft
    engine.commit(committed + draft)
    ahead = Ahead(engine, committed, draft, SamplingParams(1.0), rng, frozenset(), lambda a: 3)
    while ahead.wants_more():
        ahead.step()
    accepted, guess = ahead.branch
    kept = ahead.resolve(2, guess, [0, 1, 2, guess])
    assert kept is not None and engine.text == [0, 1, 2, guess] + kept.tokens and len(kept.q) == 3


def test_a_hint_redirects_the_bet_and_drops_the_other_branch():
    _, q_logits = _tables(4)
    engine = TableDraftEngine([quantize(softmax(row), 4, 1.0) for row in q_logits])
    rng = np.random.default_rng(1)
    engine.commit([0, 1, 2, 3])
    ahead = Ahead(engine, [0], [1, 2, 3], SamplingParams(), rng, frozenset(), lambda a: 2)
    ahead.step()
    ahead.step()
    ahead.redirect(1, 5)  # the hint: token 2 is rejected and the target says 5
    assert ahead.branch == (1, 5) and ahead.block.tokens == [] and engine.text == [0, 1, 5]
    while ahead.wants_more():
        ahead.step()
    assert len(ahead.block.tokens) == 2
    ahead.redirect(4, 0)  # a hint accepting more than was drafted is ignored
    assert ahead.branch == (1, 5)
    kept = ahead.resolve(1, 5, [0, 1, 5])
    assert kept is not None and engine.text == [0, 1, 5] + kept.tokens


def test_nothing_is_drafted_ahead_past_a_stop_token_or_the_room_left():
    _, q_logits = _tables(5)
    engine = TableDraftEngine([quantize(softmax(row), 4, 1.0) for row in q_logits])
    engine.commit([0, 4])
    ahead = Ahead(engine, [0], [4], SamplingParams(), np.random.default_rng(0), frozenset({4}), lambda a: 3)
    assert not ahead.wants_more()  # the draft ends on a stop token
    engine.commit([0, 1])
    ahead = Ahead(engine, [0], [1], SamplingParams(), np.random.default_rng(0), frozenset(), lambda a: 0)
    ahead.step()
    assert not ahead.wants_more()  # the bet is placed, but the request has no room for another block
