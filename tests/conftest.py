"""Shared fixtures: a real Mosquitto on a free port and tiny Qwen2 models written to GGUF."""
from __future__ import annotations

import pytest

from specedge.broker import MosquittoBroker
from specedge.loader import load_model
from specedge.tiny import write_pair


@pytest.fixture(scope="session")
def mosquitto():
    if MosquittoBroker.binary() is None:
        pytest.fail("mosquitto is not installed: `make test` installs it (apt-get install mosquitto)")
    broker = MosquittoBroker().start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("tiny"), seed=0, noise=0.15)


@pytest.fixture(scope="session")
def tiny_models(tiny_files):
    """(draft, tokenizer, target, tokenizer), loaded through the real GGUF loader."""
    draft_path, target_path = tiny_files
    draft, draft_tok = load_model(draft_path, dtype="bf16")
    target, target_tok = load_model(target_path, dtype="bf16", batch_invariant=True)
    return draft, draft_tok, target, target_tok


@pytest.fixture(scope="session")
def stack(tiny_models, mosquitto):
    from specedge.tools.demo import Stack

    from specedge.config import CloudConfig, build

    # Its own fleet only: other tests' verifiers and replica groups share this broker.
    s = Stack(*tiny_models, port=mosquitto.port, cloud_cfg=build(CloudConfig, {"verifier": {"fleet": "default"}}))
    yield s
    s.close()


@pytest.fixture
def fleet_verifier(tiny_models, mosquitto):
    """start(fleet, **verifier keys): a verifier on its own fleet (other tests' verifiers share the
    broker), stopped after the test."""
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, build

    started = []

    def start(fleet: str, **verifier):
        _, tok, target, _ = tiny_models
        cfg = build(CloudConfig, {"mqtt": {"port": mosquitto.port},
                                  "verifier": {"fleet": fleet, "id": f"v-{fleet}", "group": fleet, **verifier}})
        v = Verifier(cfg, Target.in_memory("tiny", target, tok)).start()
        started.append(v)
        return v
    yield start
    for v in started:
        v.stop()


def reference_greedy(model, prompt: list[int], max_new: int, stop_ids) -> list[int]:
    """The target's own greedy decoding, one position at a time, outside every service."""
    import torch

    cache = model.new_cache()
    model.forward(prompt[:-1], cache, last_only=True)
    last, out = prompt[-1], []
    for _ in range(max_new):
        token = int(torch.argmax(model.forward([last], cache)[-1]))
        if token in stop_ids:
            break
        out.append(token)
        last = token
    return out


def alone(engine, tokens):
    """Every position fed on its own, from a fresh cache: the engine's own decoding."""
    import torch

    cache = engine.new_cache()
    return torch.cat([engine.forward([t], cache) for t in tokens])


def speculation_is_the_engines_own_decoding(target, draft_and_tok, mosquitto, fleet: str, exact: bool) -> None:
    """Greedy fixed:4 speculation through a real verifier, device agent and broker against
    `target` (a loaded cloud.registry.Target) equals the engine's own one-at-a-time decoding.
    An exact engine gets no excuse; a numerical one may part only where its top two logits are
    within twice the self-test's measured gap. The verifier's status names the engine and class."""
    import json
    import threading

    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.device.agent import Agent
    from specedge.device.draft import TorchDraftEngine
    from specedge.device.policy import parse_policy
    from specedge.mqtt import Link
    from specedge.speculative import SamplingParams

    draft, tok = draft_and_tok
    statuses = []
    seen = threading.Event()
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "id": f"v-{fleet}", "fleet": fleet}}), target).start()
    agent = Agent(build(DeviceConfig, {"device": {"fleet": fleet, "id": "d"}, "mqtt": {
        "port": mosquitto.port}, "energy": {"meter": "estimated"}}), TorchDraftEngine(draft), tok).start()
    watcher = Link(build(CloudConfig, {"mqtt": {"port": mosquitto.port}}).mqtt, "status-watcher",
                   lambda topic, payload: (statuses.append(json.loads(payload)), seen.set()))
    watcher.subscribe(verifier.status_topic)
    watcher.start()
    try:
        engine = target.model
        gap = 0.0 if exact else 2 * engine.exactness.trials[0].max_abs_diff
        for text in ("write a loop", "sensor arm wheel"):
            prompt = tok.encode_chat(text)
            got = agent.generate(prompt, SamplingParams(), 40, parse_policy("fixed:4"))
            want = reference_greedy(engine, prompt, 40, tok.stop_ids)
            assert got.stats.accepted_tokens > 0
            assert got.stats.exact is exact
            diverged = next((i for i, (x, y) in enumerate(zip(got.tokens, want)) if x != y), None)
            if diverged is None:
                assert len(got.tokens) == len(want)
            else:
                logits = alone(engine, prompt + want[:diverged])[-1]
                top2 = logits.topk(2).values
                assert float(top2[0] - top2[1]) <= gap, f"position {diverged} is no near-tie"
        assert seen.wait(10)
        caps = statuses[-1]["capabilities"][target.spec.name]
        assert caps["engine"] == engine.engine
        assert caps["exactness"] == ("exact" if exact else "numerical")
        assert statuses[-1]["exact"][target.spec.name] is exact
    finally:
        watcher.stop()
        agent.stop()
        verifier.stop()


def mqtt_connects(port: int, ca=None, cert=None, key=None, wait: float = 3) -> bool:
    """Whether an MQTT 5 client (TLS with these files where `ca` is given) gets a successful
    CONNACK from the broker on `port` within `wait` seconds."""
    import ssl
    import threading
    import time

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    if ca is not None:
        c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None,
                  cert_reqs=ssl.CERT_REQUIRED)
    ok = threading.Event()
    c.on_connect = lambda client, userdata, flags, code, props: None if code.is_failure else ok.set()
    try:
        c.connect("localhost", port)
    except (ssl.SSLError, OSError):  # TLS 1.2 refuses in the handshake, TLS 1.3 on the first read
        return False
    c.loop_start()
    try:
        return ok.wait(wait)
    finally:
        c.loop_stop()
        c.disconnect()
