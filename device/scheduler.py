"""How far to speculate: a pure decision rule over an estimated state, plus the estimators.

A round that drafts g tokens (g = draft_len, docs/design.md section 4) yields
E(g) = 1 + sum_{i<=g} S_i tokens, S_i the probability that the first i drafted tokens are
all accepted; it takes
    T(g) = g t_draft + RTT + up_bytes(g)/R_up + down_bytes/R_down + t_verify(g + 1)
and costs the device
    J(g) = g t_draft P_active + (T - g t_draft) P_idle + radio(T, bytes).
S is built from per-position acceptance (for tokens not drafted yet) and from the
calibrated confidence of the tokens already drafted, so `plan` is asked again after
every drafted token and can stop a draft early. Long-run throughput is a ratio
(tokens over time), so each round maximises E - lambda T with lambda the best rate the
state allows (Dinkelbach); the energy mode minimises J - mu E the same way. The energy
budget (J/E <= budget) and the throughput floor (E/T >= floor) are constraints.
Draft length 0 (a plain target step) is always a candidate.

Cloud streaming (the cloud decodes alone and sends each token as it is made) is the other mode.
After the one round trip that starts it, a streamed token costs t_stream, the cloud's decode step as
the device sees it, with the device idle and the radio receiving:
    J_stream = t_stream (P_idle + P_radio) + bytes per token * e_radio/byte.
`choose_mode` compares the two over the next n tokens (n = the rest of the request, at most
HORIZON): n t_stream against n T(g*)/E(g*) for the best g*, under the same objective and
constraint, the mode not in force paying one round trip to switch (a stream's last tokens in
flight are lost; a new stream waits its first token). A request starts streaming while the draft
prefills, so its first token is never later than the cloud alone would give it.

A prompt-lookup proposal (device/lookup.py) is planned with the same rule on its own
acceptance, with t_draft = 0: the scheduler keeps one estimator per draft source.

Pipelined drafting (device/pipeline.py) drafts the next block during the wait, betting
that all g tokens and the draft's guess of the bonus token hold: with probability
S_{g+1} (S_g times the measured rate at which the guess of the bonus token held once all g
were accepted) the next round's drafting is already done, as far as the wait had room for it.
So a pipelined round costs (1 - S_{g+1} h) g t_draft of drafting on the critical path,
h the share of the block the wait has room for, while the device burns active power
for the drafting ahead whether the bet pays or not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

from specedge.protocol.wire import MAX_DRAFT

if TYPE_CHECKING:
    from specedge.config import EnergyConfig

MODES = ("throughput", "energy")
STREAM, SPECULATE = "stream", "speculate"  # what choose_mode returns
HORIZON = 64  # tokens ahead a mode switch is judged over


@dataclass(frozen=True)
class Objective:
    mode: str = "throughput"  # throughput: max tokens/s under the budget | energy: min J/token above the floor
    budget_j_per_token: float | None = None
    min_tokens_per_s: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"scheduler mode {self.mode!r}: use throughput or energy")
        for name in ("budget_j_per_token", "min_tokens_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {value}")


def objective(energy: EnergyConfig) -> Objective:
    """The objective an [energy] section sets (its mode checked by device/checks.py); 0 = unset."""
    return Objective(energy.mode, energy.budget_j_per_token or None, energy.min_tokens_per_s or None)


@dataclass(frozen=True)
class State:
    """Everything the decision needs, in seconds, bytes, watts and joules."""

    accept_by_position: tuple[float, ...]  # P(token j accepted | tokens < j accepted), j = 1..
    draft_s: float  # one drafted token
    verify_base_s: float  # t_verify(n rows) = base + per_row * n
    verify_per_row_s: float
    rtt_s: float  # network time of a round beyond what the bytes explain
    up_bps: float = math.inf
    down_bps: float = math.inf
    up_bytes_base: int = 70  # a Draft message on the wire with no tokens, framing included
    up_bytes_per_token: int = 4  # greedy; sampled drafts add their sparse q
    down_bytes: int = 60
    active_w: float = 10.0
    idle_w: float = 4.0
    radio_w: float = 0.0
    radio_j_per_byte_up: float = 0.0
    radio_j_per_byte_down: float = 0.0
    pipelined: bool = False  # the next block is drafted during the wait (see the module notes)
    # P(the draft's guess of the target's own token holds | every drafted token accepted): the
    # pipelined bet's second half; None: taken as the acceptance at the next position.
    bet_holds: float | None = None
    stream_token_s: float = 0.1  # t_stream: seconds between streamed tokens
    stream_up_bytes: float = 4.0  # per streamed token: its acknowledgement
    stream_down_bytes: float = 40.0  # per streamed token: its message

    def stream_cost(self) -> tuple[float, float]:
        """(seconds, device joules) of one streamed token."""
        s = self.stream_token_s
        return s, (s * (self.idle_w + self.radio_w) + self.stream_up_bytes * self.radio_j_per_byte_up
                   + self.stream_down_bytes * self.radio_j_per_byte_down)

    def accept(self, position: int) -> float:
        table = self.accept_by_position
        return table[min(position, len(table)) - 1] if table else 0.0

    def expected_tokens(self, draft_len: int) -> float:
        """E(g) = 1 + sum_{i<=g} prod_{j<=i} c_j: tokens a round drafting g = draft_len yields."""
        return _outcomes(self, (), draft_len)[-1][1]

    def round_cost(self, draft_len: int, survival_next: float = 0.0) -> tuple[float, float]:
        """(seconds, device joules) of a round drafting `draft_len` tokens; `survival_next` =
        S_{draft_len+1}, the chance a pipelined device's bet on this round's outcome pays."""
        up = self.up_bytes_base + self.up_bytes_per_token * draft_len
        draft = draft_len * self.draft_s
        wait = (self.rtt_s + up * 8 / self.up_bps + self.down_bytes * 8 / self.down_bps
                + self.verify_base_s + self.verify_per_row_s * (draft_len + 1))
        ahead = 0.0  # seconds spent drafting ahead during the wait
        if self.pipelined and self.draft_s > 0:
            ahead = min(wait, (draft_len + 1) * self.draft_s)  # the bonus guess, then the next block
            room = max(ahead - self.draft_s, 0.0)  # of the next block, what was drafted in time
            draft -= survival_next * min(draft, room)
        seconds = draft + wait
        joules = ((draft + ahead) * self.active_w + (wait - ahead) * self.idle_w + seconds * self.radio_w
                  + up * self.radio_j_per_byte_up + self.down_bytes * self.radio_j_per_byte_down)
        return seconds, joules


def _outcomes(state: State, survival: Sequence[float], max_draft: int):
    """(draft_len, expected tokens, seconds, joules) for every total draft length
    len(survival) <= draft_len <= max_draft."""
    drafted = len(survival)
    tokens = 1.0 + sum(survival)
    s = survival[-1] if survival else 1.0
    out = []
    for draft_len in range(drafted, max_draft + 1):
        if draft_len > drafted:
            s *= state.accept(draft_len)
            tokens += s
        bet = state.bet_holds if state.bet_holds is not None else state.accept(draft_len + 1)
        seconds, joules = state.round_cost(draft_len, s * bet)
        out.append((draft_len, tokens, seconds, joules))
    return out


def _feasible(objective: Objective, tokens: float, seconds: float, joules: float) -> bool:
    if objective.mode == "throughput":
        return objective.budget_j_per_token is None or joules <= objective.budget_j_per_token * tokens
    return objective.min_tokens_per_s is None or tokens >= objective.min_tokens_per_s * seconds


def best_rate(state: State, objective: Objective, max_draft: int) -> tuple[float, int]:
    """Before drafting: the best tokens/s (throughput mode) or J/token (energy mode) a fixed
    draft length reaches under the constraint, and that length. Falls back to the least
    violating length when no length meets the constraint."""
    outcomes = _outcomes(state, (), max_draft)
    feasible = [o for o in outcomes if _feasible(objective, *o[1:])] or None
    if objective.mode == "throughput":
        if feasible:
            return max((t / s, draft_len) for draft_len, t, s, _ in feasible)
        draft_len, t, s, _ = min(outcomes, key=lambda o: o[3] / o[1])
        return t / s, draft_len
    if feasible:
        return min((j / t, draft_len) for draft_len, t, s, j in feasible)
    return max((t / s, draft_len) for draft_len, t, s, _ in outcomes)


def best_round(state: State, objective: Objective, max_draft: int) -> tuple[int, float, float, float]:
    """(draft_len, tokens, seconds, joules) of the round `best_rate` picks."""
    _, draft_len = best_rate(state, objective, max_draft)
    return _outcomes(state, (), max_draft)[draft_len]


def choose_mode(state: State, objective: Objective, max_draft: int, remaining: int, streaming: bool) -> str:
    """STREAM or SPECULATE for the next tokens (see the module notes): the mode whose next
    n = min(remaining, HORIZON) tokens are faster (throughput) or cheaper (energy) and meet the
    constraint; the mode not in force (`streaming`) pays one round trip, idle, to switch. If
    neither meets the constraint: the one closer to it."""
    n = max(1, min(remaining, HORIZON))
    _, tokens, seconds, joules = best_round(state, objective, max_draft)
    stream_s, stream_j = state.stream_cost()
    switch_s = state.rtt_s
    switch_j = switch_s * (state.idle_w + state.radio_w)
    modes = {STREAM: (n * stream_s, n * stream_j), SPECULATE: (n * seconds / tokens, n * joules / tokens)}
    other = SPECULATE if streaming else STREAM
    s, j = modes[other]
    modes[other] = (s + switch_s, j + switch_j)
    feasible = {m: c for m, c in modes.items() if _feasible(objective, n, *c)}
    if objective.mode == "throughput":
        if not feasible:  # over budget either way: spend the least per token
            return min(modes, key=lambda m: (modes[m][1], m == other))
        return min(feasible, key=lambda m: (feasible[m][0], m == other))
    if not feasible:  # below the floor either way: the faster
        return min(modes, key=lambda m: (modes[m][0], m == other))
    return min(feasible, key=lambda m: (feasible[m][1], m == other))


def speculation_can_pay(state: State, objective: Objective, max_draft: int, remaining: int) -> bool:
    """Whether speculating could beat streaming even if every drafted token were accepted: if not,
    a streaming device neither prefills its draft nor tries a round to learn its acceptance."""
    perfect = replace(state, accept_by_position=(1.0,))
    return max_draft > 0 and choose_mode(perfect, objective, max_draft, remaining, streaming=True) == SPECULATE


def request_budget(objective: Objective, spent_j: float, generated: int, remaining: int) -> Objective:
    """The objective for the rest of a request that has spent `spent_j` (prefill and drafting
    included) on `generated` tokens: a budget of B J/token over the whole request leaves
    B (generated + remaining) - spent_j for the `remaining` tokens, so what one part overspent the
    rest saves (and the reverse)."""
    budget = objective.budget_j_per_token
    if budget is None or remaining <= 0:
        return objective
    left = (budget * (generated + remaining) - spent_j) / remaining
    return replace(objective, budget_j_per_token=max(left, 1e-9))


def plan(state: State, objective: Objective, survival: Sequence[float], max_draft: int) -> int:
    """How many more tokens to draft, given the survival probabilities S_1..S_i of the
    tokens drafted so far this round (empty before the first). 0 = stop here."""
    if max_draft <= len(survival):
        return 0
    outcomes = _outcomes(state, survival, max_draft)
    feasible = [o for o in outcomes if _feasible(objective, *o[1:])]
    if objective.mode == "throughput":
        if not feasible:  # over budget whatever we do: spend the least per token
            return min(outcomes, key=lambda o: (o[3] / o[1], o[0]))[0] - len(survival)
        rate, _ = best_rate(state, objective, max_draft)
        best = max(feasible, key=lambda o: (o[1] - rate * o[2], -o[0]))
    else:
        if not feasible:  # below the floor whatever we do: go as fast as we can
            return max(outcomes, key=lambda o: (o[1] / o[2], -o[0]))[0] - len(survival)
        per_token, _ = best_rate(state, objective, max_draft)
        best = min(feasible, key=lambda o: (o[3] - per_token * o[1], o[0]))
    return best[0] - len(survival)


# -- online estimators ---------------------------------------------------------------------------
class Ewma:
    def __init__(self, alpha: float, initial: float | None = None):
        self.alpha, self.value = alpha, initial

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


class LinearFit:
    """y = a + b x by least squares with exponential forgetting; b clamped to >= 0.
    Until x has spread by `min_spread` (standard deviation), b stays at its prior and a
    follows the mean: a slope read off a few bytes of difference would be noise."""

    def __init__(self, forget: float = 0.97, slope_prior: float = 0.0, min_spread: float = 0.0):
        self.forget, self.slope_prior, self.min_spread = forget, slope_prior, min_spread
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def update(self, x: float, y: float) -> None:
        f = self.forget
        self.w, self.sx, self.sy = f * self.w + 1, f * self.sx + x, f * self.sy + y
        self.sxx, self.sxy = f * self.sxx + x * x, f * self.sxy + x * y

    @property
    def ready(self) -> bool:
        return self.w > 0

    def coefficients(self) -> tuple[float, float]:
        if not self.w:
            return 0.0, self.slope_prior
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        spread_ok = var > max(self.min_spread ** 2, 1e-9 * max(mx * mx, 1.0))
        slope = max((self.sxy / self.w - mx * my) / var if spread_ok else self.slope_prior, 0.0)
        intercept = my - slope * mx
        if intercept < 0:  # the line would promise negative cost at x = 0: keep the mean instead
            slope = my / mx if mx > 0 else 0.0
            intercept = 0.0
        return intercept, slope

    def anchored(self, x0: float, y0: float) -> tuple[float, float] | None:
        """Where x has not spread but its mean lies min_spread or more from x0: the line through
        (x0, y0), a point known apart, and the mean; else None."""
        if not self.w:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        if self.sxx / self.w - mx * mx > self.min_spread ** 2 or abs(mx - x0) < self.min_spread:
            return None
        slope = max((my - y0) / (mx - x0), 0.0)
        return max(y0 - slope * x0, 0.0), slope


class DecayedRate:
    """How often something held, from decayed counts with a Beta prior (AcceptanceEstimator's, for
    one yes/no event): the pipelined bet, an early-exit hint's agreement."""

    def __init__(self, decay: float = 0.98, prior_strength: float = 2.0):
        self.decay, self.k = decay, prior_strength
        self.tried = self.held = 0.0

    def observe(self, held: bool) -> None:
        self.tried = self.decay * self.tried + 1
        self.held = self.decay * self.held + held

    def rate(self, prior: float) -> float:
        return (self.held + self.k * prior) / (self.tried + self.k)


CONFIDENCE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0001)


class AcceptanceEstimator:
    """Acceptance per draft position (conditional on the earlier ones accepted) and per draft
    confidence bin, from decayed counts with Beta priors, so it follows a drifting text."""

    def __init__(self, positions: int = 16, decay: float = 0.98, prior_strength: float = 2.0,
                 initial_rate: float = 0.6):
        self.positions, self.decay, self.k = positions, decay, prior_strength
        self.pos_tested = [0.0] * positions
        self.pos_accepted = [0.0] * positions
        bins = len(CONFIDENCE_EDGES) - 1
        self.bin_tested = [0.0] * bins
        self.bin_accepted = [0.0] * bins
        self.tested = self.accepted = 0.0
        self.initial_rate = initial_rate

    @staticmethod
    def _bin(confidence: float) -> int:
        for b in range(len(CONFIDENCE_EDGES) - 1):
            if confidence < CONFIDENCE_EDGES[b + 1]:
                return b
        return len(CONFIDENCE_EDGES) - 2

    def observe(self, confidences: Sequence[float], accepted: int) -> None:
        """One verdict: tokens 1..accepted accepted, token accepted+1 rejected, later ones untested."""
        d = self.decay
        for table in (self.pos_tested, self.pos_accepted, self.bin_tested, self.bin_accepted):
            for i in range(len(table)):
                table[i] *= d
        self.tested *= d
        self.accepted *= d
        for j, confidence in enumerate(confidences[: accepted + 1]):
            ok = j < accepted
            p, b = min(j, self.positions - 1), self._bin(confidence)
            self.pos_tested[p] += 1
            self.bin_tested[b] += 1
            self.tested += 1
            if ok:
                self.pos_accepted[p] += 1
                self.bin_accepted[b] += 1
                self.accepted += 1

    @property
    def rate(self) -> float:
        return (self.accepted + self.k * self.initial_rate) / (self.tested + self.k)

    def by_position(self) -> tuple[float, ...]:
        mean = self.rate
        return tuple((a + self.k * mean) / (t + self.k) for a, t in zip(self.pos_accepted, self.pos_tested))

    def given_confidence(self, confidence: float) -> float:
        """P(accepted | the draft gave its token this probability); the prior is the confidence itself."""
        b = self._bin(confidence)
        return (self.bin_accepted[b] + self.k * confidence) / (self.bin_tested[b] + self.k)


@dataclass
class Scheduler:
    """The estimators of one device plus its objective; `state()` is the snapshot `plan` reads.
    `prior` holds what is used until measured (and the fixed inputs: message sizes, radio)."""

    objective: Objective = field(default_factory=Objective)
    max_draft: int = MAX_DRAFT
    prior: State = field(default_factory=lambda: State((0.6,), draft_s=0.05, verify_base_s=0.1,
                                                       verify_per_row_s=0.0, rtt_s=0.0))
    # After this many rounds without a draft, draft one token anyway: plain steps teach the
    # estimators nothing about acceptance or draft cost, and the text or the link may have changed.
    probe_every: int = 16
    # Likewise a stream leaves for one speculative round after this many tokens, where speculation
    # could pay at all: acceptance is only learnt by drafting.
    probe_stream_tokens: int = 64
    first_probe_gap: int = 8  # the first of those gaps: they double after each probe, up to the above
    # ... and never closer than a probe's cost allows: probing spends at most this share of the
    # time streaming takes (a probe leaves the stream, its tokens in flight lost, and comes back).
    explore_share: float = 0.02
    # ... once acceptance has been learnt from this many drafted tokens' verdicts (decayed): until
    # then the backed-off gaps alone. One probe of 4 tokens left a device at its prior's pessimism
    # (0.87 for a pair that accepts 0.98), and its cost then put the next probe 700 tokens away.
    learn_tokens: int = 32
    # The first round after streams drafts at most this: until a round is verified, a pass of k rows
    # is priced as one row, which a CPU target (a decode step a row) makes k times too cheap.
    first_probe: int = 4

    def __post_init__(self):
        self.acceptance = AcceptanceEstimator(initial_rate=self.prior.accept(1))
        self.lookup = AcceptanceEstimator(initial_rate=self.prior.accept(1))  # prompt-lookup drafts
        self.rounds_without_lookup = 0
        self.draft_s = Ewma(0.2)
        self.verify = LinearFit(0.95, min_spread=0.5)  # seconds against rows verified
        # Network seconds against uplink bytes: RTT + 1/R_up. Greedy drafts differ by 4 bytes a
        # token, so the rate is only read once sampled drafts spread the sizes by a packet or so.
        self.network = LinearFit(0.9, min_spread=1000.0)
        self.power_active = Ewma(0.2, self.prior.active_w)
        self.power_idle = Ewma(0.2, self.prior.idle_w)
        self.down_bytes = self.prior.down_bytes
        decay, k = self.acceptance.decay, self.acceptance.k
        self.bet = DecayedRate(decay, k)  # over pipelined rounds whose draft was all accepted
        self.hints = DecayedRate(decay, k)  # over verdicts that followed an early-exit hint
        self.prefill_s_per_token = Ewma(0.3)  # the draft's prompt prefill
        self.stream_token_s = Ewma(0.1)  # seconds between streamed tokens
        self.stream_up_bytes = Ewma(0.1, self.prior.stream_up_bytes)
        self.stream_down_bytes = Ewma(0.1, self.prior.stream_down_bytes)
        self.rounds = 0
        self.rounds_without_draft = 0
        self.streamed_since_round = 0  # over requests: a device of short requests must probe too
        self.probe_gap = self.first_probe_gap  # streamed tokens before the next probe (backs off)

    @property
    def draft_cap(self) -> int:
        """The most tokens a round may draft: the device's max_draft, never past the wire's."""
        return min(self.max_draft, MAX_DRAFT)

    def set_objective(self, objective: Objective) -> None:
        """Safe at run time: the next `plan` call sees it (one reference swap)."""
        self.objective = objective

    def observe_round(self, confidences: Sequence[float], accepted: int, draft_s: float, verify_s: float,
                      round_trip_s: float, up_bytes: int, down_bytes: int, cold: bool = False,
                      source: str = "model") -> None:
        """One verdict. `source`: where the draft came from, model or lookup (whose tokens take no
        drafting time and whose acceptance is estimated apart). `cold`: the verifier also prefilled
        the text for this round (a request's first, a resync's): its compute and its wait say
        nothing of a round's, and one such prefill in the verify fit made every later draft look
        cheap to verify (docs/scheduler.md)."""
        drafted = len(confidences)
        if source == "lookup":
            self.lookup.observe(confidences, accepted)
            self.rounds_without_lookup = 0
        else:
            self.acceptance.observe(confidences, accepted)
            self.rounds_without_lookup += 1
        if drafted and source != "lookup":
            self.draft_s.update(draft_s / drafted)
        if not cold:
            self.verify.update(drafted + 1, verify_s)
            self.network.update(up_bytes, max(round_trip_s - verify_s, 0.0))
            if self.stream_token_s.value is not None:
                # No stream runs while rounds do: what one would cost now is a one-row pass of the
                # rounds' line. Left as last measured, a stream timed while others' long prompts
                # shared its passes kept a device speculating long after streaming was cheaper.
                base, row = self.verify_line()
                self.stream_token_s.update(base + row)
        self.down_bytes = down_bytes
        self.rounds += 1
        self.rounds_without_draft = 0 if drafted else self.rounds_without_draft + 1
        # A round right after a stream was a probe (or a switch): the next one comes twice as late,
        # up to probe_stream_tokens; rounds in a row (speculation kept paying) start it over.
        if self.streamed_since_round:
            self.probe_gap = min(2 * self.probe_gap, self.probe_stream_tokens)
        else:
            self.probe_gap = self.first_probe_gap
        self.streamed_since_round = 0

    def observe_bet(self, held: bool) -> None:
        """A pipelined round whose draft was all accepted: did the guess of the target's token hold?"""
        self.bet.observe(held)

    def observe_hint(self, agreed: bool) -> None:
        """A verdict that came after an early-exit hint: did the hint predict it?"""
        self.hints.observe(agreed)

    def bet_holds(self) -> float | None:
        """State.bet_holds: the measured rate, its prior the acceptance rate; None before any bet."""
        return self.bet.rate(self.acceptance.rate) if self.bet.tried else None

    def follow_hint(self, confidences: Sequence[float]) -> bool:
        """Move a pipelined bet to an early-exit hint's prediction? Only where hints have predicted
        verdicts more often than the standing bet (every drafted token accepted, with these draft
        confidences, and the guess of the target's token) can be expected to hold: where hints
        lose, they are ignored."""
        agreement = self.hints.rate(0.5)
        bet = self.bet_holds() or self.acceptance.rate
        for c in confidences:
            bet *= self.acceptance.given_confidence(c)
        return agreement > bet

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.prefill_s_per_token.update(seconds / tokens)

    def prefill_in_time(self, tokens: int, remaining: int) -> bool:
        """Start the draft's prefill of `tokens` behind a stream with `remaining` tokens to go? Only
        if it would be done with half the stream still to come: a prefill the request outruns only
        burns power (and the request waits for it at its end)."""
        per_token = self.prefill_s_per_token.value
        return per_token is None or per_token * tokens < 0.5 * remaining * self.state().stream_token_s

    def observe_stream(self, seconds: float, tokens: int, up_bytes: int, down_bytes: int) -> None:
        """Streamed tokens that came `seconds` after the ones before them (a stream's first message,
        which also waits a round trip or a prefill, is not observed)."""
        self.streamed_since_round += max(tokens, 0)
        if tokens > 0 and seconds > 0:  # tokens that came at once (a burst after a stall) time no step
            gap = seconds / tokens
            if self.stream_token_s.value is not None:  # a stall (a blackout) is no cloud step: clipped,
                gap = min(gap, 3 * self.stream_token_s.value)  # so only a lasting slowdown moves it far
            # A streamed token is a one-row pass (its network overlaps the next step): the anchor of
            # the verify line at one row (state()), so one probing round after a stream gives it a
            # slope. Not a point of the rounds' fit: a stream's many one-row points would drown the
            # rounds' (forgotten a little more at each), and the fit would lose its slope again.
            self.stream_token_s.update(gap)
            self.stream_up_bytes.update(up_bytes / tokens)
            self.stream_down_bytes.update(down_bytes / tokens)

    def observe_power(self, busy_w: float | None, waiting_w: float | None) -> None:
        if busy_w is not None and busy_w > 0:
            self.power_active.update(busy_w)
        if waiting_w is not None and waiting_w > 0:
            self.power_idle.update(waiting_w)

    def verify_line(self) -> tuple[float, float]:
        """(base, per row) of a verification's seconds: the rounds' fit; rounds of one size, the line
        through a stream's step at one row; streams only, a row costs a step and more rows the
        prior's slope until probed; neither, the prior."""
        prior, streamed = self.prior, self.stream_token_s.value
        if self.verify.ready and streamed is not None:
            return self.verify.anchored(1, streamed) or self.verify.coefficients()
        if streamed is not None:
            return max(streamed - prior.verify_per_row_s, 0.0), prior.verify_per_row_s
        if self.verify.ready:
            return self.verify.coefficients()
        return prior.verify_base_s, prior.verify_per_row_s

    def state(self) -> State:
        prior = self.prior
        streamed = self.stream_token_s.value
        verify_base, verify_row = self.verify_line()
        rtt, s_per_byte = self.network.coefficients()
        if streamed is None:  # never streamed: a one-row pass costs the same cloud step
            streamed = verify_base + verify_row if self.verify.ready else prior.stream_token_s
        return replace(
            prior, accept_by_position=self.acceptance.by_position(), bet_holds=self.bet_holds(),
            stream_token_s=streamed,
            stream_up_bytes=self.stream_up_bytes.value, stream_down_bytes=self.stream_down_bytes.value,
            draft_s=self.draft_s.value if self.draft_s.value is not None else prior.draft_s,
            verify_base_s=verify_base,
            verify_per_row_s=verify_row,
            rtt_s=rtt if self.network.ready else prior.rtt_s,
            up_bps=8 / s_per_byte if s_per_byte > 0 else prior.up_bps,
            down_bytes=self.down_bytes, active_w=self.power_active.value, idle_w=self.power_idle.value)

    def mode(self, remaining: int, streaming: bool, objective: Objective | None = None) -> str:
        """STREAM or SPECULATE for the rest of a request (`remaining` tokens) on the current estimates,
        a draft never timed taken as free (as can_pay does): a guess of its cost would keep a device
        streaming that never learns it, and the first round is kept short (first_probe)."""
        return choose_mode(self._untimed_free(), objective or self.objective, self.draft_cap, remaining, streaming)

    def start_mode(self, remaining: int, objective: Objective | None = None) -> str:
        """How a request starts: SPECULATE where measured rounds (a timed draft, a verified round)
        say speculating the whole request beats starting a stream, whose GENERATE costs a round trip
        as a round does; else STREAM, so its first token comes as soon as the cloud alone gives it.
        A request that starts speculating drafts at least one token in its first round."""
        if self.draft_s.value is None or not self.verify.ready:
            return STREAM
        return choose_mode(self.state(), objective or self.objective, self.draft_cap, remaining, streaming=False)

    def _untimed_free(self) -> State:
        state = self.state()
        return replace(state, draft_s=0.0) if self.draft_s.value is None else state

    @property
    def probe_due(self) -> bool:
        """Enough tokens streamed since the last round, over requests, to leave for one: a first
        probe soon (one probe of a few tokens misjudges acceptance), later ones backing off, and
        never more often than explore_share of the streaming time pays for."""
        if self.streamed_since_round < self.probe_gap:
            return False
        if self.acceptance.tested < self.learn_tokens:
            return True
        return self.streamed_since_round * self.explore_share >= self.probe_cost_tokens()

    def probe_cost_tokens(self) -> float:
        """What one probe costs, in streamed tokens: a round trip out of the stream (the tokens it
        had in flight are lost) and one back, and the round's time beyond what its tokens would
        have taken streamed."""
        state = self.state()
        _, tokens, seconds, _ = best_round(state, self.objective, self.draft_cap)
        lost = 2 * state.rtt_s + max(seconds - tokens * state.stream_token_s, 0.0)
        return lost / state.stream_token_s if state.stream_token_s > 0 else 0.0

    def pipelining_pays(self, objective: Objective | None = None) -> bool:
        """Draft ahead during this round's wait? Where it gives more tokens/s (throughput mode; it
        never gives fewer unless its bet fails and the wait is short) or fewer J/token (energy mode:
        drafting ahead burns active power whether the bet pays or not), each at its best length."""
        objective, state, max_draft = objective or self.objective, self.state(), self.draft_cap
        ahead, _ = best_rate(replace(state, pipelined=True), objective, max_draft)
        plain, _ = best_rate(state, objective, max_draft)
        return ahead >= plain if objective.mode == "throughput" else ahead <= plain

    def can_pay(self, remaining: int, objective: Objective | None = None) -> bool:
        """speculation_can_pay on the current estimates, a draft never timed taken as free: the
        probe that would time it is the only way to learn it."""
        return speculation_can_pay(self._untimed_free(), objective or self.objective, self.draft_cap, remaining)

    def lookup_len(self, available: int, objective: Objective | None = None) -> int:
        """How many tokens of a prompt-lookup proposal of `available` to send; 0: draft with the
        model instead. The best length for the lookup's own acceptance at no drafting cost, taken
        where its rate beats the model's (throughput mode; in energy mode a lookup, which spends
        nothing on drafting, is taken whenever a length pays). After probe_every rounds without
        one it is tried anyway, as plain steps are: its acceptance is only learnt by trying."""
        objective = objective or self.objective
        cap = min(available, self.draft_cap)
        if cap <= 0:
            return 0
        if self.rounds_without_lookup >= self.probe_every:
            return cap
        state = self.state()
        looked = replace(state, accept_by_position=self.lookup.by_position(), draft_s=0.0)
        rate, draft_len = best_rate(looked, objective, cap)
        if objective.mode == "throughput" and rate < best_rate(state, objective, self.draft_cap)[0]:
            return 0
        return draft_len

    def planner(self, draft_len: int, objective: Objective | None = None, pipelined: bool = False,
                probe: bool = False):
        """A pure keep-drafting test for one round of at most `draft_len` tokens: confidences of the
        tokens drafted so far -> bool. The state and objective are frozen for the round; the draft
        loop calls it between tokens. `probe`: draft at least one token (a round after a stream)."""
        state, objective, acceptance = self._untimed_free(), objective or self.objective, self.acceptance
        state = replace(state, pipelined=pipelined)
        max_draft = min(draft_len, self.draft_cap)
        if probe and not self.verify.ready:  # the first round only measures: what k rows cost is a guess
            max_draft = min(max_draft, self.first_probe)
        probe = max_draft > 0 and (probe or self.rounds_without_draft >= self.probe_every)

        def keep_going(confidences: Sequence[float]) -> bool:
            if probe and not confidences:
                return True
            survival, s = [], 1.0
            for c in confidences:
                s *= acceptance.given_confidence(c)
                survival.append(s)
            return plan(state, objective, survival, max_draft) > 0

        return keep_going
