"""Pure checks of the metric helpers: per-position acceptance, percentiles, policy objects."""
import pytest

from specedge.device.policy import fixed_policy, parse_policy
from specedge.exporter import DeviceMetrics, render
from specedge.metrics import SpecStats, percentile, spec_rates
from specedge.protocol.wire import MAX_DRAFT


def test_acceptance_is_counted_per_draft_position():
    stats = SpecStats()
    stats.record_round(drafted=3, accepted=1, round_trip_s=0.1, verify_s=0.01)
    stats.record_round(drafted=2, accepted=2, round_trip_s=0.1, verify_s=0.01)
    stats.record_round(drafted=0, accepted=0, round_trip_s=0.1, verify_s=0.01)  # a plain target step
    stats.record_round(drafted=4, accepted=0, round_trip_s=0.1, verify_s=0.01)
    assert stats.drafted_per_pos == [3, 3, 2, 1]
    assert stats.accepted_per_pos == [2, 1, 0, 0]
    assert stats.summary()["acceptance_by_position"] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    # The per-position counts add up to the totals.
    assert sum(stats.drafted_per_pos) == stats.drafted_tokens == 9
    assert sum(stats.accepted_per_pos) == stats.accepted_tokens == 3
    assert SpecStats().summary()["acceptance_by_position"] == []


def test_per_position_counters_are_exported_with_a_position_label():
    metrics = DeviceMetrics(lambda: {"queue_depth": 0, "draining": False, "decode_errors": {}})
    stats = SpecStats()
    stats.record_round(drafted=2, accepted=1, round_trip_s=0.1, verify_s=0.01)
    stats.record_round(drafted=1, accepted=1, round_trip_s=0.1, verify_s=0.01)
    metrics.observe(stats)
    text = render(metrics.registry).decode()
    assert 'specedge_drafted_tokens_per_position_total{position="0"} 2.0' in text
    assert 'specedge_drafted_tokens_per_position_total{position="1"} 1.0' in text
    assert 'specedge_accepted_tokens_per_position_total{position="0"} 2.0' in text
    assert 'specedge_accepted_tokens_per_position_total{position="1"} 0.0' in text
    assert f'position="{MAX_DRAFT}"' not in text
    assert metrics.totals()["mean_accepted_len"] == pytest.approx(2.0)


def test_streamed_tokens_and_mode_switches_are_exported():
    metrics = DeviceMetrics(lambda: {"queue_depth": 0, "draining": False, "decode_errors": {}})
    stats = SpecStats(streamed_tokens=40, generated_tokens=60, modes=[(0.0, "stream"), (2.0, "speculate"),
                                                                       (3.0, "stream")])
    metrics.observe(stats)
    text = render(metrics.registry).decode()
    assert "specedge_streamed_tokens_total 40.0" in text and "specedge_mode_switches_total 2.0" in text
    assert stats.summary()["streamed_share"] == pytest.approx(40 / 60) and stats.summary()["mode_switches"] == 2


def test_percentile_is_the_sorted_value_at_floor_q_n():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4, 1, 3, 2], 0.5) == 3  # index 2: no interpolation
    assert percentile([5, 1, 4, 2, 3], 0.5) == 3
    assert percentile(range(100), 0.99) == 99
    assert percentile(range(10), 1.0) == 9
    assert percentile(range(10), 0.0) == 0


def test_spec_rates_names():
    assert spec_rates(4, 2, 2) == {"acceptance_rate": 0.5, "mean_accepted_len": 2.0}
    assert spec_rates(0, 0, 0) == {"acceptance_rate": None, "mean_accepted_len": None}


def test_fixed_policies_are_built_directly():
    assert fixed_policy(3) == parse_policy("fixed:3")
    assert fixed_policy(2, pipelined=True) == parse_policy("fixed:2+pipelined")
    assert fixed_policy(4, early_exit=True) == parse_policy("fixed:4+early-exit")
    shorthand = parse_policy("pipelined")
    assert (shorthand.name, shorthand.draft_len, shorthand.pipelined, shorthand.early_exit) == ("pipelined", 4, True, False)
    assert parse_policy("early-exit:2").early_exit and parse_policy("early-exit:2").draft_len == 2
    # An adaptive policy carries no cap of the device's: the scheduler's draft_cap is the one cap.
    assert parse_policy("adaptive").draft_len == parse_policy("adaptive", 8).draft_len == MAX_DRAFT
    assert parse_policy("fixed:8", 8).draft_len == 8
    with pytest.raises(ValueError):
        parse_policy("fixed:9", 8)
    assert parse_policy("fixed:2").next_draft_len(10) == 2 and parse_policy("fixed:5").next_draft_len(3) == 2
    with pytest.raises(ValueError):
        fixed_policy(MAX_DRAFT + 1)
    for bad in (f"fixed:{MAX_DRAFT + 1}", "pipelined:x", "fixed:3+sideways"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_the_grafana_dashboard_names_only_metrics_the_exporters_export_and_shows_them_all(stack):
    """docs/grafana-dashboard.json against what a device and a real verifier export: a renamed
    metric would leave an empty panel, a new one no panel."""
    import json
    import re
    from pathlib import Path

    def family(name: str) -> str:  # a sample's or a counter's name without its suffix
        return re.sub(r"_(total|bucket|sum|count)$", "", name)

    device = DeviceMetrics(lambda: {"queue_depth": 0, "draining": False, "decode_errors": {}})
    exported = set()
    for registry in (device.registry, stack.verifier.metrics.registry):
        exported |= {family(n) for n in re.findall(r"^# TYPE (\S+) ", render(registry).decode(), re.M)}
    dashboard = json.loads((Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    named = {family(m) for e in exprs for m in re.findall(r"specedge_[a-z_]+", e)}
    assert named - exported == set() and exported - named == set()
