"""No device can hurt another, part 2 (issue 34): what one session sends must not cost a session
batched with it its verdicts. Each attack runs through real wire messages against the real
verifier, with an innocent device alongside whose verdicts are checked against the target's own."""
from __future__ import annotations

import time

import numpy as np
import pytest

from specedge import grammar
from specedge.cloud.registry import Target
from specedge.cloud.passes import PassLimits, fill_pass
from specedge.cloud.session import Item, TargetSession, verify_batch
from specedge.mqtt import publish_packet_bytes
from specedge.protocol import topics, wire
from specedge.speculative import Q_ONE, SamplingParams, SparseDist

SAMPLED = SamplingParams(temperature=0.8, seed=3)


def _q(ids: list[int]) -> SparseDist:
    """A q over `ids`, the first the drafted token."""
    counts = np.full(len(ids), Q_ONE // len(ids), dtype=np.int64)
    counts[0] += Q_ONE - counts.sum()
    return SparseDist(np.asarray(ids, dtype=np.uint32), counts)


def _alone(model, tok, prompt: list[int], draft: list[int]) -> tuple[int, int]:
    """The greedy verdict of `draft` on `prompt` verified alone, in a session of its own."""
    return TargetSession(Target.in_memory("tiny", model, tok), prompt, SamplingParams(), 1).verify(draft)


# -- 1: a q naming tokens outside the vocabulary ---------------------------------------------------
def test_a_q_outside_the_vocabulary_is_refused_at_the_door_and_the_pass_beside_it_stands(
        tiny_models, fleet_verifier, wire_client):
    _, tok, target, _ = tiny_models
    vocab = target.cfg.vocab_size
    verifier = fleet_verifier("oovq", batch_window_ms=1000)  # both rounds in one pass
    # A listener each: once refused, the bad device is suspect and its next round is answered
    # after the good one's (cloud/fairness.py), not in the order sent.
    attacker, client = wire_client("oovq", ("bad",)), wire_client("oovq", ("good",))
    prompt = tok.encode_chat("stack the red boxes")
    assert isinstance(attacker.ask("bad", wire.Open(1, 1, prompt, SAMPLED)), wire.Opened)
    assert isinstance(client.ask("good", wire.Open(1, 1, prompt)), wire.Opened)
    text = list(prompt)
    for seq in (2, 3):  # again: a second pass over the caches the first left
        want = _alone(target, tok, text, [5, 6, 7])
        bad = [_q([5, vocab + 7]), _q([6])]
        attacker.send("bad", wire.Draft(1, seq, len(prompt), [5, 6], bad, wire.text_hash(prompt)))
        client.send("good", wire.Draft(1, seq, len(text), [5, 6, 7], text_hash=wire.text_hash(text)))
        refused, verdict = attacker.answer("bad", timeout=20), client.answer("good", timeout=20)
        assert isinstance(refused, wire.Error) and refused.code == wire.ErrorCode.BAD_REQUEST
        assert "vocabulary" in refused.text
        assert isinstance(verdict, wire.Verdict) and (verdict.accepted, verdict.next_token) == want
        text += [5, 6, 7][:verdict.accepted] + [verdict.next_token]
    assert verifier.errors.get("internal", 0) == 0


def test_a_round_that_fails_in_a_pass_is_the_only_one_without_a_verdict_and_caches_hold_only_text(
        tiny_models):
    """Whatever the door misses: a round whose verdict cannot be computed (here a q the door would
    refuse, put in the pass behind its back) leaves every cache at its committed text."""
    _, tok, model, _ = tiny_models
    target = Target.in_memory("tiny", model, tok)
    prompt = tok.encode_chat("fold the towel")
    bad = TargetSession(target, prompt, SAMPLED, 1)
    good = TargetSession(target, prompt, SamplingParams(), 2)
    want = _alone(model, tok, prompt, [5, 6, 7])
    items = [Item(bad, [5, 6], [_q([5, model.cfg.vocab_size + 3]), _q([6])]), Item(good, [5, 6, 7])]
    verify_batch(model, items)
    assert isinstance(items[0].error, IndexError) and not items[0].done
    assert (items[1].accepted, items[1].next_token) == want
    assert bad.committed == prompt and bad.cache.length <= len(prompt)
    again = Item(bad, [5, 6], [_q([5, 9]), _q([6])])
    verify_batch(model, [again])
    assert again.done and again.error is None and bad.cache.length == len(bad.committed) - 1


def test_a_pass_the_engine_fails_cuts_every_fed_cache_back(tiny_models):
    _, tok, model, _ = tiny_models
    target = Target.in_memory("tiny", model, tok)

    class FailingEngine:  # a fault injected where an engine runs out of memory mid-pass
        cfg = model.cfg

        def forward_batch(self, fed, **kw):
            model.forward_batch(fed, **kw)  # the caches grow, as they would before a failure
            raise RuntimeError("out of memory")

    prompt = tok.encode_chat("open the gate")
    sessions = [TargetSession(target, prompt, SamplingParams(), i) for i in (1, 2)]
    verify_batch(model, [Item(s, []) for s in sessions])  # warm: each holds its text but the last
    held = [s.cache.length for s in sessions]
    with pytest.raises(RuntimeError):
        verify_batch(FailingEngine(), [Item(s, [5, 6, 7]) for s in sessions])
    assert [s.cache.length for s in sessions] == held


def test_a_failing_round_is_refused_alone_while_the_innocent_one_gets_its_verdict(
        tiny_models, fleet_verifier, wire_client):
    """The verifier's side of the test above: the round behind the door's back gets INTERNAL, its
    session goes, and the innocent device batched with it never notices."""
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("failed", batch_window_ms=1000)
    client = wire_client("failed")
    prompt = tok.encode_chat("water the plants")
    for device, params in (("bad", SAMPLED), ("good", SamplingParams())):
        assert isinstance(client.ask(device, wire.Open(1, 1, prompt, params)), wire.Opened)
    bad = verifier.table.sessions[("failed", "bad", 1)]
    bad.check_draft = lambda *_: None  # the door misses this one (a fault injected)
    client.send("bad", wire.Draft(1, 2, len(prompt), [5], [_q([5, target.cfg.vocab_size + 1])],
                                  wire.text_hash(prompt)))
    client.send("good", wire.Draft(1, 2, len(prompt), [5, 6, 7], text_hash=wire.text_hash(prompt)))
    refused, verdict = client.answer("bad", timeout=20), client.answer("good", timeout=20)
    assert isinstance(verdict, wire.Verdict)
    assert (verdict.accepted, verdict.next_token) == _alone(target, tok, prompt, [5, 6, 7])
    assert isinstance(refused, wire.Error) and refused.code == wire.ErrorCode.INTERNAL
    assert ("failed", "bad", 1) not in verifier.table.sessions and verifier.errors.get("internal") == 1


# -- 2: a grammar whose lexer one session exhausts --------------------------------------------------
LONG_STRING = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}},
               "required": ["s"], "additionalProperties": False}


# llguidance spends its lexer budget ("fuel") building derivatives: Qwen's 151k-token vocabulary
# spends the default budget on a few thousand tokens of string under a large repetition bound;
# the tiny vocabulary needs a budget cut to match.
TIGHT = {"step_lexer_fuel": 5000}


def _spend(tok) -> list[int]:
    """A JSON string's opening and ~1,500 bytes of it: enough to spend TIGHT."""
    return tok.encode('{"s": "' + "".join(chr(33 + (i * 7) % 90) for i in range(1500)).replace('"', "x")
                      .replace("\\", "y"))


def test_a_session_that_spends_the_lexer_budget_spends_its_own(tiny_models):
    """Each request's matcher is its own: llguidance's deep copies shared one lexer, so one request
    that spent its budget left every other request of the grammar in its error state (allowing
    only EOS)."""
    _, tok, model, _ = tiny_models
    compiled = grammar.Cache(limits=TIGHT).get(tok, model.cfg.vocab_size, grammar.json_schema(LONG_STRING))
    innocent, hostile = compiled.start(), compiled.start()
    assert innocent.accept(tok.encode('{"s": "ab'))
    try:
        hostile.accept(_spend(tok))
        hostile.allowed()
    except grammar.GrammarError:
        pass  # a budget of its own, spent: its own request fails, loudly
    allowed = innocent.allowed()
    assert allowed[tok.encode("c")[0]] and allowed.sum() > 100  # a string goes on: not EOS alone


def test_a_grammar_session_spending_its_budget_leaves_the_innocent_sessions_verdicts_alone(
        tiny_models, fleet_verifier, wire_client):
    _, tok, model, _ = tiny_models
    verifier = fleet_verifier("lexer")
    verifier.table.grammars = grammar.Cache(limits=TIGHT)
    client = wire_client("lexer")
    text = grammar.json_schema(LONG_STRING)
    prompt = tok.encode_chat("write a note")
    want = grammar.reference_decode(model, tok, prompt, 12, text)
    named = dict(grammar_hash=grammar.grammar_hash(text), grammar=text, grammar_from=len(prompt))
    assert isinstance(client.ask("good", wire.Open(1, 1, prompt, **named)), wire.Opened)
    client.ask("bad", wire.Open(1, 1, prompt + _spend(tok), **named))  # whatever it gets, it gets alone
    verdict = client.ask("good", wire.Draft(1, 2, len(prompt), want[:6], text_hash=wire.text_hash(prompt)))
    assert isinstance(verdict, wire.Verdict)
    assert (verdict.accepted, verdict.next_token) == (6, want[6])  # the constrained target's, not EOS


def test_a_matcher_in_error_raises_instead_of_allowing_only_eos(tiny_models):
    _, tok, model, _ = tiny_models
    compiled = grammar.Compiled(tok, model.cfg.vocab_size, grammar.json_schema(LONG_STRING))
    c = compiled.start()
    c.m.consume_token(model.cfg.vocab_size - 1)  # llguidance's error state, by an invalid consume
    assert c.m.is_error()
    with pytest.raises(grammar.GrammarError, match="matcher failed"):
        c.allowed()
    with pytest.raises(grammar.GrammarError, match="matcher failed"):
        c.forced()


def test_the_grammar_cache_compares_the_text_not_only_its_hash(tiny_models):
    _, tok, model, _ = tiny_models
    cache = grammar.Cache()
    first = grammar.json_schema({"enum": ["left", "right"]})
    held = cache.get(tok, model.cfg.vocab_size, first)
    other = grammar.json_schema({"enum": ["up", "down"]})
    held.hash = grammar.grammar_hash(other)  # a colliding text, the cheap way
    scope = cache._compiled[()]
    key = next(iter(scope))
    scope[(key[0], key[1], held.hash)] = scope.pop(key)
    got = cache.get(tok, model.cfg.vocab_size, other)
    assert got.text == other and got is not held


# -- 6: what one pass may hold ------------------------------------------------------------------------
def test_a_pass_takes_rounds_while_they_fit_and_the_rest_wait_for_the_next():
    limits = PassLimits(sessions=2, rows=100, device_rows=40, cells=500)
    rounds = [("a", 30, 100), ("a", 30, 100), ("b", 200, 250), ("c", 20, 450), ("d", 5, 50), ("e", 1, 10)]
    taken, rest = fill_pass(rounds, limits, lambda r: r[0], lambda r: r[1], lambda r: r[2])
    # a's second round is over a's rows, b's over the pass's, c's over the cells, e over the sessions
    assert taken == [rounds[0], rounds[4]]
    assert rest == [rounds[1], rounds[2], rounds[3], rounds[5]]
    alone, _ = fill_pass([("b", 200, 900)], limits, lambda r: r[0], lambda r: r[1], lambda r: r[2])
    assert alone == [("b", 200, 900)]  # the first round always goes: a pass is never empty


def test_one_devices_long_rounds_fill_a_pass_only_to_its_share_of_rows(tiny_models, fleet_verifier, wire_client):
    """Four sessions of one device drafting 64 tokens each used to make one pass of 260 rows that
    the innocent device's round waited out (on vLLM a request per row: ~13 s of its worker). A
    device's rounds beyond its first now fill a pass to max_device_rows; the rest go next."""
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("rows", batch_window_ms=1000, share_slack=0, max_device_rows=100)
    heavy, light = wire_client("rows", ("heavy",)), wire_client("rows", ("light",))
    prompt = tok.encode_chat("pick up the cup")
    texts = {}
    for client, device, sessions in ((heavy, "heavy", 4), (light, "light", 1)):  # a round each: all active
        for sid in range(1, sessions + 1):
            assert isinstance(client.ask(device, wire.Open(sid, 1, prompt)), wire.Opened)
            v = client.ask(device, wire.Draft(sid, 2, len(prompt), [5], text_hash=wire.text_hash(prompt)))
            texts[device, sid] = prompt + [5][:v.accepted] + [v.next_token]
    before = len(verifier.stats.batch_sizes)
    long = [5, 6, 7, 8] * 16
    for sid in range(1, 5):
        t = texts["heavy", sid]
        heavy.send("heavy", wire.Draft(sid, 3, len(t), long, text_hash=wire.text_hash(t)))
    t = texts["light", 1]
    verdict = light.ask("light", wire.Draft(1, 3, len(t), [5, 6], text_hash=wire.text_hash(t)))
    assert (verdict.accepted, verdict.next_token) == _alone(target, tok, t, [5, 6])
    for _ in range(4):
        got = heavy.answer("heavy")
        t = texts["heavy", got.session]
        assert (got.accepted, got.next_token) == _alone(target, tok, t, long)
    assert list(verifier.stats.batch_sizes)[before:] == [2, 1, 1, 1]


def test_a_batched_llama_cpp_pass_holds_only_what_its_shared_cells_hold(tiny_files, tiny_models, mosquitto,
                                                                        wire_client):
    """Three sessions of 200 positions on 512 shared cells: the pass used to fail on every try
    (and each round went again alone); the verifier now plans its passes within the cells."""
    from specedge.cloud.llama_target import LlamaCppTarget
    from specedge.cloud.verifier import Verifier
    from specedge.config import CloudConfig, build

    tok = tiny_models[1]
    engine = LlamaCppTarget(tiny_files[1], False, n_ctx=512, n_seq=8, n_batch=64, threads=1)
    cfg = build(CloudConfig, {"mqtt": {"port": mosquitto.port}, "verifier": {
        "fleet": "cells", "id": "v-cells", "group": "cells", "batch_window_ms": 1000, "share_slack": 0}})
    verifier = Verifier(cfg, Target.in_memory("tiny-llama", engine, tok)).start()
    try:
        clients = {d: wire_client("cells", (d,)) for d in ("a", "b", "c")}
        prompt = (tok.encode_chat("the robot turns left") * 20)[:200]
        texts = {}
        for device, client in clients.items():  # a round each: all active (the third takes the first's cells)
            assert isinstance(client.ask(device, wire.Open(1, 1, prompt)), wire.Opened)
            v = client.ask(device, wire.Draft(1, 2, len(prompt), [5], text_hash=wire.text_hash(prompt)))
            texts[device] = prompt + [5][:v.accepted] + [v.next_token]
        before = len(verifier.stats.batch_sizes)
        for device, client in clients.items():
            client.send(device, wire.Draft(1, 3, len(texts[device]), [5, 6], text_hash=wire.text_hash(texts[device])))
        for device, client in clients.items():
            assert isinstance(client.answer(device), wire.Verdict)
        assert "split_pass" not in verifier.errors and "internal" not in verifier.errors
        assert sorted(list(verifier.stats.batch_sizes)[before:]) == [1, 2]
    finally:
        verifier.stop()


# -- 7: the grammar cache, an oracle and a shared resource -------------------------------------------
def test_a_grammar_named_by_hash_is_found_only_by_the_scope_that_sent_its_text(
        tiny_models, fleet_verifier, wire_client):
    """An OPEN by hash alone used to find any grammar this verifier had compiled: a device could
    tell whether another device had used a schema. It now finds what its own scope sent, the
    prefix cache's scope: its device by default, its fleet under share_prefixes = "fleet"."""
    _, tok, _, _ = tiny_models
    text = grammar.json_schema({"enum": ["left", "right"]})
    prompt = tok.encode_chat("which way")
    by_text = wire.Open(1, 1, prompt, grammar_hash=grammar.grammar_hash(text), grammar=text, grammar_from=len(prompt))
    by_hash = wire.Open(1, 1, prompt, grammar_hash=grammar.grammar_hash(text), grammar_from=len(prompt))
    for scope, fleet, others_find in (("device", "gramd", False), ("fleet", "gramf", True)):
        fleet_verifier(fleet, share_prefixes=scope)
        client = wire_client(fleet)
        assert isinstance(client.ask("a", by_text), wire.Opened)
        assert isinstance(client.ask("a", by_hash), wire.Opened)  # its own, by hash
        answer = client.ask("b", by_hash)  # another device of the fleet
        if others_find:
            assert isinstance(answer, wire.Opened)
        else:
            assert isinstance(answer, wire.Error) and answer.code == wire.ErrorCode.UNKNOWN_GRAMMAR


def test_one_scope_opening_grammar_after_grammar_evicts_only_its_own(tiny_models):
    """64 schemas of 0.02-0.1 s each used to push every other device's grammar out of the shared
    LRU: a scope now holds per_scope grammars, and the cache's bound takes from the fullest scope."""
    _, tok, model, _ = tiny_models
    vocab = model.cfg.vocab_size
    cache = grammar.Cache(size=8, per_scope=4)
    mine = grammar.json_schema({"enum": ["left", "right"]})
    cache.get(tok, vocab, mine, ("fleet", "innocent"))
    for i in range(40):
        cache.get(tok, vocab, grammar.json_schema({"enum": [f"w{i}"]}), ("fleet", "churner"))
    for i in range(4):  # other devices, one grammar each: past the bound, the churner gives one up
        cache.get(tok, vocab, grammar.json_schema({"enum": [f"x{i}"]}), ("fleet", f"d{i}"))
    assert cache.find(tok, vocab, grammar.grammar_hash(mine), ("fleet", "innocent")) is not None
    assert len(cache._compiled[("fleet", "churner")]) == 3 and len(cache) == 8


# -- 3: stale rounds while a stream is pending -------------------------------------------------------
def test_stale_rounds_flooding_a_streaming_session_are_dropped_not_queued(
        tiny_models, fleet_verifier, wire_client):
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("flood")
    client = wire_client("flood")
    prompt = tok.encode_chat("list every color")  # the tiny target's answer runs past 300 tokens
    for device in ("bad", "good"):
        assert isinstance(client.ask(device, wire.Open(1, 1, prompt)), wire.Opened)
    client.send("bad", wire.Generate(1, 9, len(prompt), 1500, wire.text_hash(prompt)))
    stale = wire.encode(wire.Draft(1, 3, len(prompt), [5], text_hash=wire.text_hash(prompt)))
    topic = topics.device("flood", "bad", "draft")
    for _ in range(500):
        client.link.publish(topic, stale)
    deepest, deadline = 0, time.monotonic() + 20
    while verifier.errors.get("stale", 0) < 450 and time.monotonic() < deadline:  # the broker may drop a few
        deepest = max(deepest, len(verifier.deferred))
        time.sleep(0.01)
    text = list(prompt)
    for seq in range(2, 6):  # the innocent device's rounds go on, each the target's own verdict
        want = _alone(target, tok, text, [5, 6])
        verdict = client.ask("good", wire.Draft(1, seq, len(text), [5, 6], text_hash=wire.text_hash(text)))
        assert isinstance(verdict, wire.Verdict) and (verdict.accepted, verdict.next_token) == want
        text += [5, 6][:verdict.accepted] + [verdict.next_token]
        deepest = max(deepest, len(verifier.deferred))
    assert deepest <= 1 and verifier.errors.get("stale", 0) > 0
    client.send("bad", wire.Close(1, 10))


def test_the_verifier_hears_rounds_at_qos_0_so_a_qos_1_flood_costs_it_no_acknowledgements(
        fleet_verifier, wire_client):
    """Rounds travel at QoS 0; a device may send them at QoS 1 anyway, and each would cost the
    verifier's MQTT thread a PUBACK to write and send (a fifth of its core under a flood of
    1,000 a second, measured with py-spy). Subscribed at QoS 0, the broker delivers them so."""
    verifier = fleet_verifier("qos")
    client = wire_client("qos")
    payload = wire.encode(wire.Draft(7, 2, 3, [5], text_hash=wire.text_hash([1, 2, 3])))
    topic = topics.device("qos", "loud", "draft")
    before = verifier.link.bytes_received
    client.link.publish(topic, payload, qos=1)
    answer = client.answer("loud", timeout=20)
    assert isinstance(answer, wire.Error) and answer.code == wire.ErrorCode.UNKNOWN_SESSION
    assert verifier.link.bytes_received - before == publish_packet_bytes(topic, len(payload), wire.ROUND_QOS, True)


# -- 4: the prefix cache, a timing oracle ------------------------------------------------------------
def test_a_prefix_is_shared_within_its_scope_only(tiny_models, fleet_verifier, wire_client):
    """By default a device's sessions share prefixes among themselves only: another device guessing
    its prompt gets no faster answer for a right guess. share_prefixes = "fleet" widens it to the
    fleet; no setting reaches another fleet."""
    _, tok, _, _ = tiny_models
    system = "You drive a robot arm with a wheel and a sensor. " * 4
    prompts = [tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": ask}])) for ask in ("go", "stop", "turn")]
    for scope, fleet, hits in (("device", "pfxd", [0, 1]), ("fleet", "pfxf", [1, 2])):
        verifier = fleet_verifier(fleet, share_prefixes=scope)
        client = wire_client(fleet)
        assert isinstance(client.ask("a", wire.Open(1, 1, prompts[0])), wire.Opened)
        client.ask("a", wire.Draft(1, 2, len(prompts[0]), [5], text_hash=wire.text_hash(prompts[0])))  # warm
        assert isinstance(client.ask("b", wire.Open(1, 1, prompts[1])), wire.Opened)  # another device
        assert verifier.stats.prefix_hits == hits[0]
        assert isinstance(client.ask("a", wire.Open(2, 1, prompts[2])), wire.Opened)  # the same device
        assert verifier.stats.prefix_hits == hits[1]


def test_the_prefix_index_keeps_scopes_apart():
    from specedge.cloud.session import PrefixIndex

    index, text = PrefixIndex(), list(range(100))
    index.add(("fleet-a",), ("fleet-a", "d", 1), text)
    assert [key for key, _ in index.candidates(("fleet-a",), text + [7])] == [("fleet-a", "d", 1)] * 3
    assert list(index.candidates(("fleet-b",), text + [7])) == []


# -- 8: taking a round is all or nothing -------------------------------------------------------------
def test_a_round_refused_midway_leaves_the_session_as_it_was(tiny_models, fleet_verifier, wire_client):
    """A DRAFT whose second forced token the grammar does not force is refused, and the first
    forced token does not stay behind: the same round, stated right, is verified."""
    _, tok, model, _ = tiny_models
    verifier = fleet_verifier("atomic")
    client = wire_client("atomic")
    text = grammar.json_schema(LONG_STRING)
    prompt = tok.encode_chat("say something")
    opened = client.ask("d", wire.Open(1, 1, prompt, grammar_hash=grammar.grammar_hash(text), grammar=text,
                                       grammar_from=len(prompt)))
    assert isinstance(opened, wire.Opened)
    session = verifier.table.sessions[("atomic", "d", 1)]
    forced = grammar.Compiled(tok, model.cfg.vocab_size, text).start()
    first = forced.forced()
    forced.accept([first])
    second = forced.forced()
    assert first is not None and second is not None  # '{"s": "' is forced token by token
    wrong = (second + 1) % model.cfg.vocab_size
    refused = client.ask("d", wire.Draft(1, 2, len(prompt), [5], text_hash=wire.text_hash(prompt),
                                         forced=[first, wrong]))
    assert isinstance(refused, wire.Error) and refused.code == wire.ErrorCode.BAD_REQUEST
    assert session.committed == prompt and session.constraint.length == 0
    verdict = client.ask("d", wire.Draft(1, 3, len(prompt), [second], text_hash=wire.text_hash(prompt),
                                         forced=[first]))
    assert isinstance(verdict, wire.Verdict) and verdict.accepted == 1


# -- 5: streams outliving their device ---------------------------------------------------------------
def test_a_stream_whose_device_went_away_ends_and_costs_no_more_rows(tiny_models, fleet_verifier, wire_client):
    """A device that asks for a long stream and walks away (no CLOSE, no will) stops costing the
    target a row a pass: the broker's answer to a QoS 1 TOKENS says nobody listens."""
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("walk")
    walker, good = wire_client("walk", ("bad",)), wire_client("walk", ("good",))
    prompt = tok.encode_chat("list every color")  # the tiny target's answer runs past 300 tokens
    assert isinstance(walker.ask("bad", wire.Open(1, 1, prompt)), wire.Opened)
    assert isinstance(good.ask("good", wire.Open(1, 1, prompt)), wire.Opened)
    walker.send("bad", wire.Generate(1, 2, len(prompt), 1800, wire.text_hash(prompt)))
    first = walker.answer("bad", timeout=20)
    assert isinstance(first, wire.Tokens)
    walker.stop()  # gone, without a word
    deadline = time.monotonic() + 30
    while verifier.errors.get("stream_unheard") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert verifier.errors.get("stream_unheard") == 1
    assert verifier.table.sessions[("walk", "bad", 1)].generating == 0  # it ended: 1,800 tokens were asked
    streamed = verifier.stats.rounds
    text = list(prompt)
    for seq in (2, 3):  # the innocent device's rounds: the target's verdicts, in passes of its own
        verdict = good.ask("good", wire.Draft(1, seq, len(text), [5, 6], text_hash=wire.text_hash(text)))
        assert (verdict.accepted, verdict.next_token) == _alone(target, tok, text, [5, 6])
        text += [5, 6][:verdict.accepted] + [verdict.next_token]
    assert verifier.stats.rounds == streamed + 2 and list(verifier.stats.batch_sizes)[-2:] == [1, 1]


def test_a_message_for_a_session_with_a_round_pending_waits_for_its_pass_instead_of_forcing_one(
        tiny_models, fleet_verifier, wire_client):
    """A CLOSE (or OPEN, EXTEND) for a session whose draft waits for the batch used to run the pass
    at once: any device could split every batch. It now acts after the pass, in order."""
    _, tok, target, _ = tiny_models
    verifier = fleet_verifier("split", batch_window_ms=1000)
    bad, good = wire_client("split", ("bad",)), wire_client("split", ("good",))
    prompt = tok.encode_chat("pick up the cup")
    texts = {}
    for client, device in ((bad, "bad"), (good, "good")):  # a round each: a pass waits for both now
        assert isinstance(client.ask(device, wire.Open(1, 1, prompt)), wire.Opened)
        v = client.ask(device, wire.Draft(1, 2, len(prompt), [5], text_hash=wire.text_hash(prompt)))
        texts[device] = prompt + [5][:v.accepted] + [v.next_token]
    b, g = texts["bad"], texts["good"]
    bad.send("bad", wire.Draft(1, 3, len(b), [5], text_hash=wire.text_hash(b)))
    bad.send("bad", wire.Close(1, 4))
    time.sleep(0.1)
    verdict = good.ask("good", wire.Draft(1, 3, len(g), [5, 6], text_hash=wire.text_hash(g)))
    assert (verdict.accepted, verdict.next_token) == _alone(target, tok, g, [5, 6])
    assert isinstance(bad.answer("bad", timeout=20), wire.Verdict)  # the draft before the CLOSE got its verdict
    assert list(verifier.stats.batch_sizes) == [1, 1, 2]
    deadline = time.monotonic() + 10
    while ("split", "bad", 1) in verifier.table.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("split", "bad", 1) not in verifier.table.sessions
