"""The verifier service: MQTT in, batched target passes, verdicts out.

One worker thread owns every session; paho's thread only queues payloads (with
their arrival time). The worker gathers drafts for up to `batch_window_ms` or
`max_batch` sessions, verifies them in one target pass per version, and answers
each. Replays are harmless: a round already answered gets the same verdict
again, an older one is dropped, a bad payload gets an error reply and a count.

Replicas: new sessions reach one replica of the group (MQTT 5 shared
subscription); it answers OPENED with its name, and the device sends that
session's drafts to `.../draft/{replica}` afterwards. A replica's retained
status on `specedge/v1/_verifiers/{id}/status` turns "offline" through its last
will when it dies; its devices then resync with the group.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from specedge.protocol import wire
from specedge.cloud.fairness import Shares
from specedge.cloud.registry import Target, TargetSpec
from specedge.cloud.passes import PassLimits, fill_pass, wait_for_more
from specedge.cloud.session import Item, TargetSession, verify_batch
from specedge.cloud.table import Pending, SessionTable
from specedge.cloud.versions import Versions
from specedge.config import CloudConfig
from specedge.exporter import VerifierMetrics
from specedge.metrics import percentile, spec_rates
from specedge.mqtt import Link
from specedge.protocol import topics

log = logging.getLogger("specedge.cloud")

RECENT = 10_000  # rounds (and passes) the latency and batch-size statistics describe
# Devices name their drafts: each name becomes a key of the statistics and a Prometheus label
# value. The first MAX_DRAFT_NAMES names keep statistics of their own, later ones are pooled as OTHER.
MAX_DRAFT_NAMES = 64
OTHER = "(other)"
# Well under the broker's packet limit (wire.MAX_PACKET): a larger message gets us disconnected.
MAX_STATS_BYTES = 64 * 1024
DEFERRED = 4  # messages held for one session while its round is pending (Verifier.defer)
BACKLOG = 64  # messages held for one device over its share (Verifier.receive)
# What an honest device does not send, and how much each weighs toward making its sender
# suspect (cloud/fairness.py): a stale round now and then is a retry, a flood of them is not.
STRIKES = {"bad_request": 1.0, "bad_topic": 1.0, "unexpected_type": 1.0, "malformed": 1.0, "truncated": 1.0,
           "oversized": 1.0, "unknown_type": 1.0, "stream_unheard": 1.0, "stale": 0.05}
# Every STREAM_CHECK tokens a stream asks the broker whether its device still listens (a QoS 1
# TOKENS, whose MQTT 5 PUBACK says "no matching subscribers" if not): the answer comes back
# through the inbox under the UNHEARD topic, which no MQTT topic can be.
STREAM_CHECK = 32
UNHEARD = "\0unheard"


@dataclass
class PairStats:
    """Acceptance of one (draft, target version) pair."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def summary(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                **spec_rates(self.drafted, self.accepted, self.rounds)}


@dataclass
class VerifierStats:
    passes: int = 0  # target forward passes
    rounds: int = 0  # drafts verified plus cloud-ar steps
    tokens: int = 0  # tokens committed by those rounds
    rows: int = 0  # positions run through the target
    evictions: int = 0
    expired: int = 0
    switches: int = 0
    dropped: int = 0  # sessions a device's new OPEN pushed out (max_sessions_per_device, max_context_per_device)
    prefill_chunks: int = 0  # a cold session's share of a pass that fed only part of its text
    extended: int = 0  # conversations' next turns appended to a kept session (EXTEND)
    extended_cached_tokens: int = 0  # the history those turns did not send again
    prefix_hits: int = 0  # new sessions that started from another session's cached prefix (PrefixIndex)
    prefix_tokens: int = 0  # the positions those did not prefill
    share_held: int = 0  # rounds that waited a pass for a device within its share (cloud/fairness.py)
    share_yields: int = 0  # passes of over-share rounds alone, kept to about yield_ms
    hints_sent: int = 0  # early-exit hints sent mid-pass (docs/verifier.md)
    hints_withheld: int = 0  # and those under the exit threshold, not sent
    kv_peak_bytes: int = 0  # the most all caches held together, right after a pass
    # The most recent rounds and passes only: a service runs for months, its percentiles should
    # neither grow its memory nor describe last week.
    queue_s: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # per round: arrival to its pass
    compute_s: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # per round: its pass
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    pairs: dict = field(default_factory=dict)  # (draft, version) -> PairStats
    drafts: set = field(default_factory=set)  # the names with statistics of their own
    max_drafts: int = MAX_DRAFT_NAMES

    def passed(self, rounds: int, rows: int, cache_bytes: int) -> None:
        """A target pass of `rounds` rounds, `rows` positions fed, all caches `cache_bytes` after it."""
        self.passes += 1
        self.rows += rows
        self.batch_sizes.append(rounds)
        self.kv_peak_bytes = max(self.kv_peak_bytes, cache_bytes)

    def answered(self, item, draft: str | None, version: str, queue_s: float, compute_s: float) -> None:
        """A round verified (`draft`: its draft's name; None: a cloud-ar step)."""
        self.rounds += 1
        self.tokens += item.accepted + 1
        self.queue_s.append(queue_s)
        self.compute_s.append(compute_s)
        if draft is not None:
            pair = self.pair(draft, version)
            pair.rounds += 1
            pair.drafted += len(item.draft)
            pair.accepted += item.accepted

    def pair(self, draft: str, version: str) -> PairStats:
        if draft not in self.drafts:
            if len(self.drafts) < self.max_drafts:
                self.drafts.add(draft)
            else:
                draft = OTHER
        return self.pairs.setdefault((draft, version), PairStats())

    def summary(self) -> dict:
        return {"passes": self.passes, "rounds": self.rounds, "tokens": self.tokens, "rows": self.rows,
                "passes_per_token": self.passes / self.tokens if self.tokens else None,
                "mean_batch": sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else None,
                "recent_rounds": len(self.queue_s),
                "queue_s_p50": percentile(self.queue_s, 0.5), "queue_s_p99": percentile(self.queue_s, 0.99),
                "compute_s_p50": percentile(self.compute_s, 0.5), "compute_s_p99": percentile(self.compute_s, 0.99),
                "evictions": self.evictions, "expired": self.expired, "switches": self.switches,
                "dropped": self.dropped, "prefill_chunks": self.prefill_chunks, "kv_peak_bytes": self.kv_peak_bytes,
                "extended": self.extended, "extended_cached_tokens": self.extended_cached_tokens,
                "prefix_hits": self.prefix_hits, "prefix_tokens": self.prefix_tokens,
                "share_held": self.share_held, "share_yields": self.share_yields,
                "hints_sent": self.hints_sent, "hints_withheld": self.hints_withheld,
                "pairs": [{"draft": d, "target": v, **s.summary()} for (d, v), s in sorted(self.pairs.items())]}


def status_payload(replica: str, default: str, targets: dict, state: str) -> bytes:
    """A replica's retained status: its state, its versions and what each can promise here."""
    targets = sorted(targets.items())
    return json.dumps({"state": state, "replica": replica, "default": default,
                       "versions": [name for name, _ in targets], "time": time.time(),
                       "exact": {name: t.exact for name, t in targets},
                       "capabilities": {name: t.capabilities.to_json() for name, t in targets},
                       "exactness": {name: t.model.exactness.describe() for name, t in targets}}).encode()


def stats_payload(summary: dict, limit: int = MAX_STATS_BYTES) -> bytes:
    """`summary` as JSON of at most `limit` bytes where its pairs allow: those with the fewest
    rounds are left out first, and counted in "pairs_omitted"."""
    pairs = summary["pairs"]
    kept = sorted(range(len(pairs)), key=lambda i: pairs[i]["rounds"], reverse=True)
    while True:
        payload = json.dumps({**summary, "pairs": [pairs[i] for i in sorted(kept)],
                              "pairs_omitted": len(pairs) - len(kept)}).encode()
        if len(payload) <= limit or not kept:
            return payload
        # Drop about as many pairs as the excess is worth (at least one), then measure again.
        excess = (len(payload) - limit) * len(kept) // len(payload) + 1
        kept = kept[:-excess]


class Verifier:
    def __init__(self, cfg: CloudConfig, default: Target, registry: dict[str, TargetSpec] | None = None):
        self.cfg = cfg
        self.replica = cfg.verifier.id
        self.errors: dict[str, int] = {}
        self.versions = Versions(cfg.target, default, registry, self.count)
        self.inbox: queue.Queue = queue.Queue()
        self.stats = VerifierStats()
        self.table = SessionTable(cfg.verifier, self.stats, self.reply, self.count)
        # Messages for a session whose round is still pending (a long prefill), handled after its
        # pass in order: at most DEFERRED a session, one per round number, whatever a device sends.
        self.deferred: dict[tuple, dict[int, tuple]] = {}
        v = cfg.verifier
        self.shares = Shares(v.share_slack, v.yield_ms / 1000, v.share_hold_s)
        self.holding = False  # every pending round waits for lighter devices to go idle (fairness.py)
        self.backlog: dict[tuple, deque] = {}  # device -> its messages held back (receive)
        self.sender: tuple | None = None  # (fleet, device) of the message being handled
        self.metrics = VerifierMetrics(self)
        self.metrics_port: int | None = None  # where /metrics is served, once started
        self.status_topic = topics.replica(self.replica, "status")
        offline = json.dumps({"state": "offline", "replica": self.replica}).encode()
        self.link = Link(cfg.mqtt, f"specedge-verifier-{self.replica}", self._on_message,
                         will=(self.status_topic, offline, True),
                         birth=(self.status_topic, lambda: self._status("online"), True))
        self._stop = threading.Event()
        self._thread = None

    @property
    def rounds(self) -> int:
        return self.stats.rounds

    @property
    def targets(self) -> dict[str, Target]:
        return self.versions.targets

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload, time.monotonic()))

    def start(self) -> "Verifier":
        for target in self.targets.values():
            target.contract  # computed before the first OPEN waits for it (Target.contract)
        fleet = self.cfg.verifier.fleet
        # Round messages travel at QoS 0 (wire.ROUND_QOS); subscribed so, a device that sends at
        # QoS 1 anyway (a flood, say) gets no PUBACK written and sent by this process for each.
        self.link.subscribe(topics.draft(fleet, topics.ANY, self.replica), qos=wire.ROUND_QOS)
        self.link.subscribe(topics.fleet(fleet, "targets"))
        self.link.start()
        group = self.cfg.verifier.group
        if group and self.link.protocol == "5":
            self.link.subscribe(topics.shared(group, topics.draft(fleet, topics.ANY)), qos=wire.ROUND_QOS)
        else:
            if group:
                log.warning("broker speaks MQTT %s: no shared subscriptions, run one replica only", self.link.protocol)
            self.link.subscribe(topics.draft(fleet, topics.ANY), qos=wire.ROUND_QOS)
        ident = self.cfg.verifier
        if ident.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(ident.metrics_host, ident.metrics_port)
        self._thread = threading.Thread(target=self.serve, name="verifier", daemon=True)
        self._thread.start()
        return self

    def problem(self) -> str:
        """"" while healthy, else what is wrong (the systemd watchdog stops pinging)."""
        return "" if self._thread is not None and self._thread.is_alive() else "the verifier worker is not running"

    def _status(self, state: str) -> bytes:
        return status_payload(self.replica, self.versions.default, self.targets, state)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if self.link.connected.is_set():  # a clean goodbye does not fire the will
            self.publish_stats()
            self.link.publish(self.status_topic, self._status("offline"), retain=True)
        self.link.stop()
        self.metrics.close()

    def count(self, kind: str, device: tuple | None = None) -> None:
        """Count an error of `kind`; one an honest device does not cause (STRIKES) weighs against
        its sender (`device`, else the sender of the message being handled)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1
        device = device or self.sender
        if device is not None and kind in STRIKES:
            self.shares.strike(device, STRIKES[kind], time.monotonic())

    # -- the worker loop -----------------------------------------------------------------------
    def serve(self) -> None:
        last_sweep = last_stats = time.monotonic()
        while not self._stop.is_set():
            self.gather()
            try:
                self.run_pending()
            except Exception:  # one bad batch must not take the service down
                log.exception("internal error in a target pass")
                self.count("internal")
                self.table.pending.clear()
            if self.versions.poll():
                self.apply_assignments()
            now = time.monotonic()
            if now - last_sweep > 1:
                self.table.expire_idle()
                last_sweep = now
            if now - last_stats > self.cfg.verifier.stats_interval_s:
                self.publish_stats()
                last_stats = now

    def gather(self) -> None:
        """Handle messages until a batch is due: the oldest pending draft has waited the window,
        or max_batch sessions are pending."""
        cfg = self.cfg.verifier
        last_compute_s = self.stats.compute_s[-1] if self.stats.compute_s else 0.0
        window = max(cfg.batch_window_ms / 1000, cfg.batch_wait_fraction * last_compute_s)
        # Work carried over from the last pass (cloud-ar steps, prefill chunks) must not keep new
        # rounds out: they would wait for a whole long prefill, chunks or not.
        table = self.table
        limit = cfg.max_batch + len(table.pending)
        deferred, self.deferred = self.deferred, {}
        for held in deferred.values():
            for seq in sorted(held):
                self.dispatch(*held[seq])
        self.drain_backlog()
        if self.holding:  # nothing may run until a lighter device goes idle: wait for news, not spin
            self.holding = False
            try:
                self.receive(self.inbox.get(timeout=0.01))
            except queue.Empty:
                pass
        # What queued up during the last pass joins this one whatever its age; the window only
        # bounds how long we wait for more.
        opened = time.monotonic()
        while len(table.pending) < limit and not self.inbox.empty():
            self.receive(self.inbox.get_nowait())
        while len(table.pending) < limit and not self._stop.is_set():
            pending = table.pending.values()
            timeout = wait_for_more([p.arrived for p in pending], self.active_sessions() if pending else 0,
                                    all(isinstance(p.msg, wire.Generate) for p in pending), opened, window,
                                    time.monotonic())
            if timeout is None:
                return
            try:
                message = self.inbox.get(timeout=timeout)
            except queue.Empty:
                return
            self.receive(message)

    def defer(self, key, seq: int, message: tuple) -> None:
        held = self.deferred.setdefault(key, {})
        held[seq] = message
        if len(held) > DEFERRED:
            del held[min(held)]
            self.count("stale")

    def active_sessions(self) -> int:
        """Sessions that had a round answered in the last few seconds, of devices within their
        share: the ones a batch may wait for (a session opened and never used, or one whose rounds
        are refused, must not make every other device's round wait the window)."""
        now = time.monotonic()
        over = self.shares.over(now) if self.shares.seen else set()
        return sum(1 for k, s in self.table.sessions.items() if s.last_round > now - 5.0 and k[:2] not in over)

    def receive(self, message: tuple) -> None:
        """A message from the inbox: handled now, or, from a device over its share while a lighter
        device is busy (cloud/fairness.py), kept in that device's backlog (at most BACKLOG, the
        oldest dropped and counted `shed`): its handling is target time too (an OPEN under a
        grammar walks its whole text), and a flood would otherwise be decoded between every pass."""
        topic, payload, arrived = message
        parts = topics.parse_device(topic) if topic != UNHEARD else None  # the only time it is parsed
        device = parts[:2] if parts is not None else None
        if device is not None:
            self.shares.touch(device, arrived)
        held = self.backlog.get(device)
        if held or (device is not None and self.shares.gated(device, time.monotonic())):
            held = self.backlog.setdefault(device, deque())
            held.append((topic, payload, arrived, parts))
            if len(held) > BACKLOG:
                held.popleft()
                self.count("shed")
            return
        self.dispatch(topic, payload, arrived, parts)

    def drain_backlog(self) -> None:
        """Handle the backlog of each device no longer gated, and whatever of an honest device's
        waited share_hold_s (a suspect device's waits for the others' idle time however long)."""
        now = time.monotonic()
        for device, held in list(self.backlog.items()):
            while held and (not self.shares.gated(device, now) or (
                    now - held[0][2] >= self.shares.hold_s and not self.shares.suspect(device, now))):
                message = held.popleft()
                if not held:  # gone before its last message is answered: whoever reads it sees no backlog
                    del self.backlog[device]
                self.dispatch(*message)
                now = time.monotonic()

    def dispatch(self, topic: str, payload: bytes, arrived: float, parts: tuple | None) -> None:
        """`parts`: (fleet, device, kind) of a device's topic, else None."""
        t0 = time.monotonic()
        self.sender = parts[:2] if parts is not None else None
        try:
            self.handle(topic, payload, arrived, parts)
        except Exception:  # one bad request must not take the service down
            log.exception("internal error on %s", topic)
            self.count("internal")
        finally:
            self.sender = None
        if parts is not None:  # handling a message is the sender's use of the target's time too
            now = time.monotonic()
            self.shares.charge(parts[:2], now - t0, now)

    def publish_stats(self) -> None:
        summary = {"replica": self.replica, "time": time.time(), "sessions": len(self.table.sessions),
                   "cache_bytes": self.table.cache_bytes(),
                   "errors": dict(self.errors), **self.stats.summary()}
        # Emulated compute (cloud/emulated_target.py): whether this host kept each pass's time.
        emulated = {name: t.model.emulation() for name, t in self.targets.items() if hasattr(t.model, "emulation")}
        if emulated:
            summary["emulation"] = emulated
        self.link.publish(topics.replica(self.replica, "stats"), stats_payload(summary))

    def reply(self, topic: str, msg, unheard=None) -> bytes:
        """`unheard`: called if nobody listens on `topic` any more (sent at QoS 1 to learn it)."""
        payload = wire.encode(msg)
        self.link.publish(topic, payload, qos=1 if unheard else wire.ROUND_QOS, unheard=unheard)
        return payload

    # -- messages ------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, arrived: float, parts: tuple | None) -> None:
        if topic == UNHEARD:
            self.end_stream(*payload)
        elif parts is not None and parts[2] == "draft":
            self.session_message(parts, topic, payload, arrived)
        elif (announced := topics.parse_fleet(topic)) is not None and announced[1] == "targets":
            self.on_announcement(announced[0], payload)
        else:
            self.count("bad_topic")

    def session_message(self, parts: tuple, topic: str, payload: bytes, arrived: float) -> None:
        """A device's message to one of its sessions (`parts`: its topic's (fleet, device, "draft")):
        decoded, then the table's to act on, in order of its round numbers."""
        fleet, device, _ = parts
        out = topics.answers(fleet, device)
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            self.count(exc.kind)
            log.warning("rejected a payload from %s/%s: %s", fleet, device, exc)
            if len(payload) >= wire.HEADER.size:  # answer the sender if it can be named
                _, _, session, seq = wire.peek_header(payload)
                code = (wire.ErrorCode.UNSUPPORTED_VERSION if isinstance(exc, wire.UnsupportedVersion)
                        else wire.ErrorCode.BAD_REQUEST)
                self.reply(out, wire.Error(session, seq, code, str(exc)))
            return
        key = (fleet, device, msg.session)
        order = self.table.order(key, msg)
        if order == "later":  # after the pending round's pass, in order
            self.defer(key, msg.seq, (topic, payload, arrived, parts))
        elif order == "stale":
            self.count("stale")
        elif order == "now":
            self.act(key, msg, out, arrived)

    def act(self, key, msg, out: str, arrived: float) -> None:
        if isinstance(msg, wire.Open):
            self.table.open(key, msg, out, self.targets[self.versions.version_for(*key[:2])], self.replica)
        elif isinstance(msg, wire.Close):
            self.table.close(key)
        elif isinstance(msg, wire.Extend):
            self.table.extend(key, msg, out)
        elif isinstance(msg, (wire.Draft, wire.Generate)):
            replay = self.table.take(key, msg, out, arrived, self.hint_sender)
            if replay is not None:  # a replay: the same answer, no new work
                self.link.publish(out, replay, qos=wire.ROUND_QOS)
        else:
            self.count("unexpected_type")

    def hint_sender(self, session: TargetSession, msg: wire.Draft, out: str):
        if not (session.hints and msg.tokens):
            return None

        def on_hint(accepted, token, confidence):  # leaves mid-pass, before the remaining layers run
            if confidence < self.cfg.target.exit_threshold:
                self.stats.hints_withheld += 1
                return
            self.stats.hints_sent += 1
            layer = session.target.exit_head.layer
            self.reply(out, wire.Hint(msg.session, msg.seq, msg.committed, accepted, token, layer, msg.text_hash))
        return on_hint

    # -- batched passes --------------------------------------------------------------------------
    def run_pending(self) -> None:
        """Verify the pending drafts and take a step of the cloud-ar generations: one target pass
        per version, of the rounds that fit what a pass may hold (pass_limits); the rest wait
        for the next pass."""
        table = self.table
        if not table.pending:
            return
        # Oldest first, but a round a pass has fed (a long prefill, chunk by chunk) after those it
        # has not, and after those fed longer ago: rounds left out of a full pass go next.
        pending, table.pending = sorted(table.pending.values(), key=lambda p: (p.served, p.arrived)), {}
        pending, waiting, chunk = self.shares.plan(pending, lambda p: p.key[:2],
                                                   lambda p, c: p.item.session.positions(p.item.draft, c),
                                                   lambda p: p.arrived, time.monotonic())
        table.pending.update((p.key, p) for p in waiting)
        self.holding = not pending
        self.stats.share_held += len(waiting) if not chunk else 0
        self.stats.share_yields += bool(chunk)
        by_target: dict[str, list[Pending]] = {}
        for p in table.admit(pending, chunk):
            by_target.setdefault(p.item.session.target.name, []).append(p)
        fed_chunk = chunk or self.cfg.verifier.prefill_chunk
        for name, group in by_target.items():
            target = self.targets[name]
            batch, rest = fill_pass(group, self.pass_limits(target), lambda p: p.key[:2],
                                    lambda p: p.item.session.positions(p.item.draft, fed_chunk),
                                    lambda p: p.item.session.length_after(p.item.draft, fed_chunk))
            table.pending.update((p.key, p) for p in rest)  # the next pass's, planned again with what came
            self.run_batch(target, batch, chunk)
        table.enforce_budget()

    def pass_limits(self, target: Target) -> PassLimits:
        cfg, model = self.cfg.verifier, target.model
        return PassLimits(min(cfg.max_batch, getattr(model, "max_sessions", 0) or cfg.max_batch),
                          cfg.max_pass_rows, cfg.max_device_rows, getattr(model, "shared_cells", 0))

    def run_batch(self, target: Target, batch: list[Pending], chunk: int = 0) -> None:
        """One pass over `batch`; `chunk`: the most positions a cold session feeds (0: prefill_chunk)."""
        t0 = time.monotonic()
        try:
            rows = verify_batch(target.model, [p.item for p in batch], target.exit_head,
                                chunk or self.cfg.verifier.prefill_chunk)
        except Exception as exc:  # the caches are back where they were (verify_batch)
            if len(batch) == 1:
                self.table.fail_round(batch[0], exc)
                return
            # Whatever broke the pass, it must not cost the others their rounds: each goes again
            # alone, and only a round that fails alone is refused.
            log.warning("a pass of %d rounds failed (%s): each goes alone", len(batch), exc)
            self.count("split_pass")
            for p in batch:
                self.run_batch(target, [p], chunk)
            return
        compute_s = time.monotonic() - t0
        self.shares.charge_pass([(p.key[:2], p.item.fed) for p in batch], compute_s, time.monotonic())
        self.stats.passed(len(batch), rows, self.table.cache_bytes())
        self.metrics.observe_pass(len(batch), compute_s, [t0 - p.arrived for p in batch])
        for p in batch:
            p.item.session.last_used = time.monotonic()
            if p.item.error is not None:
                self.table.fail_round(p, p.item.error)
            elif not p.item.done:  # a chunk of a long prefill: the rest goes in the next passes
                self.stats.prefill_chunks += 1
                p.served = t0
                self.table.pending[p.key] = p
            else:
                self.answer(p, target.name, t0, compute_s)

    def answer(self, p: Pending, version: str, t0: float, compute_s: float) -> None:
        """A round its pass has verified: a DRAFT's verdict, or a cloud-ar step's token (and the
        next step queued)."""
        item, session, msg = p.item, p.item.session, p.msg
        session.last_round = session.last_used
        # busy from its answer on, not only from its last message: it drafts its next round now
        self.shares.touch(p.key[:2], session.last_round)
        self.stats.answered(item, session.draft if isinstance(msg, wire.Draft) else None, version,
                            t0 - p.arrived, compute_s)
        if isinstance(msg, wire.Draft):
            session.last_seq = msg.seq
            session.last_reply = self.reply(p.out, wire.Verdict(
                msg.session, msg.seq, msg.committed, item.accepted, item.next_token, int(compute_s * 1e6),
                msg.text_hash, item.logprobs))  # text_hash: checked when the draft came in
            return
        session.generating -= 1
        done = item.next_token in session.target.tokenizer.stop_ids or session.generating <= 0
        ask = not done and (msg.max_new_tokens - session.generating) % STREAM_CHECK == 0
        unheard = (lambda k=p.key, seq=msg.seq: self.inbox.put((UNHEARD, (k, seq), time.monotonic()))) if ask else None
        self.reply(p.out, wire.Tokens(msg.session, msg.seq, len(session.committed) - 1, [item.next_token], done,
                                      item.logprobs), unheard)
        if not done:
            self.table.pending[p.key] = Pending(p.key, Item.step(session), msg, p.out, time.monotonic())

    def end_stream(self, key, seq: int) -> None:
        """Nobody listens to session `key`'s stream any more (the device went away): it ends here
        instead of running to its max_new_tokens, a row of every pass until then."""
        if self.table.end_stream(key, seq):
            self.count("stream_unheard", key[:2])

    # -- target versions (cloud/versions.py decides; this moves sessions and tells devices) -------
    def on_announcement(self, fleet: str, payload: bytes) -> None:
        self.versions.announce(fleet, payload)
        self.apply_assignments()

    def apply_assignments(self) -> None:
        """Move each session to the version its fleet's announcement gives it, if loaded and compatible.
        The session keeps its committed text; its cache is rebuilt by the new version."""
        for (fleet, device, session_id), session, target in self.versions.moves(self.table.sessions):
            session.switch(target)
            self.stats.switches += 1
            self.reply(topics.answers(fleet, device),
                       wire.Opened(session_id, session.last_seq, self.replica, target.name, target.exact))
