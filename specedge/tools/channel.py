"""Wireless channel emulator: a user-space TCP proxy that shapes each direction.

Per direction (up = client -> upstream, down = upstream -> client):
  capacity  Mahimahi trace (one line per 1500-byte delivery opportunity, in ms,
            repeating with the last timestamp as period) or a fixed rate;
            bytes queue at the bottleneck and drain at link speed, unused
            opportunities are lost (as in Mahimahi);
  delay     fixed one-way propagation delay plus optional jitter (order kept,
            it carries TCP);
  loss      a lost 1500-byte packet costs a retransmission timeout of extra delay;
  blackouts intervals (seconds since start) with no delivery at all.
A channel may also move through phases (another preset from a given second on, or a blackout),
laid out from the same start as the trace.
No kernel qdiscs, no privileges: it works on a laptop and in CI.
"""
from __future__ import annotations

import asyncio
import bisect
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from specedge.resources import resource

MTU = 1500


def default_trace_dir() -> Path:
    """$SPECEDGE_TRACES, else the traces shipped in the package."""
    return Path(os.environ["SPECEDGE_TRACES"]) if os.environ.get("SPECEDGE_TRACES") else resource("data", "traces")


def load_trace(path: str | Path) -> list[int]:
    """Millisecond timestamps of delivery opportunities; validated."""
    path = Path(path)
    try:
        values = [int(line) for line in path.read_text().split()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a Mahimahi trace ({exc})") from None
    if not values or values[-1] <= 0 or any(b < a for a, b in zip(values, values[1:])) or values[0] < 0:
        raise ValueError(f"{path}: a trace needs non-decreasing, non-negative timestamps ending after 0 ms")
    return values


@dataclass
class LinkSpec:
    """One direction of the emulated link."""

    trace: list[int] | None = None  # ms timestamps of 1500-byte opportunities
    rate_bps: float | None = None  # fixed capacity when there is no trace (None = unlimited)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability that a 1500-byte packet needs a retransmission
    rto_ms: float = 200.0  # the delay a retransmission adds
    blackouts: list[tuple[float, float]] = field(default_factory=list)  # (start_s, duration_s)
    trace_file: str | None = None  # where `trace` was read from, for reports

    def mean_rate_bps(self) -> float | None:
        if self.trace:
            return len(self.trace) * MTU * 8 / (self.trace[-1] / 1000)
        return self.rate_bps

    def capacity_text(self) -> str:
        rate = self.mean_rate_bps()
        if self.trace:
            source = Path(self.trace_file).name if self.trace_file else "trace"
            return f"{source} ({rate / 1e6:.3g} Mbit/s mean)"
        return f"{rate / 1e6:.3g} Mbit/s fixed" if rate else "unlimited"

    def impairments_text(self) -> str:
        parts = [f"{self.delay_ms:g} ms one-way delay"]
        if self.jitter_ms:
            parts.append(f"{self.jitter_ms:g} ms jitter")
        if self.loss:
            parts.append(f"{self.loss * 100:g}% loss")
        if self.blackouts:
            parts.append(f"{len(self.blackouts)} blackout(s)")
        return ", ".join(parts)

    def rate_at(self, t: float, window_s: float = 1.0) -> float | None:
        """Capacity (bit/s) over [t, t + window) seconds after start: what the trace offers there;
        0 inside a blackout."""
        if any(start <= t < start + duration for start, duration in self.blackouts):
            return 0.0
        if not self.trace:
            return self.rate_bps
        period = self.trace[-1] / 1000
        start, end = t % period, t % period + window_s
        count = bisect.bisect_left(self.trace, end * 1000) - bisect.bisect_left(self.trace, start * 1000)
        if end > period:
            count += bisect.bisect_left(self.trace, (end - period) * 1000)
        return count * MTU * 8 / window_s


class _Opportunities:
    """Delivery opportunity times for one direction. The trace and the blackouts are laid
    out from `origin` (emulator clock seconds); times in and out are on the emulator clock."""

    def __init__(self, spec: LinkSpec, origin: float = 0.0):
        self.spec, self.origin = spec, origin
        self.index = 0
        if spec.trace:
            self.period = spec.trace[-1] / 1000
            self.times = [t / 1000 for t in spec.trace]
        elif spec.rate_bps:
            self.interval, self.next_time = MTU * 8 / spec.rate_bps, 0.0

    def blacked_out(self, t: float) -> float | None:
        """End of the blackout covering t, if any."""
        for start, duration in self.spec.blackouts:
            if start <= t < start + duration:
                return start + duration
        return None

    def next_after(self, now: float) -> float:
        """The first usable opportunity at or after `now` (consumed)."""
        now = max(now - self.origin, 0.0)
        while True:
            t = self._next_raw(now)
            end = self.blacked_out(t)
            if end is None:
                return self.origin + t
            if end == math.inf:  # until the link is switched
                return end
            now = end

    def _next_raw(self, now: float) -> float:
        spec = self.spec
        if spec.trace:
            n = len(self.times)
            cycle, pos = divmod(self.index, n)
            t = cycle * self.period + self.times[pos]
            if t < now:  # unused opportunities are gone: jump to the first one after now
                cycle = int(now // self.period)
                pos = bisect.bisect_left(self.times, now - cycle * self.period)
                if pos == n:
                    cycle, pos = cycle + 1, 0
                self.index = cycle * n + pos
                t = cycle * self.period + self.times[pos]
            self.index += 1
            return t
        if spec.rate_bps:
            t = max(now, self.next_time)
            self.next_time = t + self.interval
            return t
        return now


class _Direction:
    """Bottleneck queue -> propagation delay -> writer, for one direction of one connection."""

    def __init__(self, name: str, spec: LinkSpec, writer: asyncio.StreamWriter, clock, rng: random.Random,
                 counter, origin: float):
        self.name = name  # up | down
        self.spec, self.writer, self.clock, self.rng, self.counter = spec, writer, clock, rng, counter
        self.queue = bytearray()
        self.data = asyncio.Event()
        self.ops = _Opportunities(spec, origin)
        self.inflight: asyncio.Queue = asyncio.Queue()
        self.last_delivery = 0.0
        self.ready_at = 0.0  # since when the head of the queue has been waiting
        self.closed = False
        self.switched = asyncio.Event()

    def switch(self, spec: LinkSpec, origin: float) -> None:
        """Another link from now on, its trace laid out from `origin`."""
        self.spec, self.ops = spec, _Opportunities(spec, origin)
        # A packet waiting for the old link's opportunity (or a blackout's end) asks the new link.
        self.switched.set()

    def push(self, chunk: bytes) -> None:
        if not self.queue:
            self.ready_at = self.clock()
        self.queue += chunk
        self.data.set()

    async def bottleneck(self) -> None:
        while True:
            if not self.queue:
                if self.closed:
                    await self.inflight.put(None)
                    return
                self.data.clear()
                await self.data.wait()
                continue
            if self.spec.trace is None and not self.spec.rate_bps and not self.spec.blackouts:
                size, depart = len(self.queue), self.clock()  # unlimited capacity
            else:
                # A backlogged queue uses consecutive opportunities; an idle link lets them pass.
                depart = self.ops.next_after(self.ready_at)
                size = min(MTU, len(self.queue))
                wait = depart - self.clock()
                if wait > 0:
                    self.switched.clear()
                    try:
                        await asyncio.wait_for(self.switched.wait(), None if wait == math.inf else wait)
                        continue
                    except asyncio.TimeoutError:
                        pass
            packet = bytes(self.queue[:size])
            del self.queue[:size]
            self.ready_at = depart
            delay = self.spec.delay_ms / 1000
            if self.spec.jitter_ms:
                delay = max(0.0, delay + self.rng.uniform(-1, 1) * self.spec.jitter_ms / 1000)
            if self.spec.loss and self.rng.random() < self.spec.loss:
                delay += self.spec.rto_ms / 1000
            arrive = max(depart + delay, self.last_delivery)  # TCP keeps order
            self.last_delivery = arrive
            await self.inflight.put((arrive, packet))

    async def deliver(self) -> None:
        while True:
            item = await self.inflight.get()
            if item is None:
                break
            arrive, packet = item
            wait = arrive - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(packet)
            self.counter(len(packet))
            await self.writer.drain()
        self.writer.close()


@dataclass
class ChannelConfig:
    up: LinkSpec = field(default_factory=LinkSpec)
    down: LinkSpec = field(default_factory=LinkSpec)
    name: str = "custom"
    seed: int = 0
    # (start second since the origin, the channel from then on), in order; empty for a plain channel
    phases: list[tuple[float, ChannelConfig]] = field(default_factory=list)

    @property
    def description(self) -> str:
        """What was loaded, not what a preset promises: trace files with their measured mean
        rates, or fixed rates; then delay, jitter and loss. Each phase's, for a phased channel."""
        if self.phases:
            return " -> ".join(f"from {start:g} s {cfg.name}" + ("" if cfg.name == "blackout" else
                                                                 f" ({cfg.description})")
                               for start, cfg in self.phases)
        links = f"up {self.up.capacity_text()}, down {self.down.capacity_text()}"
        up, down = self.up.impairments_text(), self.down.impairments_text()
        return f"{links}; {up}" if up == down else f"{links}; up {up}; down {down}"

    def phase_at(self, t: float) -> tuple[float, ChannelConfig]:
        """(its start, the phase) in force t seconds after the origin; (0, self) for a plain channel."""
        if not self.phases:
            return 0.0, self
        return self.phases[max(bisect.bisect_right([start for start, _ in self.phases], t) - 1, 0)]

    def link_at(self, t: float) -> ChannelConfig:
        return self.phase_at(t)[1]

    def rates_at(self, t: float) -> tuple[float | None, float | None]:
        """(up, down) bit/s offered t seconds after the origin (see LinkSpec.rate_at)."""
        start, cfg = self.phase_at(t)
        return cfg.up.rate_at(t - start), cfg.down.rate_at(t - start)


class ChannelEmulator:
    """TCP proxy listen_port -> upstream, shaping both directions. Runs its own asyncio thread."""

    def __init__(self, config: ChannelConfig, upstream: tuple[str, int], listen_port: int = 0,
                 host: str = "127.0.0.1"):
        self.config, self.upstream, self.host = config, upstream, host
        self.port = listen_port
        self.bytes_up = self.bytes_down = 0
        self.connections = 0
        self._t0 = time.monotonic()
        self._origin = 0.0
        self._live = (0.0, config.link_at(0))  # (since when, the phase the connections are on)
        self._switches: list[asyncio.TimerHandle] = []
        self._rng = random.Random(config.seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="channel", daemon=True)
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._directions: set[_Direction] = set()

    def clock(self) -> float:
        return time.monotonic() - self._t0

    def elapsed(self) -> float:
        """Seconds since the trace and blackouts were last laid out (start or restart_clock)."""
        return self.clock() - self._origin

    def restart_clock(self) -> None:
        """Lay the trace, blackouts and phases out again from now, so the bench gives every run the
        same channel. The clock itself runs on: bytes in flight keep their delivery times."""
        self._in_loop(self._reset)

    def reconfigure(self, config: ChannelConfig) -> None:
        """Switch live connections to another channel from now on (a handover, a tunnel)."""
        def switch():
            self.config = config
            self._reset()

        self._in_loop(switch)

    def _reset(self) -> None:
        self._origin = self.clock()
        for handle in self._switches:
            handle.cancel()
        self._switches = [self._loop.call_later(start, self._enter, self._origin + start, cfg)
                          for start, cfg in self.config.phases[1:]]
        self._enter(self._origin, self.config.link_at(0))

    def _enter(self, since: float, phase: ChannelConfig) -> None:
        """Put live and later connections on `phase`, its trace laid out from `since`. The origin
        stays: elapsed() keeps counting from the request's start."""
        self._live = (since, phase)
        for d in self._directions:
            d.switch(phase.up if d.name == "up" else phase.down, since)

    def _in_loop(self, fn) -> None:
        async def call():
            fn()

        if self._thread.is_alive():  # the directions belong to the loop's thread
            asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=5)
        else:
            fn()

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n

    async def _pipe(self, reader: asyncio.StreamReader, direction: _Direction) -> None:
        try:
            while chunk := await reader.read(65536):
                direction.push(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            direction.closed = True
            direction.data.set()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        self.connections += 1
        self._writers.update((client_writer, up_writer))
        since, phase = self._live
        up = _Direction("up", phase.up, up_writer, self.clock, self._rng, self._count_up, since)
        down = _Direction("down", phase.down, client_writer, self.clock, self._rng, self._count_down, since)
        self._directions.update((up, down))
        jobs = [self._pipe(client_reader, up), up.bottleneck(), up.deliver(),
                self._pipe(up_reader, down), down.bottleneck(), down.deliver()]
        tasks = [asyncio.ensure_future(j) for j in jobs]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            self._directions.difference_update((up, down))
            for w in (client_writer, up_writer):
                w.close()
                self._writers.discard(w)

    def start(self) -> "ChannelEmulator":
        self._thread.start()

        async def boot():
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
            return self._server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=10)
        self.restart_clock()
        return self

    def stop(self) -> None:
        async def shutdown():
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# Presets: real U.S. cellular traces (Mahimahi format, shipped in specedge/data/traces) plus
# typical one-way delays; Wi-Fi has no trace here and uses a fixed home-Wi-Fi rate. The rates a
# run actually met are in ChannelConfig.description, measured from the files loaded.
PRESETS = {
    "ideal": dict(doc="loopback: no shaping, no delay"),
    "wifi": dict(up_rate=20e6, down_rate=50e6, delay_ms=5, jitter_ms=2, loss=0.002,
                 doc="home Wi-Fi: 20/50 Mbit/s up/down, 5 ms one-way (10 ms RTT), 2 ms jitter, 0.2% loss"),
    "lte": dict(trace="Verizon-LTE-short", delay_ms=30, jitter_ms=5,
                doc="Verizon LTE trace, 30 ms one-way (60 ms RTT)"),
    "lte-driving": dict(trace="ATT-LTE-driving-2016", delay_ms=40, jitter_ms=8,
                        doc="AT&T LTE trace while driving (with outages), 40 ms one-way"),
    "umts": dict(trace="TMobile-UMTS-driving", delay_ms=75, jitter_ms=10,
                 doc="T-Mobile UMTS/3G trace while driving, 75 ms one-way (150 ms RTT)"),
    "evdo": dict(trace="Verizon-EVDO-driving", delay_ms=100, jitter_ms=15,
                 doc="Verizon EV-DO trace while driving, 100 ms one-way (200 ms RTT)"),
    # (preset or "blackout", seconds; None = for ever), from the request's start
    # Short phases: a streamed request of ~100 tokens lasts ~10 s, its first ~3.5 s the prefill.
    "varying": dict(phases=(("wifi", 2), ("lte", 2), ("umts", 2), ("blackout", 1.5), ("lte", None)),
                    doc="within one request: Wi-Fi, LTE from 2 s, UMTS from 4 s, a 1.5 s blackout "
                        "from 6 s, LTE from 7.5 s on"),
}


def preset(name: str, trace_dir: str | Path | None = None, seed: int = 0) -> ChannelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown channel {name!r}; presets: {', '.join(PRESETS)}, or {TRACE_FORM}")
    p = PRESETS[name]
    if "phases" in p:
        phases, start = [], 0.0
        for phase, duration in p["phases"]:
            phases.append((start, _blackout(seed) if phase == "blackout" else preset(phase, trace_dir, seed)))
            if duration is None:
                break
            start += duration
        first = phases[0][1]
        return ChannelConfig(first.up, first.down, name, seed, phases)
    trace_dir = Path(trace_dir) if trace_dir else default_trace_dir()
    common = dict(delay_ms=p.get("delay_ms", 0.0), jitter_ms=p.get("jitter_ms", 0.0), loss=p.get("loss", 0.0))
    if "trace" in p:
        up, down = (trace_dir / f"{p['trace']}.{side}" for side in ("up", "down"))
        up = LinkSpec(trace=load_trace(up), trace_file=str(up), **common)
        down = LinkSpec(trace=load_trace(down), trace_file=str(down), **common)
    else:
        up = LinkSpec(rate_bps=p.get("up_rate"), **common)
        down = LinkSpec(rate_bps=p.get("down_rate"), **common)
    return ChannelConfig(up, down, name, seed)


def _blackout(seed: int = 0) -> ChannelConfig:
    """Nothing delivered either way. The blackout lasts until the next phase's switch: one that
    ended by itself at the phase's end could let queued bytes out just before the switch."""
    gone = LinkSpec(blackouts=[(0.0, math.inf)])
    return ChannelConfig(gone, gone, "blackout", seed)


TRACE_FORM = "trace:UP,DOWN[,delay_ms=MS][,jitter_ms=MS][,loss=P]"
# option -> the interval its value must lie in
TRACE_OPTIONS = {"delay_ms": (0.0, math.inf), "jitter_ms": (0.0, math.inf), "loss": (0.0, 1.0)}


def parse_trace_spec(spec: str, seed: int = 0) -> ChannelConfig:
    """A channel over any Mahimahi trace pair: `trace:UP,DOWN[,delay_ms=..][,jitter_ms=..][,loss=..]`,
    UP and DOWN being file paths; the options apply to both directions. A ValueError names the
    part that is wrong."""
    if not spec.startswith("trace:"):
        raise ValueError(f"{spec!r} is not a trace spec: expected {TRACE_FORM}")
    parts = [p.strip() for p in spec[len("trace:"):].split(",")]
    files, settings = parts[:2], parts[2:]
    if len(files) != 2 or any(not f or "=" in f for f in files):
        raise ValueError(f"{spec!r}: expected two trace files first, as in {TRACE_FORM}")
    options: dict[str, float] = {}
    for part in settings:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"{spec!r}: {part!r} is not KEY=VALUE (only two trace files, then options)")
        if key not in TRACE_OPTIONS:
            raise ValueError(f"{spec!r}: unknown option {key!r}; known: {', '.join(TRACE_OPTIONS)}")
        if key in options:
            raise ValueError(f"{spec!r}: {key} given twice")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{spec!r}: {key}={value!r} is not a number") from None
        low, high = TRACE_OPTIONS[key]
        if not low <= number <= high:
            raise ValueError(f"{spec!r}: {key}={value} is outside [{low:g}, {high:g}]")
        options[key] = number
    links = []
    for direction, file in zip(("up", "down"), files):
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec!r}: the {direction} trace {path} does not exist")
        links.append(LinkSpec(trace=load_trace(path), trace_file=str(path), **options))
    up, down = (Path(f).stem for f in files)
    name = "trace:" + ",".join([up if up == down else f"{up}+{down}", *settings])
    return ChannelConfig(links[0], links[1], name, seed)


def channel_config(spec: str, seed: int = 0) -> ChannelConfig:
    """A preset name or a `trace:` spec."""
    return parse_trace_spec(spec, seed) if spec.startswith("trace:") else preset(spec, seed=seed)


def split_channels(text: str) -> list[str]:
    """A comma-separated list of channels into specs; a `trace:` spec keeps its own commas
    (its second file and its KEY=VALUE options)."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        last = specs[-1] if specs else ""
        if last.startswith("trace:") and not part.startswith("trace:") and ("," not in last or "=" in part):
            specs[-1] = f"{last},{part}"
        else:
            specs.append(part)
    return specs


# -- `specedge channel` -----------------------------------------------------------------------------
def add_parser(sub) -> None:
    ch = sub.add_parser("channel", help="wireless channel emulator: a shaping TCP proxy")
    ch.add_argument("--listen", type=int, required=True, help="local port (0 = any)")
    ch.add_argument("--upstream", required=True, help="HOST:PORT of the broker")
    ch.add_argument("--preset", help="ideal, wifi, lte, lte-driving, umts, evdo or varying (overrides the rest)")
    ch.add_argument("--up-trace", help="Mahimahi trace for device -> broker")
    ch.add_argument("--down-trace", help="Mahimahi trace for broker -> device")
    ch.add_argument("--up-mbps", type=float, help="fixed uplink rate without a trace")
    ch.add_argument("--down-mbps", type=float, help="fixed downlink rate without a trace")
    ch.add_argument("--delay-ms", type=float, default=0.0, help="one-way propagation delay")
    ch.add_argument("--jitter-ms", type=float, default=0.0)
    ch.add_argument("--loss", type=float, default=0.0, help="packet loss probability (adds an RTO each)")
    ch.add_argument("--rto-ms", type=float, default=200.0)
    ch.add_argument("--blackout", action="append", metavar="START_S:DURATION_S")
    ch.add_argument("--seed", type=int, default=0)
    ch.set_defaults(func=run)


def run(args) -> int:
    """The emulator between --listen and --upstream until SIGINT or SIGTERM."""
    import sys

    from specedge.systemd import wait_for_signal

    host, _, port = args.upstream.rpartition(":")
    if not port.isdigit():
        raise SystemExit("specedge channel: --upstream must be HOST:PORT")
    cfg = preset(args.preset, seed=args.seed) if args.preset else config_from_args(args)
    channel = ChannelEmulator(cfg, (host or "127.0.0.1", int(port)), args.listen).start()
    print(f"channel {cfg.name}: 127.0.0.1:{channel.port} -> {args.upstream} ({cfg.description})", file=sys.stderr)
    try:
        wait_for_signal()
    finally:
        channel.stop()
        print(f"bytes up {channel.bytes_up}, down {channel.bytes_down}", file=sys.stderr)
    return 0


def config_from_args(args) -> ChannelConfig:
    """A custom channel from the command line's traces or fixed rates, with the same delay, jitter,
    loss and blackouts both ways."""
    blackouts = []
    for b in args.blackout or []:
        start, _, duration = b.partition(":")
        blackouts.append((float(start), float(duration)))

    def side(trace, rate):
        return LinkSpec(trace=load_trace(trace) if trace else None, trace_file=trace,
                        rate_bps=rate * 1e6 if rate else None,
                        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=args.loss,
                        rto_ms=args.rto_ms, blackouts=blackouts)

    return ChannelConfig(side(args.up_trace, args.up_mbps), side(args.down_trace, args.down_mbps), seed=args.seed)
