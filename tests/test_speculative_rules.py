"""The acceptance rules and the fixed-point draft distribution, as pure functions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from specedge.speculative import (Q_ONE, SamplingParams, coupled_choice, greedy_verify, position_noise, quantize,
                                  sample_sparse, softmax, speculative_verify, target_distribution)


def test_greedy_accepts_longest_matching_prefix():
    assert greedy_verify([], [7]) == (0, 7)
    assert greedy_verify([1, 2, 3], [1, 2, 3, 4]) == (3, 4)
    assert greedy_verify([1, 2, 3], [1, 9, 3, 4]) == (1, 9)
    assert greedy_verify([5, 2, 3], [1, 2, 3, 4]) == (0, 1)
    with pytest.raises(ValueError):
        greedy_verify([1, 2], [1, 2])


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-20, 20), min_size=1, max_size=300),
       top_k=st.integers(0, 300), top_p=st.floats(0.05, 1.0))
def test_quantized_q_sums_exactly_to_one(logits, top_k, top_p):
    probs = softmax(np.array(logits))
    q = quantize(probs, top_k, top_p)
    assert int(q.counts.sum()) == Q_ONE
    assert (q.counts >= 1).all() and len(set(q.ids.tolist())) == len(q.ids)
    if top_k:
        assert len(q.ids) <= top_k
    assert int(q.ids[0]) == int(np.argmax(probs)) or probs[q.ids[0]] == probs.max()


def test_sample_sparse_is_the_exact_inverse_cdf():
    q = quantize(softmax(np.array([2.0, 1.0, 0.0, -1.0])), 0, 1.0)
    counts = np.zeros(4, dtype=np.int64)
    for draw in range(Q_ONE):  # every draw once: frequencies are exactly q
        counts[sample_sparse(q, draw)] += 1
    assert counts[q.ids].tolist() == q.counts.tolist()


def test_target_distribution_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = target_distribution(logits, SamplingParams(1.0, top_k=2))
    assert np.allclose(p, [0.625, 0.375, 0, 0])
    p = target_distribution(logits, SamplingParams(1.0, top_p=0.9))
    assert np.allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95)


VOCAB = 6


def _tables(seed):
    """Context-dependent target p(x | prev) and a deliberately different draft."""
    rng = np.random.default_rng(seed)
    p_logits = rng.normal(size=(VOCAB, VOCAB)) * 1.5
    q_logits = p_logits + rng.normal(size=(VOCAB, VOCAB)) * 1.5
    return p_logits, q_logits


@pytest.mark.parametrize("draft_len,q_top_k,params", [
    (1, 6, SamplingParams(1.0)),
    (3, 3, SamplingParams(1.0)),  # sparse q: the draft never proposes half the vocabulary
    (4, 2, SamplingParams(0.7, top_k=4)),
    (2, 6, SamplingParams(1.3, top_p=0.8)),
])
def test_speculative_sampling_reproduces_the_target_distribution(draft_len, q_top_k, params):
    """Chi-square over the first two generated tokens (36 cells) after many rounds."""
    p_logits, q_logits = _tables(draft_len)
    p_table = np.stack([target_distribution(row, params) for row in p_logits])
    q_table = [quantize(softmax(row / params.temperature), q_top_k, 1.0) for row in q_logits]
    rng = np.random.default_rng(1234 + draft_len)
    trials, start = 30000, 0
    counts = np.zeros((VOCAB, VOCAB))
    for _ in range(trials):
        out, prev = [], start
        while len(out) < 2:
            draft, qs, ctx = [], [], prev
            for _ in range(draft_len):
                q = q_table[ctx]
                ctx = sample_sparse(q, int(rng.integers(Q_ONE)))
                draft.append(ctx)
                qs.append(q)
            contexts = [prev] + draft
            p_rows = np.stack([p_table[c] for c in contexts])
            accepted, token = speculative_verify(draft, qs, p_rows, rng)
            new = draft[:accepted] + [token]
            out += new
            prev = out[-1]
        counts[out[0], out[1]] += 1
    expected = p_table[start][:, None] * p_table  # p(a) * p(b | a)
    mask = expected.ravel() > 0
    assert counts.ravel()[~mask].sum() == 0  # never outside the target's support
    stat, pvalue = chisquare(counts.ravel()[mask], expected.ravel()[mask] / expected.ravel()[mask].sum() * trials)
    assert pvalue > 1e-3, f"chi-square {stat:.1f}, p = {pvalue:.2e}"


def test_a_lookup_draft_with_a_point_mass_q_keeps_the_target_distribution():
    """Prompt lookup (device/lookup.py) proposes copied tokens with q a point mass on each: the
    same rule accepts with p(x) and otherwise draws from p without x, so the output is still
    the target's distribution (chi-square over the first two tokens)."""
    from specedge.device.lookup import drafted

    params = SamplingParams(0.8, top_k=5)
    p_logits, _ = _tables(7)
    p_table = np.stack([target_distribution(row, params) for row in p_logits])
    rng = np.random.default_rng(77)
    trials, start = 12000, 0
    counts = np.zeros((VOCAB, VOCAB))
    history = [1, 2, 3, 0, 1, 2, 4, 5, 3, 0]  # ends in "3 0", which came before "1 2 4": proposed
    looked_up = 0
    for _ in range(trials):
        out = []
        while len(out) < 2:
            proposal = drafted(history + out, 3, params)
            draft, qs = (proposal.tokens, proposal.q) if proposal else ([], [])  # none: a plain step
            assert all(len(q.ids) == 1 and q.counts[0] == Q_ONE for q in qs)
            looked_up += bool(draft)
            contexts = [(history + out)[-1]] + draft
            accepted, token = speculative_verify(draft, qs, np.stack([p_table[c] for c in contexts]), rng)
            out += draft[:accepted] + [token]
        counts[out[0], out[1]] += 1
    assert looked_up >= trials  # every first round, at least, verified a lookup
    expected = p_table[start][:, None] * p_table
    mask = expected.ravel() > 0
    assert counts.ravel()[~mask].sum() == 0
    stat, pvalue = chisquare(counts.ravel()[mask], expected.ravel()[mask] / expected.ravel()[mask].sum() * trials)
    assert pvalue > 1e-3, f"chi-square {stat:.1f}, p = {pvalue:.2e}"


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# -- coupled sampling (a request's seed) ---------------------------------------------------------
def test_coupled_noise_is_a_function_of_seed_and_position_alone():
    a = position_noise(7, 100, 50)
    assert np.array_equal(position_noise(7, 100, 50), a)  # no state carries between calls
    assert np.array_equal(position_noise(7, 100, 80)[:50], a)  # the vocabulary's size changes nothing of it
    assert not np.array_equal(position_noise(7, 101, 50), a) and not np.array_equal(position_noise(8, 100, 50), a)
    assert np.isfinite(a).all()


def test_coupled_choices_are_samples_of_p():
    """Over positions (independent noise), the coupled choice under p is distributed as p."""
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    draws = np.bincount([coupled_choice(p, 3, t) for t in range(20000)], minlength=len(p))
    assert draws[-1] == 0  # never outside p's support
    assert chisquare(draws[:-1], 20000 * p[:-1]).pvalue > 1e-3


def test_a_coupled_draft_agrees_with_the_target_at_least_as_the_coupling_bound_says():
    """P(the draft's choice == the target's) under shared noise is at least (1 - d) / (1 + d), d the
    total variation between p and q (the module notes): the acceptance coupling costs."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = softmax(rng.normal(size=12) * 2), softmax(rng.normal(size=12) * 2)
        d = 0.5 * np.abs(p - q).sum()
        agree = np.mean([coupled_choice(p, 11, t) == coupled_choice(q, 11, t) for t in range(4000)])
        assert agree >= (1 - d) / (1 + d) - 0.03, (agree, d)


def test_a_seed_makes_sampling_coupled_and_none_draws_afresh():
    seeded = SamplingParams.seeded(1.0, 0, 1.0, -1)
    assert seeded.coupled and seeded.seed == (1 << 64) - 1 and not seeded.sends_q
    fresh = SamplingParams.seeded(1.0, 0, 1.0, None)
    assert not fresh.coupled and fresh.sends_q
    assert not SamplingParams.seeded(0.0, 0, 1.0, 5).sends_q  # greedy sends no q either
