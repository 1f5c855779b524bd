"""The fault-injection suite, CI-sized: one trial of every fault against real services."""
from __future__ import annotations

from specedge import faults


def test_every_fault_is_survived_or_fails_cleanly_with_nothing_lost():
    report = faults.run_suite(trials=1, seed=1)
    failed = {r["fault"]: r["problems"] for r in report["rows"] if not r["passed"]}
    assert not failed, faults.format_table(report) + f"\n{failed}"
    assert set(report["table"]) == {f.name for f in faults.faults()}
