"""The soak, CI-sized: devices generate without pause over the emulated Wi-Fi for 20 s."""
from __future__ import annotations

import pytest

from specedge.tools import soak

pytestmark = pytest.mark.integration  # the soak starts its own broker and services (tests/conftest.py)


def test_a_short_soak_loses_nothing_and_leaks_no_descriptors():
    report = soak.run_soak(seconds=20, devices=3, channel="wifi", interval_s=4.0)
    assert report["requests"] > 0 and report["failed"] == 0 and report["wrong"] == 0, report["failures"]
    assert report["hung_devices"] == 0
    assert report["verifier_fd_growth"] <= 0 and report["device_fd_growth"] <= 0
    assert all(s["verifier_sessions"] <= 3 for s in report["samples"])  # closed sessions are gone
    assert report["passed"]
