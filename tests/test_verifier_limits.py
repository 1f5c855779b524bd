"""The verifier's limits (issue 20, point 2): sessions and context per device, the KV budget
admitted before a pass allocates, and long prefills fed in chunks between other sessions' rounds;
and a stream, which the session's next round ends."""
from __future__ import annotations

import threading

import pytest

from conftest import reference_greedy
from specedge.protocol import wire
from specedge.cloud.registry import Target
from specedge.config import CloudConfig, ConfigError, DeviceConfig, build
from specedge.device.agent import Agent
from specedge.device.request import Refused
from specedge.device.draft import TorchDraftEngine
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams


def _agent(tiny_models, port: int, fleet: str, device: str = "d") -> Agent:
    draft, tok, _, _ = tiny_models
    cfg = build(DeviceConfig, {"device": {"fleet": fleet, "id": device}, "mqtt": {"port": port},
                               "energy": {"meter": "estimated"}})
    return Agent(cfg, TorchDraftEngine(draft), tok).start()


def _long_prompt(tok, words: int) -> list[int]:
    text = " ".join(f"robot {i % 7} moves arm to bin {i % 5}" for i in range(words))
    return tok.encode_chat(text)


def test_new_limits_are_validated():
    for key, value in (("max_sessions_per_device", 0), ("max_context_per_device", 0), ("prefill_chunk", 0)):
        with pytest.raises(ConfigError, match=key):
            build(CloudConfig, {"verifier": {key: value}})


# -- (a) sessions per device ----------------------------------------------------------------------
def test_a_device_holds_at_most_max_sessions_per_device_and_loses_its_oldest(
        tiny_models, fleet_verifier, wire_client):
    _, tok, _, _ = tiny_models
    verifier = fleet_verifier("cap", max_sessions_per_device=2)
    client = wire_client("cap")
    prompt = tok.encode_chat("go")
    for session in (1, 2, 3):
        assert isinstance(client.ask("d", wire.Open(session, 1, prompt)), wire.Opened)
    assert isinstance(client.ask("e", wire.Open(1, 1, prompt)), wire.Opened)  # another device: its own cap
    held = sorted(k for k in verifier.table.sessions if k[1] == "d")
    assert held == [("cap", "d", 2), ("cap", "d", 3)]
    gone = client.ask("d", wire.Draft(1, 2, len(prompt), [3], text_hash=wire.text_hash(prompt)))
    assert isinstance(gone, wire.Error) and gone.code == wire.ErrorCode.UNKNOWN_SESSION  # it resyncs
    for device, session in (("d", 2), ("d", 3), ("e", 1)):
        assert isinstance(client.ask(device, wire.Draft(session, 2, len(prompt), [3], text_hash=wire.text_hash(prompt))), wire.Verdict)
    assert verifier.stats.dropped == 1


def test_an_extend_appends_to_a_kept_session_only_over_the_same_text(tiny_models, fleet_verifier, wire_client):
    """EXTEND (a conversation's next turn) goes unanswered when it takes; over another text or
    an unknown session it is refused with the code that makes the device resync."""
    _, tok, _, _ = tiny_models
    verifier = fleet_verifier("ext")
    client = wire_client("ext")
    prompt, more = tok.encode_chat("go"), tok.encode("left then right")
    assert isinstance(client.ask("d", wire.Open(1, 1, prompt)), wire.Opened)
    wrong = client.ask("d", wire.Extend(1, 2, len(prompt), more, wire.text_hash(prompt[:-1] + [7])))
    assert isinstance(wrong, wire.Error) and wrong.code == wire.ErrorCode.OUT_OF_SYNC
    unknown = client.ask("d", wire.Extend(9, 2, len(prompt), more, wire.text_hash(prompt)))
    assert isinstance(unknown, wire.Error) and unknown.code == wire.ErrorCode.UNKNOWN_SESSION
    client.send("d", wire.Extend(1, 3, len(prompt), more, wire.text_hash(prompt)))
    text = prompt + more
    verdict = client.ask("d", wire.Draft(1, 4, len(text), [3], text_hash=wire.text_hash(text)))
    assert isinstance(verdict, wire.Verdict)  # the session now holds the whole text
    assert verifier.stats.extended == 1 and verifier.stats.extended_cached_tokens == len(prompt)
    client.send("d", wire.Extend(1, 3, len(text), more, wire.text_hash(text)))  # a stale round: ignored
    again = client.ask("d", wire.Draft(1, 5, len(text) + verdict.accepted + 1, [3],
                                       text_hash=verifier.table.sessions[("ext", "d", 1)].text_hash()))
    assert isinstance(again, wire.Verdict) and verifier.stats.extended == 1


# -- (b) the KV budget, admitted before a pass allocates --------------------------------------------
def test_an_open_whose_cache_cannot_fit_the_kv_budget_is_refused_before_any_pass(
        tiny_models, fleet_verifier, wire_client):
    _, tok, _, _ = tiny_models
    verifier = fleet_verifier("kvopen", kv_budget_mb=0.02)  # about 80 positions of the tiny target
    client = wire_client("kvopen")
    prompt = _long_prompt(tok, 20)
    reply = client.ask("d", wire.Open(1, 1, prompt))
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.OVERLOADED
    assert "kv_budget_mb" in reply.text
    assert verifier.stats.passes == 0 and not verifier.table.sessions


def test_rounds_that_fit_the_kv_budget_only_one_at_a_time_take_turns_and_caches_never_exceed_it(
        tiny_models, mosquitto, fleet_verifier):
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("kvturns", kv_budget_mb=0.05, batch_window_ms=20)  # room for one cache
    agents = [_agent(tiny_models, mosquitto.port, "kvturns", f"d{i}") for i in range(3)]
    prompts = [tok.encode_chat(f"count to {i}") for i in range(3)]
    results = [None] * 3

    def one(i):
        results[i] = agents[i].generate(prompts[i], SamplingParams(), 16, parse_policy("fixed:3"))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for a in agents:
            a.stop()
    for prompt, result in zip(prompts, results):
        assert result.tokens == reference_greedy(target, prompt, 16, tok.stop_ids)
        assert result.stats.resyncs == 0
    budget = 0.05 * 2**20
    assert 0 < verifier.stats.kv_peak_bytes <= budget  # measured right after every pass


# -- (c) context per device ------------------------------------------------------------------------
def test_a_context_over_max_context_per_device_is_refused_with_its_reason(
        tiny_models, fleet_verifier, wire_client):
    _, tok, _, _ = tiny_models
    verifier = fleet_verifier("ctx", max_context_per_device=64)
    client = wire_client("ctx")
    long = _long_prompt(tok, 10)
    assert len(long) > 64
    reply = client.ask("d", wire.Open(1, 1, long))
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.OVERLOADED
    assert "max_context_per_device" in reply.text and str(len(long)) in reply.text
    # Two sessions of 40 tokens: the second pushes the first (idle) out rather than being refused.
    short = long[:40]
    assert isinstance(client.ask("d", wire.Open(2, 1, short)), wire.Opened)
    assert isinstance(client.ask("d", wire.Open(3, 1, short)), wire.Opened)
    assert sorted(k[2] for k in verifier.table.sessions if k[1] == "d") == [3]
    # A draft that would carry the session itself past the cap is refused, the session kept.
    reply = client.ask("d", wire.Draft(3, 2, 40, list(range(3, 3 + 30)), text_hash=wire.text_hash(short)))
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.OVERLOADED
    assert "max_context_per_device" in reply.text
    assert isinstance(client.ask("d", wire.Draft(3, 3, 40, [3, 4], text_hash=wire.text_hash(short))), wire.Verdict)


def test_the_device_surfaces_the_refusal_reason(tiny_models, mosquitto, fleet_verifier):
    _, tok, _, _ = tiny_models
    fleet_verifier("ctxdev", max_context_per_device=64)
    agent = _agent(tiny_models, mosquitto.port, "ctxdev")
    try:
        with pytest.raises(Refused, match="max_context_per_device") as refused:
            agent.generate(_long_prompt(tok, 10), SamplingParams(), 8, parse_policy("fixed:3"))
    finally:
        agent.stop()
    assert refused.value.code == wire.ErrorCode.OVERLOADED
    assert "max_context_per_device" in refused.value.reason


# -- (d) chunked prefill ----------------------------------------------------------------------------
def test_a_long_prompt_prefilled_in_chunks_is_still_the_targets_own_decoding(
        tiny_models, mosquitto, fleet_verifier):
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("chunks", prefill_chunk=32)
    agent = _agent(tiny_models, mosquitto.port, "chunks")
    prompt = _long_prompt(tok, 30)
    assert len(prompt) > 8 * 32
    try:
        result = agent.generate(prompt, SamplingParams(), 24, parse_policy("fixed:3"))
    finally:
        agent.stop()
    assert result.stats.exact is True
    assert result.tokens == reference_greedy(target, prompt, 24, tok.stop_ids)
    assert verifier.stats.prefill_chunks >= len(prompt) // 32


@pytest.mark.parametrize("max_batch", [16, 1])
def test_a_short_sessions_round_is_verified_between_the_chunks_of_a_long_prefill(
        tiny_models, fleet_verifier, wire_client, max_batch):
    """Without chunks a cold session's whole context runs in one pass and everyone waits for it.
    No clock here: the order of the verdicts says which round was verified first."""
    from specedge.cloud.session import TargetSession

    _, tok, target, _ = tiny_models
    fleet = f"interleave{max_batch}"
    verifier = fleet_verifier(fleet, prefill_chunk=16, max_batch=max_batch)
    client = wire_client(fleet)
    long, short = _long_prompt(tok, 30), tok.encode_chat("stop")
    assert isinstance(client.ask("long", wire.Open(1, 1, long)), wire.Opened)
    assert isinstance(client.ask("short", wire.Open(2, 1, short)), wire.Opened)
    client.send("long", wire.Draft(1, 2, len(long), [3, 4], text_hash=wire.text_hash(long)))
    client.send("short", wire.Draft(2, 2, len(short), [5], text_hash=wire.text_hash(short)))
    order = [client.replies.get(timeout=120) for _ in range(2)]
    assert [who for who, _ in order] == ["short", "long"]
    assert all(isinstance(msg, wire.Verdict) for _, msg in order)
    version = Target.in_memory("alone", target, tok)
    want = TargetSession(version, long, SamplingParams(), 1).verify([3, 4])  # one unchunked pass
    assert (order[1][1].accepted, order[1][1].next_token) == want
    assert verifier.stats.prefill_chunks >= len(long) // 16 - 1


# -- (e) a stream ends at the session's next round --------------------------------------------------
def test_a_draft_ends_a_stream_and_takes_the_text_back_to_what_the_device_holds(tiny_models, fleet_verifier,
                                                                                 wire_client):
    """The adaptive device's switch from streaming to speculating: its DRAFT, under the next round
    number, states fewer tokens than were streamed (the rest were in flight). The verifier stops the
    generation, takes its text back to the DRAFT's, checks the hash and verifies: the verdict is
    the target's own next token there. Not past where the GENERATE began: that is out of sync."""
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("streams")
    client = wire_client("streams")
    prompt = tok.encode_chat("the robot arm turns left")
    expected = reference_greedy(target, prompt, 40, tok.stop_ids)
    assert len(expected) >= 12  # the checks below reach position 9
    assert isinstance(client.ask("d", wire.Open(1, 1, prompt)), wire.Opened)
    client.send("d", wire.Generate(1, 2, len(prompt), 200, wire.text_hash(prompt)))
    streamed = []
    while len(streamed) < 5:
        who, msg = client.replies.get(timeout=60)
        if isinstance(msg, wire.Tokens) and msg.seq == 2:
            streamed += msg.tokens

    def answer(msg):  # the reply under msg's round (the ended stream's tokens still in flight are not)
        client.send("d", msg)
        while True:
            _, reply = client.replies.get(timeout=60)
            if reply.session == msg.session and reply.seq == msg.seq:
                return reply

    held = prompt + streamed[:5]
    assert streamed[:5] == expected[:5]
    draft = expected[5:8]  # a draft of the target's own tokens: all accepted
    verdict = answer(wire.Draft(1, 3, len(held), draft, text_hash=wire.text_hash(held)))
    assert isinstance(verdict, wire.Verdict) and (verdict.accepted, verdict.next_token) == (3, expected[8])
    session = verifier.table.sessions[("streams", "d", 1)]
    assert session.generating == 0 and len(session.committed) == len(held) + 4
    again = answer(wire.Generate(1, 4, len(held) + 4, 10, session.text_hash()))
    assert isinstance(again, wire.Tokens) and again.tokens[0] == expected[9]
    early = answer(wire.Draft(1, 5, len(prompt) - 1, [3], text_hash=wire.text_hash(prompt[:-1])))
    assert isinstance(early, wire.Error) and early.code == wire.ErrorCode.OUT_OF_SYNC
