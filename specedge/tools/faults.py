"""`specedge faults`: real faults injected into real services; every trial proves nothing was lost.

A trial starts its own Mosquitto, verifier processes (`specedge cloud run`) and a
device agent in this process (through the channel emulator where the fault is
the link's), injects one fault at a random round of a greedy generation, and checks:
  - the output is the target's own greedy decoding, or the request failed with the
    documented error (VerifierUnavailable / BrokerUnreachable) and what it had
    committed is a prefix of that decoding, or (the `draft` policy) the text up to
    the first unverified token is, and the unverified spans are marked;
  - the streamed tokens are exactly the returned ones: none lost, none twice;
  - the request ended inside its bound, every process it started exits when asked,
    the surviving verifier holds no session afterwards, and the agent's threads and
    file descriptors are back where they were.
Models are tiny ones written for the run (the fault handling does not depend on them);
`--pair real` runs the default Qwen pair instead, its target on llama.cpp, where a fault's
speed on the real models is the question (hostile-device).
"""
from __future__ import annotations

import contextlib
import gc
import heapq
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from specedge.protocol import wire
from specedge.tools.bench import _read_json, _split_cores, _stop, pinned_here, spawn_verifier
from specedge.tools.bench_verifier import target_decode
from specedge.broker import MosquittoBroker
from specedge.tools.channel import ChannelConfig, ChannelEmulator, LinkSpec
from specedge.config import DeviceConfig, MqttConfig, build
from specedge.mqtt import Link
from specedge.protocol import topics
from specedge.tools.soak import proc_stats

FLEET = "faults"
# Prompts the tiny target answers at length (30-40 tokens), so every fault lands mid-generation.
PROMPTS = ["robot go to the mat", "hello", "say hi to the user", "turn on the light", "go home"]
MAX_NEW = 40
# The speed check's request: the tiny target's answer to it runs past 300 tokens.
SPEED_PROMPT, SPEED_TOKENS, SPEED_REPEATS = "list every color", 200, 3
REAL_SPEED_TOKENS = 48  # the real pair on a CPU: a few tokens a second
LONG_STRING = 4096  # tokens of the hostile device's string under a grammar
DEVICE_FAULTS = dict(round_timeout_s=1.0, max_retries=2, max_wait_s=40.0)


@dataclass
class Fault:
    name: str
    doc: str
    inject: Callable  # (rig, rng) -> None, run just before the chosen round's draft
    expect: str = "exact"  # exact | failed | unverified
    replicas: int = 1
    persistence: bool = False
    channel: bool = False
    faults: dict = field(default_factory=dict)  # the device's [faults] for this trial
    chaos: Callable | None = None  # (rig, rng) -> a client that misbehaves for the whole trial
    # With chaos: a request's tokens/s must be at least this share of the same request's without
    # it (_check_speed). None: not measured.
    slowdown: float | None = None


@dataclass
class Pair:
    """The models of a run: their files, the draft and tokenizer the device loads, the target the
    reference decoding runs on, and the [target] keys the replicas load it with."""
    files: tuple[Path, Path]
    draft: object
    tok: object
    target: object
    target_keys: str
    speed_tokens: int = SPEED_TOKENS
    faults: dict = field(default_factory=dict)  # the device's [faults] beyond DEVICE_FAULTS
    start_s: float = 60.0  # how long a replica may take to load the target and self-test it
    # How long the replicas may take to show only the device's kept session once its request
    # ended: a real pass on one CPU core runs for seconds, and the statistics wait for it.
    settle_s: float = 5.0


def tiny_pair(folder: Path) -> Pair:
    """Tiny models written for the run: the fault handling does not depend on them."""
    from specedge.loader import load_model
    from specedge.tiny import write_pair

    files = write_pair(folder / "models", seed=0, noise=0.3)
    draft, tok = load_model(files[0], dtype="bf16")
    target, _ = load_model(files[1], dtype="bf16", batch_invariant=True)
    return Pair(files, draft, tok, target, 'engine = "torch"\nweights = "bf16"\n')


def real_pair() -> Pair:
    """The default Qwen pair as a fleet runs it: the target on llama.cpp (its own decoding the
    reference), the draft int8 on torch; a speed request of REAL_SPEED_TOKENS, this being a CPU."""
    from specedge.cloud.registry import load_target, registry_for
    from specedge.config import TargetConfig
    from specedge.exactness import establish
    from specedge.fetch import DEFAULT_DRAFT, DEFAULT_TARGET, resolve
    from specedge.loader import load_named

    draft, tok = load_named(DEFAULT_DRAFT, "int8")
    specs, default = registry_for(TargetConfig(model=DEFAULT_TARGET, engine="llama.cpp"))
    target = load_target(specs[default]).model
    establish(target)
    files = (resolve(DEFAULT_DRAFT)[0], resolve(DEFAULT_TARGET)[0])
    # A round of the real pair on a CPU takes seconds (a prompt's prefill more): the device waits
    # as long as it would by default, not DEVICE_FAULTS' second.
    return Pair(files, draft, tok, target, 'engine = "llama.cpp"\n', REAL_SPEED_TOKENS,
                {"round_timeout_s": 30.0, "max_wait_s": 300.0}, start_s=600.0, settle_s=60.0)


class Rig:
    """What one trial runs: broker, replicas, optional channel emulator, the agent."""

    def __init__(self, folder: Path, pair: Pair, fault: Fault, trial: int, cores: list[int] = ()):
        """`cores`: the replicas' (run_suite's pinning), none: unpinned."""
        from specedge.device.agent import Agent
        from specedge.device.draft import TorchDraftEngine

        self.folder, self.pair, self.fault, self.trial, self.cores = folder, pair, fault, trial, list(cores)
        folder.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, object] = {}
        self.hung: list[str] = []
        self.later: list[threading.Thread] = []  # faults still playing out (a replica restarting)
        self.broker = MosquittoBroker(persistence=fault.persistence).start()
        self.channel = None
        self.clients: list = []
        try:
            self.start_replicas([f"r{i}" for i in range(fault.replicas)])
            port = self.broker.port
            if fault.channel:
                self.channel = ChannelEmulator(ChannelConfig(), ("127.0.0.1", port)).start()
                port = self.channel.port
            cfg = build(DeviceConfig, {"device": {"id": f"dev{trial}", "fleet": FLEET},
                                       "mqtt": {"port": port, "protocol": "5", "keepalive_s": 5},
                                       "faults": {**DEVICE_FAULTS, **pair.faults, **fault.faults}})
            self.agent = Agent(cfg, TorchDraftEngine(pair.draft, cfg.draft.q_top_k, cfg.draft.q_top_p),
                               pair.tok).start()
        except BaseException:
            self.close()
            raise

    def mqtt(self) -> MqttConfig:
        return MqttConfig(port=self.broker.port, protocol="5")

    def start_replicas(self, names: list[str]) -> None:
        started = []
        for name in names:
            cfg = self.folder / f"{name}.toml"
            cfg.write_text(f'[verifier]\nid = "{name}-{self.trial}"\nfleet = "{FLEET}"\ngroup = "{FLEET}"\n'
                           f'stats_interval_s = 0.3\n[mqtt]\nport = {self.broker.port}\nprotocol = "5"\n'
                           f'keepalive_s = 5\n[target]\nmodel = "{self.pair.files[1]}"\n'
                           # the reference decoding's product block: replicas compute with it too
                           f'{self.pair.target_keys}block = {self.pair.target.block}\n')
            proc = spawn_verifier(cfg, self.folder / f"{name}.log", cores=self.cores)
            self.procs[f"{name}-{self.trial}"] = proc
            started.append(proc)
        for proc in started:
            _read_json(proc, "a verifier replica", self.pair.start_s)

    def kill_replica(self) -> str:
        """kill -9 the replica holding the session (or the first one alive)."""
        name = self.agent.current.rounds.replica or next(n for n, p in self.procs.items() if p.poll() is None)
        self.procs[name].kill()
        self.procs[name].wait()
        return name

    def alive_replicas(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def replica_sessions(self, expected: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
        """Sessions each live replica holds, from its statistics topic, once they are `expected`
        (replica -> sessions; none elsewhere) or `timeout` has passed."""
        latest: dict[str, int] = {}
        alive = set(self.alive_replicas())

        def on(topic, payload):
            try:
                stats = json.loads(payload)
                latest[stats["replica"]] = int(stats["sessions"])
            except (ValueError, KeyError, TypeError):
                pass
        link = Link(self.mqtt(), f"faults-watch-{self.trial}", on)
        link.subscribe(topics.replica(topics.ANY, "stats"))
        link.start()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if alive <= set(latest) and all(latest.get(n) == expected.get(n, 0) for n in alive):
                    break
                latest.clear()
                time.sleep(0.7)  # a fresh statistics message from each replica
        finally:
            link.stop()
        return {n: latest.get(n, -1) for n in alive}

    def close(self) -> None:
        for thread in self.later:
            thread.join(timeout=60)
        if getattr(self, "agent", None) is not None:
            self.agent.stop()
        for client in self.clients:
            client.stop()
        if self.channel is not None:
            self.channel.stop()
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except Exception:  # TimeoutExpired: hung on the way out
                    self.hung.append(name)
                    _stop(proc)
            if proc.stdout:
                proc.stdout.close()
            if proc.stdin:
                proc.stdin.close()
        self.broker.stop()


# -- misbehaving clients -----------------------------------------------------------------------
class Echo:
    """Duplicates every verdict-topic message 1-2 times with random delays up to `max_delay_s`:
    duplicated, delayed and (the delay outlasting later rounds) reordered verdicts."""

    def __init__(self, rig: Rig, rng: random.Random, max_delay_s: float = 1.2):
        self.rng, self.max_delay_s = rng, max_delay_s
        self.topic = rig.agent.down_topic
        self.seen: set[bytes] = set()  # our own copies come back on the topic: echo each payload once
        self.heap: list = []
        self.wake = threading.Condition()
        self.copies = 0
        self.link = Link(rig.mqtt(), f"faults-echo-{rig.trial}", self.on)
        self.link.subscribe(self.topic)
        self.link.start()
        self._stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def on(self, topic, payload):
        if payload in self.seen:
            return
        self.seen.add(payload)
        with self.wake:
            for _ in range(self.rng.randint(1, 2)):
                heapq.heappush(self.heap, (time.monotonic() + self.rng.uniform(0, self.max_delay_s), payload))
            self.wake.notify()

    def run(self):
        while True:
            with self.wake:
                while not self._stop and (not self.heap or self.heap[0][0] > time.monotonic()):
                    self.wake.wait(timeout=max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else None)
                if self._stop:
                    return
                _, payload = heapq.heappop(self.heap)
            self.link.publish(self.topic, payload)
            self.copies += 1

    def stop(self):
        with self.wake:
            self._stop = True
            self.wake.notify()
        self.thread.join(timeout=5)
        self.link.stop()


class Rogue:
    """A broken replica: answers every message of the device with verdicts for another session,
    for the previous and the next round, a refusal for a round not asked, and claims the session
    moved to another target version, all in the name of a replica that does not hold it."""

    def __init__(self, rig: Rig, rng: random.Random):
        self.rng = rng
        self.down = rig.agent.down_topic
        self.forged = 0
        self.link = Link(rig.mqtt(), f"faults-rogue-{rig.trial}", self.on)
        self.link.subscribe(topics.device(FLEET, rig.agent.cfg.device.id, "draft/#"))
        self.link.start()

    def on(self, topic, payload):
        try:
            msg = wire.decode(payload)
        except wire.WireError:
            return
        s, n = msg.session, getattr(msg, "committed", 0)
        q = max(msg.seq, 1)  # round numbers around it stay in range
        token = self.rng.randrange(1, 50)
        forged = [wire.Verdict(s ^ 1, q, n, 0, token), wire.Verdict(s, q - 1, n, 0, token),
                  wire.Verdict(s, q + 1, n, 0, token), wire.Error(s, q + 2, wire.ErrorCode.INCOMPATIBLE, "forged"),
                  wire.Opened(s, q + 3, "rogue", "wrong-version")]
        if not isinstance(msg, wire.Open):  # a replica that is not ours claims a version switch
            forged.append(wire.Opened(s, q, "rogue", "wrong-version"))
        for m in forged:
            self.link.publish(self.down, wire.encode(m))
            self.forged += 1

    def stop(self):
        self.link.stop()


class Hostile:
    """A device of the trial's fleet that attacks the verifier it shares with the trial's device
    (docs/security.md, "The shared pass"), a round of attacks every `every_s`, never listening
    to an answer: a sampled DRAFT whose q names a token past the vocabulary; a GENERATE to the
    context's end that it walks away from at once, flooded with stale DRAFTs; an OPEN whose text
    is a long string under a large repetition bound (what spent llguidance's lexer budget in the
    review behind issue 34). It is a process of its own, as another device is a machine of its
    own, and runs at the lowest CPU priority: sharing this host, its own sending would otherwise
    take the trial device's interpreter lock or cores from it, which no verifier could prevent.
    What it costs the broker and the verifier is the attack."""

    SCHEMA = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}, "required": ["s"]}
    ATTACKS = ("q", "stream", "flood", "grammar")  # all of them; a subset weighs them one by one

    def __init__(self, rig: Rig, rng: random.Random, every_s: float = 0.3, flood: int = 300,
                 attacks: tuple[str, ...] = ATTACKS):
        import subprocess

        from specedge import grammar

        tok, cfg = rig.agent.tokenizer, rig.agent.engine.model.cfg  # the pair shares its shape
        prompt = tok.encode_chat("tell me everything")
        # the review's ~3,300 tokens of string (up to the context; the tiny pair's is 2,048)
        size = min(cfg.max_seq_len, LONG_STRING)
        filler = "".join(chr(0x4e00 + (i * 7919) % 20000) for i in range(size))
        text = grammar.json_schema(self.SCHEMA)
        plan = {"port": rig.broker.port, "client": f"faults-hostile-{rig.trial}",
                "topic": topics.device(FLEET, f"hostile{rig.trial}", "draft"), "vocab": cfg.vocab_size,
                "context": cfg.max_seq_len, "prompt": prompt,
                "long": prompt + tok.encode('{"s": "' + filler)[:size - len(prompt) - 2],
                "grammar": text, "grammar_hash": grammar.grammar_hash(text).hex(), "every_s": every_s,
                "flood": flood, "attacks": list(attacks), "seed": rng.randrange(2**32)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from specedge.tools.faults import hostile_main; "
                                      "hostile_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(plan) + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()  # "attacking": connected, the first round of attacks sent

    def stop(self) -> None:
        """It leaves as devices do (a CLOSE for each session): the trial counts the sessions left."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def hostile_main() -> None:
    """The hostile device's process (Hostile): its plan on stdin as one JSON line, attacks until
    stdin closes, then a CLOSE for each of its sessions."""
    import numpy as np

    from specedge.speculative import Q_ONE, SamplingParams, SparseDist

    os.nice(19)  # another machine's CPU: the host's spare time, not the trial device's (Hostile)
    plan = json.loads(sys.stdin.readline())
    rng, topic, every_s, flood = random.Random(plan["seed"]), plan["topic"], plan["every_s"], plan["flood"]
    prompt, attacks = plan["prompt"], set(plan["attacks"])
    n, h = len(prompt), wire.text_hash(prompt)
    grammar_hash = bytes.fromhex(plan["grammar_hash"])
    link = Link(MqttConfig(port=plan["port"], protocol="5"), plan["client"], lambda *_: None).start()
    seq = 0

    def send(msg) -> None:
        nonlocal seq
        seq += 1
        link.publish(topic, wire.encode(msg))

    def attack() -> None:
        nonlocal seq
        if "q" in attacks:
            half = np.array([Q_ONE // 2, Q_ONE - Q_ONE // 2], dtype=np.int64)
            outside = SparseDist(np.array([5, plan["vocab"] + rng.randrange(1, 1000)], dtype=np.uint32), half)
            send(wire.Open(1, seq + 1, prompt, SamplingParams(temperature=0.9, seed=1)))
            send(wire.Draft(1, seq + 1, n, [5], [outside], h))
        if "stream" in attacks:
            send(wire.Open(2, seq + 1, prompt))
            stream = seq + 1 + flood
            link.publish(topic, wire.encode(wire.Generate(2, stream, n, plan["context"] - n - 1, h)))
            if "flood" in attacks:
                stale = wire.encode(wire.Draft(2, stream - 1, n, [5], text_hash=h))
                for _ in range(flood):
                    link.publish(topic, stale)
            seq = stream
        if "grammar" in attacks:
            send(wire.Open(3, seq + 1, plan["long"], grammar_hash=grammar_hash, grammar=plan["grammar"],
                           grammar_from=n))

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    attack()
    print("attacking", flush=True)
    while not done.wait(every_s):
        try:
            attack()
        except Exception:  # the broker restarting under it, say: the attacker just goes on
            pass
    for session in (1, 2, 3):
        send(wire.Close(session, seq + 1))
    time.sleep(0.2)
    link.stop()


# -- the faults --------------------------------------------------------------------------------
def _later(rig: Rig, delay_s: float, fn) -> None:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), fn()), daemon=True)
    rig.later.append(thread)
    thread.start()


def _restart_broker(rig: Rig, rng: random.Random) -> None:
    rig.broker.restart(down_s=rng.uniform(0.0, 1.5))


def _kill_and_restart(rig: Rig, rng: random.Random) -> None:
    rig.kill_replica()
    _later(rig, rng.uniform(1.0, 3.0), lambda: rig.start_replicas(["r9"]))


def _blackout(seconds: float):
    def inject(rig: Rig, rng: random.Random) -> None:
        gone = LinkSpec(blackouts=[(0.0, seconds)])
        rig.channel.reconfigure(ChannelConfig(gone, gone, f"blackout {seconds:g}s"))
    return inject


def _flap(rig: Rig, rng: random.Random) -> None:
    outages = []
    t = 0.0
    for _ in range(6):  # six outages of 0.3-1.2 s, 0.5-1.5 s apart
        duration = rng.uniform(0.3, 1.2)
        outages.append((t, duration))
        t += duration + rng.uniform(0.5, 1.5)
    spec = LinkSpec(blackouts=outages)
    rig.channel.reconfigure(ChannelConfig(spec, spec, "flapping"))


def _nothing(rig: Rig, rng: random.Random) -> None:
    pass


def faults(blackout_s: float = 10.0) -> list[Fault]:
    return [
        Fault("broker-restart", "Mosquitto restarted mid-generation, no persistence", _restart_broker),
        Fault("broker-restart-persistent", "Mosquitto restarted mid-generation, persistence on", _restart_broker,
              persistence=True),
        Fault("broker-down-fail", "Mosquitto gone for good, on_broker_loss = fail",
              lambda rig, rng: rig.broker.stop_process(), expect="failed", faults={"on_broker_loss": "fail"}),
        Fault("verifier-kill-wait", "kill -9 of the only replica, a new one 1-3 s later (wait)", _kill_and_restart),
        Fault("verifier-kill-fail", "kill -9 of the only replica, on_verifier_loss = fail",
              lambda rig, rng: rig.kill_replica(), expect="failed", faults={"on_verifier_loss": "fail"}),
        Fault("verifier-kill-draft", "kill -9 of the only replica, draft alone (<= 6 tokens), a new one later",
              _kill_and_restart, expect="unverified",
              faults={"on_verifier_loss": "draft", "unverified_max_tokens": 6}),
        Fault("verifier-kill-failover", "kill -9 of the replica holding the session, two replicas",
              lambda rig, rng: rig.kill_replica(), replicas=2),
        Fault("blackout", f"the link carries nothing for {blackout_s:g} s (channel emulator)",
              _blackout(blackout_s), channel=True),
        Fault("flapping-link", "six outages of 0.3-1.2 s in a row (channel emulator)", _flap, channel=True),
        Fault("duplicated-reordered-verdicts", "every verdict delivered 2-3 times, copies up to 1.2 s late",
              _nothing, chaos=Echo),
        Fault("wrong-answers", "a broken replica answers for other sessions, rounds and target versions",
              _nothing, chaos=Rogue),
        Fault("hostile-device", "another device sends q past the vocabulary, stale-draft floods, long strings "
              "under a grammar and streams it walks away from; speed within 10 % of the run without it",
              _nothing, chaos=Hostile, slowdown=0.9),
    ]


# -- one trial ---------------------------------------------------------------------------------
@contextlib.contextmanager
def on_draft_call(engine, calls: set[int], action):
    """Run `action()` just before the engine's draft calls numbered in `calls` (1-based): a fault
    or an operator's move at a chosen point of a generation."""
    original, count = engine.draft, 0

    def draft(*args, **kwargs):
        nonlocal count
        count += 1
        if count in calls:
            action()
        return original(*args, **kwargs)
    engine.draft = draft
    try:
        yield
    finally:
        engine.draft = original


def _diverges(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_trial(fault: Fault, trial: int, seed: int, folder: Path, pair: Pair, speed: bool = True,
              cores: list[int] = ()) -> dict:
    """One trial: a fresh rig, one greedy generation with `fault` injected at a random round, then
    the output, the stream, the verifier's sessions and this process's resources checked; with
    `speed`, a fault's slowdown bound too (a benchmark's figure: `make test` leaves it out).
    `cores`: the replicas' (run_suite's pinning)."""
    rng = random.Random(f"{seed}-{fault.name}-{trial}")
    tok, target = pair.tok, pair.target
    prompt = tok.encode_chat(rng.choice(PROMPTS))
    reference = target_decode(target, [prompt], MAX_NEW, tok.stop_ids)[0]
    at_round = rng.randint(2, 4)
    gc.collect()
    before = (proc_stats(), threading.active_count(), time.monotonic())
    row = {"fault": fault.name, "trial": trial, "round": at_round, "problems": []}
    rig = Rig(folder / f"{fault.name}-{trial}", pair, fault, trial, cores)
    try:
        if fault.chaos:
            rig.clients.append(fault.chaos(rig, rng))
        generation = _generate_under_fault(rig, fault, rng, prompt, at_round)
        for client in rig.clients:  # the chaos lasts the request: a hostile device's sessions are not the trial's
            client.stop()
        rig.clients = []
        _check_generation(generation, fault, reference, rig, row)
        if speed and fault.slowdown is not None and generation.result is not None:
            _check_speed(rig, fault, rng, row)
    finally:
        rig.close()
    if rig.hung:
        row["problems"].append(f"processes hung on the way out: {rig.hung}")
    _check_leftovers(row, *before)
    row["passed"] = not row["problems"]
    return row


@dataclass
class Generation:
    """One request under a fault, as the app that asked for it saw it."""
    worker: threading.Thread
    bound_s: float  # how long the request was given
    hung: bool = False  # still running after bound_s
    streamed: list = field(default_factory=list)  # tokens as on_tokens delivered them
    flags: list = field(default_factory=list)  # per streamed token: verified or not
    result: object = None
    error: Exception | None = None  # RequestFailed: a documented failure
    crash: Exception | None = None  # anything else: a defect


def _generate_under_fault(rig: Rig, fault: Fault, rng: random.Random, prompt: list[int], at_round: int) -> Generation:
    """The agent generates on a worker thread (so a hung request is seen, not waited for) while
    `fault` is injected just before the draft of round `at_round`."""
    from specedge.device.request import RequestFailed
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams

    def on_tokens(tokens, verified):
        gen.streamed.extend(tokens)
        gen.flags.extend([verified] * len(tokens))

    def generate():
        try:
            gen.result = rig.agent.generate(prompt, SamplingParams(), MAX_NEW, parse_policy("fixed:3"), on_tokens)
        except RequestFailed as exc:
            gen.error = exc
        except Exception as exc:  # anything else is a defect the trial reports
            gen.crash = exc
    gen = Generation(threading.Thread(target=generate, daemon=True), {**DEVICE_FAULTS, **rig.pair.faults}["max_wait_s"] + 60)
    with on_draft_call(rig.agent.engine, {at_round}, lambda: fault.inject(rig, rng)):
        gen.worker.start()
        gen.worker.join(timeout=gen.bound_s)
    gen.hung = gen.worker.is_alive()
    return gen


def _timed(rig: Rig, prompt: list[int]) -> float:
    """Tokens/s of one greedy request of the pair's speed_tokens tokens."""
    from specedge.device.policy import parse_policy
    from specedge.speculative import SamplingParams

    t0 = time.monotonic()
    tokens = rig.agent.generate(prompt, SamplingParams(), rig.pair.speed_tokens, parse_policy("fixed:3")).tokens
    return len(tokens) / (time.monotonic() - t0)


def _check_speed(rig: Rig, fault: Fault, rng: random.Random, row: dict) -> None:
    """The request's tokens/s with the chaos against without it: SPEED_REPEATS of each, taking
    turns, medians compared (one 40-token request on the tiny pair lasts a third of a second, and
    two of them alone differ by up to 40 % on a shared 2-core host)."""
    prompt = rig.agent.tokenizer.encode_chat(SPEED_PROMPT)
    quiet, loud = [], []
    for _ in range(SPEED_REPEATS):
        quiet.append(_timed(rig, prompt))
        client = fault.chaos(rig, rng)
        try:
            loud.append(_timed(rig, prompt))
        finally:
            client.stop()
    ratio = statistics.median(loud) / statistics.median(quiet)
    row.update(tokens_per_s=[round(x, 1) for x in loud], quiet_tokens_per_s=[round(x, 1) for x in quiet],
               speed_ratio=round(ratio, 3))
    if ratio < fault.slowdown:
        row["problems"].append(f"{statistics.median(loud):.1f} tokens/s with it, {ratio:.2f}x the same "
                               f"request without it (bound {fault.slowdown})")


def _check_generation(gen: Generation, fault: Fault, reference: list[int], rig: Rig, row: dict) -> None:
    """The trial's row: its outcome and statistics, and its problems with the request (hung,
    crashed, stream against result, the fault's expectation, sessions left on the verifier)."""
    problems = row["problems"]
    if gen.hung:
        problems.append(f"request still running after {gen.bound_s:.0f}s (hung)")
    result, error = gen.result, gen.error
    if gen.crash is not None:
        problems.append(f"crashed: {gen.crash!r}")
    got = result.tokens if result else gen.streamed
    if result and gen.streamed != result.tokens:
        problems.append("streamed tokens differ from the returned ones (lost or duplicated)")
    problems += _expectation_problems(fault, gen, got, reference, rig)
    if result:
        row.update(tokens=len(result.tokens), unverified=result.stats.unverified_tokens,
                   retries=result.stats.retries, resyncs=result.stats.resyncs,
                   failovers=result.stats.failovers, stale=result.stats.stale_messages)
    row["outcome"] = "error: " + type(error).__name__ if error else "exact" if got == reference else "unverified"
    if not gen.worker.is_alive() and rig.broker.proc.poll() is None:
        # The device keeps its last session open for a next turn (docs/apps.md): that one only.
        kept = rig.agent.kept
        expected = {kept.rounds.replica: 1} if kept is not None else {}
        held = rig.replica_sessions(expected, rig.pair.settle_s)
        if any(count != expected.get(name, 0) for name, count in held.items()):
            problems.append(f"sessions left on the verifier: {held}; the device keeps {expected or 'none'}")


def _expectation_problems(fault: Fault, gen: Generation, got: list[int], reference: list[int], rig: Rig) -> list[str]:
    """What breaks the fault's promise: `exact` (the target's own decoding, all verified), `failed`
    (VerifierUnavailable, and only the target's text committed before it) or `unverified` (the
    target's text up to the first unverified span, the spans marked and within the policy)."""
    from specedge.device.request import VerifierUnavailable

    problems = []
    result, error, streamed, flags = gen.result, gen.error, gen.streamed, gen.flags
    if fault.expect == "exact":
        if error:
            problems.append(f"failed: {error}")
        elif result and result.tokens != reference:
            problems.append(f"output differs from the target's decoding from token {_diverges(got, reference)}")
        if not all(flags):
            problems.append("tokens marked unverified under a lossless policy")
    elif fault.expect == "failed":
        if not isinstance(error, VerifierUnavailable):
            problems.append(f"expected VerifierUnavailable, got {error or 'success'!r}")
        if streamed != reference[:len(streamed)]:
            problems.append("committed text before the failure is not the target's")
    elif fault.expect == "unverified" and result:
        spans = result.unverified
        first = spans[0][0] if spans else len(got)
        if not spans and got != reference:  # no spans: the new replica answered before the loss
            problems.append("output differs from the target's decoding with no token marked unverified")
        if got[:first] != reference[:first]:
            problems.append("verified text before the outage is not the target's")
        marked = [i for i, f in enumerate(flags) if not f]
        if marked != [i for a, b in spans for i in range(a, b)]:
            problems.append("stream marks differ from the result's unverified spans")
        if result.stats.unverified_tokens > rig.agent.cfg.faults.unverified_max_tokens:
            problems.append("more unverified tokens than the policy allows")
    return problems


def _check_leftovers(row: dict, stats0: tuple[float, int], threads0: int, t0: float) -> None:
    """The trial's time, and the threads, file descriptors and memory it left in this process."""
    rss0, fds0 = stats0
    time.sleep(0.3)  # paho's and the emulator's threads wind down
    gc.collect()
    rss, fds = proc_stats()
    row.update(seconds=round(time.monotonic() - t0, 2), threads=threading.active_count() - threads0,
               fds=fds - fds0, rss_mb=round(rss - rss0, 1))
    if row["threads"] > 0:
        row["problems"].append(f"{row['threads']} threads left behind")
    if row["fds"] > 0:
        row["problems"].append(f"{row['fds']} file descriptors left open")


def run_suite(trials: int = 1, names: list[str] | None = None, seed: int = 0, blackout_s: float = 10.0,
              progress=None, speed: bool = True, pair: str = "tiny", pin: bool = False) -> dict:
    """`pin`: this process (the device), its broker and any other device's process on half the
    cores, the replicas on the other half, as `specedge bench` pins them: a fault's speed is then
    what it costs the verifier and the broker, not two processes fighting over the same cores."""
    every = faults(blackout_s)
    chosen = [f for f in every if not names or f.name in names]
    unknown = set(names or ()) - {f.name for f in every}
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {[f.name for f in every]}")
    device_cores, verifier_cores, pinning = _split_cores() if pin else ([], [], "not pinned")
    with pinned_here(device_cores), tempfile.TemporaryDirectory(prefix="specedge-faults-") as tmp:
        folder = Path(tmp)
        models = tiny_pair(folder) if pair == "tiny" else real_pair()
        rss_start = proc_stats()[0]
        rows = []
        for fault in chosen:
            for trial in range(trials):
                row = run_trial(fault, trial, seed, folder, models, speed, verifier_cores)
                rows.append(row)
                if progress:
                    progress(row)
        rss_growth = proc_stats()[0] - rss_start
    table = {}
    for fault in chosen:
        mine = [r for r in rows if r["fault"] == fault.name]
        table[fault.name] = {"doc": fault.doc, "expect": fault.expect, "run": len(mine),
                             "passed": sum(r["passed"] for r in mine),
                             "mean_s": round(sum(r["seconds"] for r in mine) / max(len(mine), 1), 2)}
    return {"trials": trials, "seed": seed, "pair": pair, "pinning": pinning, "table": table, "rows": rows,
            "rss_growth_mb": round(rss_growth, 1), "passed": all(r["passed"] for r in rows)}


def format_table(report: dict) -> str:
    lines = [f"{'fault':32}{'passed/run':>11}  {'expect':11}{'mean s':>7}  what"]
    for name, t in report["table"].items():
        lines.append(f"{name:32}{t['passed']:>5}/{t['run']:<5}  {t['expect']:11}{t['mean_s']:>7.1f}  {t['doc']}")
    lines.append(f"device process RSS growth over the run: {report['rss_growth_mb']:+.1f} MB; {report['pinning']}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    fa = sub.add_parser("faults", help="inject real faults into real services; per fault: trials passed / run")
    fa.add_argument("--trials", type=int, default=20, help="trials per fault (each with its own timing)")
    fa.add_argument("--only", default="", help="comma-separated fault names (default: all)")
    fa.add_argument("--seed", type=int, default=0)
    fa.add_argument("--blackout-s", type=float, default=10.0, help="length of the link blackout")
    fa.add_argument("--pair", default="tiny", choices=["tiny", "real"],
                    help="tiny models written for the run, or the default Qwen pair (its target on llama.cpp)")
    fa.add_argument("--json", default="", help="write the table and every trial here")
    fa.add_argument("--no-pin", action="store_true",
                    help="leave processes unpinned (default: the device side and the replicas on half the cores each)")
    fa.set_defaults(func=run)


def run(args) -> int:
    def progress(row):
        state = "ok  " if row["passed"] else "FAIL"
        print(f"{state} {row['fault']:32} trial {row['trial']:>2}  round {row['round']}  {row['outcome']:24} "
              f"{row['seconds']:6.1f}s  {'; '.join(row['problems'])}", file=sys.stderr, flush=True)
    names = args.only.split(",") if args.only else None
    report = run_suite(args.trials, names, args.seed, args.blackout_s, progress, pair=args.pair, pin=not args.no_pin)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["passed"] else 1
