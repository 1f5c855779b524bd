"""Rounds under faults (issue 20, point 13): sessions checked by a hash of the committed text, not
its length alone; a late verdict of a stale draft never verifies a different text; the device's
rounds against a scripted verifier that is slow, stale, duplicated, reordered, of another session
or another protocol version; unverified tokens marked in the HTTP stream and the MQTT API.

The scripted verifier is a real MQTT client on the real Mosquitto: it verifies with the real
target (cloud.session) over the text it holds, checking lengths only (as a verifier did before
protocol 5), and adds whatever noise a test scripts."""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import alone, reference_greedy
from specedge.protocol import wire
from specedge.cloud.registry import Target
from specedge.cloud.session import TargetSession
from specedge.config import DeviceConfig, MqttConfig, build
from specedge.device.agent import Agent
from specedge.device.draft import TorchDraftEngine
from specedge.device.policy import parse_policy
from specedge.mqtt import Link, ReplyTo
from specedge.protocol import topics
from specedge.speculative import SamplingParams

FLEETS = itertools.count()


def hash_of(tokens) -> dict:
    """The text-hash field of a message over `tokens` (protocol 5); nothing where the wire has
    none, so the scripts below also run against protocol 4 and show what it let through."""
    if hasattr(wire, "text_hash"):
        return {"text_hash": wire.text_hash(tokens)}
    return {}


class ScriptedVerifier:
    """Holds each session's text and verifies drafts over it with the real target; `noise(verifier,
    msg, answers, previous verdict)`, a test's script, returns what to publish for a DRAFT instead of
    `answers`: messages, raw bytes, or (delay_s, message) published later."""

    def __init__(self, port: int, fleet: str, device: str, target: Target, noise=None):
        self.target, self.noise = target, noise
        self.sessions: dict[int, TargetSession] = {}
        self.down = topics.answers(fleet, device)
        self.lock = threading.Lock()
        self.timers: list[threading.Timer] = []
        self.last_verdict: dict[int, wire.Verdict] = {}
        self.errors = 0  # the script's own exceptions (tests assert there were none)
        self.link = Link(MqttConfig(port=port), f"scripted-verifier-{fleet}", self.on)
        self.link.subscribe(f"specedge/v1/{fleet}/{device}/#")
        self.link.start()
        time.sleep(0.2)  # let the subscription land

    def publish(self, item) -> None:
        if isinstance(item, tuple):
            delay, item = item
            timer = threading.Timer(delay, self.publish, (item,))
            self.timers.append(timer)
            timer.start()
            return
        self.link.publish(self.down, item if isinstance(item, bytes) else wire.encode(item))

    def on(self, topic: str, payload: bytes) -> None:
        if topic == self.down:
            return
        try:
            msg = wire.decode(payload)
        except wire.WireError:  # the device's telemetry and commands share its topics
            return
        with self.lock:
            try:
                answers = self.answer(msg)
            except Exception:  # a script's bug must show, not silently stop the client's thread
                import traceback
                traceback.print_exc()
                self.errors += 1
                return
            for item in answers:
                self.publish(item)

    def verify(self, msg: wire.Draft) -> list:
        """What a length-checking verifier answers to `msg`, its session's text moved on."""
        s = self.sessions.get(msg.session)
        if s is None:
            return [wire.Error(msg.session, msg.seq, wire.ErrorCode.UNKNOWN_SESSION, "open")]
        if msg.committed != len(s.committed):
            return [wire.Error(msg.session, msg.seq, wire.ErrorCode.OUT_OF_SYNC, "length")]
        base = hash_of(s.committed)
        accepted, token = s.verify(msg.tokens)
        verdict = wire.Verdict(msg.session, msg.seq, msg.committed, accepted, token, **base)
        self.last_verdict[msg.session] = verdict
        return [verdict]

    def answer(self, msg) -> list:
        if isinstance(msg, wire.Open):
            self.sessions[msg.session] = TargetSession(self.target, msg.tokens, msg.params, msg.session)
            return [wire.Opened(msg.session, msg.seq, "scripted", self.target.name, True)]
        if isinstance(msg, wire.Draft):
            previous = self.last_verdict.get(msg.session)
            answers = self.verify(msg)
            return self.noise(self, msg, answers, previous) if self.noise else answers
        return []

    def lose(self, msg: wire.Draft) -> None:
        """As if `msg` never arrived: its session's text back to what it extended."""
        s = self.sessions[msg.session]
        self.sessions[msg.session] = TargetSession(self.target, s.committed[:msg.committed], s.params, msg.session)

    def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.link.stop()


def device_cfg(port: int, fleet: str, **faults) -> DeviceConfig:
    return build(DeviceConfig, {"device": {"fleet": fleet, "id": "d"}, "mqtt": {"port": port},
                                "energy": {"meter": "estimated"},
                                "faults": {"round_timeout_s": 0.3, "max_retries": 0, "max_wait_s": 10.0,
                                           "on_verifier_loss": "draft", "unverified_max_tokens": 4, **faults}},
                 env={})


@pytest.fixture(scope="module")
def target(tiny_models):
    _, _, model, tok = tiny_models
    return Target.in_memory("tiny", model, tok)


def greedy_choices(model, text: list[int]) -> list[int]:
    """The target's greedy token after every prefix of `text`, each position fed on its own."""
    return alone(model, text).argmax(dim=-1).tolist()


# -- 1. the committed text is checked by its hash ---------------------------------------------------
def test_the_text_hash_is_incremental_and_tells_texts_of_one_length_apart():
    text = list(range(1, 40))
    hasher = wire.TextHasher(text[:5])
    for a, b in ((5, 6), (6, 20), (20, 20), (20, 39)):
        hasher.update(text[a:b])
    assert hasher.digest() == wire.text_hash(text) and len(hasher.digest()) == 8
    assert hasher.length == len(text)
    assert wire.text_hash(text[:-1] + [text[-1] + 1]) != wire.text_hash(text)
    assert wire.text_hash([1, 2]) != wire.text_hash([2, 1]) and wire.text_hash([]) != wire.text_hash([0])


def test_messages_that_state_a_committed_length_carry_the_texts_hash_on_the_wire():
    h = wire.text_hash([1, 2, 3])
    for msg in (wire.Draft(7, 3, 3, [4, 5], text_hash=h), wire.Generate(7, 3, 3, 9, text_hash=h),
                wire.Verdict(7, 3, 3, 1, 5, 10, text_hash=h), wire.Hint(7, 3, 3, 1, 5, 12, text_hash=h)):
        assert wire.decode(wire.encode(msg)).text_hash == h
    assert wire.PROTOCOL_VERSION >= 5  # the hash came with protocol 5


def test_a_session_refuses_a_draft_over_another_text_of_the_same_length(target):
    prompt = [5, 6, 7, 8]
    session = TargetSession(target, prompt, SamplingParams(), 1)
    session.sync(4, wire.text_hash(prompt))
    accepted, token = session.verify([9, 10])
    mine = session.committed
    assert session.text_hash() == wire.text_hash(mine)
    other = mine[:-1] + [mine[-1] + 1]
    from specedge.cloud.session import OutOfSync
    with pytest.raises(OutOfSync, match="hash"):
        session.sync(len(other), wire.text_hash(other))
    session.sync(len(mine), wire.text_hash(mine))
    session.sync(4, wire.text_hash(prompt), allow_rollback=True)  # cloud-ar rolls back, hash follows
    assert session.text_hash() == wire.text_hash(prompt)


def test_the_verifier_answers_out_of_sync_to_a_draft_over_another_text_of_the_same_length(
        tiny_models, mosquitto):
    """The stale-draft case at the real verifier: after a verdict, a DRAFT whose length matches
    the session's text but whose hash does not is OUT_OF_SYNC, never verified."""
    from conftest import Wire

    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig

    _, tok, model, _ = tiny_models
    fleet = f"rh-{next(FLEETS)}"
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "fleet": fleet, "id": f"v-{fleet}", "group": fleet}}), Target.in_memory("tiny", model, tok)).start()
    client = Wire(mosquitto.port, fleet)
    try:
        prompt = tok.encode_chat("go")
        assert isinstance(client.ask("d", wire.Open(1, 0, prompt)), wire.Opened)
        verdict = client.ask("d", wire.Draft(1, 1, len(prompt), [3, 4, 5], text_hash=wire.text_hash(prompt)))
        assert isinstance(verdict, wire.Verdict) and verdict.text_hash == wire.text_hash(prompt)
        held = verifier.table.sessions[(fleet, "d", 1)].committed
        other = held[:-1] + [(held[-1] + 1) % model.cfg.vocab_size]
        refused = client.ask("d", wire.Draft(1, 2, len(other), [6], text_hash=wire.text_hash(other)))
        assert isinstance(refused, wire.Error) and refused.code == wire.ErrorCode.OUT_OF_SYNC
        assert verifier.table.sessions[(fleet, "d", 1)].committed == held  # nothing verified over it
        assert isinstance(client.ask("d", wire.Draft(1, 3, len(held), [6], text_hash=wire.text_hash(held))),
                          wire.Verdict)
    finally:
        client.stop()
        verifier.stop()


# -- 2. the late verdict of a stale draft ------------------------------------------------------------
def test_a_late_verdict_of_a_stale_draft_after_drafting_alone_never_verifies_another_text(
        tiny_models, mosquitto, target):
    """The device drafts alone (`draft` policy) when round 1 goes unanswered; the slow verifier
    then answers round 1 after all, all drafted tokens but the last accepted and another last
    token: its text has the device's length but not its tokens. Its verdict of round 2 must not be
    taken: the device resyncs, every token after the unverified span is the target's greedy
    decoding of the device's own text, and the verifier ends up holding that text."""
    draft, tok, model, _ = tiny_models
    held: list[wire.Draft] = []

    def noise(ver, msg, answers, previous):
        if not held:  # round 1: slow, answered after the next draft arrives
            held.append(msg)
            ver.lose(msg)  # the late verdict below decides what it holds
            return []
        if len(held) == 1:
            stale = held[0]
            held.append(msg)  # only once
            s = ver.sessions[msg.session]
            base = hash_of(s.committed[:stale.committed])
            last = stale.tokens[-1]
            other = next(t for t in range(last + 1, last + 50) if t not in tok.stop_ids) % model.cfg.vocab_size
            # What the slow verifier holds once it got to round 1: the device's length, not its text.
            ver.sessions[msg.session] = TargetSession(
                target, s.committed[:stale.committed] + stale.tokens[:-1] + [other], s.params, msg.session)
            late = wire.Verdict(stale.session, stale.seq, stale.committed, len(stale.tokens) - 1, other, **base)
            return [late] + ver.verify(msg)
        return answers

    fleet = f"rs-{next(FLEETS)}"
    ver = ScriptedVerifier(mosquitto.port, fleet, "d", target, noise)
    agent = Agent(device_cfg(mosquitto.port, fleet), TorchDraftEngine(draft), tok).start()
    try:
        prompt = tok.encode_chat("sensor arm wheel")
        result = agent.generate(prompt, SamplingParams(), 16, parse_policy("fixed:4"))
        session = agent.current.rounds.session
    finally:
        agent.stop()
        ver.stop()
    assert result.unverified == [(0, 4)]
    text = prompt + result.tokens
    want = reference_greedy(model, text[: len(prompt) + 4], 16 - 4, tok.stop_ids)
    assert result.tokens[4:] == want[: len(result.tokens) - 4]
    assert result.stats.resyncs >= 1
    assert ver.sessions[session].committed[: len(text)] == text
    assert ver.errors == 0


# -- 2b. the device's rounds against a scripted, misbehaving verifier -------------------------------
NOISES = ("plain", "slow", "duplicate", "stale", "reorder", "wrong_session", "wrong_version", "wrong_text")


def script(noises: list[str], vocab: int):
    rounds = iter(noises)

    def noise(ver, msg, answers, previous):
        kind = next(rounds, "plain")
        verdict = answers[0]
        if not isinstance(verdict, wire.Verdict):
            return answers
        wrong = (verdict.next_token + 1) % vocab
        older = [previous] if previous is not None else []
        if kind == "slow":
            return [(0.6, verdict)]
        if kind == "duplicate":
            return [verdict, verdict]
        if kind == "stale":
            return older + [verdict]
        if kind == "reorder":
            return [verdict] + older
        if kind == "wrong_session":
            return [wire.Verdict(msg.session ^ 1, msg.seq, msg.committed, 0, wrong), verdict]
        if kind == "wrong_version":
            raw = bytearray(wire.encode(wire.Verdict(msg.session, msg.seq, msg.committed, 0, wrong)))
            raw[0] = wire.PROTOCOL_VERSION + 1
            return [bytes(raw), verdict]
        if kind == "wrong_text":  # another text of the same length: a verdict the device must not take
            other = {"text_hash": b"\xee" * 8} if hasattr(wire, "text_hash") else {}
            return [wire.Verdict(msg.session, msg.seq, msg.committed, 0, wrong, **other), (0.05, verdict)]
        return answers
    return noise


@pytest.fixture(scope="module")
def scripted_rig(tiny_models, mosquitto, target):
    draft, tok, _, _ = tiny_models
    fleet = f"rp-{next(FLEETS)}"
    ver = ScriptedVerifier(mosquitto.port, fleet, "d", target)
    agent = Agent(device_cfg(mosquitto.port, fleet), TorchDraftEngine(draft), tok).start()
    yield agent, ver
    agent.stop()
    ver.stop()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noises=st.lists(st.sampled_from(NOISES), min_size=1, max_size=6),
       prompt_text=st.sampled_from(["write a loop", "sensor arm wheel", "go"]))
def test_every_verified_token_is_the_targets_greedy_choice_whatever_the_verifier_does(
        scripted_rig, tiny_models, noises, prompt_text):
    """Slow, duplicated, stale, reordered, other-session, other-version and other-text verdicts:
    each token the device does not mark unverified is the target's greedy token after the
    device's own text before it, and only the `draft` policy's bounded span is unverified."""
    agent, ver = scripted_rig
    _, tok, model, _ = tiny_models
    ver.noise = script(noises, model.cfg.vocab_size)
    prompt = tok.encode_chat(prompt_text)
    result = agent.generate(prompt, SamplingParams(), 12, parse_policy("fixed:3"))
    text = prompt + result.tokens
    choices = greedy_choices(model, text)
    unverified = {i for a, b in result.unverified for i in range(a, b)}
    assert result.stats.unverified_tokens == len(unverified) <= 4
    for i, token in enumerate(result.tokens):
        if i not in unverified:
            assert token == choices[len(prompt) + i - 1], (i, noises, result.unverified)
    if not unverified:
        assert result.tokens == reference_greedy(model, prompt, 12, tok.stop_ids)
    assert ver.errors == 0


# -- 4. unverified tokens are marked for the apps ---------------------------------------------------
def silent_first_round(ver, msg, answers, previous, seen=set()):
    """Round 1 of every session is lost: the device drafts alone, then rounds resume."""
    if msg.session not in seen:
        seen.add(msg.session)
        ver.lose(msg)
        return []
    return answers


@pytest.fixture(scope="module")
def alone_node(tiny_models, mosquitto, target):
    from specedge.device.node import DeviceNode

    draft, tok, _, _ = tiny_models
    fleet = f"ra-{next(FLEETS)}"
    ver = ScriptedVerifier(mosquitto.port, fleet, "robot", target, silent_first_round)
    cfg = build(DeviceConfig, {"device": {"id": "robot", "fleet": fleet}, "mqtt": {"port": mosquitto.port},
                               "energy": {"meter": "estimated"}, "speculation": {"policy": "fixed:4"},
                               "faults": {"round_timeout_s": 0.3, "max_retries": 0, "max_wait_s": 10.0,
                                          "on_verifier_loss": "draft", "unverified_max_tokens": 4},
                               "api": {"http_port": 0, "local_mqtt_host": "127.0.0.1",
                                       "local_mqtt_port": mosquitto.port}}, env={})
    node = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    yield node, fleet
    node.stop()
    ver.stop()


def sse(port: int, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_unverified_tokens_are_marked_in_the_http_stream_and_counted_in_its_last_chunk(alone_node):
    node, _ = alone_node
    events = sse(node.http.port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "sensor arm wheel"}], "max_tokens": 16, "stream": True})
    texts = [e for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
    marked = [e for e in texts if e.get("specedge", {}).get("unverified")]
    assert marked, events
    assert all(e.get("specedge", {}).get("unverified") in (None, True) for e in texts)
    assert len(marked) < len(texts)  # the verified rounds after it are not marked
    assert events[-1]["specedge"]["unverified_tokens"] == 4
    # completions (not chat) mark their chunks the same way
    events = sse(node.http.port, "/v1/completions", {"prompt": "def f():", "max_tokens": 16, "stream": True})
    assert any(e.get("specedge", {}).get("unverified") for e in events if e.get("choices") and e["choices"][0]["text"])
    assert events[-1]["specedge"]["unverified_tokens"] == 4


def test_unverified_tokens_are_marked_in_the_local_mqtt_api(alone_node, mosquitto):
    node, _ = alone_node
    got: queue.Queue = queue.Queue()
    link = Link(MqttConfig(port=mosquitto.port), "app-unverified",
                lambda topic, payload: got.put(json.loads(payload))).start()
    try:
        reply = "specedge/local/robot/response/app-unverified"
        link.subscribe(reply)
        time.sleep(0.2)
        request = {"id": "u1", "prompt": "def f():", "max_tokens": 16, "stream": True}
        link.publish("specedge/local/robot/request", json.dumps(request).encode(), reply_to=ReplyTo(reply, b"c"))
        messages = []
        while not messages or not messages[-1].get("done"):
            messages.append(got.get(timeout=30))
    finally:
        link.stop()
    deltas = messages[:-1]
    assert any(m.get("unverified") for m in deltas) and not all(m.get("unverified") for m in deltas)
    assert "".join(m["delta"] for m in deltas) == messages[-1]["text"]
    assert messages[-1]["specedge"]["unverified_tokens"] == 4


# -- 3. the round state machine, no I/O ---------------------------------------------------------------
def test_the_round_state_takes_only_this_rounds_messages_and_binds_only_to_its_latest_open():
    from specedge.device.rounds import BOUND, CURRENT, ERROR, MOVED, OTHER_OPENED, STALE, Rounds

    rounds = Rounds(7, [1, 2, 3])
    open_seq = rounds.opening()
    assert rounds.classify(wire.Opened(7, open_seq + 1, "r1", "v")).kind == OTHER_OPENED  # not our OPEN's
    assert rounds.classify(wire.Opened(8, open_seq, "r1", "v")).kind == STALE  # another session's
    refusal = wire.Error(7, open_seq, wire.ErrorCode.INCOMPATIBLE)
    assert rounds.classify(refusal).kind == ERROR  # a refusal of our OPEN, before any replica holds it
    assert rounds.classify(wire.Opened(7, open_seq, "r1", "v1")).kind == BOUND and rounds.replica == "r1"
    assert rounds.classify(wire.Opened(7, open_seq, "r2", "v1")).kind == OTHER_OPENED and rounds.replica == "r1"
    assert rounds.classify(wire.Opened(7, 0, "r1", "v2")).kind == MOVED and rounds.target_version == "v2"
    seq = rounds.next_round()
    h = rounds.text_hash()
    verdict = wire.Verdict(7, seq, 3, 1, 5, text_hash=h)
    assert rounds.classify(verdict).kind == CURRENT
    for other in (wire.Verdict(7, seq - 1, 3, 1, 5, text_hash=h), wire.Verdict(7, seq + 1, 3, 1, 5, text_hash=h),
                  wire.Verdict(6, seq, 3, 1, 5, text_hash=h), refusal):
        assert rounds.classify(other).kind == STALE
    draft = wire.Draft(7, seq, 3, [4], text_hash=h)
    assert Rounds.text_matches(verdict, draft)
    assert not Rounds.text_matches(wire.Verdict(7, seq, 3, 1, 5, text_hash=wire.text_hash([1, 2, 4])), draft)
    rounds.commit([4, 5])
    assert rounds.text_hash() == wire.text_hash([1, 2, 3, 4, 5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["verdict", "error", "opened"]), st.integers(0, 2),
                          st.integers(-2, 2)), max_size=30),
       st.lists(st.sampled_from(["round", "open"]), max_size=8))
def test_whatever_arrives_only_the_current_rounds_messages_of_the_session_count(arrivals, steps):
    """Duplicated, reordered, stale and other sessions' messages, in any order, between any
    rounds and OPENs: CURRENT or ERROR only for this session's current round (or its OPEN while
    unbound), and only an OPENED of the latest OPEN binds the session."""
    from specedge.device.rounds import BOUND, CURRENT, ERROR, Rounds

    rounds = Rounds(1, [5])
    steps = iter(steps)
    for kind, session, offset in arrivals:
        step = next(steps, None)
        if step == "round":
            rounds.next_round()
        elif step == "open":
            rounds.unbind()
            rounds.next_round()
            rounds.opening()
        seq, unbound = max(rounds.seq + offset, 0), rounds.replica is None
        msg = {"verdict": wire.Verdict(session, seq, 1, 0, 3), "error": wire.Error(session, seq, 2),
               "opened": wire.Opened(session, seq, f"r{offset}", "v")}[kind]
        got = rounds.classify(msg).kind
        if got in (CURRENT, ERROR):
            assert session == 1 and (seq == rounds.seq or (kind == "error" and unbound and seq == rounds.open_seq))
        if got == BOUND:
            assert unbound and session == 1 and seq == rounds.open_seq and rounds.replica == msg.replica


@pytest.mark.parametrize("policy, broker, attempt, waited, alone, can_draft, unverified, want", [
    ("wait", False, 0, 1.0, False, True, 0, "retry"),  # a hiccup: try again
    ("draft", False, 0, 1.0, False, True, 0, "retry"),  # retries before the policy applies
    ("draft", False, 2, 1.0, False, True, 0, "draft alone"),
    ("draft", False, 0, 1.0, True, True, 0, "draft alone"),  # the last round went on alone: no retries
    ("draft", False, 2, 1.0, False, True, 4, "retry"),  # its unverified tokens spent: wait instead
    ("draft", False, 2, 1.0, False, False, 0, "retry"),  # nothing drafted to go on with
    ("draft", False, 2, 99.0, False, True, 0, "fail"),  # past max_wait_s
    ("fail", False, 2, 1.0, False, True, 0, "fail"),
    ("fail", True, 0, 0.0, False, True, 0, "fail"),  # a broker loss applies the policy at once
    ("wait", True, 0, 0.0, False, True, 0, "retry"),
])
def test_the_fault_policy_decides_without_io(policy, broker, attempt, waited, alone, can_draft, unverified, want):
    from specedge.config import FaultConfig
    from specedge.device.rounds import Rounds

    faults = FaultConfig(max_retries=2, max_wait_s=10.0, unverified_max_tokens=4, on_verifier_loss=policy,
                         on_broker_loss=policy)
    assert Rounds.fault_action(faults, broker, attempt, waited, alone, can_draft, unverified) == want


# -- 4. one exchange (a DRAFT until its verdict), no I/O: events in, actions out ---------------------
def _exchange(prompt=(1, 2, 3), draft=(4, 5), bound=True, **faults):
    import random

    from specedge.config import FaultConfig
    from specedge.device.rounds import Exchange, RoundTimer, Rounds
    from specedge.metrics import SpecStats

    rounds = Rounds(7, list(prompt))
    rounds.opening()
    if bound:
        rounds.classify(wire.Opened(7, rounds.open_seq, "r1", "v1", True))
    rounds.next_round()
    pending = wire.Draft(7, rounds.seq, len(prompt), list(draft), text_hash=rounds.text_hash())
    cfg = FaultConfig(**{"round_timeout_s": 1.0, "max_retries": 2, "max_wait_s": 30.0, **faults})
    ex = Exchange(rounds, pending, cfg, SpecStats(), RoundTimer(), 100, 0.0, can_draft=True,
                  rng=random.Random(0))
    return ex, rounds, pending


def _kinds(actions):
    return [a.kind for a in actions]


def test_a_late_verdict_over_another_text_of_the_same_length_resyncs_and_is_never_delivered():
    """The exact case of issue 20 point 13, without I/O: after the device drafted alone, a slow
    verifier's session holds another text of the same length; its verdict for the current round
    states that text's hash. The exchange drops it, resyncs (OPEN under a new round), sends the
    draft again once bound, and delivers only the verdict over the device's own text."""
    from specedge.device.rounds import DELIVER, DROPPED, OPEN, SEND

    ex, rounds, pending = _exchange()
    assert _kinds(ex.start(0.0)) == [SEND]
    other = wire.text_hash([1, 2, 9])  # same length, last token differs
    acts = ex.on_payload(wire.encode(wire.Verdict(7, rounds.seq, 3, 2, 6, text_hash=other)), 0.1)
    assert _kinds(acts) == [DROPPED, OPEN] and acts[0].arg[0] == "text_mismatch"
    assert rounds.replica is None and ex.stats.resyncs == 1
    acts = ex.on_payload(wire.encode(wire.Opened(7, rounds.open_seq, "r2", "v1", True)), 0.2)
    assert _kinds(acts) == [SEND] and acts[0].arg.seq == rounds.seq and acts[0].arg.tokens == [4, 5]
    good = wire.Verdict(7, rounds.seq, 3, 2, 6, text_hash=pending.text_hash)
    assert ex.on_payload(wire.encode(good), 0.3) == [type(acts[0])(DELIVER, good)]


def test_silence_retries_with_failover_then_the_policy_decides():
    from specedge.device.rounds import DRAFT_ALONE, FAIL, OPEN, SEND, TIMEOUT

    ex, rounds, _ = _exchange(on_verifier_loss="draft")
    ex.start(0.0)
    assert _kinds(ex.on_silence(TIMEOUT, 1.5)) == [OPEN] and rounds.replica is None  # failover to the group
    assert ex.stats.failovers == 1 and ex.attempt == 1
    assert _kinds(ex.on_payload(wire.encode(wire.Opened(7, rounds.open_seq, "r2", "v1")), 1.6)) == [SEND]
    ex.on_silence(TIMEOUT, 4.0)
    ex.on_payload(wire.encode(wire.Opened(7, rounds.open_seq, "r3", "v1")), 4.1)
    assert _kinds(ex.on_silence(TIMEOUT, 8.0)) == [DRAFT_ALONE]  # max_retries spent: the policy
    failing, _, _ = _exchange(on_verifier_loss="fail", max_retries=0)
    failing.start(0.0)
    acts = failing.on_silence(TIMEOUT, 1.5)
    assert _kinds(acts) == [FAIL] and acts[0].arg.tries == 1 and acts[0].arg.policy == "fail"


def test_a_broker_loss_waits_for_the_broker_then_resends_to_the_same_replica():
    from specedge.device.rounds import AWAIT_BROKER, BROKER_LOST, FAIL, SEND

    ex, rounds, _ = _exchange()
    ex.start(0.0)
    acts = ex.on_silence(BROKER_LOST, 0.5)
    assert _kinds(acts) == [AWAIT_BROKER] and acts[0].arg == 30.0  # since + max_wait_s
    assert _kinds(ex.on_broker_back(5.0)) == [SEND] and rounds.replica == "r1"
    assert _kinds(ex.on_silence(BROKER_LOST, 31.0)) == [FAIL]  # still down past max_wait_s


def test_an_error_refuses_or_resyncs_and_a_reconnect_resends_the_same_round():
    from specedge.device.rounds import OPEN, REFUSE, SEND

    ex, rounds, _ = _exchange()
    ex.start(0.0)
    seq = rounds.seq
    acts = ex.on_reconnected(0.1)
    assert _kinds(acts) == [SEND] and acts[0].arg.seq == seq
    lost = wire.Error(7, seq, wire.ErrorCode.UNKNOWN_SESSION)
    assert _kinds(ex.on_payload(wire.encode(lost), 0.2)) == [OPEN] and rounds.seq > seq
    busy = wire.Error(7, rounds.open_seq, wire.ErrorCode.OVERLOADED, "sessions per device")
    acts = ex.on_payload(wire.encode(busy), 0.3)
    assert _kinds(acts) == [REFUSE] and acts[0].arg.text == "sessions per device"


def _noise():
    """What a slow, stale, duplicating, reordering, confused or hostile verifier may send, as
    (kind, session offset, seq offset, committed offset, text is ours) plus silences."""
    # weighted towards this session's current round, where a wrong answer could do harm
    message = st.tuples(st.sampled_from(["verdict", "verdict", "verdict", "hint", "opened", "opened", "error",
                                         "tokens", "garbage"]),
                        st.sampled_from([0, 0, 0, 1]), st.sampled_from([0, 0, 0, 0, -1, -2, 1]),
                        st.sampled_from([0, 0, 0, -1, 1]), st.booleans())
    event = st.one_of(message, st.sampled_from([("silence", "timeout"), ("silence", "replica lost"),
                                                ("silence", "broker lost"), ("broker back",), ("reconnected",)]))
    return st.lists(event, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_noise(), st.booleans(), st.sampled_from(["wait", "draft", "fail"]))
def test_whatever_the_verifier_does_only_a_verdict_over_our_text_for_this_round_is_delivered(events, bound,
                                                                                            policy):
    """Slow (silences), stale and reordered (older rounds), duplicated, other sessions', other
    versions' (OPENED of another replica), hostile (garbage, out-of-range tokens) messages in any
    order: the exchange delivers at most one answer, and it is a VERDICT of this session and its
    current round, over the draft's committed text (length and hash); it sends the draft only
    while bound, each OPEN under a new round number; and it ends only by delivering, the fault
    policy or a refusal."""
    from dataclasses import replace

    from specedge.device.rounds import (ASK_AGAIN, AWAIT_BROKER, DELIVER, DRAFT_ALONE, FAIL, OPEN, REFUSE, SEND,
                                        Action)

    ex, rounds, pending = _exchange(bound=bound, on_verifier_loss=policy, on_broker_loss=policy)
    seqs = [rounds.seq]

    def ended(acts) -> bool:
        for act in acts:
            assert isinstance(act, Action) and act.kind != ASK_AGAIN  # a DRAFT's never hands back
            if act.kind == SEND:
                assert rounds.replica is not None and act.arg == replace(pending, seq=rounds.seq)
            if act.kind == OPEN:
                assert rounds.open_seq == rounds.seq > seqs[-1]
                seqs.append(rounds.seq)
            if act.kind == AWAIT_BROKER:
                assert act.arg <= ex.since + ex.faults.max_wait_s
            if act.kind == DELIVER:
                v = act.arg
                assert isinstance(v, wire.Verdict) and (v.session, v.seq) == (7, rounds.seq) and rounds.replica
                assert (v.committed, v.text_hash) == (pending.committed, pending.text_hash)
            if act.kind in (DELIVER, DRAFT_ALONE, FAIL, REFUSE):
                return True
        return False

    now = 0.0
    if ended(ex.start(now)):
        return
    for event in events:
        now += 0.7
        if event[0] == "silence":
            acts = ex.on_silence(event[1], now)
        elif event[0] == "broker back":
            acts = ex.on_broker_back(now)
        elif event[0] == "reconnected":
            acts = ex.on_reconnected(now)
        else:
            kind, session, seq_off, committed_off, ours = event
            session, seq = 7 + session, max(0, rounds.seq + seq_off)
            committed = pending.committed + committed_off
            text_hash = pending.text_hash if ours else wire.text_hash([1, 2, 9])
            msg = {"verdict": wire.Verdict(session, seq, committed, 1, 42, text_hash=text_hash),
                   "hint": wire.Hint(session, seq, committed, 1, 42, 3, text_hash=text_hash),
                   "opened": wire.Opened(session, rounds.open_seq if ours else seq, f"r{seq_off + 2}", "v2"),
                   "error": wire.Error(session, seq, wire.ErrorCode.OUT_OF_SYNC),
                   "tokens": wire.Tokens(session, seq, 0, [5])}.get(kind)
            acts = ex.on_payload(wire.encode(msg) if msg else bytes([0x53, 0x45, 99, 1, 2]), now)
        if ended(acts):
            return


def test_a_stream_delivers_every_tokens_message_and_hands_back_after_a_failover():
    import random

    from specedge.config import FaultConfig
    from specedge.device.rounds import ASK_AGAIN, DELIVER, OPEN, TIMEOUT, Exchange, RoundTimer, Rounds
    from specedge.metrics import SpecStats

    rounds = Rounds(7, [1, 2, 3])
    rounds.opening()
    rounds.classify(wire.Opened(7, rounds.open_seq, "r1", "v1"))
    rounds.next_round()
    request = wire.Generate(7, rounds.seq, 3, 8, rounds.text_hash())
    ex = Exchange(rounds, request, FaultConfig(round_timeout_s=1.0), SpecStats(), RoundTimer(), 100, 0.0,
                  attempt=1, rng=random.Random(0))
    ex.start(0.0)
    for start in (0, 1):
        acts = ex.on_payload(wire.encode(wire.Tokens(7, rounds.seq, start, [5])), 0.5 + start)
        assert _kinds(acts) == [DELIVER] and ex.attempt == 0 and ex.since == 0.5 + start
    assert _kinds(ex.on_silence(TIMEOUT, 9.0)) == [OPEN, ASK_AGAIN] and ex.attempt == 1 and ex.stats.failovers == 1


@pytest.mark.parametrize("policy, ends", [("fail", "fail"), ("draft", "draft alone"), ("wait", "fail")])
def test_a_verifier_that_keeps_asking_for_resyncs_is_treated_as_lost(policy, ends):
    """Every verdict over another text (or every OUT_OF_SYNC) asks for a resync, and no silence
    ever comes: past max_retries resyncs in one exchange the fault policy decides; under `wait`
    the request fails once max_wait_s has passed instead of resyncing for ever."""
    ex, rounds, pending = _exchange(on_verifier_loss=policy)
    ex.start(0.0)
    now, kinds = 0.0, []
    for _ in range(200):
        now += 1.0
        wrong = wire.Verdict(7, rounds.seq, 3, 1, 42, text_hash=wire.text_hash([1, 2, 9]))
        kinds = _kinds(ex.on_payload(wire.encode(wrong), now))
        if ends in kinds:
            break
        ex.on_payload(wire.encode(wire.Opened(7, rounds.open_seq, "r1", "v1")), now)
    assert ends in kinds
    assert ex.stats.resyncs <= ex.faults.max_retries + (30 if policy == "wait" else 0)


def test_a_resyncs_open_cannot_be_named_in_advance():
    """A resync's OPEN jumps the round number by a secret random step: a broken replica that
    forges refusals "for the round after next" (the fault suite's wrong-answers) cannot hit it."""
    from specedge.device.rounds import Rounds

    rounds = Rounds(1, [5])
    gaps = []
    for _ in range(50):
        before = rounds.seq
        assert rounds.reopening() == rounds.open_seq == rounds.seq > before
        gaps.append(rounds.seq - before)
    assert len(set(gaps)) > 40 and max(gaps) > 2


def test_a_kept_session_is_shared_by_a_next_turn_up_to_where_its_prompt_parts_from_the_kept_text():
    """A next turn repeats the last prompt whole; it goes on up to where it parts from the kept text,
    and never past what the target's own generation had fed."""
    from specedge.device.rounds import Kept, Rounds

    rounds = Rounds(7, [1, 2, 3])
    rounds.replica = "r1"
    kept = Kept(rounds, [1, 2, 3, 4, 5], SamplingParams(), False, True, [(0, 3)])
    assert kept.shared([1, 2, 3, 4, 5, 6, 7], SamplingParams(), False) == 5  # the history, then a new turn
    assert kept.shared([1, 2, 3, 9, 5, 6], SamplingParams(), False) == 3  # the seam re-tokenized
    assert kept.shared([1, 2, 3, 4, 5], SamplingParams(), False) == 4  # at least one token to send
    assert kept.shared([8, 2, 3], SamplingParams(), False) == 0
    assert kept.shared([1, 2, 7, 4, 5, 6], SamplingParams(), False) == 0  # another prompt, a shared beginning
    assert kept.shared([1, 2, 3, 4, 5, 6], SamplingParams(0.7), False) == 0  # the verifier samples otherwise
    assert kept.shared([1, 2, 3, 4, 5, 6], SamplingParams(), True) == 0  # hints are set at OPEN
    cut = Kept(rounds, [1, 2, 3, 4, 5], SamplingParams(), False, True, [(0, 3)], stopped=False)
    assert cut.shared([1, 2, 3, 4, 5, 6, 7], SamplingParams(), False) == 4  # max_tokens: 5 was never fed
    many = Kept(rounds, [1, 2, 3, 4, 5], SamplingParams(), False, True, [(i, i + 1) for i in range(255)][:5])
    assert many.shared([1, 2, 3, 4, 5, 6], SamplingParams(), False) == 5
    many.prompts = [(i, i + 1) for i in range(255)]
    assert many.shared([1, 2, 3, 4, 5, 6], SamplingParams(), False) == 0  # no room for another turn's span
    rounds.unbind()
    assert kept.shared([1, 2, 3, 4, 5, 6], SamplingParams(), False) == 0  # no replica holds it
