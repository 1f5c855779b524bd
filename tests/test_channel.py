"""The channel emulator: delay, throughput, blackouts and clean shutdown, measured through real sockets.

Tolerances: one-way delay within 15 ms + 15%, throughput within 15% of the configured
capacity (the machines are shared and asyncio timers are coarse).
"""
from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from specedge.channel import ChannelConfig, ChannelEmulator, LinkSpec, load_trace, preset


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


def test_presets_load_the_real_traces():
    for name in ("lte", "umts", "evdo", "lte-driving"):
        cfg = preset(name)
        assert cfg.up.trace and cfg.down.trace and cfg.up.delay_ms > 0
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
