"""One verifier for many devices: batched passes, the KV budget, replicas and failover, target versions."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest
import torch

from conftest import reference_greedy
from specedge import tiny
from specedge.tools.bench import _read_json, spawn_verifier
from specedge.cloud.registry import Target, read_registry
from specedge.protocol.announce import Announcement, AnnouncementError
from specedge.cloud.session import Item, TargetSession, verify_batch
from specedge.config import CloudConfig, ConfigError, DeviceConfig, build
from specedge.device.draft import TorchDraftEngine
from specedge.device.policy import parse_policy
from specedge.exit_head import ExitHead
from specedge.tools.faults import on_draft_call
from specedge.loader import load_model
from specedge.mqtt import Link
from specedge.protocol import topics
from specedge.speculative import SamplingParams


def test_batched_pass_is_bit_identical_to_one_session_at_a_time(tiny_models):
    _, tok, target, _ = tiny_models
    prompts = [tok.encode_chat(t) for t in ("a", "the robot arm moves left", "stop", "x y z w")]
    drafts = [[5], [6, 7, 8], [], [9, 10]]
    alone = []
    for prompt, draft in zip(prompts, drafts):
        cache = target.new_cache()
        target.forward(prompt[:-1], cache)
        alone.append(target.forward(prompt[-1:] + draft, cache))
    caches = []
    for i, prompt in enumerate(prompts):
        cache = target.new_cache()
        if i % 2:  # warm sessions next to cold ones whose whole prompt rides along
            target.forward(prompt[:-1], cache)
        caches.append(cache)
    fed = [((p if c.length == 0 else p[-1:]) + d, c) for p, d, c in zip(prompts, drafts, caches)]
    batched = target.forward_batch(fed, keep=[len(d) + 1 for d in drafts])
    assert all(torch.equal(a, b) for a, b in zip(alone, batched))


def test_verify_batch_gives_each_session_its_own_verdict(tiny_models):
    _, tok, target, _ = tiny_models
    version = Target.in_memory("v", target, tok)
    prompts = [tok.encode_chat(t) for t in ("go", "turn right now", "hello there")]
    reference = [TargetSession(version, p, SamplingParams(), i).verify([3, 4, 5]) for i, p in enumerate(prompts)]
    items = [Item(TargetSession(version, p, SamplingParams(), i), [3, 4, 5]) for i, p in enumerate(prompts)]
    verify_batch(target, items)
    assert [(i.accepted, i.next_token) for i in items] == reference


def test_a_resync_on_the_same_replica_keeps_the_cache_it_can(tiny_models):
    _, tok, target, _ = tiny_models
    version = Target.in_memory("v", target, tok)
    prompt = tok.encode_chat("the robot arm moves left")
    old = TargetSession(version, prompt, SamplingParams(), 1)
    old.verify([3, 4, 5])
    committed = list(old.committed)
    same = TargetSession(version, committed, SamplingParams(), 1)
    same.adopt_cache(old)
    assert same.cache is old.cache and same.cache.length == len(committed) - 1  # nothing to prefill
    fresh = TargetSession(version, committed, SamplingParams(), 1)
    assert same.verify([6, 7]) == fresh.verify([6, 7])
    # The device knows less than the replica (a verdict it never got): the cache rolls back to it.
    behind = TargetSession(version, committed[:-2], SamplingParams(), 1)
    behind.adopt_cache(same)
    assert behind.cache.length == len(committed) - 3
    assert behind.verify([6]) == TargetSession(version, committed[:-2], SamplingParams(), 1).verify([6])


@pytest.mark.parametrize("last_pass_s, joined", [(0.0, 1), (0.4, 2)])
def test_after_a_slow_pass_the_window_waits_for_the_devices_just_answered(tiny_models, last_pass_s, joined):
    """A fixed 5 ms window splits devices into half batches taking turns when passes take seconds:
    the window stretches to a fraction of the last pass's compute time."""
    from specedge.protocol import wire
    from specedge.cloud.verifier import Verifier
    from specedge.protocol import topics

    _, tok, target, _ = tiny_models
    cfg = build(CloudConfig, {"verifier": {"batch_window_ms": 5, "batch_wait_fraction": 0.25}})
    verifier = Verifier(cfg, Target.in_memory("v", target, tok))  # not started: no broker needed
    prompt = tok.encode_chat("go")
    for device in ("d1", "d2"):
        session = TargetSession(verifier.targets["v"], prompt, SamplingParams(), 1)
        session.last_round = time.monotonic()  # both answered a moment ago: the ones a pass waits for
        verifier.table.sessions[("f", device, 1)] = session
    if last_pass_s:
        verifier.stats.compute_s.append(last_pass_s)

    def draft_from(device):
        payload = wire.encode(wire.Draft(1, 1, len(prompt), [3, 4], text_hash=wire.text_hash(prompt)))
        verifier.inbox.put((topics.device("f", device, "draft"), payload, time.monotonic()))
    draft_from("d1")
    late = threading.Timer(0.04, draft_from, ("d2",))  # a device that needed 40 ms to draft again
    late.start()
    verifier.gather()
    late.join()
    assert len(verifier.table.pending) == joined


def test_a_stream_step_alone_does_not_wait_for_the_window(tiny_models):
    """Streams gain nothing from waiting for the devices between rounds: the verifier sets their
    pace. A pending GENERATE alone runs at once however long the window, and the draft that comes
    40 ms later joins the next pass (it would have joined this one if the stream had waited)."""
    from specedge.protocol import wire
    from specedge.cloud.verifier import Verifier
    from specedge.protocol import topics

    _, tok, target, _ = tiny_models
    cfg = build(CloudConfig, {"verifier": {"batch_window_ms": 5, "batch_wait_fraction": 0.25}})
    verifier = Verifier(cfg, Target.in_memory("v", target, tok))
    prompt = tok.encode_chat("go")
    for device in ("d1", "d2"):
        session = TargetSession(verifier.targets["v"], prompt, SamplingParams(), 1)
        session.last_round = time.monotonic()  # both active: a draft would wait the window for the other
        verifier.table.sessions[("f", device, 1)] = session
    verifier.stats.compute_s.append(0.4)  # a window of 100 ms
    stream = wire.encode(wire.Generate(1, 1, len(prompt), 8, wire.text_hash(prompt)))
    verifier.inbox.put((topics.device("f", "d1", "draft"), stream, time.monotonic()))

    def draft_from_d2():
        payload = wire.encode(wire.Draft(1, 1, len(prompt), [3, 4], text_hash=wire.text_hash(prompt)))
        verifier.inbox.put((topics.device("f", "d2", "draft"), payload, time.monotonic()))
    late = threading.Timer(0.04, draft_from_d2)
    late.start()
    verifier.gather()
    late.join()
    assert [key[1] for key in verifier.table.pending] == ["d1"]


def test_an_open_does_not_fingerprint_the_tokenizer_again(tiny_models, monkeypatch):
    """The target's contract (a fingerprint of the whole tokenizer and its rendered chat template,
    0.3 s) is computed once per version: at every OPEN it was 0.3 s of every first token."""
    from specedge.protocol import wire
    from specedge.cloud.verifier import Verifier
    from specedge.protocol.contract import Contract

    _, tok, target, _ = tiny_models
    verifier = Verifier(build(CloudConfig, {}), Target.in_memory("v", target, tok))
    replies = []
    monkeypatch.setattr(verifier.table, "reply", lambda out, msg: replies.append(msg))  # not started: no broker
    calls = []
    real = Contract.of.__func__
    monkeypatch.setattr(Contract, "of", classmethod(lambda cls, *a: calls.append(1) or real(cls, *a)))
    prompt = tok.encode_chat("go")
    for session in (1, 2, 3):
        open_msg = wire.Open(session, 1, prompt, SamplingParams(), contract=verifier.targets["v"].contract)
        verifier.table.open(("f", "d", session), open_msg, "out", verifier.targets["v"], verifier.replica)
    assert len(verifier.table.sessions) == 3 and len(calls) <= 1
    assert [type(m).__name__ for m in replies] == ["Opened"] * 3


def _agents(tiny_models, port: int, fleet: str, n: int, drafts=None):
    from specedge.device.agent import Agent

    draft, tok, _, _ = tiny_models
    agents = []
    for i in range(n):
        model, name = (drafts or [(draft, "")])[i % len(drafts or [None])]
        cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": f"d{i}"}, "mqtt": {"port": port},
                                   "draft": {"name": name}, "energy": {"meter": "estimated"}})
        agents.append(Agent(cfg, TorchDraftEngine(model), tok).start())
    return agents


def _generate_all(agents, prompts, max_new, policy="fixed:3"):
    results = [None] * len(agents)

    def one(i):
        results[i] = agents[i].generate(prompts[i], SamplingParams(), max_new, parse_policy(policy))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def _generate_then_stop(agents, prompts, max_new):
    try:
        return _generate_all(agents, prompts, max_new)
    finally:
        for a in agents:
            a.stop()


def test_many_devices_with_different_drafts_share_batched_passes_and_get_their_target_outputs(
        tiny_models, mosquitto, fleet_verifier):
    draft, tok, target, _ = tiny_models
    verifier = fleet_verifier("many", max_batch=8, batch_window_ms=20)
    shallow = draft.layer_subset([0])  # a smaller draft on the same backbone
    agents = _agents(tiny_models, mosquitto.port, "many", 6, [(draft, "full"), (shallow, "shallow")])
    prompts = [tok.encode_chat(f"robot {i} moves to the dock") for i in range(6)]
    results = _generate_then_stop(agents, prompts, 24)
    for prompt, result in zip(prompts, results):
        assert result.tokens == reference_greedy(target, prompt, 24, tok.stop_ids)
        assert result.stats.replica == verifier.replica
    summary = verifier.stats.summary()
    assert summary["mean_batch"] > 1.5  # sessions did share passes
    assert summary["passes"] < summary["rounds"]
    pairs = {(p["draft"], p["target"]) for p in summary["pairs"]}
    assert pairs == {("full", "tiny"), ("shallow", "tiny")}


def test_kv_budget_evicts_the_least_recently_used_and_rebuilds_them_transparently(
        tiny_models, mosquitto, fleet_verifier):
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("budget", kv_budget_mb=0.05, batch_window_ms=0)  # room for about one cache
    agents = _agents(tiny_models, mosquitto.port, "budget", 3)
    prompts = [tok.encode_chat(f"count to {i}") for i in range(3)]
    results = _generate_then_stop(agents, prompts, 20)
    assert verifier.stats.evictions > 0
    for prompt, result in zip(prompts, results):
        assert result.tokens == reference_greedy(target, prompt, 20, tok.stop_ids)
        assert result.stats.resyncs == 0  # rebuilt on the verifier: the device never noticed


def test_idle_sessions_expire_and_the_device_resyncs(tiny_models, mosquitto, fleet_verifier):
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("idle", session_idle_s=0.2)
    agent, = _agents(tiny_models, mosquitto.port, "idle", 1)
    prompt = tok.encode_chat("wait for me")
    try:
        with on_draft_call(agent.engine, {3}, lambda: time.sleep(1.6)):  # the device pauses past the idle limit
            result = agent.generate(prompt, SamplingParams(), 20, parse_policy("fixed:2"))
    finally:
        agent.stop()
    assert verifier.stats.expired >= 1 and result.stats.resyncs >= 1
    assert result.tokens == reference_greedy(target, prompt, 20, tok.stop_ids)


def _replica(tmp_path, name: str, port: int, target_path) -> subprocess.Popen:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[verifier]\nid = "{name}"\nfleet = "ha"\ngroup = "ha"\n[mqtt]\nport = {port}\nprotocol = "5"\n'
                   f'[target]\nmodel = "{target_path}"\nweights = "bf16"\n')
    proc = spawn_verifier(cfg, tmp_path / f"{name}.log")
    assert _read_json(proc, f"replica {name}", 60)["ready"]
    return proc


def test_killed_replica_loses_no_session(tiny_files, tiny_models, mosquitto, tmp_path):
    """Two replicas in a shared-subscription group; kill -9 the one holding the session mid-generation:
    its last will fires, the device resyncs with the group and the output is still the target's."""
    _, tok, target, _ = tiny_models
    replicas = {name: _replica(tmp_path, name, mosquitto.port, tiny_files[1]) for name in ("ra", "rb")}
    agent, = _agents(tiny_models, mosquitto.port, "ha", 1)
    killed = []

    def kill_the_holder():
        victim = agent.current.rounds.replica
        replicas[victim].kill()
        replicas[victim].wait()
        killed.append(victim)
    prompt = tok.encode_chat("keep going whatever happens")
    try:
        with on_draft_call(agent.engine, {4}, kill_the_holder):
            result = agent.generate(prompt, SamplingParams(), 30, parse_policy("fixed:2"))
    finally:
        agent.stop()
        for proc in replicas.values():
            proc.kill()
            proc.wait()
    assert killed and result.stats.failovers >= 1
    assert result.stats.replica != killed[0]
    assert result.tokens == reference_greedy(target, prompt, 30, tok.stop_ids)


def test_target_versions_switch_by_announcement_with_pins_and_per_version_acceptance(
        tiny_models, tiny_files, mosquitto, tmp_path):
    from specedge.cloud.verifier import Verifier

    draft, tok, target, _ = tiny_models
    folder = tmp_path / "v2"
    _, v2_path = tiny.write_pair(folder, seed=7)  # another target of the same tokenizer
    registry = tmp_path / "targets.toml"
    registry.write_text(f'[versions.v1]\nmodel = "{tiny_files[1]}"\n\n[versions.v2]\nmodel = "{v2_path}"\n'
                        f'\n[versions.v1-pruned]\nmodel = "{tiny_files[1]}"\ndrop_layers = [1]\n')
    specs = read_registry(registry)
    assert specs["v1-pruned"].drop_layers == (1,)
    cfg = build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {"fleet": "canary", "id": "v-canary", "group": "canary"},
                              "target": {"registry": str(registry), "version": "v1"}})
    verifier = Verifier(cfg, Target.in_memory("v1", target, tok), specs).start()
    operator = Link(build(CloudConfig, {"mqtt": {"port": mosquitto.port}}).mqtt, "operator", lambda *_: None).start()
    agents = _agents(tiny_models, mosquitto.port, "canary", 2)
    prompt = tok.encode_chat("version check")
    v2, _ = load_model(v2_path, dtype="bf16", batch_invariant=True)
    try:
        first = agents[0].generate(prompt, SamplingParams(), 16, parse_policy("fixed:3"))
        assert first.stats.target_version == "v1"
        # Canary: only d1 moves to v2; the fleet stays on v1.
        operator.publish(topics.fleet("canary", "targets"), Announcement("v1", {"d1": "v2"}).encode(), retain=True)
        deadline = time.monotonic() + 60
        while "v2" not in verifier.targets:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        results = _generate_all(agents, [prompt, prompt], 16)
        assert results[0].stats.target_version == "v1" and results[1].stats.target_version == "v2"
        assert results[0].tokens == reference_greedy(target, prompt, 16, tok.stop_ids)
        assert results[1].tokens == reference_greedy(v2, prompt, 16, tok.stop_ids)
        # A switch in the middle of a generation: the session moves, the device is told.
        def switch_fleet():
            operator.publish(topics.fleet("canary", "targets"), Announcement("v2").encode(), retain=True)
            time.sleep(0.3)
        with on_draft_call(agents[0].engine, {2}, switch_fleet):
            switched = agents[0].generate(prompt, SamplingParams(), 16, parse_policy("fixed:3"))
        assert switched.stats.version_switches == 1 and switched.stats.target_version == "v2"
        pairs = {p["target"]: p for p in verifier.stats.summary()["pairs"]}
        assert set(pairs) == {"v1", "v2"} and all(p["rounds"] > 0 for p in pairs.values())
        assert verifier.stats.switches >= 1
    finally:
        operator.publish(topics.fleet("canary", "targets"), b"", retain=True)
        operator.stop()
        for a in agents:
            a.stop()
        verifier.stop()


def test_bad_registries_and_announcements_are_clear_errors(tmp_path):
    bad = tmp_path / "targets.toml"
    for text, what in (("[versions.a]\nweights = \"bf16\"\n", "needs model"),
                       ("[versions.a]\nmodel = \"m\"\ndrop_layers = [\"x\"]\n", "drop_layers"),
                       ("[versions.a]\nmodel = \"m\"\ncolour = 1\n", "unknown key"),
                       ("[other]\n", r"only \[versions")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=what):
            read_registry(bad)
    for payload in (b"\xff", b"[]", b'{"default": 3}', b'{"default": "a", "pins": {"d": 1}}', b"{" * 70000):
        with pytest.raises(AnnouncementError):
            Announcement.decode(payload)
    assert Announcement.decode(Announcement("a", {"d": "b"}).encode()).version_for("d") == "b"


def test_shallow_draft_reads_its_backbone_through_the_trained_head(tiny_models):
    draft, tok, _, _ = tiny_models
    gen = torch.Generator().manual_seed(0)
    dim = draft.cfg.dim
    down, up = torch.randn(4, dim, generator=gen) * 0.1, torch.randn(dim, 4, generator=gen) * 0.1
    small = draft.layer_subset([0], (down, up))
    tokens = tok.encode_chat("pick up the cup")
    seen = {}
    draft.forward(tokens, draft.new_cache(), on_layer=lambda i, x: seen.setdefault(i, x.clone()))
    expected = ExitHead(draft, 1, down, up).logits(seen[1])
    assert torch.equal(small.forward(tokens, small.new_cache()), expected)
    assert small.cfg.n_layers == 1 and draft.cfg.n_layers == 2  # the backbone is untouched
