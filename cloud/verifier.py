"""The verifier service: MQTT in, target sessions, verdicts out.

One worker thread owns every session; paho's thread only queues payloads.
Replays are harmless: a round already answered gets the same verdict again,
an older one is dropped, a bad payload gets an error reply and a count.
"""
from __future__ import annotations

import logging
import queue
import struct
import threading
import time

from specedge import wire
from specedge.cloud.exit_head import default_exit_layer, load_exit_head
from specedge.cloud.session import BadRequest, OutOfSync, TargetSession
from specedge.config import CloudConfig
from specedge.mqtt import TOPIC_ROOT, Link, split_device_topic

log = logging.getLogger("specedge.cloud")


class Verifier:
    def __init__(self, cfg: CloudConfig, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.fingerprint = bytes.fromhex(tokenizer.fingerprint())
        target = cfg.target
        self.exit_head = load_exit_head(model, target.exit_layer or default_exit_layer(model.cfg.n_layers),
                                        target.exit_head or None)
        self.hints_sent = self.hints_withheld = 0
        self.inbox: queue.Queue = queue.Queue()
        self.sessions: dict[tuple[str, str, int], TargetSession] = {}
        self.link = Link(cfg.mqtt, f"specedge-verifier-{cfg.verifier.id}", self._on_message)
        self.errors: dict[str, int] = {}
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = None

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def start(self) -> "Verifier":
        self.link.subscribe(f"{TOPIC_ROOT}/{self.cfg.verifier.fleet}/+/draft")
        self.link.start()
        self._thread = threading.Thread(target=self.serve, name="verifier", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.link.stop()

    def count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def serve(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            try:
                topic, payload = self.inbox.get(timeout=0.2)
            except queue.Empty:
                topic = None
            if topic is not None:
                try:
                    self.handle(topic, payload)
                except Exception:  # one bad request must not take the service down
                    log.exception("internal error on %s", topic)
                    self.count("internal")
            if time.monotonic() - last_sweep > 5:
                self.expire_idle()
                last_sweep = time.monotonic()

    def expire_idle(self) -> None:
        cutoff = time.monotonic() - self.cfg.verifier.session_idle_s
        for key in [k for k, s in self.sessions.items() if s.last_used < cutoff]:
            del self.sessions[key]

    def reply(self, topic: str, msg) -> bytes:
        payload = wire.encode(msg)
        self.link.publish(topic, payload)
        return payload

    def handle(self, topic: str, payload: bytes) -> None:
        parts = split_device_topic(topic)
        if parts is None:
            self.count("bad_topic")
            return
        fleet, device, _ = parts
        out = f"{TOPIC_ROOT}/{fleet}/{device}/verdict"
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            self.count(exc.kind)
            log.warning("rejected a payload from %s/%s: %s", fleet, device, exc)
            if len(payload) >= 14:  # answer the sender if it can be named
                _, _, session, seq = struct.unpack_from("<BBQI", payload)
                code = (wire.ErrorCode.UNSUPPORTED_VERSION if isinstance(exc, wire.UnsupportedVersion)
                        else wire.ErrorCode.BAD_REQUEST)
                self.reply(out, wire.Error(session, seq, code, str(exc)))
            return
        key = (fleet, device, msg.session)
        if isinstance(msg, wire.Open):
            self.open(key, msg, out)
        elif isinstance(msg, wire.Close):
            self.sessions.pop(key, None)
        elif isinstance(msg, (wire.Draft, wire.Generate)):
            session = self.sessions.get(key)
            if session is None:
                self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.UNKNOWN_SESSION, "open the session"))
                return
            session.last_used = time.monotonic()
            if msg.seq == session.last_seq and session.last_reply is not None:
                self.link.publish(out, session.last_reply)  # a replay: same answer, no new work
                return
            if msg.seq <= session.last_seq:
                self.count("stale")
                return
            try:
                if isinstance(msg, wire.Draft):
                    self.verify(session, msg, out)
                else:
                    self.generate(session, msg, out)
            except OutOfSync as exc:
                self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.OUT_OF_SYNC, str(exc)))
            except BadRequest as exc:
                self.count("bad_request")
                self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.BAD_REQUEST, str(exc)))
        else:
            self.count("unexpected_type")

    def open(self, key, msg: wire.Open, out: str) -> None:
        if msg.tokenizer != bytes(8) and msg.tokenizer != self.fingerprint:
            self.count("incompatible")
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.INCOMPATIBLE,
                                       f"draft tokenizer {msg.tokenizer.hex()} != target {self.fingerprint.hex()}"))
            return
        old = self.sessions.pop(key, None)
        try:
            session = TargetSession(self.model, msg.tokens, msg.params, msg.session)
        except BadRequest as exc:
            self.count("bad_request")
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.BAD_REQUEST, str(exc)))
            return
        if old is not None:  # a resync keeps the round counter so replays stay recognisable
            session.last_seq, session.last_reply = old.last_seq, None
        session.hints = msg.hints
        self.sessions[key] = session

    def verify(self, session: TargetSession, msg: wire.Draft, out: str) -> None:
        session.sync(msg.committed)
        on_hint = None
        if session.hints and msg.tokens:
            def on_hint(accepted, token, confidence):  # leaves mid-pass, before the remaining layers run
                if confidence < self.cfg.target.exit_threshold:
                    self.hints_withheld += 1
                    return
                self.hints_sent += 1
                self.reply(out, wire.Hint(msg.session, msg.seq, msg.committed, accepted, token, self.exit_head.layer))
        t0 = time.perf_counter()
        accepted, token = session.verify(msg.tokens, msg.q, self.exit_head, on_hint)
        verify_us = int((time.perf_counter() - t0) * 1e6)
        self.rounds += 1
        session.last_seq = msg.seq
        session.last_reply = self.reply(out, wire.Verdict(msg.session, msg.seq, msg.committed, accepted, token,
                                                          verify_us))

    def generate(self, session: TargetSession, msg: wire.Generate, out: str) -> None:
        session.sync(msg.committed, allow_rollback=True)
        session.last_seq, session.last_reply = msg.seq, None
        stop_ids = self.tokenizer.stop_ids
        for i in range(msg.max_new_tokens):
            start = len(session.committed)
            token = session.step()
            done = token in stop_ids or i == msg.max_new_tokens - 1
            self.reply(out, wire.Tokens(msg.session, msg.seq, start, [token], done))
            if done:
                break
