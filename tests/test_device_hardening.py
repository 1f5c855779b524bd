"""Issue 20's device findings, against the real Mosquitto: what the device takes from a verifier
(replica names, token ids, streams that never advance, floods, oversized packets), deeply nested
JSON on the topics it reads, the stop-string scan, and starting while the broker is down.

A scripted fake verifier stands in where the real one would never misbehave: it answers the
device's messages through the broker with whatever a test tells it to."""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time

import pytest

from specedge.protocol import wire
from specedge.config import CloudConfig, DeviceConfig, MqttConfig, build
from specedge.device.agent import MAX_INBOX, Agent
from specedge.device.request import MAX_STALLED, RequestFailed
from specedge.device.draft import TorchDraftEngine
from specedge.device.policy import parse_policy
from specedge.mqtt import Link, ReplyTo
from specedge.protocol import topics
from specedge.speculative import SamplingParams

NESTED = b"[" * 5000 + b"]" * 5000
TOKEN = 100  # a token id of the tiny vocabulary that is no stop token
FLEETS = itertools.count()


class FakeVerifier:
    """Answers every message the device sends with `answer(msg)` (a list of messages), on the
    device's verdict topic; records the topics the device published on."""

    def __init__(self, port: int, fleet: str, device: str, answer):
        self.answer, self.topics = answer, []
        self.down = topics.answers(fleet, device)
        self.link = Link(MqttConfig(port=port), f"fake-verifier-{fleet}", self.on)
        self.link.subscribe(f"specedge/v1/{fleet}/{device}/#")
        self.link.start()
        time.sleep(0.2)  # let the subscription land

    def on(self, topic: str, payload: bytes) -> None:
        if topic == self.down:
            return
        self.topics.append(topic)
        for reply in self.answer(wire.decode(payload)):
            self.link.publish(self.down, wire.encode(reply))

    def stop(self) -> None:
        self.link.stop()


def opened(msg, replica: str = "good") -> list:
    return [wire.Opened(msg.session, msg.seq, replica, "fake")]


def accept_all(msg, token: int = TOKEN) -> list:
    """An honest-looking verifier: every drafted token holds, then `token`."""
    if isinstance(msg, wire.Open):
        return opened(msg)
    if isinstance(msg, wire.Draft):
        return [wire.Verdict(msg.session, msg.seq, msg.committed, len(msg.tokens), token, text_hash=msg.text_hash)]
    return []


@pytest.fixture
def device(tiny_models, mosquitto):
    """make(answer) -> (an agent of its own fleet, its fake verifier answering with `answer`); a round
    left unanswered fails the request after about two seconds."""
    draft, tok, _, _ = tiny_models
    made = []

    def make(answer, protocol: str = "auto"):
        fleet = f"dh-{next(FLEETS)}"  # a fleet of its own: nothing else answers it
        fake = FakeVerifier(mosquitto.port, fleet, "d", answer)
        cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": "d"},
                                   "mqtt": {"port": mosquitto.port, "protocol": protocol},
                                   "energy": {"meter": "estimated"},
                                   "faults": {"round_timeout_s": 1.0, "max_retries": 1, "max_wait_s": 10.0,
                                              "on_verifier_loss": "fail"}}, env={})
        agent = Agent(cfg, TorchDraftEngine(draft), tok).start()
        made.append((agent, fake))
        return agent, fake

    yield make
    for agent, fake in made:
        agent.stop()
        fake.stop()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def generate(agent, tok, policy: str = "fixed:2", max_new: int = 8):
    return agent.generate(tok.encode_chat("hello"), SamplingParams(), max_new, parse_policy(policy))


# -- 1. range checks on what the verifier sends ----------------------------------------------------
@pytest.mark.parametrize("replica", ["a/b", "#", "+", "", "a\x00b", "caf\u00e9", "a b", ".."])
def test_a_replica_name_that_is_no_plain_topic_level_is_dropped_and_never_published_to(device, tiny_models,
                                                                                       replica):
    """OPENED names the replica the device then publishes to: `#`, `+`, `/` (or anything but
    [A-Za-z0-9_-]; the wire bounds names to 64 bytes) must not steer the device's drafts elsewhere."""
    def answer(msg):
        if isinstance(msg, wire.Open):  # the bad name first: it must not bind the session
            return [wire.Opened(msg.session, msg.seq, replica, "fake"), *opened(msg)]
        return accept_all(msg)

    agent, fake = device(answer)
    result = generate(agent, tiny_models[1])
    assert result.tokens[-1] == TOKEN and result.stats.replica == "good"
    up = agent.up_topic
    assert set(fake.topics) <= {up, f"{up}/good"}, fake.topics
    assert agent.decode_errors.get("bad_replica", 0) >= 1


def test_a_verdict_token_outside_the_vocabulary_is_dropped_as_a_protocol_error(device, tiny_models):
    vocab = tiny_models[0].cfg.vocab_size

    def answer(msg):
        if isinstance(msg, wire.Draft):  # a forged verdict first, then the real one
            return accept_all(msg, token=vocab + 5) + accept_all(msg) + accept_all(msg, token=wire.MAX_TOKEN_ID)
        return accept_all(msg)

    agent, _ = device(answer)
    result = generate(agent, tiny_models[1])
    assert all(0 <= t < vocab for t in result.tokens) and TOKEN in result.tokens
    assert agent.decode_errors.get("token_out_of_range", 0) >= 1


def test_streamed_tokens_outside_the_vocabulary_are_dropped_as_a_protocol_error(device, tiny_models):
    vocab = tiny_models[0].cfg.vocab_size

    def answer(msg):
        if isinstance(msg, wire.Generate):
            bad = wire.Tokens(msg.session, msg.seq, msg.committed, [TOKEN, vocab], True)
            good = wire.Tokens(msg.session, msg.seq, msg.committed, [TOKEN] * msg.max_new_tokens, True)
            return [bad, good]
        return accept_all(msg)

    agent, _ = device(answer)
    result = generate(agent, tiny_models[1], "cloud-ar", max_new=5)
    assert result.tokens == [TOKEN] * 5
    assert agent.decode_errors.get("token_out_of_range", 0) >= 1


@pytest.mark.parametrize("stall", ["empty", "gap", "duplicates"])
def test_a_cloud_ar_stream_that_never_advances_fails_after_a_bound(device, tiny_models, stall):
    """Answers that add no token (empty, always past what the device holds, or repeats of what it
    has) end the request with a clear error instead of asking again forever."""
    def answer(msg):
        if not isinstance(msg, wire.Generate):
            return accept_all(msg)
        start = {"empty": msg.committed, "gap": msg.committed + 1, "duplicates": msg.committed - 1}[stall]
        tokens = [] if stall == "empty" else [TOKEN]
        return [wire.Tokens(msg.session, msg.seq, start, tokens, stall != "duplicates")] * (
            1 if stall != "duplicates" else MAX_STALLED + 1)

    agent, fake = device(answer)
    outcome: queue.Queue = queue.Queue()
    worker = threading.Thread(target=lambda: outcome.put(_catch(generate, agent, tiny_models[1], "cloud-ar")),
                              daemon=True)
    worker.start()
    try:
        err = outcome.get(timeout=30)
    finally:
        fake.stop()  # the device's rounds go unanswered from here on: a looping request ends too
    assert isinstance(err, RequestFailed) and "no token" in str(err), err


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def test_the_verdict_inbox_is_bounded_under_a_flood(device, tiny_models, mosquitto):
    """A flood on the verdict topic while the device is idle (nobody reads the inbox) is dropped
    past MAX_INBOX and counted, not queued without end; the next request still works."""
    agent, _ = device(accept_all)
    flood = Link(MqttConfig(port=mosquitto.port), "flooder", lambda *_: None).start()
    try:
        sent = 2 * MAX_INBOX + 10
        for i in range(sent):
            flood.publish(agent.down_topic, b"junk %d" % i)
        wait_for(lambda: agent.inbox.qsize() + agent.decode_errors.get("inbox_full", 0) >= sent)
        assert agent.inbox.qsize() <= MAX_INBOX
    finally:
        flood.stop()
    assert generate(agent, tiny_models[1]).tokens[-1] == TOKEN


def test_the_broker_never_sends_the_device_a_packet_larger_than_a_legal_message(device, mosquitto):
    """MQTT 5 Maximum-Packet-Size on CONNECT: Mosquitto drops what the device could not take."""
    agent, _ = device(accept_all, protocol="5")
    assert agent.status().protocol == "5"
    sender = Link(MqttConfig(port=mosquitto.port, protocol="5"), "big-sender", lambda *_: None).start()
    try:
        sender.publish(agent.down_topic, b"x" * (wire.MAX_PAYLOAD + 8192))
        sender.publish(agent.down_topic, b"marker")
        wait_for(lambda: b"marker" in list(agent.inbox.queue))
        assert all(len(p) <= wire.MAX_PAYLOAD for p in agent.inbox.queue if p)
    finally:
        sender.stop()


# -- 2. deeply nested JSON -----------------------------------------------------------------------
def test_nested_json_on_a_replica_status_topic_is_counted_and_the_link_lives_on(device, mosquitto):
    """The status is parsed in paho's network thread: a RecursionError there would end the thread
    and with it every message the device gets."""
    agent, _ = device(accept_all)
    sender = Link(MqttConfig(port=mosquitto.port), "nested-status", lambda *_: None).start()
    try:
        sender.publish(topics.replica("nested-test", "status"), NESTED)
        sender.publish(topics.replica("nested-test-2", "status"), b'{"state": "offline"}')
        wait_for(lambda: "nested-test-2" in agent.offline_replicas)
        assert agent.decode_errors.get("replica_status", 0) >= 1
    finally:
        sender.stop()


@pytest.fixture(scope="module")
def node(tiny_models, mosquitto):
    """A device node (fleet, local API) and a real verifier on fleet `dh-node`."""
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.device.node import DeviceNode

    draft, tok, target, target_tok = tiny_models
    cloud = build(CloudConfig, {"mqtt": {"port": mosquitto.port},
                                "verifier": {"id": "v-dh-node", "fleet": "dh-node", "group": "dh-node"}})
    verifier = Verifier(cloud, Target.in_memory("tiny", target, target_tok)).start()
    cfg = build(DeviceConfig, {"device": {"id": "n1", "fleet": "dh-node"}, "mqtt": {"port": mosquitto.port},
                               "energy": {"meter": "estimated"}, "api": {"http_port": -1}}, env={})
    n = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    yield n, verifier
    n.stop()
    verifier.stop()


def test_status_reports_the_nodes_link_and_its_byte_counters(node, tiny_models):
    """The node makes the one MQTT link and hands it to the agent and the fleet member; the agent's
    status() snapshot reads that link: its protocol, its connection, every byte of a request."""
    n, _ = node
    assert n.fleet.link is n.link and n.link.connected.wait(10)
    before = n.service.agent.status()
    assert before.connected and before.protocol == n.link.protocol and before.protocol in ("5", "3.1.1")
    result = n.service.agent.generate(tiny_models[1].encode_chat("hello"), SamplingParams(), 6,
                                      parse_policy("fixed:2"))
    after = n.service.agent.status()
    assert after.bytes_sent > before.bytes_sent and after.bytes_received > before.bytes_received
    # The request's own bytes, counted on the link; the fleet member may publish on it meanwhile.
    grown = after.bytes_sent + after.bytes_received - before.bytes_sent - before.bytes_received
    assert 0 < result.stats.wire_bytes <= grown
    assert n.link.bytes_sent >= after.bytes_sent and after.energy_j > before.energy_j
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.connected = False


@pytest.fixture
def operator(mosquitto):
    got: queue.Queue = queue.Queue()
    link = Link(MqttConfig(port=mosquitto.port, protocol="5"), f"op-{time.monotonic_ns()}",
                lambda t, p: got.put((t, p))).start()
    link.got = got
    yield link
    link.stop()


def test_a_nested_json_command_is_answered_as_malformed(node, operator):
    reply = "specedge/v1/dh-node/n1/reply/tester"
    operator.subscribe(reply)
    time.sleep(0.2)
    operator.publish("specedge/v1/dh-node/n1/cmd", NESTED, reply_to=ReplyTo(reply, b"q"))
    topic, payload = operator.got.get(timeout=10)
    answer = json.loads(payload)
    assert topic == reply and answer["ok"] is False and "malformed command" in answer["error"], answer
    assert "nested" in answer["error"]


def test_a_nested_json_desired_config_is_rejected_in_the_acknowledgement(node, operator):
    acks = "specedge/v1/dh-node/n1/config/applied"
    operator.subscribe(acks)
    time.sleep(0.2)
    while not operator.got.empty():
        operator.got.get()
    operator.publish("specedge/v1/dh-node/n1/config", NESTED, retain=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            topic, payload = operator.got.get(timeout=max(deadline - time.monotonic(), 0.01))
            ack = json.loads(payload)
            if topic == acks and "device" in ack.get("rejected", {}):
                break
        assert "nested" in ack["rejected"]["device"], ack
    finally:
        operator.publish("specedge/v1/dh-node/n1/config", b"", retain=True)


def test_a_nested_json_targets_announcement_is_refused_by_verifier_and_device(node, operator, caplog):
    n, verifier = node
    before = dict(verifier.errors)
    try:
        operator.publish("specedge/v1/dh-node/targets", NESTED, retain=True)
        wait_for(lambda: verifier.errors.get("bad_announcement", 0) > before.get("bad_announcement", 0)
                 or verifier.errors.get("internal", 0) > before.get("internal", 0))
        wait_for(lambda: any("targets" in r.getMessage() for r in caplog.records if r.name == "specedge.fleet"))
    finally:
        operator.publish("specedge/v1/dh-node/targets", b"", retain=True)
    assert verifier.errors.get("internal", 0) == before.get("internal", 0)
    fleet_logs = [r for r in caplog.records if r.name == "specedge.fleet"]
    assert all(r.exc_info is None for r in fleet_logs)
    assert any("ignored the fleet's targets announcement" in r.getMessage() and "nested" in r.getMessage()
               for r in fleet_logs)


# -- 3. the stop-string scan -----------------------------------------------------------------------
def scan_as_it_was(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[tuple[str, bool]], str]:
    """Job.on_tokens' hold-back before issue 20 (quadratic in the held text): the reference."""
    held, out = "", []
    for piece in pieces:
        text = held + piece
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            out.append((text[:cut], True))
            return out, ""
        hold = max(len(s) for s in stops) - 1
        keep = next((k for k in range(min(hold, len(text)), 0, -1) if any(s.startswith(text[-k:]) for s in stops)),
                    0)
        text, held = text[:len(text) - keep], text[len(text) - keep:]
        out.append((text, False))
    return out, held


def scan_now(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[tuple[str, bool]], str]:
    from specedge.device.service import StopScan

    scan, out = StopScan(stops), []
    for piece in pieces:
        out.append(scan.push(piece))
        if out[-1][1]:
            break
    return out, scan.held


def test_the_stop_scan_passes_on_and_holds_back_exactly_what_it_did_before():
    """Random stop strings over a two-letter alphabet (overlaps, repeats, one inside another) and
    random text cut into random pieces, empty ones too: the same text passed on piece by piece,
    the same stop, the same text held back."""
    import random

    rng = random.Random(20)
    word = lambda lo, hi: "".join(rng.choice("ab") for _ in range(rng.randint(lo, hi)))
    stopped = 0
    for _ in range(4000):
        stops = tuple(word(1, 6) for _ in range(rng.randint(1, 4)))
        text = word(0, 40)
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert scan_now(stops, pieces) == scan_as_it_was(stops, pieces), (stops, pieces)
        stopped += scan_now(stops, pieces)[0][-1][1] if pieces else 0
    assert 1000 < stopped < 3900  # both kinds of ending were exercised


def test_a_job_cuts_at_a_stop_string_across_tokens_and_holds_back_its_start(tiny_models):
    from specedge.device.service import Job, _StopStringHit

    tok = tiny_models[1]
    ids = tok.encode("def add(a, b):\n    return a + b\n")
    pieces = [tok.decode(ids[:i + 1])[len(tok.decode(ids[:i])):] for i in range(len(ids))]
    assert "".join(pieces) == "def add(a, b):\n    return a + b\n" and len(ids) > 10
    stops = ("):\n    ret", "zzz")
    job = Job([], SamplingParams(), 64, tok, stops)
    with pytest.raises(_StopStringHit):
        for token in ids:
            job.on_tokens([token], True)
    texts = []
    while not job._events.empty():
        texts.append(job._events.get()[1])
    want, _ = scan_as_it_was(stops, pieces)
    assert texts == [t for t, _ in want if t]
    assert "".join(texts) == "def add(a, b"


def test_the_stop_scan_is_linear_in_the_text_whatever_the_stop_strings_length():
    """A 100,000-character stop string that the text keeps almost matching (the worst case for
    re-scanning the held tail on every token): the matchers' moves stay within twice the
    characters fed per stop string, and the whole tail is held back until it cannot match."""
    from specedge.device.service import StopScan

    long_stop = "a" * 99_999 + "b"
    scan = StopScan((long_stop, "ab" * 50_000 + "c"))
    fed = 0
    for _ in range(2000):
        piece = "a" * 40
        passed, stopped = scan.push(piece)
        fed += len(piece)
        assert not stopped and passed == "" and len(scan.held) == fed
    passed, stopped = scan.push("x")
    fed += 1
    assert not stopped and passed == "a" * (fed - 1) + "x" and scan.held == ""
    assert scan.steps <= 2 * fed * len(scan.stops)


# -- 4. starting without a broker ------------------------------------------------------------------
def test_a_device_started_before_its_broker_answers_503_then_connects_and_serves(tiny_models):
    """systemd would restart a device that exits for want of a broker, re-hashing its model each
    time: it starts anyway, says broker_unreachable on /health, and connects when the broker comes."""
    from specedge.broker import MosquittoBroker, free_port
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.device.node import DeviceNode
    from test_fleet_secure import http

    draft, tok, target, target_tok = tiny_models
    port = free_port()  # nothing listens there yet
    cfg = build(DeviceConfig, {"device": {"id": "late", "fleet": "dh-late"}, "mqtt": {"port": port},
                               "energy": {"meter": "estimated"},
                               "api": {"http_port": 0, "local_mqtt_host": "127.0.0.1", "local_mqtt_port": port}},
                env={})
    node = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    broker = verifier = None
    try:
        status, body = http(node.http.port, "/health")
        assert status == 503 and json.loads(body)["status"] == "broker_unreachable"
        status, body = http(node.http.port, "/v1/completions", {"prompt": "def f():", "max_tokens": 4})
        assert status == 503 and json.loads(body)["error"]["code"] == "broker_unreachable"
        broker = MosquittoBroker(port=port).start()
        cloud = build(CloudConfig, {"mqtt": {"port": port},
                                    "verifier": {"id": "v-dh-late", "fleet": "dh-late", "group": "dh-late"}})
        verifier = Verifier(cloud, Target.in_memory("tiny", target, target_tok)).start()
        wait_for(lambda: http(node.http.port, "/health")[0] == 200, timeout=30)
        assert node.local.link.connected.wait(30)
        status, body = http(node.http.port, "/v1/completions", {"prompt": "def f():", "max_tokens": 4})
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] >= 1
    finally:
        node.stop()
        if verifier:
            verifier.stop()
        if broker:
            broker.stop()
