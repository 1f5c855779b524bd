"""Speculative-decoding metrics (vLLM's first-class numbers) for one generation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of `values`, None when there are none: the sorted value at
    index floor(q * n), the last for q = 1 (no interpolation: always a value that occurred)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def spec_rates(drafted: int, accepted: int, rounds: int) -> dict:
    """Acceptance rate and mean accepted length (tokens a round commits: the accepted ones and
    the target's own) of some rounds; None where nothing was drafted or no round ran."""
    return {"acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_len": (accepted + rounds) / rounds if rounds else None}


@dataclass
class SpecStats:
    policy: str = ""
    rounds: int = 0  # verification rounds (= target forward passes for speculative policies)
    target_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0
    draft_s: float = 0.0
    draft_prefill_s: float = 0.0  # of draft_s, the prompt's prefill (behind a stream or before the first round)
    verify_s: float = 0.0  # target compute time as reported by the verifier
    wait_s: float = 0.0  # device waiting for verdicts (round trip, verification included)
    total_s: float = 0.0
    ttft_s: float = 0.0
    first_tokens: int = 0  # tokens that came at ttft_s (a first round's verdict brings several)
    wire_bytes: int = 0  # MQTT packets both ways, framing included
    resyncs: int = 0
    failovers: int = 0  # resyncs with the replica group after our replica went silent or offline
    version_switches: int = 0  # the verifier moved the session to another target version mid-request
    target_version: str = ""  # the version that verified the last round
    # Every version that held the session passed its bitwise self-test (None: none answered).
    exact_targets: bool | None = None
    replica: str = ""  # the replica that held the session at the end
    retries: int = 0
    stale_messages: int = 0
    unverified_tokens: int = 0  # committed on the draft alone under the `draft` fault policy
    energy_j: float = 0.0  # device energy over the request (meter + modelled radio)
    energy_source: str = ""
    radio_tail_j: float = 0.0  # the radio's tail after the request, not in energy_j
    ahead_s: float = 0.0  # drafting ahead during waits (pipelined policies), in wait_s
    ahead_tokens: int = 0  # tokens drafted ahead, kept or not
    ahead_kept: int = 0  # of those, tokens whose bet held and that went out as the next draft
    ahead_hits: int = 0  # rounds whose bet held
    hints: int = 0  # rounds with an early-exit hint
    hints_agreed: int = 0  # of those, rounds whose verdict was the one the hint predicted
    hint_layer: int = 0
    q_wire_bytes: int = 0  # sampled mode: what the sparse q added to the drafts, over plain token ids
    dense_q_bytes: int = 0  # what full fp16 draft distributions would have added instead (not sent)
    draft_lens: list[int] = field(default_factory=list)
    accepted_lens: list[int] = field(default_factory=list)
    round_start_s: list[float] = field(default_factory=list)  # offsets from the request's start
    round_trip_s: list[float] = field(default_factory=list)
    verify_round_s: list[float] = field(default_factory=list)
    # vLLM's num_accepted_tokens_per_pos: per draft position i (0-based), the rounds that drafted
    # a token there and those whose verdict accepted it (positions < wire.MAX_DRAFT).
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)
    # Rounds whose draft came from prompt lookup (device/lookup.py), its tokens and the accepted
    # ones: included in the totals above, and apart here because their acceptance is their own.
    draft_reused_tokens: int = 0  # prompt tokens the draft's cache kept from the last request (a conversation)
    cached_prompt_tokens: int = 0  # prompt tokens a kept session held on the verifier: not sent again (EXTEND)
    forced_tokens: int = 0  # committed with no round trip: the grammar allowed nothing else (grammar.py)
    lookup_rounds: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    # Tokens the cloud streamed (cloud-ar, or an adaptive policy's stream mode), and each mode an
    # adaptive request entered: (seconds since its start, "stream" or "speculate").
    streamed_tokens: int = 0
    modes: list[tuple[float, str]] = field(default_factory=list)

    def record_round(self, drafted: int, accepted: int, round_trip_s: float, verify_s: float,
                     start_s: float = 0.0, source: str = "model") -> None:
        if source == "lookup":
            self.lookup_rounds += 1
            self.lookup_drafted += drafted
            self.lookup_accepted += accepted
        self.rounds += 1
        self.target_passes += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_s += verify_s
        self.draft_lens.append(drafted)
        self.accepted_lens.append(accepted)
        self.round_start_s.append(start_s)
        self.round_trip_s.append(round_trip_s)
        self.verify_round_s.append(verify_s)
        if drafted > len(self.drafted_per_pos):
            grow = drafted - len(self.drafted_per_pos)
            self.drafted_per_pos += [0] * grow
            self.accepted_per_pos += [0] * grow
        for i in range(drafted):
            self.drafted_per_pos[i] += 1
        for i in range(min(accepted, drafted)):
            self.accepted_per_pos[i] += 1

    def acceptance_by_position(self) -> list[float]:
        """Accepted over drafted at each draft position that some round reached."""
        return [a / d for a, d in zip(self.accepted_per_pos, self.drafted_per_pos) if d]

    def verified_by(self, exact: bool) -> None:
        """A target version took the session; `exact` is what its OPENED said."""
        self.exact_targets = exact if self.exact_targets is None else self.exact_targets and exact

    @property
    def exact(self) -> bool:
        """Greedy output is bit for bit the target's own decoding: every token was verified, by
        versions that showed on their machine that they compute it so."""
        return bool(self.exact_targets) and self.unverified_tokens == 0

    def network_rtt_s(self) -> list[float]:
        """Round trips minus the verifier's compute: link, broker and queueing."""
        return [max(rt - v, 0.0) for rt, v in zip(self.round_trip_s, self.verify_round_s)]

    def summary(self) -> dict:
        gen = max(self.generated_tokens, 1)
        rounds = max(self.rounds, 1)
        mean_draft_len = self.drafted_tokens / rounds
        mean_accepted_len = (self.accepted_tokens + self.rounds) / rounds if self.rounds else 0.0
        rtt_p50 = percentile(self.round_trip_s, 0.5)
        return {
            "policy": self.policy,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / self.total_s if self.total_s else 0.0,
            # After the first token: what the rounds (or the stream) deliver, without the prefills.
            "decode_tokens_per_s": ((self.generated_tokens - self.first_tokens) / (self.total_s - self.ttft_s)
                                    if self.generated_tokens > self.first_tokens and self.total_s > self.ttft_s
                                    else 0.0),
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "rounds": self.rounds,
            "acceptance_rate": self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0,
            "mean_accepted_len": mean_accepted_len,
            "mean_draft_len": mean_draft_len,
            "acceptance_by_position": self.acceptance_by_position(),
            # vLLM's system efficiency: tokens produced per round over the most a round could give.
            "draft_efficiency": mean_accepted_len / (mean_draft_len + 1) if self.rounds else 0.0,
            "target_passes_per_token": self.target_passes / gen,
            "wire_bytes_per_token": self.wire_bytes / gen,
            # Drafting time over the tokens the draft model made (a lookup takes none), its prefill left out.
            "draft_ms_per_token": (1000 * (self.draft_s - self.draft_prefill_s)
                                   / (self.drafted_tokens - self.lookup_drafted)
                                   if self.drafted_tokens > self.lookup_drafted else 0.0),
            "draft_reused_tokens": self.draft_reused_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "forced_tokens": self.forced_tokens,
            "streamed_share": self.streamed_tokens / gen,
            "mode_switches": max(len(self.modes) - 1, 0),
            "lookup_rounds": self.lookup_rounds,
            "lookup_acceptance": self.lookup_accepted / self.lookup_drafted if self.lookup_drafted else None,
            "verify_ms_per_pass": 1000 * self.verify_s / self.target_passes if self.target_passes else 0.0,
            "round_trip_ms_p50": 1000 * rtt_p50 if rtt_p50 is not None else 0.0,
            "resyncs": self.resyncs,
            "retries": self.retries,
            "stale_messages": self.stale_messages,
            "unverified_tokens": self.unverified_tokens,
            "exact": self.exact,
            "energy_j_per_token": self.energy_j / gen,
            "naive_wire_bytes_per_token": ((self.wire_bytes - self.q_wire_bytes + self.dense_q_bytes) / gen
                                           if self.dense_q_bytes else None),
            "ahead_hit_rate": self.ahead_hits / rounds if self.ahead_tokens or self.ahead_hits else None,
            "ahead_kept_tokens": self.ahead_kept,
            "early_exit_agreement": self.hints_agreed / self.hints if self.hints else None,
            "energy_source": self.energy_source,
        }
