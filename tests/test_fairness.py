"""Each device's share of the target (cloud/fairness.py): the rule alone, then through real wire
messages against the real verifier, a heavy device beside a light one whose verdicts must stay
the target's own."""
from __future__ import annotations

import time

import pytest

from specedge.cloud.engine import own_generation
from specedge.cloud.fairness import ACTIVE_S, HALF_LIFE_S, SPAN, Shares
from specedge.cloud.registry import Target
from specedge.cloud.session import TargetSession
from specedge.protocol import wire
from specedge.speculative import SamplingParams

A, B, C = ("f", "a"), ("f", "b"), ("f", "c")


def _plan(shares: Shares, pending: list[tuple], now: float, positions: int = 4, since: float = 0.0,
          cold: bool = False):
    """pending: (device, name) rounds, each feeding `positions` (a cold session's text: at most
    the chunk), each come at `since`."""
    return shares.plan(pending, lambda p: p[0], lambda p, chunk: min(positions, chunk) if cold else positions,
                       lambda p: since, now)


def test_service_halves_every_half_life_and_a_quiet_device_is_forgotten():
    shares = Shares()
    shares.charge(A, 4.0, now=0.0)
    assert shares.used(A, HALF_LIFE_S) == pytest.approx(2.0)
    assert shares.used(A, 3 * HALF_LIFE_S) == pytest.approx(0.5)
    shares.touch(A, 0.0)
    shares.touch(B, 100.0)
    shares.over(100.0)
    assert A not in shares.seen and A not in shares.service  # long quiet: nothing kept for it


def test_a_device_alone_is_never_over_its_share_whatever_it_uses():
    shares = Shares()
    shares.touch(A, 0.0)
    shares.charge(A, 10 * SPAN, 0.0)
    assert shares.over(0.0) == set()
    assert _plan(shares, [(A, 1), (A, 2)], 0.0) == ([(A, 1), (A, 2)], [], 0)


def test_devices_using_the_target_alike_share_every_pass():
    shares = Shares()
    for d in (A, B, C):
        shares.touch(d, 0.0)
        shares.charge(d, SPAN / 3, 0.0)  # the target busy, a third each
    assert shares.over(0.0) == set()
    rounds = [(A, 1), (B, 1), (C, 1)]
    assert _plan(shares, rounds, 0.0) == (rounds, [], 0)


def test_a_device_over_its_share_waits_while_a_lighter_device_has_a_round_pending():
    shares = Shares(slack=1.2)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(A, 0.9 * SPAN, 0.0)  # the heavy one: 90 % of the target
    shares.charge(B, 0.1 * SPAN, 0.0)
    assert shares.over(0.0) == {A}
    assert _plan(shares, [(A, 1), (B, 1), (A, 2)], 0.0) == ([(B, 1)], [(A, 1), (A, 2)], 0)


def test_a_pass_of_over_share_rounds_alone_feeds_about_yield_s_and_one_round_at_least():
    shares = Shares(slack=1.2, yield_s=0.05)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(A, SPAN, 0.0)
    shares.charge_pass([(A, 100)], 1.0, 0.0)  # 10 ms a position: 5 positions in 50 ms
    assert shares.position_s == pytest.approx(0.01) and shares.budget() == 5
    assert _plan(shares, [(A, 1), (A, 2)], 0.0, positions=4) == ([(A, 1)], [(A, 2)], 5)
    assert _plan(shares, [(A, 1), (A, 2)], 0.0, positions=3) == ([(A, 1)], [(A, 2)], 5)  # whole rounds
    # a cold session feeds at most the budget: two chunks of a long prompt fit in no pass together
    assert _plan(shares, [(A, 1), (A, 2)], 0.0, positions=1000, cold=True) == ([(A, 1)], [(A, 2)], 5)


def test_a_round_no_yield_can_fit_waits_for_the_lighter_devices_to_go_idle_or_hold_s():
    """A stream step or a prompt call that alone takes longer than yield_s (a slow target, a call
    the engine cannot split) would make the light device's next round wait that long."""
    shares = Shares(slack=1.2, yield_s=0.05, hold_s=10.0)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(A, 2 * SPAN, 0.0)
    shares.charge_pass([(A, 1)], 0.12, 0.0)  # a row costs 120 ms: no pass fits 50 ms
    assert shares.budget() == 1
    assert _plan(shares, [(A, 1)], 0.5, positions=1) == ([(A, 1)], [], 1)  # one position fits one
    assert _plan(shares, [(A, 1)], 0.5, positions=5) == ([], [(A, 1)], 0)  # B was here 0.5 s ago
    assert _plan(shares, [(A, 1)], 1.5, positions=5)[0] == [(A, 1)]  # B idle for a second
    shares.touch(B, 11.0)
    shares.touch(A, 11.0)
    shares.charge(A, SPAN, 11.0)
    assert _plan(shares, [(A, 1)], 11.0, positions=5, since=0.5)[0] == [(A, 1)]  # waited hold_s


def test_a_heavy_device_becomes_light_again_once_it_stops():
    shares = Shares(slack=1.2)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(A, SPAN, 0.0)
    assert shares.over(0.0) == {A}
    later = 4 * HALF_LIFE_S  # a sixteenth left
    shares.touch(A, later)
    shares.touch(B, later)
    assert shares.over(later) == set()
    assert ACTIVE_S > 0 and shares.over(later + ACTIVE_S + 1) == set()  # both quiet


def test_a_device_that_sent_what_no_honest_device_sends_gets_only_the_others_idle_time():
    shares = Shares(slack=1.2, yield_s=0.05)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.strike(A, 1.0, 0.0)  # a refused request: no service to speak of, suspect all the same
    assert shares.over(0.0) == {A} and shares.gated(A, 0.5) and not shares.gated(B, 0.5)
    assert _plan(shares, [(A, 1), (B, 1)], 0.5) == ([(B, 1)], [(A, 1)], 0)
    assert _plan(shares, [(A, 1)], 0.5, positions=1) == ([], [(A, 1)], 0)  # B busy: even one position waits
    assert _plan(shares, [(A, 1)], 1.5, positions=1)[0] == [(A, 1)]  # B quiet for a second
    shares.touch(A, 30.0)
    shares.touch(B, 30.0)
    assert not shares.suspect(A, 30.0) and shares.over(30.0) == set()  # a strike fades


def test_a_suspect_device_has_no_share_so_a_heavy_honest_device_beside_it_never_waits_for_it():
    """On a CPU target one honest device may use the whole target: beside an attacker it was
    over half a share, and the attacker's rounds and messages stopped waiting (0.45x on the real
    pair). A suspect device is not counted in the shares, and waits past hold_s."""
    shares = Shares(slack=1.2, yield_s=0.05, hold_s=10.0)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(B, 2 * SPAN, 0.0)  # the honest device used everything lately
    shares.strike(A, 1.0, 0.0)
    assert shares.over(0.0) == {A} and shares.gated(A, 0.5)
    assert _plan(shares, [(A, 1), (B, 1)], 0.5) == ([(B, 1)], [(A, 1)], 0)
    shares.touch(A, 11.0)
    shares.strike(A, 1.0, 11.0)  # still at it
    shares.touch(B, 11.9)
    assert _plan(shares, [(A, 1)], 12.0, positions=1, since=0.0) == ([], [(A, 1)], 0)  # 12 s > hold_s
    assert _plan(shares, [(A, 1)], 13.0, positions=1, since=0.0)[0] == [(A, 1)]  # B idle for a second


def test_a_shares_off_switch_plans_every_round_at_once():
    shares = Shares(slack=0)
    shares.touch(A, 0.0)
    shares.touch(B, 0.0)
    shares.charge(A, 100.0, 0.0)
    assert _plan(shares, [(A, 1), (B, 1)], 0.0) == ([(A, 1), (B, 1)], [], 0)


# -- through the wire ------------------------------------------------------------------------------
def _verdicts(client, device: str, text: list[int], draft: list[int], rounds: int, first_seq: int, want):
    for seq in range(first_seq, first_seq + rounds):
        verdict = client.ask(device, wire.Draft(1, seq, len(text), draft, text_hash=wire.text_hash(text)), 30)
        assert isinstance(verdict, wire.Verdict)
        assert (verdict.accepted, verdict.next_token) == want(text, draft)
        text += draft[:verdict.accepted] + [verdict.next_token]
    return text


def _stream(client, device: str, n: int) -> list[int]:
    got = []
    while True:
        msg = client.answer(device, 1, timeout=60)
        assert isinstance(msg, wire.Tokens), msg
        got += msg.tokens
        if msg.done or len(got) >= n:
            return got


def test_a_streaming_device_over_its_share_waits_for_the_light_one_and_both_answers_stay_exact(
        tiny_models, fleet_verifier, wire_client):
    _, tok, model, _ = tiny_models
    target = Target.in_memory("tiny", model, tok)
    verifier = fleet_verifier("shares", batch_window_ms=1)
    light, heavy = wire_client("shares", ("light",)), wire_client("shares", ("heavy",))
    prompt = tok.encode_chat("list every color")  # the tiny target answers it at length (faults.py)
    for client, device in ((heavy, "heavy"), (light, "light")):
        assert isinstance(client.ask(device, wire.Open(1, 1, prompt)), wire.Opened)
    heavy.send("heavy", wire.Generate(1, 2, len(prompt), 300, wire.text_hash(prompt)))
    first = heavy.answer("heavy", 1, timeout=30)  # under way (a GENERATE of a heavy device would wait)
    # The heavy device has had the target for a minute (what a long stream or a flood of long
    # prompts would have left): it is over its share while the light one is active.
    verifier.shares.charge(("shares", "heavy"), 60.0, time.monotonic())

    def want(text, draft):
        return TargetSession(target, text, SamplingParams(), 1).verify(draft)
    _verdicts(light, "light", list(prompt), [5, 6, 7], 4, 2, want)
    stream = first.tokens + _stream(heavy, "heavy", 300 - len(first.tokens))
    reference = own_generation(model, [prompt], 300, tok.stop_ids)[0]
    assert stream[:len(reference)] == reference  # up to the stop token, which the stream sends too
    assert len(stream) == len(reference) or (len(stream) == len(reference) + 1 and stream[-1] in tok.stop_ids)
    assert verifier.stats.share_held > 0  # its steps waited for the light device's rounds


def test_a_long_prompt_of_a_device_over_its_share_is_fed_a_yield_at_a_time(
        tiny_models, fleet_verifier, wire_client):
    _, tok, model, _ = tiny_models
    verifier = fleet_verifier("yield", yield_ms=0.001)  # a position a pass, whatever it costs
    client = wire_client("yield")
    short = tok.encode_chat("hi")
    long = tok.encode_chat("list the parts of a bicycle, then of a car, then of a train, one per line")
    assert isinstance(client.ask("light", wire.Open(1, 1, short)), wire.Opened)
    assert isinstance(client.ask("heavy", wire.Open(1, 1, long)), wire.Opened)
    verifier.shares.charge(("yield", "heavy"), 60.0, time.monotonic())
    client.send("heavy", wire.Generate(1, 2, len(long), 3, wire.text_hash(long)))
    assert _stream(client, "heavy", 3) == own_generation(model, [long], 3, tok.stop_ids)[0]
    assert verifier.stats.share_yields >= len(long) - 1  # its prefill went a position a pass
    assert verifier.stats.prefill_chunks >= len(long) - 2


def test_messages_of_a_device_over_its_share_wait_while_a_lighter_device_is_busy(
        tiny_models, fleet_verifier, wire_client):
    """Handling a message is target time too: an OPEN under a grammar walks its whole text, and a
    flood would be decoded between every pass. The heavy device's OPEN is answered once the light
    device has gone quiet, not between its rounds."""
    _, tok, model, _ = tiny_models
    target = Target.in_memory("tiny", model, tok)
    verifier = fleet_verifier("gate", share_hold_s=60)
    light, heavy = wire_client("gate", ("light",)), wire_client("gate", ("heavy",))
    prompt = tok.encode_chat("water the plants")
    assert isinstance(light.ask("light", wire.Open(1, 1, prompt)), wire.Opened)
    verifier.shares.charge(("gate", "heavy"), 60.0, time.monotonic())
    heavy.send("heavy", wire.Open(1, 1, prompt))

    def want(text, draft):
        return TargetSession(target, text, SamplingParams(), 1).verify(draft)
    _verdicts(light, "light", list(prompt), [5, 6, 7], 4, 2, want)
    assert heavy.replies.empty()  # held while the light device was busy
    assert isinstance(heavy.answer("heavy", 1, timeout=30), wire.Opened)  # a second after it went quiet
    assert verifier.errors.get("shed", 0) == 0 and not verifier.backlog


def test_a_session_opened_and_never_used_does_not_make_others_wait_the_batch_window(
        tiny_models, fleet_verifier, wire_client):
    _, tok, model, _ = tiny_models
    target = Target.in_memory("tiny", model, tok)
    verifier = fleet_verifier("window")
    client = wire_client("window")
    prompt = tok.encode_chat("feed the cat")
    for device in ("idle", "busy"):
        assert isinstance(client.ask(device, wire.Open(1, 1, prompt)), wire.Opened)

    def want(text, draft):
        return TargetSession(target, text, SamplingParams(), 1).verify(draft)
    _verdicts(client, "busy", list(prompt), [5, 6], 1, 2, want)
    assert len(verifier.table.sessions) == 2 and verifier.active_sessions() == 1  # the one answered
