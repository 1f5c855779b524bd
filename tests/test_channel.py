"""The channel emulator: delay, throughput, blackouts and clean shutdown, measured through real sockets.

Tolerances: one-way delay within 15 ms + 15%, throughput within 15% of the configured
capacity (the machines are shared and asyncio timers are coarse).
"""
from __future__ import annotations

import math
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest

from specedge.tools.channel import (ChannelConfig, ChannelEmulator, LinkSpec, channel_config, default_trace_dir,
                              load_trace, parse_trace_spec, preset, split_channels)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Sends `size` bytes as fast as it can, then closes."""

    size = 0

    def handle(self):
        self.request.recv(1)
        self.request.sendall(b"x" * self.size)


@pytest.fixture
def server():
    servers = []

    def make(handler):
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.server_address

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _rtt(sock) -> float:
    t0 = time.perf_counter()
    sock.sendall(b"ping")
    got = b""
    while len(got) < 4:
        got += sock.recv(4)
    return time.perf_counter() - t0


def test_delay_matches_configuration(server):
    addr = server(_Echo)
    cfg = ChannelConfig(LinkSpec(delay_ms=40), LinkSpec(delay_ms=60))
    with ChannelEmulator(cfg, addr) as ch, socket.create_connection(("127.0.0.1", ch.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = sorted(_rtt(s) for _ in range(8))
    median = rtts[len(rtts) // 2]
    assert 0.100 * 0.85 - 0.015 <= median <= 0.100 * 1.15 + 0.015, rtts


def _download(addr, size) -> float:
    with socket.create_connection(addr) as s:
        t0 = time.perf_counter()
        s.sendall(b"g")
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
        assert got == size
        return time.perf_counter() - t0


def test_fixed_rate_drains_a_burst_at_link_speed(server):
    _Sink.size = 300_000
    addr = server(_Sink)
    cfg = ChannelConfig(LinkSpec(), LinkSpec(rate_bps=2e6))
    with ChannelEmulator(cfg, addr) as ch:
        elapsed = _download(("127.0.0.1", ch.port), _Sink.size)
        assert ch.bytes_down == _Sink.size and ch.bytes_up == 1
    expected = _Sink.size * 8 / 2e6  # 1.2 s
    assert expected * 0.85 <= elapsed <= expected * 1.15, elapsed


def test_trace_capacity_is_replayed_and_repeats(server, tmp_path):
    # 2 opportunities every 3 ms for 30 ms, then repeating: 2 * 1500 B / 3 ms = 8 Mbit/s.
    trace = tmp_path / "t.down"
    trace.write_text("\n".join(str(t) for ms in range(3, 31, 3) for t in (ms, ms)))
    _Sink.size = 600_000
    addr = server(_Sink)
    cfg = ChannelConfig(LinkSpec(), LinkSpec(trace=load_trace(trace)))
    with ChannelEmulator(cfg, addr) as ch:
        elapsed = _download(("127.0.0.1", ch.port), _Sink.size)
    expected = _Sink.size * 8 / 8e6  # 0.6 s, many repetitions of the 30 ms trace
    assert expected * 0.85 <= elapsed <= expected * 1.15, elapsed
    assert cfg.down.mean_rate_bps() == pytest.approx(8e6)


def test_blackout_stops_traffic_and_it_resumes_after(server):
    addr = server(_Echo)
    cfg = ChannelConfig(LinkSpec(rate_bps=10e6, blackouts=[(0.3, 0.8)]), LinkSpec(rate_bps=10e6))
    with ChannelEmulator(cfg, addr) as ch, socket.create_connection(("127.0.0.1", ch.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch.restart_clock()
        assert _rtt(s) < 0.1  # before the blackout
        time.sleep(0.35 - ch.elapsed())
        stalled = _rtt(s)  # sent inside the blackout: held until it ends at 1.1 s
        assert ch.elapsed() >= 1.1 and stalled >= 0.6
        assert _rtt(s) < 0.1  # after it


def test_restarting_the_trace_keeps_bytes_in_flight_on_time(server):
    """restart_clock between two exchanges must not hold new traffic behind old timestamps."""
    addr = server(_Echo)
    cfg = ChannelConfig(LinkSpec(rate_bps=5e6, delay_ms=20), LinkSpec(rate_bps=5e6, delay_ms=20))
    with ChannelEmulator(cfg, addr) as ch, socket.create_connection(("127.0.0.1", ch.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        time.sleep(0.5)
        assert _rtt(s) < 0.1
        s.sendall(b"late")  # still in flight when the trace restarts
        ch.restart_clock()
        got = b""
        while len(got) < 4:
            got += s.recv(4)
        assert _rtt(s) < 0.1


def test_loss_adds_retransmission_delay(server):
    addr = server(_Echo)
    cfg = ChannelConfig(LinkSpec(loss=1.0, rto_ms=150), LinkSpec())
    with ChannelEmulator(cfg, addr) as ch, socket.create_connection(("127.0.0.1", ch.port)) as s:
        assert 0.14 <= _rtt(s) <= 0.3


def test_proxy_closes_cleanly(server):
    addr = server(_Echo)
    before = threading.active_count()
    ch = ChannelEmulator(ChannelConfig(), addr).start()
    s = socket.create_connection(("127.0.0.1", ch.port))
    assert _rtt(s) < 0.5
    ch.stop()
    s.settimeout(2)
    assert s.recv(10) == b""  # the client sees the connection end
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ch.port), timeout=1).close()
    time.sleep(0.1)
    assert threading.active_count() <= before


def test_presets_load_the_real_traces_shipped_in_the_package(monkeypatch):
    monkeypatch.delenv("SPECEDGE_TRACES", raising=False)
    assert default_trace_dir().parent.parent.name == "specedge"  # specedge/data/traces
    for name in ("lte", "umts", "evdo", "lte-driving"):
        cfg = preset(name)
        assert cfg.up.trace and cfg.down.trace and cfg.up.delay_ms > 0
        assert Path(cfg.up.trace_file).parent == default_trace_dir()
    assert preset("ideal").up.trace is None
    with pytest.raises(ValueError, match="unknown channel"):
        preset("5g-dreams")


def test_bad_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.up"
    bad.write_text("5\n3\n")
    with pytest.raises(ValueError, match="non-decreasing"):
        load_trace(bad)
    bad.write_text("abc\n")
    with pytest.raises(ValueError, match="not a Mahimahi trace"):
        load_trace(bad)


def _traces(folder: Path, stem: str, up_per_ms: int, down_per_ms: int) -> tuple[Path, Path]:
    """A 10 ms trace pair with this many 1500-byte opportunities per millisecond (12 Mbit/s each)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for side, per_ms in (("up", up_per_ms), ("down", down_per_ms)):
        path = folder / f"{stem}.{side}"
        path.write_text("".join(f"{ms}\n" * per_ms for ms in range(1, 11)))
        paths.append(path)
    return paths[0], paths[1]


def test_trace_spec_takes_two_files_then_options(tmp_path):
    up, down = _traces(tmp_path, "mine", 1, 2)
    cfg = parse_trace_spec(f"trace:{up},{down},delay_ms=25,jitter_ms=3,loss=0.01", seed=7)
    assert cfg.up.trace_file == str(up) and cfg.down.trace_file == str(down)
    assert cfg.up.mean_rate_bps() == pytest.approx(12e6) and cfg.down.mean_rate_bps() == pytest.approx(24e6)
    for link in (cfg.up, cfg.down):
        assert (link.delay_ms, link.jitter_ms, link.loss) == (25, 3, 0.01)
    assert cfg.name == "trace:mine,delay_ms=25,jitter_ms=3,loss=0.01" and cfg.seed == 7
    plain = parse_trace_spec(f"trace:{up},{down}")
    assert plain.up.delay_ms == 0 and plain.name == "trace:mine"


@pytest.mark.parametrize("spec,message", [
    ("lte", "not a trace spec"),
    ("trace:{up}", "two trace files first"),
    ("trace:{up},delay_ms=5", "two trace files first"),
    ("trace:,{down}", "two trace files first"),
    ("trace:{up},{down},{down}", "'.*mine.down' is not KEY=VALUE"),
    ("trace:{up},{down},rate=5", "unknown option 'rate'"),
    ("trace:{up},{down},delay_ms=fast", "delay_ms='fast' is not a number"),
    ("trace:{up},{down},loss=1.5", "loss=1.5 is outside"),
    ("trace:{up},{down},delay_ms=-1", "delay_ms=-1 is outside"),
    ("trace:{up},{down},loss=0.1,loss=0.2", "loss given twice"),
    ("trace:{up},{missing}", "the down trace .*nowhere.down does not exist"),
    ("trace:{missing},{down}", "the up trace .*nowhere.down does not exist"),
])
def test_bad_trace_specs_name_the_bad_part(tmp_path, spec, message):
    up, down = _traces(tmp_path, "mine", 1, 1)
    with pytest.raises(ValueError, match=message):
        parse_trace_spec(spec.format(up=up, down=down, missing=tmp_path / "nowhere.down"))


def test_a_custom_trace_pair_is_described_by_its_files_and_measured_rates(tmp_path):
    up, down = _traces(tmp_path, "bus", 1, 2)
    cfg = parse_trace_spec(f"trace:{up},{down},delay_ms=40,loss=0.02")
    assert cfg.description == ("up bus.up (12 Mbit/s mean), down bus.down (24 Mbit/s mean); "
                               "40 ms one-way delay, 2% loss")


def test_preset_description_names_the_files_loaded_not_the_shipped_ones(tmp_path, monkeypatch):
    _traces(tmp_path / "elsewhere", "Verizon-LTE-short", 3, 1)
    monkeypatch.setenv("SPECEDGE_TRACES", str(tmp_path / "elsewhere"))
    described = preset("lte").description
    assert str(tmp_path / "elsewhere" / "Verizon-LTE-short.up") == preset("lte").up.trace_file
    assert described.startswith("up Verizon-LTE-short.up (36 Mbit/s mean), down Verizon-LTE-short.down "
                                "(12 Mbit/s mean); 30 ms one-way delay")
    monkeypatch.delenv("SPECEDGE_TRACES")
    assert "(5.95 Mbit/s mean)" in preset("lte").description  # the shipped Verizon trace


def test_channel_lists_keep_a_trace_spec_together():
    assert split_channels("ideal,lte") == ["ideal", "lte"]
    assert split_channels("ideal,trace:a.up,b.down,delay_ms=5,loss=0.1,umts,trace:c,d") == [
        "ideal", "trace:a.up,b.down,delay_ms=5,loss=0.1", "umts", "trace:c,d"]
    assert split_channels(" lte , ,trace:a,b,") == ["lte", "trace:a,b"]


def test_varying_preset_moves_through_its_phases_from_the_request_start():
    cfg = channel_config("varying")
    assert [(start, phase.name) for start, phase in cfg.phases] == [
        (0, "wifi"), (2, "lte"), (4, "umts"), (6, "blackout"), (7.5, "lte")]
    assert (cfg.up, cfg.down) == (preset("wifi").up, preset("wifi").down)  # what a connection starts on
    for t, name in ((0, "wifi"), (1.9, "wifi"), (2, "lte"), (4.5, "umts"), (6, "blackout"), (7.4, "blackout"),
                    (7.5, "lte"), (600, "lte")):
        assert cfg.link_at(t).name == name, t
    assert cfg.rates_at(1) == (20e6, 50e6) and cfg.rates_at(7) == (0, 0)
    lte = preset("lte")
    assert cfg.rates_at(8) == (lte.up.rate_at(0.5), lte.down.rate_at(0.5))  # the trace from the phase's start
    assert "from 4 s umts (up TMobile-UMTS-driving.up" in cfg.description and "from 6 s blackout ->" in cfg.description
    plain = preset("lte")
    assert plain.link_at(5) is plain and plain.rates_at(5) == (lte.up.rate_at(5), lte.down.rate_at(5))
    assert split_channels("lte,umts,varying") == ["lte", "umts", "varying"]


def _phased(*phases: tuple[float, LinkSpec | None]) -> ChannelConfig:
    """A channel with these phases, the same link both ways; None is a blackout until the next phase."""
    gone = LinkSpec(blackouts=[(0.0, math.inf)])
    configs = [(start, ChannelConfig(link or gone, link or gone, "blackout" if link is None else f"phase {i}"))
               for i, (start, link) in enumerate(phases)]
    return ChannelConfig(configs[0][1].up, configs[0][1].down, "phased", phases=configs)


def _connect(ch: ChannelEmulator) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", ch.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_phases_switch_live_connections_and_a_blackout_holds_bytes_until_the_next_phase(server):
    addr = server(_Echo)
    cfg = _phased((0.0, LinkSpec()), (0.4, None), (0.8, LinkSpec(delay_ms=100)))
    with ChannelEmulator(cfg, addr) as ch, _connect(ch) as s:
        ch.restart_clock()
        assert _rtt(s) < 0.1
        time.sleep(0.5 - ch.elapsed())
        stalled = _rtt(s)  # held to 0.8 s, then 100 ms each way
        # elapsed() still counts from the restart: the switches do not move the origin.
        assert ch.elapsed() >= 0.8 + 0.2 * 0.95 and stalled >= 0.45, stalled
        assert _rtt(s) >= 0.195
        with _connect(ch) as late:  # opened mid-phase: on the phase in force
            assert _rtt(late) >= 0.195


def test_restarting_the_clock_restarts_the_phases_and_drops_the_old_schedule(server):
    addr = server(_Echo)
    cfg = _phased((0.0, LinkSpec()), (0.4, None), (0.8, LinkSpec(delay_ms=100)))
    with ChannelEmulator(cfg, addr) as ch, _connect(ch) as s:
        time.sleep(0.9 - ch.elapsed())
        assert _rtt(s) >= 0.195  # the last phase
        ch.restart_clock()
        assert _rtt(s) < 0.1  # the first phase again
        time.sleep(0.3 - ch.elapsed())
        ch.restart_clock()
        time.sleep(0.2 - ch.elapsed())  # the blackout of the schedule just dropped would be on now
        assert _rtt(s) < 0.1
        time.sleep(0.5 - ch.elapsed())
        _rtt(s)
        assert ch.elapsed() >= 0.8 + 0.2 * 0.95  # the blackout of the new schedule, then 100 ms each way
