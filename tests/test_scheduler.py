"""The draft-length scheduler: the decision rule on constructed states, the estimators on
synthetic streams, and the agent adapting when the emulated channel changes mid-run."""
from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from specedge.device.scheduler import (SPECULATE, STREAM, AcceptanceEstimator, Ewma, LinearFit, Objective,
                                       Scheduler, State, best_rate, choose_mode, plan, request_budget,
                                       speculation_can_pay)

# Shaped like the real pair on one CPU core: 76 ms a drafted token, ~300 ms a verification.
BASE = State(accept_by_position=(0.7, 0.65, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6), draft_s=0.076,
             verify_base_s=0.28, verify_per_row_s=0.005, rtt_s=0.07)
THROUGHPUT = Objective()
MAX = 8


def draft_len(state: State, objective: Objective = THROUGHPUT, survival=()) -> int:
    return plan(state, objective, survival, MAX)


def test_high_rtt_pushes_the_draft_longer():
    assert draft_len(replace(BASE, rtt_s=0.4)) > draft_len(BASE)


def test_slow_link_pushes_the_draft_longer():
    # Every round pays the message sizes at the link rate: a slow link makes rounds dear.
    assert draft_len(replace(BASE, up_bps=3000, down_bps=3000)) > draft_len(BASE)


def test_low_acceptance_shortens_the_draft():
    assert draft_len(replace(BASE, accept_by_position=(0.25,))) < draft_len(BASE)
    assert draft_len(replace(BASE, accept_by_position=(0.02,))) == 0  # a plain target step


def test_high_acceptance_and_cheap_drafts_lengthen_it():
    assert draft_len(replace(BASE, accept_by_position=(0.95,))) > draft_len(BASE)
    assert draft_len(replace(BASE, draft_s=0.005)) > draft_len(BASE)


def test_pipelining_hides_the_draft_time_the_bet_pays_for():
    pipelined = replace(BASE, pipelined=True)
    wait = BASE.round_cost(0)[0]  # no drafting: all waiting (plus the bytes of a 0-token draft)
    plain_s, plain_j = BASE.round_cost(2)
    assert pipelined.round_cost(2, survival_next=0.0)[0] == pytest.approx(plain_s)  # the bet never pays
    assert pipelined.round_cost(2, survival_next=1.0)[0] == pytest.approx(plain_s - 2 * BASE.draft_s)
    # drafting ahead draws active power during the wait, whether the bet pays or not
    assert pipelined.round_cost(2, survival_next=0.0)[1] > plain_j
    # only what the wait has room for is hidden: a block longer than the wait costs the rest
    long_draft_len = int(wait / BASE.draft_s) + 4
    hidden = plain_long = BASE.round_cost(long_draft_len)[0]
    hidden = plain_long - pipelined.round_cost(long_draft_len, survival_next=1.0)[0]
    assert 0 < hidden < long_draft_len * BASE.draft_s
    # cheaper drafting per round: the scheduler drafts at least as far, and a round earns more
    assert draft_len(pipelined) >= draft_len(BASE)
    assert best_rate(pipelined, THROUGHPUT, MAX)[0] > best_rate(BASE, THROUGHPUT, MAX)[0]


def test_the_pipelined_plan_takes_the_measured_bet_over_the_next_positions_acceptance():
    s = Scheduler(max_draft=8)
    for _ in range(40):
        s.observe_round([0.9] * 4, 4, 0.08, 0.3, 0.4, 90, 60)
    assert s.state().bet_holds is None  # no pipelined round yet: the next position's acceptance stands in
    for _ in range(60):
        s.observe_bet(False)  # the draft's favourite was never the target's own token
    never = replace(s.state(), pipelined=True)
    assert never.bet_holds < 0.1
    assert best_rate(never, THROUGHPUT, 8)[0] < best_rate(replace(never, bet_holds=None), THROUGHPUT, 8)[0]
    for _ in range(200):
        s.observe_bet(True)
    assert s.state().bet_holds > 0.9


def test_pipelining_is_chosen_where_it_pays_and_left_off_where_it_only_burns_power():
    s = Scheduler(max_draft=8, prior=BASE)
    assert s.pipelining_pays(THROUGHPUT)  # drafting during the wait hides time the bet pays for
    dear = Scheduler(max_draft=8, prior=replace(BASE, active_w=40.0, idle_w=1.0))
    assert dear.pipelining_pays(THROUGHPUT)
    assert not dear.pipelining_pays(Objective("energy"))  # drafting ahead burns power whether it pays or not


def test_early_exit_hints_are_followed_only_where_they_beat_the_standing_bet():
    s = Scheduler(max_draft=8)
    for n in range(40):
        s.observe_round([0.9] * 4, 4, 0.08, 0.3, 0.4, 90, 60)
        s.observe_bet(n % 2 == 0)  # the guess of the target's token holds half the time
    for _ in range(60):
        s.observe_hint(False)  # hints that rarely predict the verdict
    assert not s.follow_hint([0.99, 0.99])
    for _ in range(200):
        s.observe_hint(True)
    assert s.follow_hint([0.99, 0.99])
    # a bet on unsure drafted tokens is worth less than a good hint even early on
    fresh = Scheduler(max_draft=8)
    assert fresh.follow_hint([0.1, 0.1, 0.1])


def test_tight_energy_budget_shortens_the_draft_or_zeroes_it():
    # Drafting draws 12 W against 4 W waiting: each drafted token costs energy.
    state = replace(BASE, active_w=12.0, idle_w=4.0)
    free = draft_len(state)
    per_token = {n: state.round_cost(n)[1] / tokens(state, n) for n in range(MAX + 1)}
    budget = (per_token[free] + min(per_token.values())) / 2
    assert per_token[free] > min(per_token.values())
    shorter = draft_len(state, Objective(budget_j_per_token=budget))
    assert shorter < free and per_token[shorter] <= budget
    # When drafting is expensive and useless, the budget leaves only the plain step.
    costly = replace(state, active_w=60.0, accept_by_position=(0.3,))
    assert draft_len(costly, Objective(budget_j_per_token=min(
        costly.round_cost(n)[1] / tokens(costly, n) for n in range(MAX + 1)) * 1.01)) == 0


def tokens(state: State, n: int) -> float:
    total, s = 1.0, 1.0
    for j in range(1, n + 1):
        s *= state.accept(j)
        total += s
    return total


def test_energy_mode_spends_less_per_token_and_honours_the_floor():
    state = replace(BASE, active_w=12.0, idle_w=4.0)
    fast, frugal = draft_len(state), draft_len(state, Objective("energy"))
    joules = lambda n: state.round_cost(n)[1] / tokens(state, n)  # noqa: E731
    rate = lambda n: tokens(state, n) / state.round_cost(n)[0]  # noqa: E731
    assert joules(frugal) <= joules(fast) and frugal <= fast
    floor = (rate(frugal) + rate(fast)) / 2
    floored = draft_len(state, Objective("energy", min_tokens_per_s=floor))
    assert rate(floored) >= floor


def test_draft_confidence_stops_a_draft_early_or_extends_it():
    assert draft_len(BASE, survival=(0.1,)) == 0  # the first token will likely be rejected: send now
    assert draft_len(BASE, survival=(0.97,)) >= 1
    assert draft_len(BASE, survival=(0.97, 0.95, 0.93)) >= 1 > draft_len(BASE, survival=(0.97, 0.95, 0.2))


def test_plan_never_exceeds_the_limit_and_best_rate_is_a_rate():
    assert plan(replace(BASE, accept_by_position=(1.0,)), THROUGHPUT, (), 3) == 3
    assert plan(BASE, THROUGHPUT, (0.9, 0.9, 0.9), 3) == 0
    rate, n = best_rate(BASE, THROUGHPUT, MAX)
    assert rate == pytest.approx(tokens(BASE, n) / BASE.round_cost(n)[0])


def test_objective_is_validated():
    with pytest.raises(ValueError):
        Objective("fastest")
    with pytest.raises(ValueError):
        Objective(budget_j_per_token=0)


# -- estimators ------------------------------------------------------------------------------------
def test_acceptance_estimator_converges_per_position_and_per_confidence():
    rng = random.Random(0)
    truth = [0.9, 0.7, 0.5, 0.3]
    est = AcceptanceEstimator(positions=4, decay=0.999)
    for _ in range(4000):
        # A token's confidence says how likely it is accepted, calibrated: P(accept | c) = c.
        confidences = [rng.choice((0.15, 0.5, 0.85, 0.99)) for _ in truth]
        accepted = 0
        for p_pos, c in zip(truth, confidences):
            if rng.random() < p_pos * c / 0.6225:  # mean confidence 0.6225: keeps position rates
                accepted += 1
            else:
                break
        est.observe(confidences, accepted)
    by_position = est.by_position()
    assert by_position[0] > by_position[1] > by_position[2] > by_position[3]
    assert est.given_confidence(0.99) > est.given_confidence(0.5) > est.given_confidence(0.15)


def test_acceptance_estimator_follows_a_change():
    est = AcceptanceEstimator(decay=0.95)
    for _ in range(200):
        est.observe([0.9] * 4, 4)
    high = est.by_position()[0]
    for _ in range(200):
        est.observe([0.9] * 4, 0)
    assert high > 0.9 and est.by_position()[0] < 0.1


def test_linear_fit_recovers_rtt_and_rate_and_ignores_tiny_spreads():
    rng = random.Random(1)
    fit = LinearFit(forget=0.999, min_spread=500)
    for _ in range(500):
        size = rng.randrange(100, 6000)
        fit.update(size, 0.08 + size * 8 / 1e6 + rng.gauss(0, 0.002))  # 80 ms + 1 Mbit/s
    rtt, s_per_byte = fit.coefficients()
    assert rtt == pytest.approx(0.08, abs=0.005) and 8 / s_per_byte == pytest.approx(1e6, rel=0.05)
    narrow = LinearFit(min_spread=500)
    for size, y in ((80, 0.07), (84, 0.09), (88, 0.06)):
        narrow.update(size, y)
    assert narrow.coefficients() == pytest.approx((0.0733, 0.0), abs=1e-3)  # the (weighted) mean


def test_ewma_tracks_the_latest_level():
    e = Ewma(0.2)
    for _ in range(50):
        e.update(1.0)
    for _ in range(50):
        e.update(3.0)
    assert e.value == pytest.approx(3.0, abs=1e-3)


def test_scheduler_learns_costs_from_rounds_and_takes_objectives_at_run_time():
    s = Scheduler(max_draft=8)
    for n in range(60):
        drafted = 1 + n % 6
        s.observe_round([0.95] * drafted, drafted, 0.02 * drafted, 0.1 + 0.01 * (drafted + 1), 0.35, 90, 60)
        s.observe_power(12.0, 4.0)
    state = s.state()
    assert state.draft_s == pytest.approx(0.02)
    assert state.verify_base_s == pytest.approx(0.1, abs=1e-6) and state.verify_per_row_s == pytest.approx(0.01)
    assert state.rtt_s == pytest.approx(0.35 - 0.1 - 0.01 * 3.5, abs=0.05)
    assert state.active_w == pytest.approx(12.0, abs=0.01) and state.idle_w == pytest.approx(4.0, abs=0.01)
    assert s.planner(8)([]) is True
    s.set_objective(Objective(budget_j_per_token=1e-6))  # nothing fits: spend the least per token
    keep = s.planner(8)
    assert keep([]) is (plan(s.state(), s.objective, (), 8) > 0)


def test_a_lookup_is_planned_on_its_own_acceptance_and_taken_only_where_it_beats_the_model():
    s = Scheduler(max_draft=8)
    for _ in range(40):  # the model's drafts: 0.6 a token, 20 ms each
        s.observe_round([0.9] * 4, 2, 0.08, 0.15, 0.4, 90, 60)
    for _ in range(40):  # lookups that copy the answer: nearly all accepted, no drafting time
        s.observe_round([1.0] * 6, 6, 0.0, 0.16, 0.4, 90, 60, source="lookup")
    assert s.state().draft_s == pytest.approx(0.02)  # lookups taught the draft cost nothing
    assert s.acceptance.rate < 0.7 < 0.9 < s.lookup.rate  # nor the model's acceptance
    assert s.lookup_len(8) == 8 and s.lookup_len(3) == 3  # free, near-certain tokens: all of them
    for _ in range(60):  # the text stopped repeating itself: lookups are rejected at once
        s.observe_round([1.0] * 4, 0, 0.0, 0.15, 0.4, 90, 60, source="lookup")
    assert s.lookup_len(8) == 0  # the model's draft serves better
    for _ in range(s.probe_every):
        s.observe_round([0.9] * 4, 2, 0.08, 0.15, 0.4, 90, 60)
    assert s.lookup_len(8) == 8  # but after probe_every model rounds it is tried again


# -- streaming or speculating --------------------------------------------------------------------
# A verifier that verifies a row at the price of a decode step (llama.cpp fed one row per call, as
# on this CPU) against one that verifies a block at the price of a step (a GPU's batched pass).
ROW_BY_ROW = replace(BASE, verify_base_s=0.0, verify_per_row_s=0.09, stream_token_s=0.09)
BATCHED = replace(BASE, accept_by_position=(0.9,), draft_s=0.01, verify_base_s=0.09, verify_per_row_s=0.001,
                  stream_token_s=0.09)


def test_streaming_wins_where_a_verified_row_costs_a_decode_step():
    assert choose_mode(ROW_BY_ROW, THROUGHPUT, MAX, 100, streaming=True) == STREAM
    assert choose_mode(ROW_BY_ROW, THROUGHPUT, MAX, 100, streaming=False) == STREAM
    # even a perfect draft cannot beat it: the device neither prefills nor probes
    assert not speculation_can_pay(ROW_BY_ROW, THROUGHPUT, MAX, 100)


def test_speculation_wins_where_verifying_a_block_costs_a_step():
    assert choose_mode(BATCHED, THROUGHPUT, MAX, 100, streaming=True) == SPECULATE
    assert speculation_can_pay(BATCHED, THROUGHPUT, MAX, 100)
    # the same costs with drafts the target rejects: streaming again
    assert choose_mode(replace(BATCHED, accept_by_position=(0.05,)), THROUGHPUT, MAX, 100, True) == STREAM


def test_without_a_cap_the_draft_grows_past_8_only_where_verifying_a_row_is_cheap():
    sure = (0.98,)  # code completion's acceptance
    # a verified row at the price of a step (this CPU): the best length stays short
    assert plan(replace(ROW_BY_ROW, accept_by_position=sure), THROUGHPUT, (), 64) <= 8
    # a batched pass (a GPU): it drafts on until one more token stops paying, past the old cap of 8
    long = plan(replace(BATCHED, accept_by_position=sure), THROUGHPUT, (), 64)
    assert 8 < long < 64


def test_a_switch_pays_its_round_trip_so_a_near_tie_keeps_the_mode_in_force():
    # speculation a little faster per token, but not by a round trip over the few tokens left
    close = replace(BATCHED, stream_token_s=BATCHED.round_cost(8)[0] / BATCHED.expected_tokens(8) * 1.02,
                    rtt_s=0.2)
    assert choose_mode(close, THROUGHPUT, MAX, 4, streaming=True) == STREAM
    assert choose_mode(close, THROUGHPUT, MAX, 4, streaming=False) == SPECULATE


def test_energy_mode_streams_when_waiting_is_cheaper_than_drafting():
    energy = Objective("energy")
    drafting_dear = replace(BATCHED, active_w=30.0, idle_w=2.0, rtt_s=0.2)
    assert choose_mode(drafting_dear, energy, MAX, 100, streaming=False) == STREAM
    # but not below a throughput floor the stream cannot reach
    floor = Objective("energy", min_tokens_per_s=0.9 / drafting_dear.stream_token_s * 1.3)
    assert choose_mode(drafting_dear, floor, MAX, 100, streaming=True) == SPECULATE
    # the throughput mode under a budget only the stream meets streams, though speculating is faster
    stream_j = drafting_dear.stream_cost()[1]
    assert choose_mode(drafting_dear, Objective(budget_j_per_token=stream_j * 1.05), MAX, 100, True) == STREAM
    assert choose_mode(drafting_dear, THROUGHPUT, MAX, 100, True) == SPECULATE


def test_the_stream_cost_is_measured_and_before_that_is_a_one_row_pass():
    s = Scheduler(max_draft=8)
    for n in range(40):
        drafted = 1 + n % 6
        s.observe_round([0.9] * drafted, 2, 0.01 * drafted, 0.2 + 0.05 * (drafted + 1), 0.5, 90, 60)
    assert s.state().stream_token_s == pytest.approx(0.25, abs=0.01)  # never streamed: base + 1 row
    for _ in range(60):
        s.observe_stream(0.3, 3, 12, 150)  # three tokens came 0.3 s after the last ones
    state = s.state()
    assert state.stream_token_s == pytest.approx(0.1, abs=1e-3)
    assert state.stream_up_bytes == pytest.approx(4.0, abs=0.01) and state.stream_down_bytes == pytest.approx(50.0, abs=0.1)
    s.observe_stream(1.5, 1, 4, 50)  # a blackout held one token back: a stall, not the cloud's step
    assert s.state().stream_token_s < 0.13
    for _ in range(40):
        s.observe_stream(0.5, 1, 4, 50)  # the cloud slowed down for good: followed
    assert s.state().stream_token_s == pytest.approx(0.5, rel=0.05)
    # A stream's tokens are one-row passes: one round of 5 rows after it gives the verify fit its slope.
    fresh = Scheduler(max_draft=8)
    for _ in range(20):
        fresh.observe_stream(0.1, 1, 4, 50)
    fresh.observe_round([0.9] * 4, 2, 0.04, 0.5, 0.6, 90, 60)
    assert fresh.state().verify_per_row_s == pytest.approx(0.1, rel=0.05)


def test_a_probes_slope_outlives_the_stream_that_follows_it_and_a_burst_times_no_step():
    """Streams anchor the verify line at one row without being points of the rounds' fit: 200
    streamed tokens after one probe left the slope where the probe put it (as points, they drowned
    it). Tokens that came at once after a stall say nothing of the cloud's step."""
    s = Scheduler(max_draft=8)
    for _ in range(20):
        s.observe_stream(0.1, 1, 4, 50)
    s.observe_round([0.9] * 4, 2, 0.04, 0.5, 0.6, 90, 60)
    for _ in range(200):
        s.observe_stream(0.1, 1, 4, 50)
    assert s.state().verify_per_row_s == pytest.approx(0.1, rel=0.05)
    s.observe_stream(0.0, 5, 20, 250)
    assert s.state().stream_token_s == pytest.approx(0.1, rel=0.01)
    assert best_rate(s.state(), THROUGHPUT, 8)[0] > 0


def test_probes_come_soon_back_off_and_once_acceptance_is_learnt_cost_no_more_than_the_explore_share():
    s = Scheduler(max_draft=16)
    for _ in range(8):
        s.observe_stream(0.05, 1, 4, 50)
    assert s.probe_due  # the first: soon, over requests
    s.observe_round([0.9] * 4, 3, 0.02, 0.05, 0.4, 90, 60)  # a probe: 350 ms of network
    for _ in range(15):
        s.observe_stream(0.05, 1, 4, 50)
    assert s.probe_gap == 16 and not s.probe_due
    s.observe_stream(0.05, 1, 4, 50)
    assert s.probe_due  # 4 tokens' verdicts teach little: the backed-off gap alone, while learning
    for _ in range(6):  # acceptance learnt from enough drafted tokens
        s.observe_round([0.9] * 8, 6, 0.04, 0.05, 0.4, 90, 60)
    assert s.acceptance.tested >= s.learn_tokens
    for _ in range(64):
        s.observe_stream(0.05, 1, 4, 50)
    # rounds in a row started the gaps over and 64 tokens meet it, but a probe costs two round trips
    # and more (~16 tokens): no more than 2 % of the stream
    assert s.probe_gap == s.first_probe_gap and not s.probe_due
    cost = s.probe_cost_tokens()
    for _ in range(int(cost / s.explore_share)):
        s.observe_stream(0.05, 1, 4, 50)
    assert s.probe_due and s.streamed_since_round * s.explore_share >= cost


def test_a_request_starts_speculating_only_where_measured_rounds_say_it_pays():
    s = Scheduler(max_draft=16)
    assert s.start_mode(64) == STREAM  # nothing measured: the first token as soon as the cloud gives it
    assert s.mode(64, True) == SPECULATE  # ... but the untimed draft is tried: a probe learns it
    for _ in range(30):  # a GPU target: 16 rows cost one, a 4 ms draft, every token accepted
        s.observe_round([0.99] * 16, 16, 0.064, 0.07, 0.13, 130, 60)
    for _ in range(30):
        s.observe_stream(0.07, 1, 4, 50)
    assert s.start_mode(64) == SPECULATE
    cpu = Scheduler(max_draft=16)
    for k in (1, 4, 1, 4, 1, 4):  # every row a 130 ms decode step
        cpu.observe_round([0.9] * k, k, 0.055 * k, 0.13 * (k + 1), 0.13 * (k + 1) + 0.06, 90, 60)
    assert cpu.start_mode(64) == STREAM


def test_the_draft_prefills_behind_a_stream_only_if_it_is_done_with_half_the_stream_to_come():
    s = Scheduler(max_draft=8)
    assert s.prefill_in_time(700, 10)  # never timed: try
    for _ in range(20):
        s.observe_stream(0.06, 1, 4, 50)
    s.observe_prefill(7.0, 700)  # 10 ms a prompt token
    assert s.prefill_in_time(700, 300)  # 7 s of prefill, 18 s of stream to come
    assert not s.prefill_in_time(700, 100)  # 6 s of stream: it would end before the draft is of use


def test_a_whole_request_budget_takes_back_what_the_start_overspent():
    budget = Objective(budget_j_per_token=2.0)
    assert request_budget(budget, 0.0, 0, 100).budget_j_per_token == pytest.approx(2.0)
    # a prefill spent 50 J before the first token: the 100 tokens to come get 1.5 J each
    assert request_budget(budget, 50.0, 0, 100).budget_j_per_token == pytest.approx(1.5)
    # half-way at 1 J a token: the rest may spend 3
    assert request_budget(budget, 50.0, 50, 50).budget_j_per_token == pytest.approx(3.0)
    # overspent beyond recovery: the tightest budget, so the cheapest mode is taken
    assert request_budget(budget, 500.0, 10, 10).budget_j_per_token <= 1e-6
    assert request_budget(Objective(), 50.0, 0, 100) == Objective()


# -- the agent over the emulated channel ---------------------------------------------------------
def test_agent_drafts_further_when_the_channel_slows_down_mid_run(tiny_models, mosquitto):
    from specedge.tools.channel import ChannelConfig, ChannelEmulator, LinkSpec
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams

    draft, tok, target, target_tok = tiny_models
    fleet = "adaptive"
    cloud = build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {"fleet": fleet, "id": "v-adaptive"}})
    verifier = Verifier(cloud, Target.in_memory("tiny", target, target_tok)).start()
    fast = ChannelConfig(LinkSpec(), LinkSpec(), "loopback")
    slow = ChannelConfig(LinkSpec(delay_ms=120), LinkSpec(delay_ms=120), "far")
    with ChannelEmulator(fast, ("127.0.0.1", mosquitto.port)) as channel:
        cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": "robot"}, "mqtt": {"port": channel.port},
                                   "energy": {"meter": "estimated"}})
        agent = Agent(cfg, TorchDraftEngine(draft), tok).start()
        switched_at = []

        def on_tokens(new, verified):
            on_tokens.count += len(new)
            if on_tokens.count >= 60 and not switched_at:
                channel.reconfigure(slow)
                switched_at.append(time.perf_counter() - start)
        on_tokens.count = 0
        start = time.perf_counter()
        try:
            result = agent.generate(tok.encode_chat("the robot arm turns left and picks up the red cube"),
                                    SamplingParams(), 200, parse_policy("adaptive+no-stream"), on_tokens)
        finally:
            agent.stop()
            verifier.stop()
    stats = result.stats
    assert switched_at, "the generation ended before the channel changed"
    before = [draft_len for draft_len, t in zip(stats.draft_lens, stats.round_start_s) if t < switched_at[0]]
    after = [draft_len for draft_len, t in zip(stats.draft_lens, stats.round_start_s) if t > switched_at[0]][10:]
    assert len(before) >= 5 and len(after) >= 5
    assert sum(after) / len(after) > sum(before) / len(before) + 0.5, (before, after)
    assert stats.energy_source == "estimated:orin-nano-15w+radio-model:lte" and stats.energy_j > 0


def test_a_request_switches_between_streaming_and_speculating_without_losing_a_token(tiny_models, mosquitto):
    """The mode switches mid-request, both ways and more than once, through Mosquitto and the
    channel emulator: each switch is a round like any other (a DRAFT ends the stream on the
    verifier, which takes the text back to what the device holds; a GENERATE ends speculation), so
    the output is the target's own decoding. The decisions come from a script (ScriptedModes, a
    Scheduler whose mode() follows the token count): the rule itself is tested above."""
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams
    from specedge.tools.channel import ChannelConfig, ChannelEmulator, LinkSpec
    from tests.conftest import reference_greedy

    draft, tok, target, target_tok = tiny_models
    fleet = "modes"
    cloud = build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {"fleet": fleet, "id": "v-modes"}})
    verifier = Verifier(cloud, Target.in_memory("tiny", target, target_tok)).start()
    lte_like = ChannelConfig(LinkSpec(delay_ms=15), LinkSpec(delay_ms=15), "lte-like")
    prompt = tok.encode_chat("the robot arm turns left and picks up the red cube")
    max_new = 160

    class ScriptedModes(Scheduler):
        """Speculates for generated tokens in [40, 80) and from 120 on; streams otherwise."""

        def mode(self, remaining, streaming, objective=None):
            generated = max_new - remaining
            return SPECULATE if 40 <= generated < 80 or generated >= 120 else STREAM

        def can_pay(self, remaining, objective=None):
            return True

        probe_due = False  # no probes: only the script switches

    with ChannelEmulator(lte_like, ("127.0.0.1", mosquitto.port)) as channel:
        cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": "robot"}, "mqtt": {"port": channel.port},
                                   "energy": {"meter": "estimated"}})
        agent = Agent(cfg, TorchDraftEngine(draft), tok, scheduler=ScriptedModes).start()
        try:
            result = agent.generate(prompt, SamplingParams(), max_new, parse_policy("adaptive"))
            again = agent.generate(prompt, SamplingParams(), max_new, parse_policy("adaptive+pipelined"))
        finally:
            agent.stop()
            verifier.stop()
    expected = reference_greedy(target, prompt, max_new, tok.stop_ids)
    assert len(expected) == max_new  # no early stop: every scripted switch is reached
    for got in (result, again):
        stats = got.stats
        assert [mode for _, mode in stats.modes] == ["stream", "speculate", "stream", "speculate"], stats.modes
        assert got.tokens == expected
        assert 60 <= stats.streamed_tokens <= 100 and stats.rounds > 0
        assert stats.summary()["mode_switches"] == 3 and stats.exact
