"""The device as a service: one agent, a bounded queue of requests, drain and resume.

Apps (the local HTTP and MQTT APIs) submit jobs; one worker thread runs them on
the agent one at a time, since the draft model is one engine. A job streams
events (text increments, then its end) to whoever submitted it, ends at a stop
string, and can be cancelled: the agent's token callback raises, the agent
closes its session, the committed text is reported as far as it got.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from specedge.config import DeviceConfig, EnergyConfig
from specedge.device.agent import Agent
from specedge.device.request import RequestFailed, VerifierUnavailable
from specedge.device.policy import Policy, parse_policy
from specedge.device.scheduler import objective
from specedge.exporter import DeviceMetrics
from specedge.grammar import TOOL_OPEN, Compiled
from specedge.metrics import SpecStats
from specedge.mqtt import Link
from specedge.speculative import SamplingParams, TokenLogprob
from specedge.tokenizer import StreamDecoder

log = logging.getLogger("specedge.device")


class Rejected(RuntimeError):
    """A request the service does not take now; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class _Cancelled(Exception):
    pass


class _StopStringHit(Exception):
    pass


def borders(s: str) -> list[int]:
    """borders[i]: the length of the longest proper prefix of s[:i + 1] that also ends it (KMP)."""
    out, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = out[k - 1]
        k += s[i] == s[k]
        out[i] = k
    return out


class StopScan:
    """Cuts streamed text at the first stop string, holding back the tail that could still become
    one. A Knuth-Morris-Pratt matcher per stop string carries how much of it the text ends with,
    so each new character is looked at once (amortised) and held-back text is never scanned
    again, however long the stop strings. `steps`: the matchers' moves, at most twice the
    characters fed per stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.borders = [borders(s) for s in stops]
        self.matched = [0] * len(stops)
        self.held = ""  # text not yet passed on: it may be the start of a stop string
        self.steps = 0

    def push(self, new: str) -> tuple[str, bool]:
        """(the text to pass on, whether a stop string begins where it ends: nothing may follow)."""
        text = self.held + new
        ends = [self._feed(i, new) for i in range(len(self.stops))]
        starts = [len(self.held) + end - len(s) for end, s in zip(ends, self.stops) if end is not None]
        if starts:
            self.held = ""
            return text[:min(starts)], True
        # The longest tail that begins a stop string: never longer than the held text plus `new`,
        # since the held text was the longest such tail before.
        keep = max(self.matched, default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def _feed(self, i: int, new: str) -> int | None:
        """Run stop string i's matcher over `new`: where in `new` its first match ends, or None."""
        stop, back, k = self.stops[i], self.borders[i], self.matched[i]
        for at, char in enumerate(new):
            while k and stop[k] != char:
                k = back[k - 1]
                self.steps += 1
            k += stop[k] == char
            self.steps += 1
            if k == len(stop):
                return at + 1  # the request ends here: the matcher is not needed again
        self.matched[i] = k
        return None


@dataclass
class Outcome:
    text: str
    tokens: int  # completion tokens
    prompt_tokens: int
    finish_reason: str  # stop | length | cancelled | error
    stats: SpecStats | None = None
    error: str = ""
    error_kind: str = ""  # verifier_unavailable | refused | internal
    # Where params.logprobs asked: (token, the target's logprob there, None if it never saw it) of
    # every token the answer's text came from.
    logprobs: list[tuple[int, TokenLogprob | None]] | None = None


class Job:
    """One request: submit, then read `events()` until it ends."""

    def __init__(self, prompt: list[int], params: SamplingParams, max_new_tokens: int, tokenizer,
                 stop: tuple[str, ...] = (), grammar: str | None = None):
        self.prompt, self.params, self.max_new_tokens = prompt, params, max_new_tokens
        self.grammar = grammar  # llguidance grammar text the output follows (specedge/grammar.py), or None
        self.stop = tuple(s for s in stop if s)
        self.cancelled = threading.Event()
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._decoder = StreamDecoder(tokenizer)
        self._scan = StopScan(self.stop)
        self._text: list[str] = []
        self._stop_hit = False
        # Text decoded from tokens the target never saw (the `draft` fault policy) and not passed
        # on yet: the text that carries it is marked unverified, however the decoder splits it.
        self._unverified_held = False
        # Where params.logprobs asks: (token, logprob) of the answer so far; the next tokens' logprobs
        # (on_logprobs comes just before on_tokens); how many were passed on in events.
        self.logprobs: list[tuple[int, TokenLogprob | None]] = []
        self._next_logprobs: list[TokenLogprob | None] = []
        self._logprobs_said = 0

    def cancel(self) -> None:
        self.cancelled.set()

    def on_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        """The agent's callback with the logprobs of the tokens its next on_tokens brings."""
        self._next_logprobs = list(logprobs)

    def on_tokens(self, tokens: list[int], verified: bool) -> None:
        """The agent's callback, on the worker thread: decode, cut at a stop string, pass text on."""
        if self.cancelled.is_set():
            raise _Cancelled
        if self.params.logprobs is not None:
            self.logprobs += zip(tokens, self._next_logprobs, strict=True)  # the agent says one per token
            self._next_logprobs = []
        self._unverified_held |= not verified
        text, stopped = self._scan.push(self._decoder.push(tokens))
        self._pass_on(text)
        if stopped:
            self._stop_hit = True
            raise _StopStringHit

    def _say_logprobs(self) -> None:
        """An event with the logprobs of the tokens not yet said: just before the text they made."""
        if self._logprobs_said < len(self.logprobs):
            self._events.put(("logprobs", self.logprobs[self._logprobs_said:]))
            self._logprobs_said = len(self.logprobs)

    def _pass_on(self, text: str) -> None:
        if text:
            self._say_logprobs()
            self._text.append(text)
            self._events.put(("unverified" if self._unverified_held else "text", text))
            # Cleared once nothing is held back: the decoder passes on all it holds whenever it passes
            # on text (it holds only a split UTF-8 character), the stop scan may hold a prefix.
            if not self._scan.held:
                self._unverified_held = False

    def finish(self, outcome: Outcome) -> None:
        if outcome.finish_reason in ("stop", "length"):
            self._pass_on(self._scan.held)
        self._scan.held = ""
        outcome.text = "".join(self._text)
        if self.params.logprobs is not None:
            self._say_logprobs()
            outcome.logprobs = self.logprobs
        self.outcome = outcome
        self._events.put(("end", outcome))
        self.done.set()

    def events(self, timeout: float | None = None):
        """("text", str) increments, ("unverified", str) where they hold text of tokens the target never
        saw (the `draft` fault policy), ("logprobs", [(token, TokenLogprob | None)]) before the text
        those tokens made (where params.logprobs asks), then ("end", Outcome)."""
        while True:
            kind, value = self._events.get(timeout=timeout)
            yield kind, value
            if kind == "end":
                return

    def wait(self, timeout: float | None = None) -> Outcome:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self.outcome


@dataclass
class Window:
    """What the requests finished since the last telemetry did: summed, then read and reset."""

    requests: int = 0
    failed: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    energy_j: float = 0.0
    wire_bytes: int = 0
    round_trip_s: list = field(default_factory=list)

    def add(self, stats: SpecStats, ok: bool) -> None:
        self.requests += 1
        self.failed += not ok
        self.tokens += stats.generated_tokens
        self.busy_s += stats.total_s
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens
        self.rounds += stats.rounds
        self.energy_j += max(stats.energy_j, 0.0)
        self.wire_bytes += stats.wire_bytes
        self.round_trip_s += stats.round_trip_s


def _live_energy(current: EnergyConfig, new: EnergyConfig) -> EnergyConfig:
    """`current` with the [energy] keys that change without a restart taken from `new`."""
    return replace(current, mode=new.mode, budget_j_per_token=new.budget_j_per_token,
                   min_tokens_per_s=new.min_tokens_per_s)


class DeviceService:
    def __init__(self, cfg: DeviceConfig, engine, tokenizer, config_path: str | None = None,
                 link: Link | None = None):
        """`link`: the device's connection, run by whoever made it (device/node.py); else the agent's own."""
        self.cfg, self.engine, self.tokenizer, self.config_path = cfg, engine, tokenizer, config_path
        self.local_cfg = cfg  # the device's own config (file and environment): desired configs go on top
        self.agent = Agent(cfg, engine, tokenizer, link)
        self.policy: Policy = parse_policy(cfg.speculation.policy, cfg.speculation.max_draft)
        self.draining = False
        self.metrics = DeviceMetrics(lambda: {"queue_depth": self.queue_depth, "draining": self.draining,
                                              "decode_errors": dict(self.agent.decode_errors)})
        self.on_state_change = None  # called after drain, resume or a config change: the fleet re-publishes status
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._window = Window()
        self._worker = threading.Thread(target=self._work, name="specedge-requests", daemon=True)
        self.started_s = time.time()
        self.last_request: tuple[float, SpecStats] | None = None  # (when it ended, its numbers)

    def start(self) -> "DeviceService":
        self.agent.start(retry=True)  # without a broker it answers 503 broker_unreachable until one comes
        self._worker.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancel()
            if self._running:
                self._running.cancel()
            self._lock.notify_all()
        self._worker.join(timeout=30)
        self.agent.stop()

    # -- requests ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting, not counting the one running."""
        return len(self._waiting)

    @property
    def requests_done(self) -> int:
        """Requests the agent ran (finished, failed or cancelled mid-way) since start."""
        return self.metrics.totals()["requests"]

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + (self._running is not None)

    def defaults(self) -> SamplingParams:
        gen = self.cfg.generation
        return SamplingParams.seeded(gen.temperature, gen.top_k, gen.top_p, gen.seed_or_none)

    def submit(self, prompt: list[int], params: SamplingParams | None = None, max_new_tokens: int | None = None,
               stop: tuple[str, ...] = (), grammar: str | None = None) -> Job:
        """Queue a request, or raise Rejected (503 draining or broker down, 429 queue full).
        `grammar`: grammar text the output must follow; check_grammar() first, so that one that
        does not compile is the caller's error, not a failed job."""
        job = Job(prompt, params or self.defaults(), max_new_tokens or self.cfg.generation.max_new_tokens,
                  self.tokenizer, stop, grammar)
        with self._lock:
            if self._stopping or self.draining:
                self.metrics.requests.labels("rejected").inc()
                raise Rejected("the device is draining: it finishes what it holds and takes no new requests",
                               503, "draining")
            if not self.agent.status().connected:
                self.metrics.requests.labels("rejected").inc()
                raise Rejected("the device has no connection to its MQTT broker, so no verifier", 503,
                               "broker_unreachable")
            if self.in_flight > self.cfg.api.queue_size:
                self.metrics.requests.labels("rejected").inc()
                raise Rejected(f"the request queue is full ({self.cfg.api.queue_size} waiting)", 429, "queue_full")
            self._waiting.append(job)
            self._lock.notify_all()
        return job

    def check_grammar(self, text: str) -> None:
        """Compile `text` for this device's tokenizer and vocabulary: a GrammarError if it does not.
        Compiled apart from the agent's cache, which the worker thread uses: a JSON schema compiles
        in milliseconds, and request threads then share no state with it."""
        Compiled(self.tokenizer, self.engine.vocab_size, text)

    @property
    def hermes(self) -> bool:
        """Whether the tokenizer has Qwen's <tool_call> token, which frames each tool call."""
        return self.tokenizer.hf.token_to_id(TOOL_OPEN) is not None

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    self._lock.notify_all()

    def _run(self, job: Job) -> None:
        outcome = Outcome("", 0, len(job.prompt), "error")
        if job.cancelled.is_set():
            outcome.finish_reason = "cancelled"
            job.finish(outcome)
            return
        try:
            result = self.agent.generate(job.prompt, job.params, job.max_new_tokens, self.policy,
                                         on_tokens=job.on_tokens, grammar=job.grammar, on_logprobs=job.on_logprobs)
            outcome.finish_reason = "stop" if result.stopped else "length"
        except _StopStringHit:
            outcome.finish_reason = "stop"
        except _Cancelled:
            outcome.finish_reason = "cancelled"
        except VerifierUnavailable as exc:
            outcome.error, outcome.error_kind = str(exc), "verifier_unavailable"
        except RequestFailed as exc:
            outcome.error, outcome.error_kind = str(exc), "refused"
        except Exception as exc:  # one bad request must not take the service down
            log.exception("request failed")
            outcome.error, outcome.error_kind = f"internal error: {exc}", "internal"
        current = self.agent.current
        stats = current.stats if current is not None else SpecStats()
        outcome.stats, outcome.tokens = stats, stats.generated_tokens
        ok = outcome.finish_reason != "error"
        self.metrics.requests.labels({"error": "failed", "cancelled": "cancelled"}.get(outcome.finish_reason,
                                                                                       "ok")).inc()
        if not ok:
            self.metrics.errors.labels(outcome.error_kind).inc()
        self.metrics.observe(stats)
        with self._lock:
            self._window.add(stats, ok)
            self.last_request = (time.monotonic(), stats)
        job.finish(outcome)

    # -- operator controls ---------------------------------------------------------------------
    def drain(self) -> int:
        """Take no new requests; those held finish. Returns how many are still held."""
        with self._lock:
            self.draining = True
        self._changed()
        return self.in_flight

    def resume(self) -> None:
        with self._lock:
            self.draining = False
        self._changed()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    # An operator's command (set_policy, set_energy) also changes local_cfg: it outlives later
    # desired configs, until a restart or reload_config.
    def set_policy(self, spec: str) -> Policy:
        policy = parse_policy(spec, self.cfg.speculation.max_draft)  # ValueError names what is allowed
        self.policy = policy
        self._set_cfg(replace(self.cfg, speculation=replace(self.cfg.speculation, policy=spec)))
        self.local_cfg = replace(self.local_cfg, speculation=replace(self.local_cfg.speculation, policy=spec))
        self._changed()
        return policy

    def set_energy(self, energy: EnergyConfig) -> None:
        """The scheduler's objective (mode, budget, floor) from a validated [energy] section."""
        self._set_cfg(replace(self.cfg, energy=_live_energy(self.cfg.energy, energy)))
        self.local_cfg = replace(self.local_cfg, energy=_live_energy(self.local_cfg.energy, energy))
        self.agent.configure(objective(self.cfg.energy))
        self._changed()

    def apply_config(self, cfg: DeviceConfig) -> None:
        """Take the sections that change without a restart from a validated config."""
        self._set_cfg(replace(self.cfg, speculation=cfg.speculation, generation=cfg.generation, faults=cfg.faults,
                              energy=_live_energy(self.cfg.energy, cfg.energy), fleet=cfg.fleet))
        self.policy = parse_policy(cfg.speculation.policy, cfg.speculation.max_draft)
        self.agent.configure(objective(self.cfg.energy), cfg.speculation.max_draft)
        self._changed()

    def _set_cfg(self, cfg: DeviceConfig) -> None:
        self.cfg = self.agent.cfg = cfg  # the agent reads [faults] per request

    def _changed(self) -> None:
        if self.on_state_change is not None:
            self.on_state_change()

    @property
    def state(self) -> str:
        return "draining" if self.draining else "online"

    def take_window(self) -> Window:
        with self._lock:
            window, self._window = self._window, Window()
        return window
