"""The llama.cpp target computes every row in the call llama.cpp's own generation computes it in:
a prompt in llama-cpp-python's batches (n_batch = n_ubatch = 512), every generated or drafted
token alone. So a verified row is bit for bit what llama-cpp-python's own `Llama` computes, and
speculation's output is its greedy generation: for long prompts, prompts fed across passes in
chunks, a resync's generated tokens and a conversation's next turn.

On the tiny models a one-row prefill gives other bits only now and then (a random 600-token
prompt: 3 of 17 rows, up to 0.15; a 700-token text: none), and which rows differ depends on the
CPU's kernels. So besides the bits, each test checks the calls themselves, as llama.cpp receives
them from us and from llama-cpp-python; the real 1.5B target parts at once (tests/test_real_models.py)."""
from __future__ import annotations

import pytest
import torch

from specedge.cloud.engine import call_start, own_generation, prompt_calls
from specedge.cloud.registry import TargetSpec, load_target
from specedge.cloud.session import TargetSession, verify_batch, Item
from specedge.device.policy import parse_policy
from specedge.speculative import SamplingParams

LONG = "the robot arm turns left, the wheel sensor reads zero, and the gripper opens slowly. " * 11


def test_a_prompt_goes_in_batches_from_its_start_and_generated_tokens_alone():
    assert prompt_calls([(0, 1100)], 0, 1100, 512) == [512, 512, 76]
    assert prompt_calls([(0, 10)], 0, 14, 512) == [10, 1, 1, 1, 1]  # a prompt, then a draft's rows
    # A resync of a conversation: turn 1 [0, 600), its answer alone, turn 2 from 620 on.
    assert prompt_calls([(0, 600), (620, 700)], 0, 700, 512) == [512, 88] + [1] * 20 + [80]
    assert prompt_calls([(0, 600), (620, 700)], 512, 625, 512) == [88] + [1] * 20 + [5]
    assert prompt_calls([(100, 1200)], 50, 1200, 512) == [1] * 50 + [512, 512, 76]
    # A pass that needs row p (or starts there) starts where p's call starts.
    assert call_start([(0, 1100)], 700, 512) == 512
    assert call_start([(0, 1100)], 1099, 512) == 1024
    assert call_start([(0, 600), (620, 700)], 610, 512) == 610
    assert call_start([(0, 600)], 700, 0) == 700


@pytest.fixture(scope="module")
def llama(tiny_files):
    target = load_target(TargetSpec("tiny-llama-own", str(tiny_files[1]), engine="llama.cpp"))
    from specedge.exactness import establish

    establish(target.model)
    return target


@pytest.fixture(scope="module")
def client(llama):
    return llama.model.client()


@pytest.fixture(scope="module")
def long_prompt(tiny_models):
    ids = tiny_models[1].encode_chat(LONG)
    assert 600 < len(ids) < 1000
    return ids


def test_the_engines_own_generation_makes_llama_cpp_pythons_calls_and_gets_its_bits(llama, client, long_prompt,
                                                                                     tiny_models, calls):
    engine, tok = llama.model, tiny_models[1]
    ours, theirs = calls
    want = client.generate(long_prompt, 24, tok.stop_ids)
    assert own_generation(engine, [long_prompt], 24, tok.stop_ids)[0] == want
    assert ours == theirs[:len(ours)] == [512, len(long_prompt) - 512] + [1] * (len(want) - 1)
    rows = client.rows(long_prompt + want, len(long_prompt))
    cache = engine.new_cache()
    mine = engine.forward_batch([(long_prompt + want, cache)], keep=[len(want) + 1],
                                calls=[[512, len(long_prompt) - 512] + [1] * len(want)])[0]
    assert torch.equal(mine, rows)


@pytest.fixture
def calls(llama, client, monkeypatch):
    """(ours, llama-cpp-python's): the rows of each llama_decode call each makes from now on."""
    ours, theirs = [], []
    engine, ctx = llama.model, client.llm._ctx
    decode, their_decode = engine._decode, ctx.decode
    monkeypatch.setattr(engine, "_decode", lambda rows, *a: (ours.append(len(rows)), decode(rows, *a))[1])
    monkeypatch.setattr(ctx, "decode", lambda batch: (theirs.append(batch.batch.n_tokens), their_decode(batch))[1])
    return ours, theirs


def _session(llama, text, prompts=None):
    return TargetSession(llama, text, SamplingParams(), 1, prompts=prompts)


def _rows_of_passes(session, draft, chunk):
    """Feed `session`'s text and `draft` in passes of at most `chunk` positions: the last pass's
    verified rows, and how many passes it took."""
    passes = 0
    while True:
        tokens, cache, done, calls = session.feed(draft, chunk)
        keep = len(draft) + 1 if done else 1
        rows = session.model.forward_batch([(tokens, cache)], keep=[keep], calls=[calls])[0]
        passes += 1
        if done:
            return rows, passes


@pytest.mark.parametrize("chunk", [0, 512, 300])
def test_a_long_prompt_fed_across_passes_gets_llamas_own_bits(llama, client, long_prompt, tiny_models, chunk):
    """The verifier's prefill_chunk cuts a cold prompt only where a call ends: the rows match
    llama-cpp-python's whether the prompt goes in one pass, in 512-row chunks or in 300-row ones."""
    tok = tiny_models[1]
    want = client.generate(long_prompt, 6, tok.stop_ids)
    session = _session(llama, long_prompt)
    rows, passes = _rows_of_passes(session, want[:4], chunk)
    assert torch.equal(rows, client.rows(long_prompt + want[:4], len(long_prompt)))
    assert passes == {0: 1, 512: 2, 300: 2}[chunk]  # 300 rows hold no whole 512-row call: one call a pass


def test_a_resyncs_generated_tokens_are_fed_alone_as_the_generation_fed_them(llama, client, long_prompt,
                                                                            tiny_models, calls):
    """A resync's OPEN states where its prompt ends: the generated tokens after it are fed one per
    call, as llama-cpp-python fed them, and the next verified rows are its rows."""
    tok, ours = tiny_models[1], calls[0]
    generated = client.generate(long_prompt, 30, tok.stop_ids)
    text, draft = long_prompt + generated[:20], generated[20:24]
    want = client.rows(text + draft, len(long_prompt))[-len(draft) - 1:]
    ours.clear()
    resynced = _session(llama, text, prompts=[(0, len(long_prompt))])
    assert torch.equal(_rows_of_passes(resynced, draft, 512)[0], want)
    assert ours == [512, len(long_prompt) - 512] + [1] * 24
    ours.clear()
    _rows_of_passes(_session(llama, text), draft, 512)  # stated as one prompt: batched to its end
    assert ours == [512, len(text) - 512] + [1] * 4


def test_speculation_on_a_long_prompt_is_llama_cpp_pythons_greedy_generation(llama, client, long_prompt,
                                                                               tiny_models, mosquitto):
    """A new session equals llama-cpp-python's generation from an empty context; a conversation's
    next turn (EXTEND, the kept session) equals its `Llama` going on from the first turn, as it
    serves one user's requests: from its prefix match over what it had fed."""
    from specedge.config import CloudConfig, DeviceConfig, build
    from specedge.tools.demo import Stack

    draft, tok = tiny_models[:2]
    stack = Stack(draft, tok, llama.model, llama.tokenizer, port=mosquitto.port,
                  device_cfg=build(DeviceConfig, {"device": {"fleet": "own-gen"}}),
                  cloud_cfg=build(CloudConfig, {"verifier": {"id": "v-own-gen", "fleet": "own-gen"}}))
    spec = stack.agent.cfg.speculation
    try:
        spec.keep_session = False
        for policy in ("fixed:4", "cloud-ar"):
            got = stack.agent.generate(long_prompt, SamplingParams(), 32, parse_policy(policy))
            assert got.tokens == client.generate(long_prompt, 32, tok.stop_ids), policy
            assert got.stats.exact
        spec.keep_session = True
        first = stack.agent.generate(long_prompt, SamplingParams(), 12, parse_policy("fixed:3"))
        assert first.tokens == client.generate(long_prompt, 12, tok.stop_ids)
        turn2 = long_prompt + first.tokens + tok.encode_chat(LONG[:400])[1:]
        second = stack.agent.generate(turn2, SamplingParams(), 16, parse_policy("fixed:3"))
        assert second.stats.cached_prompt_tokens > len(long_prompt) and second.stats.resyncs == 0
        assert second.tokens == client.generate(turn2, 16, tok.stop_ids, fresh=False)
        # A third turn the verifier no longer holds: the device's resync OPEN states the two turns'
        # prompt spans, and the verifier re-reads the text as the client had fed it.
        turn3 = turn2 + second.tokens + tok.encode_chat("and stop")[1:]
        stack.verifier.table.sessions.clear()
        third = stack.agent.generate(turn3, SamplingParams(), 16, parse_policy("fixed:3"))
        assert third.stats.resyncs >= 1
        (session,) = stack.verifier.table.sessions.values()
        assert len(session.prompts) == 3 and session.prompts[0] == (0, len(long_prompt))
        assert third.tokens == client.generate(turn3, 16, tok.stop_ids, fresh=False)
    finally:
        spec.keep_session = True
        stack.close()


def test_a_verified_round_on_a_fresh_session_is_one_pass_of_prompt_calls_and_single_rows(llama, long_prompt,
                                                                                          tiny_models):
    want = own_generation(llama.model, [long_prompt], 3, ())[0]
    session = _session(llama, long_prompt)
    item = Item(session, want[:2] + [(want[2] + 1) % 200])
    verify_batch(llama.model, [item], chunk=512)
    assert not item.done  # 512 positions first
    verify_batch(llama.model, [item], chunk=512)
    assert item.done and (item.accepted, item.next_token) == (2, want[2])
    assert session.cache.length == len(long_prompt) + 2
