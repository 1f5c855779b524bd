"""The services over a real Mosquitto: bad input, replays, lost sessions, dead brokers."""
from __future__ import annotations

import queue
import time
from dataclasses import replace

import pytest

from conftest import reference_greedy
from specedge.protocol import wire
from specedge.tools.faults import on_draft_call
from specedge.config import MqttConfig
from specedge.protocol.contract import Contract
from specedge.device.policy import parse_policy
from specedge.mqtt import BrokerUnavailable, Link
from specedge.protocol import topics
from specedge.speculative import SamplingParams


@pytest.fixture
def probe(mosquitto):
    """A raw MQTT client posing as device 'probe' of fleet 'default'."""
    inbox: queue.Queue = queue.Queue()
    link = Link(MqttConfig(port=mosquitto.port), "probe", lambda t, p: inbox.put(p))
    link.subscribe(topics.answers("default", "probe"))
    link.start()
    time.sleep(0.2)  # let the subscription land
    up = topics.device("default", "probe", "draft")

    def ask(payload: bytes, timeout=5.0):
        link.publish(up, payload)
        return wire.decode(inbox.get(timeout=timeout))

    yield link, ask, inbox
    link.stop()


def test_malformed_payloads_get_an_error_reply_and_are_counted(stack, probe):
    link, ask, _ = probe
    before = dict(stack.verifier.errors)
    truncated = wire.encode(wire.Draft(77, 1, 5, [1, 2, 3]))[:-2]
    reply = ask(truncated)
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.BAD_REQUEST and reply.session == 77
    newer = bytearray(wire.encode(wire.Close(78, 1)))
    newer[0] = wire.PROTOCOL_VERSION + 1
    reply = ask(bytes(newer))
    assert reply.code == wire.ErrorCode.UNSUPPORTED_VERSION and f"version {wire.PROTOCOL_VERSION + 1}" in reply.text
    link.publish(topics.device("default", "probe", "draft"), b"\x00")  # too short to answer: only counted
    deadline = time.monotonic() + 5
    while stack.verifier.errors.get("truncated", 0) < before.get("truncated", 0) + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stack.verifier.errors.get("unsupported_version", 0) == before.get("unsupported_version", 0) + 1


def test_draft_for_an_unknown_session_asks_for_a_resync(stack, probe):
    _, ask, _ = probe
    reply = ask(wire.encode(wire.Draft(12345, 1, 3, [1])))
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.UNKNOWN_SESSION


def test_incompatible_draft_is_refused_with_the_part_that_differs(stack, probe, tiny_models):
    _, ask, _ = probe
    _, tok, target, _ = tiny_models
    good = Contract.of(tok, target.cfg.vocab_size)
    for change, part in ((dict(tokenizer=b"12345678"), "tokenizer"), (dict(vocab_size=151936), "vocab size"),
                         (dict(special_tokens=b"xxxxxxxx"), "special tokens"),
                         (dict(chat_template=b"tttttttt"), "chat template")):
        reply = ask(wire.encode(wire.Open(5, 0, [1, 2, 3], SamplingParams(), replace(good, **change), draft="d")))
        assert reply.code == wire.ErrorCode.INCOMPATIBLE and part in reply.text, reply
    reply = ask(wire.encode(wire.Open(5, 0, [1, 2, 3], SamplingParams(), good, draft="d")))
    assert isinstance(reply, wire.Opened) and reply.replica == stack.verifier.replica


def test_replayed_round_gets_the_same_verdict_and_no_new_work(stack, probe, tiny_models):
    _, ask, _ = probe
    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("hello")
    opened = ask(wire.encode(wire.Open(99, 0, prompt, SamplingParams())))
    assert isinstance(opened, wire.Opened)
    draft = wire.encode(wire.Draft(99, 1, len(prompt), [5, 6], text_hash=wire.text_hash(prompt)))
    first = ask(draft)
    rounds = stack.verifier.rounds
    again = ask(draft)
    assert isinstance(first, wire.Verdict) and vars(first) == vars(again)
    assert stack.verifier.rounds == rounds
    expected = reference_greedy(target, prompt, 1, frozenset())[0]
    assert first.next_token == expected or first.accepted > 0
    stale = ask(wire.encode(wire.Draft(99, 2, len(prompt), [7])))  # a newer round still works
    assert isinstance(stale, (wire.Verdict, wire.Error))


def test_agent_resyncs_when_the_verifier_loses_its_session(stack, tiny_models):
    """The device is the source of truth: a verifier that forgot the session is rebuilt from it."""
    _, tok, target, _ = tiny_models
    prompt = tok.encode_chat("robot go to the mat")
    def forget():
        stack.verifier.inbox.put(("forget", b"", time.monotonic()))  # processed in order, before our next draft
        stack.verifier.table.sessions.clear()

    with on_draft_call(stack.agent.engine, {3, 6}, forget):
        result = stack.agent.generate(prompt, SamplingParams(), 30, parse_policy("fixed:3"))
    assert result.tokens == reference_greedy(target, prompt, 30, tok.stop_ids)
    assert result.stats.resyncs >= 1 or result.stopped


def test_garbage_on_the_verdict_topic_is_dropped_and_counted(stack, tiny_models, mosquitto):
    _, tok, target, _ = tiny_models
    link = Link(MqttConfig(port=mosquitto.port), "garbage", lambda *_: None).start()
    try:
        down = stack.agent.down_topic
        for junk in (b"", b"\x01", b"\xff" * 40):
            link.publish(down, junk)
        time.sleep(0.3)
        prompt = tok.encode_chat("stop")
        result = stack.agent.generate(prompt, SamplingParams(), 10, parse_policy("fixed:2"))
        assert result.tokens == reference_greedy(target, prompt, 10, tok.stop_ids)
    finally:
        link.stop()


def test_dead_broker_is_a_clear_error():
    from specedge.broker import free_port

    with pytest.raises(BrokerUnavailable, match="unreachable"):
        Link(MqttConfig(port=free_port()), "nobody", lambda *_: None).start(timeout=2)


def test_a_link_waiting_for_a_silent_broker_stops_at_once():
    """A broker that takes the connection and never answers (overloaded, or not a broker) keeps a
    connect waiting for its CONNACK; stop() must not wait for it: a service told to stop under
    load did not exit within 30 s of SIGTERM (issue 34)."""
    import socket
    import threading

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        link = Link(MqttConfig(port=silent.getsockname()[1]), "patient", lambda *_: None)
        outcome = []

        def connect():
            try:
                link.start(timeout=30)
            except BrokerUnavailable as exc:
                outcome.append(exc)
        waiting = threading.Thread(target=connect)
        waiting.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        link.stop()
        waiting.join(timeout=10)
        assert not waiting.is_alive() and time.monotonic() - t0 < 3
        assert outcome and "stopping" in str(outcome[0])


def test_embedded_broker_speaks_mqtt_311(tiny_models):
    """The zero-setup demo path: amqtt, with the client falling back from MQTT 5."""
    from specedge.tools.demo import Stack

    s = Stack(*tiny_models, broker="embedded")
    try:
        _, tok, target, _ = tiny_models
        prompt = tok.encode_chat("hello")
        result = s.agent.generate(prompt, SamplingParams(), 12, parse_policy("fixed:3"))
        assert result.tokens == reference_greedy(target, prompt, 12, tok.stop_ids)
        assert s.agent.status().protocol == "3.1.1"
    finally:
        s.close()


def test_sampled_generation_runs_end_to_end(stack, tiny_models):
    _, tok, _, _ = tiny_models
    prompt = tok.encode_chat("the cat")
    result = stack.agent.generate(prompt, SamplingParams(temperature=0.8, top_p=0.95, seed=1), 20,
                                  parse_policy("fixed:3"))
    summary = result.stats.summary()
    assert summary["generated_tokens"] == len(result.tokens) > 0
    assert 0.0 <= summary["acceptance_rate"] <= 1.0
