"""Shared fixtures: a real Mosquitto on a free port and tiny Qwen2 models written to GGUF; and the
two test layers (`unit`, `integration`), marked here so that a new test is classified without thought."""
from __future__ import annotations

import contextlib

import functools
import inspect
import queue
import re
import socket
import threading
import traceback
from pathlib import Path

import pytest

from specedge.broker import MosquittoBroker
from specedge.config import CloudConfig, build
from specedge.loader import load_model
from specedge.mqtt import Link
from specedge.protocol import topics, wire
from specedge.tiny import write_pair

# The two layers. A test is `integration` when its own source, a fixture it uses (directly or
# through other fixtures: item.fixturenames, plus fixture names given as parameters for
# request.getfixturevalue), or a function or class of this folder that any of those names, says one
# of the words below: it starts a broker or an MQTT link, a service (device node, verifier, agent,
# demo stack, local HTTP API), a socket or a server, a subprocess, or writes and loads model files
# (tiny_files, tiny_models: seconds each). Every other test is `unit`: no broker, no socket, under
# 30 s for all (`make test-unit`). I/O that only the product code does, out of sight of these
# sources, needs `@pytest.mark.integration` on the test; the guard below fails such a test loudly
# when it opens a socket. Tests marked `slow` or `gpu`, or already `unit`/`integration`, keep theirs.
_IO = re.compile("|".join((
    r"MosquittoBroker|mqtt_connects|\bLink\(",                                     # a broker, MQTT
    r"DeviceNode|\bVerifier\(|\bAgent\(|\bStack\(|LocalHttpApi|spawn_verifier",  # services
    r"\bsocket|HTTPServer|serve_forever|\.serve\(|free_port|urlopen",              # sockets, servers
    r"\bsubprocess\b|\bPopen\b",                                                  # subprocesses
    r"\bwrite_pair\b|\bwrite_gguf\b|\bload_model\b|\bload_named\b",             # model files
)))
_NAME = re.compile(r"\b[A-Za-z_]\w*\b")
_HERE = Path(__file__).resolve().parent


def _ours(obj) -> bool:
    try:
        return Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve().is_relative_to(_HERE)
    except (OSError, TypeError):
        return False


@functools.cache
def _does_io(func, _seen=frozenset()) -> bool:
    """Whether func (a test, fixture or helper of this folder) or a helper of this folder it names does I/O."""
    func = inspect.unwrap(func)
    if not _ours(func):
        return False  # pytest's own fixtures (tmp_path, capsys, monkeypatch...) and the product's code
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if _IO.search(source):
        return True
    names = getattr(func, "__globals__", None) or vars(inspect.getmodule(func) or object)
    helpers = [names[n] for n in set(_NAME.findall(source)) if n in names]
    return any((inspect.isfunction(h) or inspect.isclass(h)) and h not in _seen and _ours(h)
               and _does_io(h, _seen | {func}) for h in helpers)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(m) for m in ("slow", "gpu", "unit", "integration")):
            continue
        defs = item._fixtureinfo.name2fixturedefs
        names = set(item.fixturenames)
        names |= {v for v in getattr(getattr(item, "callspec", None), "params", {}).values() if isinstance(v, str)}
        funcs = [getattr(item, "function", None)]
        for name in names:
            funcs += [d.func for d in defs.get(name) or item.session._fixturemanager.getfixturedefs(name, item) or ()]
        io = any(f is not None and _does_io(f) for f in funcs)
        item.add_marker(pytest.mark.integration if io else pytest.mark.unit)


_BEFORE = pytest.StashKey[set]()


class _NoIO:
    """While a unit test sets up and runs, socket connect and bind raise, and the test fails even
    where the code under test swallows the error. Threads that were running before (an integration
    fixture's MQTT loop, kept for the session) are left alone. Subprocesses are not refused: the
    standard library starts some of its own (platform.processor, ctypes.util.find_library)."""

    def __init__(self, item):
        self.item, self.seen, self.saved = item, [], {}
        if _BEFORE not in item.stash:  # at setup: the threads of this test's fixtures are no excuse later
            item.stash[_BEFORE] = set(threading.enumerate()) - {threading.current_thread()}
        self.before = item.stash[_BEFORE]

    def _refuse(self, what, original):
        def refused(*args, **kwargs):
            if threading.current_thread() in self.before:
                return original(*args, **kwargs)
            self.seen.append(f"{what}, from\n{''.join(traceback.format_stack(limit=16)[:-1])}")
            raise OSError(f"{what} in a unit test: its I/O belongs to an integration test (tests/conftest.py)")
        return refused

    def __enter__(self):
        for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket.socket, "bind")):
            self.saved[owner, name] = owner.__dict__.get(name)
            setattr(owner, name, self._refuse(f"{owner.__module__}.{owner.__name__}.{name}", getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self.saved.items():
            if original is None:
                delattr(owner, name)  # inherited (socket.socket's from _socket.socket)
            else:
                setattr(owner, name, original)
        if self.seen:
            pytest.fail(f"{self.item.nodeid} is marked unit (tests/conftest.py) but its I/O belongs in a fixture, "
                        f"or it needs @pytest.mark.integration: it called {self.seen[0]}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A unit test's set-up and its call (the same guard) run with socket I/O refused."""
    if item.get_closest_marker("unit") is None:
        return (yield)
    with _NoIO(item):
        return (yield)


pytest_runtest_call = pytest_runtest_setup


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


@contextlib.contextmanager
def device_node(tiny_models, port: int, fleet: str, device: dict):
    """A verifier of its own `fleet` (other tests' verifiers share the broker) and a device node on
    it, the tiny pair's draft on torch: `device` is the device config past its fleet, broker and
    estimated meter (an HTTP port: "api": {"http_port": 0})."""
    from specedge.cloud.registry import Target
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.device.draft import TorchDraftEngine
    from specedge.device.node import DeviceNode

    draft, tok, target, target_tok = tiny_models
    verifier = Verifier(build(CloudConfig, {"mqtt": {"port": port}, "verifier": {
        "id": f"v-{fleet}", "fleet": fleet, "group": fleet}}), Target.in_memory("tiny", target, target_tok)).start()
    cfg = build(DeviceConfig, {**device, "device": {**device.get("device", {}), "fleet": fleet},
                               "mqtt": {"port": port}, "energy": {"meter": "estimated"}})
    node = DeviceNode(cfg, TorchDraftEngine(draft), tok).start()
    try:
        yield node
    finally:
        node.stop()
        verifier.stop()


def reference_greedy(model, prompt: list[int], max_new: int, stop_ids) -> list[int]:
    """The target's own greedy generation (the prompt in its prompt calls, then one position at a
    time), outside every service."""
    from specedge.cloud.engine import own_generation

    return own_generation(model, [prompt], max_new, stop_ids)[0]


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
    from specedge.cloud.engine import own_rows
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
                logits = own_rows(engine, prompt + want[:diverged], len(prompt))[-1]
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


class Wire:
    """A bare MQTT client that speaks the wire to a verifier as devices of `fleet` would."""

    def __init__(self, port: int, fleet: str, devices: tuple[str, ...] = (topics.ANY,)):
        """`devices`: whose answers it listens to (default: every device's of the fleet)."""
        self.fleet = fleet
        self.replies: queue.Queue = queue.Queue()
        name = f"wire-{fleet}-{'-'.join(devices).replace('+', 'all')}"
        self.link = Link(build(CloudConfig, {"mqtt": {"port": port}}).mqtt, name, self._on)
        for device in devices:
            self.link.subscribe(topics.answers(fleet, device))
        self.link.start()

    def _on(self, topic: str, payload: bytes) -> None:
        self.replies.put((topics.parse_answers(topic)[1], wire.decode(payload)))

    def send(self, device: str, msg) -> None:
        self.link.publish(topics.device(self.fleet, device, "draft"), wire.encode(msg))

    def ask(self, device: str, msg, timeout: float = 60):
        """Send `msg` and return the reply to it (skipping others' replies and hints)."""
        self.send(device, msg)
        return self.answer(device, msg.session, timeout)

    def answer(self, device: str, session: int | None = None, timeout: float = 60):
        """The next reply to `device` (of `session`, if given), hints and others' replies skipped."""
        while True:
            who, reply = self.replies.get(timeout=timeout)
            if who == device and session in (None, reply.session) and not isinstance(reply, wire.Hint):
                return reply

    def stop(self) -> None:
        self.link.stop()


@pytest.fixture
def wire_client(mosquitto):
    made = []

    def make(fleet: str, devices: tuple[str, ...] = (topics.ANY,)) -> Wire:
        made.append(Wire(mosquitto.port, fleet, devices))
        return made[-1]
    yield make
    for w in made:
        w.stop()
