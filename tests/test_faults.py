"""The fault-injection suite, CI-sized: one trial of every fault against real services."""
from __future__ import annotations

import pytest

from specedge.tools import faults


@pytest.mark.integration  # the suite starts its own brokers and services (tests/conftest.py)
def test_every_fault_is_survived_or_fails_cleanly_with_nothing_lost():
    report = faults.run_suite(trials=1, seed=1, speed=False)  # speed is the on-demand run's (a benchmark)
    failed = {r["fault"]: r["problems"] for r in report["rows"] if not r["passed"]}
    assert not failed, faults.format_table(report) + f"\n{failed}"
    assert set(report["table"]) == {f.name for f in faults.faults()}


def test_the_round_timer_follows_a_slowing_verifier_between_its_bounds():
    from specedge.device.rounds import RoundTimer

    timer = RoundTimer()
    assert timer.timeout_s(floor_s=2.0) == 2.0  # nothing seen yet
    for rtt in (0.1,) * 20:
        timer.observe(rtt)
    assert timer.timeout_s(floor_s=2.0) == 2.0  # fast rounds never shorten the configured wait
    for rtt in (3.0, 6.0, 9.0, 12.0):  # a verifier under growing load
        timer.observe(rtt)
    assert 12.0 < timer.timeout_s(floor_s=2.0) <= 16.0  # stretched past the slowest round, capped at 8x
    assert timer.timeout_s(floor_s=1.0) == 8.0
    assert timer.timeout_s(floor_s=2.0, cap_s=6.0) == 6.0  # never past the request's max_wait_s
