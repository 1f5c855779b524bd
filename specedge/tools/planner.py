"""Capacity planning on virtual time: many devices, one target, no waiting.

The emulator (specedge/emulation.py) runs the real product and holds each pass for its profile's
time, so it costs the wall time it emulates and one host can only run a few devices. The planner
answers the deployment questions (how fast for one device over this link, how many devices a
target serves at a floor) for 1 to 64 devices in seconds: a discrete-event model of the same
rounds on a virtual clock, where the decisions are the product's own code.

Terms:
  setup      one target profile, one draft profile, the recordings of a prompt set (greedy paths
             and draft steps of the real pair), a channel and a device count;
  pass       one target pass over every session with work pending when the target came free
             (the verifier's batching): prompt rows, drafts (k + 1 rows each), streamed rows;
  stream     cloud-ar and adaptive's streaming mode: one row a pass, its token sent at once;
  round      a draft of k tokens, its DRAFT up the link, its pass, its VERDICT down.

What is the product's own code: the adaptive scheduler (device/scheduler.py: its estimators, fed
what a device would observe, and its decision rule: when to leave a stream, how far to draft
token by token, when to stream again), the policies' draft lengths (device/policy.py), the pass
times (emulation.target_pass_ms, draft_feed_ms) and the recordings' answers (emulation.Recording).
What the model restates (docs/capacity.md section 6), checked against the emulated product: the
device's round sequence of device/request.py (the first round's message after the OPEN's OPENED; a
fixed policy's draft prefill, then rounds; an adaptive request's stream, the draft prefilling
behind it; the draft's catch-up of what it has not fed), and the verifier's batching
(cloud/verifier.py gather). Links are the channel's mean rate plus its one-way delay per message, a
phase at a time (a blackout holds messages until it ends); no jitter, loss or trace bursts. The
product's own work (the agent's per drafted token, a message's through the broker, the verifier's
per pass) is added where measured (`Overheads`, `overheads_of`).

Greedy only, as the emulation: the recordings hold argmaxes. Energy is estimated (the device
profile's board and radio power over the modelled busy and idle time), and says so.
"""
from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field, replace

from specedge.cloud.passes import PassLimits, fill_pass
from specedge.emulation import Fed, Recording, draft_feed_ms, target_pass_ms
from specedge.device.policy import parse_policy
from specedge.device.scheduler import SPECULATE, STREAM, Scheduler, State, Objective
from specedge.config import VerifierIdentity
from specedge.tools.channel import ChannelConfig

# Message sizes on the wire, bytes (MQTT framing included; the scheduler's State has the same).
OPEN_BASE, OPEN_PER_TOKEN = 80, 4
DRAFT_BASE, DRAFT_PER_TOKEN = State.up_bytes_base, State.up_bytes_per_token
VERDICT = State.down_bytes
STREAMED_UP, STREAMED_DOWN = State.stream_up_bytes, State.stream_down_bytes


@dataclass(frozen=True)
class Overheads:
    """What the product itself adds to the engines' times, measured on a host from an emulated run
    (`overheads_of`): the agent's work per drafted token, a message's way through the broker and
    the channel emulator beyond the link's delay and rate, the verifier's work per pass."""

    draft_step_ms: float = 0.0
    message_ms: float = 0.0
    pass_ms: float = 0.0
    source: str = "none: the profiles' times alone"


@dataclass(frozen=True)
class Setup:
    target: dict  # `specedge profile target`
    draft: dict  # `specedge profile draft`
    recordings: list[Recording]
    channel: ChannelConfig
    devices: int = 1
    max_new: int = 48
    max_draft: int = 8  # the devices' speculation.max_draft
    prior: State | None = None  # the devices' scheduler prior (device/agent.py scheduler_prior)
    stop_ids: frozenset = frozenset()
    passes: int = 1  # each device runs the prompt set this many times, its scheduler's estimates kept,
    warmup: int = 0  # after this many passes that are not counted (a device in service has learnt)
    verifier: VerifierIdentity = field(default_factory=VerifierIdentity)  # [verifier]: its batching and prefill chunks
    overheads: Overheads = field(default_factory=lambda: Overheads())  # the product's own, on top of the profiles


def one_way_s(channel: ChannelConfig, t: float, nbytes: float, up: bool) -> float:
    """Seconds a message of `nbytes` sent at t (after the request's start) takes one way: the
    phase's delay plus its mean rate; a blackout holds it until the next phase."""
    start, phase = channel.phase_at(t)
    spec = phase.up if up else phase.down
    if spec.blackouts:
        later = [s for s, _ in channel.phases if s > t]
        if not later:
            return float("inf")
        return later[0] - t + one_way_s(channel, later[0], nbytes, up)
    rate = spec.mean_rate_bps()
    return spec.delay_ms / 1000 + (nbytes * 8 / rate if rate else 0.0)


class _Clock:
    def __init__(self):
        self.now, self._queue, self._n = 0.0, [], 0

    def at(self, t: float, fn, *args) -> None:
        self._n += 1
        heapq.heappush(self._queue, (t, self._n, fn, args))

    def run(self) -> None:
        while self._queue:
            self.now, _, fn, args = heapq.heappop(self._queue)
            fn(*args)


class _Target:
    """The verifier's target (cloud/verifier.py gather and run_pending): an OPEN only makes the
    session, its text is fed with its first round, at most prefill_chunk cold rows a pass; a pass
    waits for more rounds while fewer than the sessions active in the last 5 s are pending (not
    when only streams are), at most the batch window (or a share of the last pass's compute); at
    most what a pass may hold (cloud/passes.py)."""

    ACTIVE_S = 5.0

    def __init__(self, clock: _Clock, profile: dict, cfg, overheads: Overheads):
        self.clock, self.profile, self.cfg, self.overheads = clock, profile, cfg, overheads
        self.work: dict = {}  # session key -> ("draft", length, drafted) | ("stream", length, left)
        self.arrived: dict = {}  # session key -> when its work became pending
        self.last_used: dict = {}
        self.cached: dict = {}  # session key -> positions its cache holds
        self.busy, self.due = False, None
        self.last_compute_s = 0.0
        self.passes = self.rows = 0
        self.busy_s = 0.0

    def submit(self, key, kind: str, *args) -> None:
        """A device's message for the session `key` (a device and its request number) arrives."""
        now = self.clock.now
        self.last_used[key] = now
        if kind == "end":  # a CLOSE: the stream ends, whatever it had in flight
            if self.work.get(key, ("",))[0] == "stream":
                del self.work[key]
            return
        self.work[key] = (kind, *args)  # a round's message also ends the session's stream
        self.arrived[key] = now
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.busy or not self.work:
            return
        now, cfg = self.clock.now, self.cfg
        active = sum(1 for t in self.last_used.values() if t > now - self.ACTIVE_S)
        window = max(cfg.batch_window_ms / 1000, cfg.batch_wait_fraction * self.last_compute_s)
        due = min(self.arrived[k] for k in self.work) + window
        streams_only = all(kind == "stream" for kind, *_ in self.work.values())
        if len(self.work) >= min(active, cfg.max_batch) or due <= now or streams_only:
            self._start()
        elif self.due != due:
            self.due = due
            self.clock.at(due, self._maybe_start)

    def _feed(self, key, kind: str, length: int, arg) -> tuple[Fed, int | None]:
        """What the next pass feeds for session `key`, and where a prefill chunk leaves its cache
        (None: the round is verified)."""
        cached = min(self.cached.get(key, 0), length - 1)  # a stream ahead of the device is cut back
        cold = length - 1 - cached
        if cold > self.cfg.prefill_chunk:  # a chunk of a long prefill: its round waits for the rest
            return Fed(cached, self.cfg.prefill_chunk, 0), cached + self.cfg.prefill_chunk
        kept = len(arg) + 1 if kind == "draft" else 1
        return Fed(cached, cold + kept, kept), None

    def _start(self) -> None:
        self.busy, self.due = True, None
        cfg = self.cfg
        feeds = {key: self._feed(key, *work) for key, work in self.work.items()}
        batch, _ = fill_pass(sorted(self.work.items(), key=lambda kv: self.arrived[kv[0]]),
                             PassLimits(cfg.max_batch, cfg.max_pass_rows, cfg.max_device_rows),
                             lambda kv: kv[0][0], lambda kv: feeds[kv[0]][0].rows, lambda kv: 0)
        seqs, fed = [feeds[key][0] for key, _ in batch], [feeds[key][1] for key, _ in batch]
        seconds = (target_pass_ms(self.profile, seqs) + self.overheads.pass_ms) / 1000
        self.passes += 1
        self.rows += sum(s.rows for s in seqs)
        self.busy_s += seconds
        self.last_compute_s = seconds
        self.clock.at(self.clock.now + seconds, self._end, batch, fed, seconds)

    def _end(self, batch, fed, seconds: float) -> None:
        now = self.clock.now
        for (key, (kind, length, arg)), chunked in zip(batch, fed):
            dev, n = key
            self.last_used[key] = now
            current = self.work.get(key) == (kind, length, arg)  # else replaced during the pass
            if chunked is not None:
                self.cached[key] = chunked
                if current:
                    self.arrived[key] = now
                continue
            if kind == "draft":
                accepted, token = dev.verdict(length, arg)
                self.cached[key] = length + accepted
                if current:
                    del self.work[key]
                    dev.send_down(VERDICT, dev.on_verdict, n, accepted, token, seconds)
                continue
            self.cached[key] = length
            if not current:
                continue
            token = dev.rec.path[length - len(dev.rec.prompt)]
            if arg > 1 and token not in dev.setup.stop_ids:
                self.work[key] = ("stream", length + 1, arg - 1)
                self.arrived[key] = now
            else:
                del self.work[key]
            dev.send_down(STREAMED_DOWN, dev.on_streamed, n, length, token)
        self.busy = False
        self._maybe_start()


class _Device:
    """One device running its requests back to back under one policy."""

    def __init__(self, index: int, setup: Setup, clock: _Clock, target: _Target, policy: str):
        self.index, self.setup, self.clock, self.target = index, setup, clock, target
        self.policy = parse_policy(policy, setup.max_draft)
        recs = setup.recordings
        self.queue = [recs[(index + i) % len(recs)] for i in range(len(recs) * (setup.warmup + setup.passes))]
        self.warm_requests = len(recs) * setup.warmup
        self.scheduler = (Scheduler(Objective(), setup.max_draft) if setup.prior is None
                          else Scheduler(Objective(), setup.max_draft, setup.prior))
        self.requests: list[dict] = []
        self.busy_s = 0.0  # drafting and prefilling
        self.up = self.down = 0

    # -- the link -------------------------------------------------------------------------------
    def send_up(self, nbytes: float, kind: str, *args) -> None:
        self.up += nbytes
        t = self.clock.now
        self.clock.at(t + self._one_way(nbytes, True), self.target.submit,
                      (self, self.n), kind, *args)

    def send_down(self, nbytes: float, fn, *args) -> None:
        t = self.clock.now
        self.clock.at(t + self._one_way(nbytes, False), self._received, nbytes, fn, args)

    def _one_way(self, nbytes: float, up: bool) -> float:
        t = self.clock.now - self.t0
        return one_way_s(self.setup.channel, t, nbytes, up) + self.setup.overheads.message_ms / 1000

    def _received(self, nbytes, fn, args) -> None:
        self.down += nbytes
        fn(*args)

    # -- requests -------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.queue:
            return
        self.rec = self.queue.pop(0)
        self.n = len(self.requests)
        self.t0 = self.clock.now
        self.committed = list(self.rec.prompt)
        self.generated, self.stopped, self.ttft = 0, False, None
        self.fed = 0  # positions the draft's cache holds
        self.prefilling_until: float | None = None
        self.streaming, self.after_stream, self.first_round = False, False, True
        self.streamed = 0
        self.last_token_at: float | None = None
        self.rounds: list[tuple[int, int]] = []  # (drafted, accepted)
        self.req_busy0, self.up0, self.down0 = self.busy_s, self.up, self.down
        # The OPEN (its text is fed with the first round); the first round's message waits for its
        # OPENED, which names the replica that holds the session (device/rounds.py).
        opening = OPEN_BASE + OPEN_PER_TOKEN * len(self.committed)
        self.up += opening
        self.down += VERDICT
        self.opened_at = self.t0 + self._one_way(opening, True) + self._one_way(VERDICT, False)
        streams = self.policy.stream and self.scheduler.start_mode(self.setup.max_new) == STREAM
        if self.policy.autoregressive or streams:
            self.clock.at(self.opened_at, self._stream)
        else:
            self.after_stream = self.policy.stream  # a speculating start is probed (device/request.py)
            self._prefill_draft()
            self.clock.at(self.clock.now + self.fed_s, self._round)

    @property
    def done(self) -> bool:
        return self.stopped or self.generated >= self.setup.max_new

    def _commit(self, tokens: list[int]) -> None:
        for token in tokens[: self.setup.max_new - self.generated]:
            if token in self.setup.stop_ids:
                self.stopped = True
                break
            self.committed.append(token)
            self.generated += 1
            if self.ttft is None:
                self.ttft = self.clock.now - self.t0

    def _finish(self) -> None:
        total = self.clock.now - self.t0
        self.send_up(0, "end")
        self.requests.append({"warmup": len(self.requests) < self.warm_requests, "tokens": self.generated,
                              "ttft_s": self.ttft or total, "total_s": total,
                              "busy_s": self.busy_s - self.req_busy0, "up": self.up - self.up0,
                              "down": self.down - self.down0, "rounds": self.rounds, "streamed": self.streamed})
        self.start()

    # -- the draft ------------------------------------------------------------------------------
    def _prefill_draft(self) -> None:
        """The draft takes in what it has not fed (a prefill, a stream's tokens) in one feed."""
        n = len(self.committed) - self.fed
        self.fed_s = draft_feed_ms(self.setup.draft, self.fed, n) / 1000 if n > 0 else 0.0
        self.busy_s += self.fed_s
        self.scheduler.observe_prefill(self.fed_s, n)
        self.fed = len(self.committed)
        self.prefilling_until = self.clock.now + self.fed_s

    def _draft(self, draft_len: int, keep_going) -> tuple[list[int], list[float], float]:
        """(tokens, confidences, seconds): the recorded draft steps, one decode step each, the first
        feeding what the draft has not seen (one token, or two after a round it won whole)."""
        text, tokens, confidences = list(self.committed), [], []
        unfed = len(self.committed) - self.fed
        seconds = 0.0
        while len(tokens) < draft_len and (keep_going is None or keep_going(confidences)):
            step = self.rec.draft_next(text)
            if step is None:
                break
            rows = 1 if tokens else unfed  # the first token's logits come from the catch-up feed
            if rows:
                seconds += draft_feed_ms(self.setup.draft, len(text) - rows, rows) / 1000
            seconds += self.setup.overheads.draft_step_ms / 1000
            tokens.append(step[0])
            confidences.append(step[1])
            text.append(step[0])
            if step[0] in self.setup.stop_ids:
                break
        if not tokens and unfed:
            seconds = 0.0  # nothing drafted: the catch-up waits for the next draft
        else:
            self.fed = len(self.committed) + max(len(tokens) - 1, 0)
        return tokens, confidences, seconds

    # -- streaming ------------------------------------------------------------------------------
    def _stream(self) -> None:
        self.streaming = True
        self.last_token_at = None
        self.send_up(DRAFT_BASE, "stream", len(self.committed), self.setup.max_new - self.generated)

    def on_streamed(self, n: int, length: int, token: int) -> None:
        if n != self.n or not self.streaming or length != len(self.committed):
            return  # a token in flight when the device left the stream, or one it holds
        now = self.clock.now
        before = self.generated
        self._commit([token])
        self.streamed += self.generated - before
        if self.last_token_at is not None:
            self.scheduler.observe_stream(now - self.last_token_at, 1, STREAMED_UP, STREAMED_DOWN)
        self.last_token_at = now
        if self.done:
            self.streaming = False
            return self._finish()
        if not self.policy.autoregressive and self._leave_stream():
            self.streaming, self.first_round, self.after_stream = False, False, True
            self._round()  # its DRAFT ends the stream on the verifier, whatever it had in flight

    def _leave_stream(self) -> bool:
        """device/request.py Streaming.leave, on virtual time."""
        scheduler, remaining = self.scheduler, self.setup.max_new - self.generated
        if not scheduler.can_pay(remaining):
            return False
        if self.prefilling_until is None:
            if not scheduler.prefill_in_time(len(self.committed), remaining):
                return False
            self._prefill_draft()
        if self.prefilling_until > self.clock.now:
            return False
        return scheduler.probe_due or scheduler.mode(remaining, True) == SPECULATE

    # -- rounds ---------------------------------------------------------------------------------
    def _round(self) -> None:
        if self.done:
            return self._finish()
        scheduler, remaining = self.scheduler, self.setup.max_new - self.generated
        if self.policy.stream and not self.after_stream and scheduler.mode(remaining, False) == STREAM:
            return self._stream()
        draft_len = self.policy.next_draft_len(remaining)
        keep_going = scheduler.planner(draft_len, probe=self.after_stream) if self.policy.adaptive else None
        self.after_stream = False
        tokens, confidences, seconds = self._draft(draft_len, keep_going)
        self.busy_s += seconds
        self.round_at = self.clock.now
        self.drafted = (tokens, confidences, seconds)
        length = len(self.committed)
        self.clock.at(max(self.clock.now + seconds, self.opened_at), self.send_up,
                      DRAFT_BASE + DRAFT_PER_TOKEN * len(tokens), "draft", length, tuple(tokens))

    def verdict(self, length: int, drafted: tuple) -> tuple[int, int]:
        """(accepted, next token): the path's, read no further than the first token off it."""
        path, at = self.rec.path, length - len(self.rec.prompt)
        accepted = 0
        while accepted < len(drafted) and at + accepted < len(path) and drafted[accepted] == path[at + accepted]:
            accepted += 1
        return accepted, path[min(at + accepted, len(path) - 1)]

    def on_verdict(self, n: int, accepted: int, token: int, verify_s: float) -> None:
        if n != self.n:
            return
        tokens, confidences, draft_s = self.drafted
        before = len(self.committed)
        now = self.clock.now
        sent = self.round_at + draft_s
        self.rounds.append((len(tokens), accepted))
        self.scheduler.observe_round(confidences, accepted, draft_s, verify_s, now - sent,
                                     DRAFT_BASE + DRAFT_PER_TOKEN * len(tokens), VERDICT, cold=self.first_round)
        self.first_round = False
        self._commit(list(tokens[:accepted]) + [token])
        self.fed = min(self.fed, before + accepted)  # the cache is cut back to what holds
        self._round()


def simulate(setup: Setup, policy: str, board=None, radio=None) -> dict:
    """Every device runs the prompts back to back under `policy`, warmup passes first: per-device
    tokens/s and TTFT of the counted passes (as `specedge bench` counts them: tokens over the
    requests' time) and their sum, estimated J/token, the target's passes and rows over the run."""
    clock = _Clock()
    target = _Target(clock, setup.target, setup.verifier, setup.overheads)
    devices = [_Device(i, setup, clock, target, policy) for i in range(setup.devices)]
    for d in devices:
        d.start()
    clock.run()
    per_device, ttft, joules, tokens = [], [], 0.0, 0
    drafted = accepted = rounds = streamed = 0
    for d in devices:
        counted = [r for r in d.requests if not r["warmup"]]
        n = sum(r["tokens"] for r in counted)
        total = sum(r["total_s"] for r in counted)
        per_device.append(n / total if total else 0.0)
        ttft += [r["ttft_s"] for r in counted]
        tokens += n
        for r in counted:
            streamed += r["streamed"]
            rounds += len(r["rounds"])
            drafted += sum(k for k, _ in r["rounds"])
            accepted += sum(a for _, a in r["rounds"])
            if board is not None:
                joules += (r["busy_s"] * board.active_w + (r["total_s"] - r["busy_s"]) * board.idle_w
                           + (radio.energy_j(r["total_s"], r["up"], r["down"]) if radio else 0.0))
    return {"policy": policy, "devices": setup.devices, "tokens_per_s": statistics.mean(per_device),
            "slowest_tokens_per_s": min(per_device), "ttft_s": statistics.mean(ttft),
            "aggregate_tokens_per_s": sum(per_device),
            "j_per_token_estimated": joules / tokens if board is not None and tokens else None,
            "mean_draft_len": drafted / rounds if rounds else 0.0,
            "acceptance": accepted / drafted if drafted else None,
            "streamed_share": streamed / tokens if tokens else 0.0,
            "target_passes": target.passes, "target_rows": target.rows,
            "target_busy": target.busy_s / clock.now if clock.now else 0.0}


def acceptance_by_position(recordings: list[Recording], positions: int) -> list[float]:
    """P(drafted token j accepted | tokens < j accepted), j = 1..positions, over every position of
    every path: the recordings' greedy acceptance, for the regime map."""
    tested, held = [0] * positions, [0] * positions
    for rec in recordings:
        run = 0
        for k in range(len(rec.path) - 1, -1, -1):  # the run of draft steps on the path from k
            run = run + 1 if rec.steps[k][0] == rec.path[k] else 0
            for j in range(min(run + 1, positions)):
                tested[j] += 1
                held[j] += j < run
    return [h / t if t else 0.0 for h, t in zip(held, tested)]


def devices_at_floor(setup: Setup, policy: str, floor: float, most: int = 64, board=None, radio=None,
                     known: dict | None = None):
    """The most devices (up to `most`) whose mean tokens/s stays at or above `floor`, and that run;
    (0, None) if even one device is below it. `known`: runs already made, by device count (the
    largest, the dearest, is not run again)."""
    known = dict(known or {})

    def run(n):
        if n not in known:
            known[n] = simulate(replace(setup, devices=n), policy, board, radio)
        return known[n]

    best, lo = None, 0
    n = 1
    while n <= most:
        r = run(n)
        if r["tokens_per_s"] < floor:
            break
        best, lo = r, n
        n *= 2
    else:
        return lo, best
    hi = n  # lo meets the floor, hi does not: bisect between
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = run(mid)
        if r["tokens_per_s"] >= floor:
            best, lo = r, mid
        else:
            hi = mid
    return lo, best


def overheads_of(report: dict, target: dict, draft: dict, channel: ChannelConfig) -> Overheads:
    """The product's own overheads on the host an emulated `specedge bench` report ran on (its
    profiles `target`, `draft`; one of its channels): the median over rounds of the drafted
    token's time beyond the draft profile's step, of half the round trip's network time beyond
    the channel's delays, and of a streamed token's gap (cloud-ar) beyond the target's step."""
    from specedge.emulation import decode_ms

    if not report.get("emulated"):
        raise ValueError("overheads are read from an emulated run (`specedge bench --emulate`)")
    runs = report["channels"][channel.name]["runs"]
    step, message, gap = [], [], []
    delay = (channel.up.delay_ms + channel.down.delay_ms) / 1000
    for policy, items in runs.items():
        for r in items:
            context = r["prompt_tokens"] + len(r["tokens"]) // 2
            if r["summary"].get("draft_ms_per_token"):
                step.append(r["summary"]["draft_ms_per_token"] - decode_ms(draft, context))
            message += [(x - delay) / 2 * 1000 for x in r["network_rtt_s"][1:]]
            if policy == "cloud-ar" and len(r["tokens"]) > 1:
                s = r["summary"]
                gap.append((s["total_s"] - s["ttft_s"]) / (len(r["tokens"]) - 1) * 1000 - decode_ms(target, context))
    med = lambda xs: max(statistics.median(xs), 0.0) if xs else 0.0
    return Overheads(round(med(step), 3), round(med(message), 3), round(med(gap), 3),
                     f"measured: {report.get('machine', {}).get('cpu', '?')}, emulated run of "
                     f"{report['emulation']['target_profile']}")
