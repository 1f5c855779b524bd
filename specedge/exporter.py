"""Prometheus metrics of both services (prometheus_client, one registry per service).

Counters and histograms are updated once per request (device) or per target pass
(verifier), never inside the draft/verify math; gauges that describe the service's
state are read when Prometheus scrapes. The device serves them at /metrics on its
local HTTP API, the verifier on `[verifier] metrics_port`.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from specedge.metrics import SpecStats, spec_rates
from specedge.protocol.wire import MAX_DRAFT

disable_created_metrics()  # *_created series double every counter and say nothing a service needs
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DRAFT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class DeviceMetrics:
    """The agent's numbers: vLLM's spec-decode metrics, speed, wire, energy, errors."""

    def __init__(self, state):
        """`state()` returns the live gauges: {"queue_depth", "draining", "decode_errors": {kind: n}}."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specedge_requests", "Requests by outcome (ok, failed, cancelled, rejected)",
                                ["outcome"], registry=r)
        self.errors = Counter("specedge_errors", "Errors by kind", ["kind"], registry=r)
        self.generated = Counter("specedge_generated_tokens", "Tokens committed", registry=r)
        self.drafted = Counter("specedge_drafted_tokens", "Tokens drafted and sent for verification", registry=r)
        self.accepted = Counter("specedge_accepted_tokens", "Drafted tokens the target accepted", registry=r)
        # vLLM's num_accepted_tokens_per_pos, with the drafted count beside it for the rate; the
        # position label is bounded by the wire (a DRAFT holds at most MAX_DRAFT tokens).
        self.drafted_per_pos = Counter("specedge_drafted_tokens_per_position",
                                       "Rounds that drafted a token at this draft position (0-based)",
                                       ["position"], registry=r)
        self.accepted_per_pos = Counter("specedge_accepted_tokens_per_position",
                                        "Rounds whose verdict accepted the token at this draft position (0-based)",
                                        ["position"], registry=r)
        self.rounds = Counter("specedge_rounds", "Verification rounds", registry=r)
        self.streamed = Counter("specedge_streamed_tokens", "Tokens the cloud streamed (cloud-ar, the stream mode)",
                                registry=r)
        self.mode_switches = Counter("specedge_mode_switches", "Switches between streaming and speculating",
                                     registry=r)
        self.wire_bytes = Counter("specedge_wire_bytes", "MQTT bytes both ways, framing included", registry=r)
        self.energy = Counter("specedge_energy_joules", "Device energy over requests", registry=r)
        self.round_latency = Histogram("specedge_round_latency_seconds", "Draft sent to verdict back",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.draft_len = Histogram("specedge_draft_len", "Tokens drafted per round",
                                   buckets=DRAFT_BUCKETS, registry=r)
        self.tokens_per_s = Gauge("specedge_tokens_per_second", "Tokens/s of the last request", registry=r)
        self.j_per_token = Gauge("specedge_joules_per_token", "Energy per token of the last request", registry=r)
        self.acceptance = Gauge("specedge_acceptance_rate", "Accepted over drafted tokens, all requests",
                                registry=r)
        self.mean_accepted = Gauge("specedge_mean_accepted_len",
                                   "Tokens committed per round (accepted + the target's own), all requests",
                                   registry=r)
        self._state = state
        self._totals = {"requests": 0, "generated": 0, "drafted": 0, "accepted": 0, "rounds": 0}
        r.register(_Collector(self._collect))

    def observe(self, stats: SpecStats) -> None:
        self.generated.inc(stats.generated_tokens)
        self.drafted.inc(stats.drafted_tokens)
        self.accepted.inc(stats.accepted_tokens)
        self.rounds.inc(stats.rounds)
        self.streamed.inc(stats.streamed_tokens)
        self.mode_switches.inc(max(len(stats.modes) - 1, 0))
        for position, (drafted, accepted) in enumerate(zip(stats.drafted_per_pos[:MAX_DRAFT],
                                                           stats.accepted_per_pos)):
            self.drafted_per_pos.labels(str(position)).inc(drafted)
            self.accepted_per_pos.labels(str(position)).inc(accepted)
        self.wire_bytes.inc(stats.wire_bytes)
        self.energy.inc(max(stats.energy_j, 0.0))
        for seconds in stats.round_trip_s:
            self.round_latency.observe(seconds)
        for draft_len in stats.draft_lens:
            self.draft_len.observe(draft_len)
        summary = stats.summary()
        self.tokens_per_s.set(summary["tokens_per_s"])
        self.j_per_token.set(summary["energy_j_per_token"])
        t = self._totals
        t["requests"] += 1
        t["generated"] += stats.generated_tokens
        t["drafted"] += stats.drafted_tokens
        t["accepted"] += stats.accepted_tokens
        t["rounds"] += stats.rounds
        totals = self.totals()
        if totals["acceptance_rate"] is not None:
            self.acceptance.set(totals["acceptance_rate"])
        if totals["mean_accepted_len"] is not None:
            self.mean_accepted.set(totals["mean_accepted_len"])

    def totals(self) -> dict:
        """Since start: requests, generated, drafted and accepted tokens, rounds, and the rates."""
        t = self._totals
        return {**t, **spec_rates(t["drafted"], t["accepted"], t["rounds"])}

    def _collect(self):
        state = self._state()
        yield _gauge("specedge_queue_depth", "Requests waiting for the agent", state["queue_depth"])
        yield _gauge("specedge_draining", "1 while the device takes no new requests", float(state["draining"]))
        decode = CounterMetricFamily("specedge_decode_errors", "Verifier messages dropped as malformed", labels=["kind"])
        for kind, n in sorted(state["decode_errors"].items()):
            decode.add_metric([kind], n)
        yield decode


class VerifierMetrics:
    """The verifier's numbers: batches, queueing against compute, sessions, caches, acceptance per pair."""

    def __init__(self, verifier):
        r = self.registry = CollectorRegistry()
        self.batch_size = Histogram("specedge_verifier_batch_size", "Sessions per target pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_s = Histogram("specedge_verifier_queue_seconds", "A round's wait from arrival to its pass",
                                 buckets=ROUND_BUCKETS, registry=r)
        self.compute_s = Histogram("specedge_verifier_compute_seconds", "One target pass",
                                   buckets=ROUND_BUCKETS, registry=r)
        self._verifier = verifier
        self._server = None
        r.register(_Collector(self._collect))

    def observe_pass(self, batch: int, compute_s: float, queue_s: list[float]) -> None:
        self.batch_size.observe(batch)
        self.compute_s.observe(compute_s)
        for seconds in queue_s:
            self.queue_s.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a background thread; returns the port."""
        self._server, _ = start_http_server(port, host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _collect(self):
        v = self._verifier
        stats = v.stats
        yield _counter("specedge_verifier_passes", "Target forward passes", stats.passes)
        yield _counter("specedge_verifier_rounds", "Drafts verified plus cloud-ar steps", stats.rounds)
        yield _counter("specedge_verifier_tokens", "Tokens committed by those rounds", stats.tokens)
        yield _counter("specedge_verifier_evictions", "KV caches dropped for the memory budget", stats.evictions)
        yield _counter("specedge_verifier_share_held", "Rounds that waited a pass for a device within its share",
                       stats.share_held)
        yield _counter("specedge_verifier_share_yields", "Passes of over-share rounds alone, kept to yield_ms",
                       stats.share_yields)
        yield _gauge("specedge_verifier_sessions", "Sessions held", len(v.table.sessions))
        yield _gauge("specedge_verifier_cache_bytes", "KV cache bytes of all sessions",
                     sum(s.cache_bytes() for s in list(v.table.sessions.values())))
        exact = GaugeMetricFamily("specedge_verifier_target_exact",
                                  "1 if the target version passed its bitwise self-test on this machine",
                                  labels=["target"])
        for name, target in sorted(dict(v.targets).items()):
            exact.add_metric([name], float(target.exact))
        yield exact
        errors = CounterMetricFamily("specedge_verifier_errors", "Errors by kind", labels=["kind"])
        for kind, n in sorted(dict(v.errors).items()):
            errors.add_metric([kind], n)
        yield errors
        acceptance = GaugeMetricFamily("specedge_acceptance_rate", "Accepted over drafted tokens",
                                       labels=["draft", "target"])
        mean = GaugeMetricFamily("specedge_mean_accepted_len", "Tokens committed per round",
                                 labels=["draft", "target"])
        for (draft, version), pair in sorted(dict(stats.pairs).items()):
            s = pair.summary()
            if s["acceptance_rate"] is not None:
                acceptance.add_metric([draft, version], s["acceptance_rate"])
            if s["mean_accepted_len"] is not None:
                mean.add_metric([draft, version], s["mean_accepted_len"])
        yield acceptance
        yield mean


class _Collector:
    def __init__(self, collect):
        self.collect = collect


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
