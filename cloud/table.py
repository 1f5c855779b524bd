"""The verifier's session table: its sessions, their pending rounds and the memory they hold.

No MQTT and no passes here. The verifier (cloud/verifier.py) hands each decoded message
of a session to the table, which opens, extends or closes the session, takes a round
into `pending` or refuses it, and keeps every device within its limits and all caches
within the KV budget; the verifier's passes (run_pending) take rounds from `pending`
and put back what a pass left over. The table answers only refusals and OPENED, through
the `reply(topic, msg)` it is handed, and counts what it refuses through `count(kind)`.

  key          (fleet, device, session id): a session's name, whichever replica holds it
  pending      key -> the one round of that session waiting for a pass (Pending)
  scope        whose prompt prefixes and grammars a session may share ([verifier]
               share_prefixes): its device's by default, its fleet's under "fleet", never
               another fleet's
  limits       per device: max_sessions_per_device sessions, max_context_per_device tokens
               (its other sessions dropped, least recently used first, to make room); all
               devices: kv_budget_mb of caches (idle caches evicted first)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from specedge.cloud.session import BadRequest, Item, OutOfSync, PrefixIndex, TargetSession
from specedge.config import VerifierIdentity
from specedge.grammar import Cache as GrammarCache, GrammarError
from specedge.protocol import wire

log = logging.getLogger("specedge.cloud")


class Overloaded(Exception):
    """A round over a limit of the verifier's (answered OVERLOADED, with the reason)."""


@dataclass
class Pending:
    key: tuple
    item: Item
    msg: object  # the Draft, or the Generate a cloud-ar step belongs to
    out: str
    arrived: float
    served: float = 0.0  # when a pass last fed it (a long prefill's chunk), 0: never


class SessionTable:
    def __init__(self, cfg: VerifierIdentity, stats, reply, count):
        """`stats`: the verifier's VerifierStats (what the table does is counted there too)."""
        self.cfg, self.stats, self.reply, self.count = cfg, stats, reply, count
        self.sessions: dict[tuple[str, str, int], TargetSession] = {}
        self.pending: dict[tuple, Pending] = {}
        self.grammars = GrammarCache()  # compiled once per grammar and scope
        self.prefixes = PrefixIndex()  # which session's cache holds a prompt prefix others may share

    # -- a session's messages ----------------------------------------------------------------------
    def open(self, key, msg: wire.Open, out: str, target, replica: str) -> None:
        """A new session for `key` on `target` (the version that serves its device), replacing
        the one it had (a resync: its cache is adopted); OPENED in `replica`'s name, or refused."""
        reason = msg.contract.mismatch(target.contract)
        if reason:
            self.count("incompatible")
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.INCOMPATIBLE,
                                       f"draft {msg.draft or '?'} cannot speculate for target {target.name}: {reason}"))
            return
        old = self.sessions.pop(key, None)
        self.pending.pop(key, None)  # a round of the session this OPEN replaces gets no verdict
        session = self._new_session(key, msg, out, target)
        if session is None:
            return
        if old is not None:  # a resync keeps the round counter so replays stay recognisable
            session.last_seq, session.last_reply, session.last_round = old.last_seq, None, old.last_round
            session.adopt_cache(old)
        else:
            self.share_prefix(key, session)
        need = session.cache_bytes_after([])
        if need > self.budget_bytes:
            self.refuse(out, msg, f"its KV cache of {need / 2**20:.2f} MB would exceed the verifier's "
                                  f"kv_budget_mb of {self.cfg.kv_budget_mb:g}")
            return
        refusal = self.make_room(key, len(session.committed), opening=True)
        if refusal:
            self.refuse(out, msg, refusal)
            return
        session.hints = msg.hints
        self.sessions[key] = session
        self.prefixes.add(self.prefix_scope(key), key, msg.tokens)
        self.reply(out, wire.Opened(msg.session, msg.seq, replica, target.name, target.exact))

    def _new_session(self, key, msg: wire.Open, out: str, target) -> TargetSession | None:
        """The OPEN's session, under its grammar; None (answered) where the OPEN is refused."""
        try:
            constraint = None
            if msg.grammar_hash:
                compiled = self.compiled_grammar(target, msg, self.prefix_scope(key))
                if compiled is None:
                    self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.UNKNOWN_GRAMMAR,
                                               "this verifier does not hold the grammar: send its text"))
                    return None
                constraint = compiled.start()
            return TargetSession(target, msg.tokens, msg.params, msg.session, msg.draft, msg.contract,
                                 constraint, msg.grammar_from, msg.prompts, "/".join(self.prefix_scope(key)))
        except (BadRequest, GrammarError) as exc:
            self.count("bad_request")
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.BAD_REQUEST, str(exc)))
            return None

    def compiled_grammar(self, target, msg: wire.Open, scope: tuple):
        """The OPEN's grammar compiled for `target`: from its text (compiled once per scope, cached
        by hash) or, sent by hash alone, from what `scope` sent before; None when neither has it."""
        vocab = target.model.cfg.vocab_size
        if msg.grammar:
            return self.grammars.get(target.tokenizer, vocab, msg.grammar, scope)
        return self.grammars.find(target.tokenizer, vocab, msg.grammar_hash, scope)

    def prefix_scope(self, key) -> tuple:
        """Whose prefixes session `key` may share ([verifier] share_prefixes): never another fleet's."""
        return key[:1] if self.cfg.share_prefixes == "fleet" else key[:2]

    def share_prefix(self, key, session: TargetSession) -> None:
        """A new session's prompt that begins like another session's of its scope (a system prompt)
        starts from a copy of that session's cache: the shared prefix is not prefilled again."""
        for holder, length in self.prefixes.candidates(self.prefix_scope(key), session.committed):
            donor = self.sessions.get(holder)
            taken = session.share_prefix(donor, length) if donor is not None else 0
            if taken:
                self.stats.prefix_hits += 1
                self.stats.prefix_tokens += taken
                return

    def extend(self, key, msg: wire.Extend, out: str) -> None:
        """The next turn of a kept session: its new tokens join the text, whose cache stays. Not
        answered when it works; the device's next round states the whole text and finds out."""
        session = self.sessions.get(key)
        if session is None:
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.UNKNOWN_SESSION, "open the session"))
            return
        if msg.seq <= session.last_seq:
            self.count("stale")
            return
        try:
            # The session may hold a token or two past the device's text: a stop token, or the last
            # verdict's tokens past max_tokens, which the device did not commit.
            session.next_turn(msg.committed, msg.text_hash, msg.tokens)
        except (OutOfSync, BadRequest) as exc:
            self.refused_by_session(out, msg, exc)
            return
        session.last_seq, session.last_reply, session.last_used = msg.seq, None, time.monotonic()
        self.stats.extended += 1
        self.stats.extended_cached_tokens += msg.committed
        self.prefixes.add(self.prefix_scope(key), key, session.committed)
        refusal = self.make_room(key, len(session.committed))
        if refusal:
            self.refuse(out, msg, refusal)

    def order(self, key, msg) -> str:
        """When a message of session `key` may be acted on, given the round it has pending: "now"
        (none pending; or the pending round is a stream step, which a newer message ends here: the
        device switched modes, asks again, opens again or is done), "later" (newer than the
        pending round: after its pass, in order), "stale" (older) or "duplicate" (of it: dropped)."""
        busy = self.pending.get(key)
        if busy is None:
            return "now"
        if isinstance(busy.msg, wire.Generate) and msg.seq > busy.msg.seq:
            self._stop_stream(key, busy)
            return "now"
        return "later" if msg.seq > busy.msg.seq else "stale" if msg.seq < busy.msg.seq else "duplicate"

    def end_stream(self, key, seq: int) -> bool:
        """End session `key`'s stream (round `seq`) if it still runs; whether it did."""
        busy = self.pending.get(key)
        if busy is not None and isinstance(busy.msg, wire.Generate) and busy.msg.seq == seq:
            self._stop_stream(key, busy)
            return True
        return False

    def _stop_stream(self, key, busy: Pending) -> None:
        del self.pending[key]
        busy.item.session.generating = 0

    def close(self, key) -> None:
        self.sessions.pop(key, None)
        self.pending.pop(key, None)  # a cloud-ar generation or a prefill still under way

    def take(self, key, msg, out: str, arrived: float, on_hint=None) -> bytes | None:
        """A DRAFT or GENERATE of session `key`: its round joins `pending`, or is refused
        (answered). Returns the session's last answer where `msg` replays its last round (the
        caller sends it again: no new work). `on_hint(session, msg, out)`: a draft's early-exit
        hint sender, or None."""
        session = self.sessions.get(key)
        if session is None:
            self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.UNKNOWN_SESSION, "open the session"))
            return None
        session.last_used = time.monotonic()
        if msg.seq == session.last_seq and session.last_reply is not None:
            return session.last_reply
        if msg.seq <= session.last_seq:
            self.count("stale")
            return None
        try:
            holds = self.take_round(session, msg)
        except Overloaded as exc:
            self.refuse(out, msg, str(exc))
            return None
        except (OutOfSync, BadRequest, GrammarError) as exc:
            self.refused_by_session(out, msg, exc)
            return None
        self.make_room(key, holds)  # within the limit: take_round checked
        if isinstance(msg, wire.Draft):
            item = Item(session, msg.tokens, msg.q, on_hint(session, msg, out) if on_hint else None)
        else:
            session.last_seq, session.last_reply = msg.seq, None
            session.generating = msg.max_new_tokens
            item = Item.step(session)
        self.pending[key] = Pending(key, item, msg, out, arrived)
        return None

    def take_round(self, session: TargetSession, msg) -> int:
        """Bring `session` to the text a DRAFT or GENERATE states, or leave it as it was: whatever
        refuses the round (OutOfSync, BadRequest, Overloaded) does so before the session changes.
        Returns the positions its cache will hold after the round."""
        if isinstance(msg, wire.Draft):
            holds = msg.committed + len(msg.forced) + len(msg.tokens) + 1
            session.check_draft(msg.tokens, msg.q, msg.committed + len(msg.forced))
        else:
            holds = msg.committed + msg.max_new_tokens
            if holds > session.model.cfg.max_seq_len:
                raise BadRequest("generation runs past the target's context")
        refusal = self.over_limit(holds)
        if refusal:
            raise Overloaded(refusal)
        if isinstance(msg, wire.Draft):
            streamed = session.stream_from is not None and msg.committed >= session.stream_from
            session.sync(msg.committed, msg.text_hash, allow_rollback=streamed)
            session.force(msg.forced)
            session.stream_from = None
        else:
            session.sync(msg.committed, msg.text_hash, allow_rollback=True)
            session.stream_from = len(session.committed)
        return holds

    def fail_round(self, p: Pending, exc: Exception) -> None:
        """A round the target could not verify, alone: its session goes (its cache already holds
        only the committed text) and the device is told why; nobody else's round is touched."""
        log.error("round %d of %s failed: %r", p.msg.seq, p.key, exc)
        self.count("internal")
        self.sessions.pop(p.key, None)
        self.reply(p.out, wire.Error(p.msg.session, p.msg.seq, wire.ErrorCode.INTERNAL,
                                     f"the target could not verify this round: {exc}"))

    def refused_by_session(self, out: str, msg, exc: Exception) -> None:
        """OUT_OF_SYNC (the device resyncs) or BAD_REQUEST (counted) for what the session refused."""
        bad = not isinstance(exc, OutOfSync)
        if bad:
            self.count("bad_request")
        code = wire.ErrorCode.BAD_REQUEST if bad else wire.ErrorCode.OUT_OF_SYNC
        self.reply(out, wire.Error(msg.session, msg.seq, code, str(exc)))

    def refuse(self, out: str, msg, reason: str) -> None:
        self.count("overloaded")
        self.reply(out, wire.Error(msg.session, msg.seq, wire.ErrorCode.OVERLOADED, reason))

    # -- limits and memory -------------------------------------------------------------------------
    def make_room(self, key, tokens: int, opening: bool = False) -> str:
        """Let session `key` hold `tokens` tokens: drop its device's other sessions, least recently
        used and idle first, while the device holds more than max_sessions_per_device sessions
        (with an OPEN's) or max_context_per_device tokens. Returns why it cannot, or ""."""
        refusal = self.over_limit(tokens)
        if refusal:
            return refusal
        # Dropping rather than refusing: a device that restarted or lost its sessions' CLOSEs would
        # otherwise be locked out until session_idle_s; a dropped session that was still in use
        # gets UNKNOWN_SESSION and resyncs.
        others = sorted((k in self.pending, s.last_used, k) for k, s in self.sessions.items()
                        if k[:2] == key[:2] and k != key)
        held = sum(len(self.sessions[k].committed) for *_, k in others)
        while others and (len(others) + opening > self.cfg.max_sessions_per_device
                          or held + tokens > self.cfg.max_context_per_device):
            *_, k = others.pop(0)
            held -= len(self.sessions.pop(k).committed)
            self.pending.pop(k, None)
            self.stats.dropped += 1
        return ""

    def over_limit(self, tokens: int) -> str:
        """Why one session may not hold `tokens` tokens, or ""."""
        limit = self.cfg.max_context_per_device
        if tokens > limit:
            return f"this session would hold {tokens} tokens, over the verifier's max_context_per_device of {limit}"
        return ""

    @property
    def budget_bytes(self) -> float:
        return self.cfg.kv_budget_mb * 2**20

    def cache_bytes(self) -> int:
        return sum(s.cache_bytes() for s in self.sessions.values())

    def admit(self, pending: list[Pending], chunk: int = 0) -> list[Pending]:
        """The rounds (oldest first) whose caches fit the KV budget once their pass has run,
        reckoned before it allocates: idle sessions lose their caches first. A round that does not
        fit waits for the next pass, when the rounds before it are done and their caches may go;
        the oldest round may also take the caches of sessions with work pending (so someone always
        goes on), and is refused when its cache alone cannot fit."""
        budget, chunk = self.budget_bytes, chunk or self.cfg.prefill_chunk
        busy = {id(p.item.session) for p in pending}
        held = self.cache_bytes()
        admitted: list[Pending] = []
        for p in pending:
            session = p.item.session
            grows = session.cache_bytes_after(p.item.draft, chunk) - session.cache_bytes()
            if held + grows > budget:
                spare = {id(a.item.session) for a in admitted} | {id(session)} | (busy if admitted else set())
                held -= self.evict(held + grows - budget, spare, busy)
            if held + grows <= budget:
                admitted.append(p)
                held += grows
            elif admitted:
                self.pending[p.key] = p
            else:
                self.sessions.pop(p.key, None)
                self.refuse(p.out, p.msg, f"its KV cache of {(session.cache_bytes() + grows) / 2**20:.2f} MB "
                                          f"would exceed the verifier's kv_budget_mb of {self.cfg.kv_budget_mb:g}")
        return admitted

    def evict(self, wanted: float, spare: set, busy: set) -> int:
        """Drop caches, least recently used first, until `wanted` bytes are freed: never those of
        `spare`, those of `busy` (work pending) after every idle one. Returns the bytes freed."""
        warm = sorted((id(s) in busy, s.last_used, id(s), s) for s in self.sessions.values()
                      if s.cache is not None and id(s) not in spare)
        freed = 0
        for *_, session in warm:
            if freed >= wanted:
                break
            freed += session.cache_bytes()
            session.evict()
            self.stats.evictions += 1
        return freed

    def enforce_budget(self) -> None:
        """After a pass: evict the least recently used caches, of sessions with no step queued,
        while all caches together hold more than the budget."""
        warm = sorted((s for s in self.sessions.values() if s.cache is not None), key=lambda s: s.last_used)
        total = sum(s.cache_bytes() for s in warm)
        for session in warm:
            if total <= self.budget_bytes:
                break
            if any(p.item.session is session for p in self.pending.values()):
                continue  # a cloud-ar generation mid-way: its next step is already queued
            total -= session.cache_bytes()
            session.evict()
            self.stats.evictions += 1

    def expire_idle(self) -> None:
        cutoff = time.monotonic() - self.cfg.session_idle_s
        for key in [k for k, s in self.sessions.items() if s.last_used < cutoff and k not in self.pending]:
            del self.sessions[key]
            self.stats.expired += 1
