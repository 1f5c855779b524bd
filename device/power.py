"""Power meters: watts per rail and in total, joules integrated over time, and a `source` label.

  jtop       jetson-stats' client of the jtop service (rails in mW from `jtop().power`)
  ina3221    the INA3221 rail monitors in sysfs on a Jetson without the jtop service
             (hwmon layout on JetPack 5/6, iio layout on JetPack 4)
  rapl       Intel RAPL energy counters under /sys/class/powercap on x86 hosts
  estimated  a device profile's idle/active watts times the busy time the agent reports;
             labelled `estimated:<profile>` wherever it is reported

`open_meter("auto", ...)` takes the first that answers, in that order. Meters that
read instantaneous power integrate it on a background thread (trapezoid rule);
RAPL reads its hardware energy counter (wrap-around handled).
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("specedge.power")

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")  # the board input: the total when a board has it


class MeterUnavailable(RuntimeError):
    """The requested meter cannot be read on this machine (the message says why)."""


@dataclass(frozen=True)
class PowerSample:
    t: float  # time.monotonic() of the reading
    rails_w: dict
    total_w: float


def board_total(rails_w: dict) -> float:
    """The input rail when the board has one (the other rails are inside it), else the sum."""
    for name in TOTAL_RAILS:
        if name in rails_w:
            return rails_w[name]
    return sum(rails_w.values())


class PowerMeter:
    source = "none"

    def sample(self) -> PowerSample:
        raise NotImplementedError

    def energy_j(self) -> float:
        """Joules since the meter opened (monotonic)."""
        raise NotImplementedError

    def note_busy(self, seconds: float) -> None:
        """The device computed for `seconds` (only the estimated meter needs to be told)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _IntegratingMeter(PowerMeter):
    """Samples instantaneous power every `interval_s` and integrates it."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = self._reading()
        self._energy = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"power-{self.source}", daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        """Rail name -> watts."""
        raise NotImplementedError

    def _reading(self) -> PowerSample:
        rails = self._read()
        return PowerSample(time.monotonic(), rails, board_total(rails))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                now = self._reading()
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s meter read failed: %s", self.source, exc)
                continue
            with self._lock:
                self._energy += 0.5 * (self._last.total_w + now.total_w) * (now.t - self._last.t)
                self._last = now

    def sample(self) -> PowerSample:
        with self._lock:
            return self._last

    def energy_j(self) -> float:
        with self._lock:  # plus the stretch since the last reading, at the last power
            return self._energy + self._last.total_w * (time.monotonic() - self._last.t)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# -- jtop ------------------------------------------------------------------------------------
def parse_jtop_power(power: dict) -> dict:
    """Rails in watts from jetson-stats' `jtop().power` ({'rail': {name: {'power': mW, ...}},
    'tot': {'power': mW, 'name': ...}}); the total is added under its rail name."""
    if not isinstance(power, dict) or "rail" not in power:
        raise ValueError(f"unexpected jtop power record: {power!r}")
    rails = {name: v["power"] / 1000 for name, v in power["rail"].items() if v.get("online", True)}
    total = power.get("tot") or {}
    if "power" in total:
        rails[total.get("name") or "VDD_IN"] = total["power"] / 1000
    return rails


class JtopMeter(_IntegratingMeter):
    source = "jtop"

    def __init__(self, interval_s: float = 0.1, client=None):
        if client is None:
            try:
                from jtop import jtop  # jetson-stats, the [jetson] extra
            except ImportError:
                raise MeterUnavailable("jetson-stats is not installed (pip install 'specedge[jetson]')") from None
            if not Path("/run/jtop.sock").exists():
                raise MeterUnavailable("the jtop service is not running (/run/jtop.sock is missing)")
            client = jtop(interval=interval_s)
            try:
                client.start()
            except Exception as exc:  # jtop raises its own JtopException types
                raise MeterUnavailable(f"the jtop service did not answer: {exc}") from None
        self.client = client
        super().__init__(interval_s)

    def _read(self) -> dict:
        return parse_jtop_power(self.client.power)

    def close(self) -> None:
        super().close()
        self.client.close()


# -- INA3221 in sysfs --------------------------------------------------------------------------
def _cat(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def find_ina3221_channels(sysfs: str | Path = "/sys") -> list[tuple[str, str, dict]]:
    """[(rail label, layout, {quantity: path})] for every connected INA3221 channel."""
    sysfs = str(sysfs)
    channels = []
    # JetPack 5/6: hwmon, in<N>_label / in<N>_input (mV) / curr<N>_input (mA).
    for hwmon in sorted(glob.glob(f"{sysfs}/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
        for label_path in sorted(glob.glob(f"{hwmon}/in*_label")):
            n = Path(label_path).name[2:-len("_label")]
            label = _cat(label_path)
            # Unconnected channels read "NC"; channel 7 is the sum of shunt voltages.
            if not n.isdigit() or n == "7" or label.upper().startswith("NC"):
                continue
            paths = {"mv": f"{hwmon}/in{n}_input", "ma": f"{hwmon}/curr{n}_input"}
            if all(os.path.exists(p) for p in paths.values()):
                channels.append((label, "hwmon", paths))
    # JetPack 4: iio, rail_name_<N> / in_power<N>_input (mW).
    for iio in sorted(glob.glob(f"{sysfs}/bus/i2c/drivers/ina3221x/*/iio:device*")):
        for label_path in sorted(glob.glob(f"{iio}/rail_name_*")):
            n = Path(label_path).name[len("rail_name_"):]
            paths = {"mw": f"{iio}/in_power{n}_input"}
            if n.isdigit() and os.path.exists(paths["mw"]):
                channels.append((_cat(label_path), "iio", paths))
    return channels


def read_ina3221(channels: list[tuple[str, str, dict]]) -> dict:
    rails = {}
    for label, layout, paths in channels:
        if layout == "hwmon":
            rails[label] = int(_cat(paths["mv"])) * int(_cat(paths["ma"])) / 1e6
        else:
            rails[label] = int(_cat(paths["mw"])) / 1e3
    return rails


class Ina3221Meter(_IntegratingMeter):
    source = "ina3221"

    def __init__(self, sysfs: str | Path = "/sys", interval_s: float = 0.02):
        self.channels = find_ina3221_channels(sysfs)
        if not self.channels:
            raise MeterUnavailable(f"no INA3221 rails under {sysfs}/bus/i2c/drivers/ina3221[x]")
        super().__init__(interval_s)

    def _read(self) -> dict:
        return read_ina3221(self.channels)


# -- Intel RAPL -------------------------------------------------------------------------------
def find_rapl_zones(sysfs: str | Path = "/sys") -> list[tuple[str, str, int]]:
    """[(zone name, energy_uj path, counter range)] for the zones that make up the total:
    `psys` (the whole platform) when present, else every package plus DRAM."""
    zones = []
    for zone in sorted(glob.glob(f"{sysfs}/class/powercap/intel-rapl:*")):
        try:
            name = _cat(f"{zone}/name")
            limit = int(_cat(f"{zone}/max_energy_range_uj"))
            _cat(f"{zone}/energy_uj")  # readable? (root-only on recent kernels)
        except (OSError, ValueError):
            continue
        zones.append((name, f"{zone}/energy_uj", limit))
    psys = [z for z in zones if z[0] == "psys"]
    if psys:
        return psys
    return [z for z in zones if z[0].startswith("package") or z[0] == "dram"]


class RaplMeter(PowerMeter):
    source = "rapl"

    def __init__(self, sysfs: str | Path = "/sys"):
        self.zones = find_rapl_zones(sysfs)
        if not self.zones:
            raise MeterUnavailable(f"no readable RAPL zones under {sysfs}/class/powercap")
        self._lock = threading.Lock()
        self._raw = self._counters()
        self._energy = {name: 0.0 for name, _, _ in self.zones}
        self._last = PowerSample(time.monotonic(), {name: 0.0 for name, _, _ in self.zones}, 0.0)
        self._last_energy = 0.0

    def _counters(self) -> dict:
        return {name: int(_cat(path)) for name, path, _ in self.zones}

    def _advance(self) -> float:
        with self._lock:
            raw = self._counters()
            for name, _, limit in self.zones:
                self._energy[name] += ((raw[name] - self._raw[name]) % (limit + 1)) / 1e6  # wraps at the range
            self._raw = raw
            return sum(self._energy.values())

    def energy_j(self) -> float:
        return self._advance()

    def sample(self) -> PowerSample:
        """Average power since the previous sample (RAPL counts energy, not power)."""
        before = dict(self._energy)
        total = self._advance()
        now = time.monotonic()
        dt = max(now - self._last.t, 1e-6)
        rails = {name: (self._energy[name] - before[name]) / dt for name in self._energy}
        self._last = PowerSample(now, rails, (total - self._last_energy) / dt)
        self._last_energy = total
        return self._last


# -- estimated ------------------------------------------------------------------------------
class EstimatedMeter(PowerMeter):
    """idle_w all the time plus (active_w - idle_w) for the busy time the agent reports."""

    def __init__(self, profile):
        self.profile = profile
        self.source = f"estimated:{profile.name}"
        self._t0 = time.monotonic()
        self._busy_s = 0.0
        self._last = (self._t0, 0.0)

    def note_busy(self, seconds: float) -> None:
        self._busy_s += max(seconds, 0.0)

    def energy_j(self) -> float:
        p = self.profile
        return p.idle_w * (time.monotonic() - self._t0) + (p.active_w - p.idle_w) * self._busy_s

    def sample(self) -> PowerSample:
        now, energy = time.monotonic(), self.energy_j()
        t_prev, e_prev = self._last
        self._last = (now, energy)
        watts = (energy - e_prev) / (now - t_prev) if now > t_prev else self.profile.idle_w
        return PowerSample(now, {"estimated": watts}, watts)


METERS = ("auto", "jtop", "ina3221", "rapl", "estimated")


def open_meter(kind: str = "auto", profile=None, sysfs: str | Path = "/sys") -> PowerMeter:
    """The meter named by `kind`; `auto` tries jtop, ina3221, rapl, then the estimate."""
    if kind not in METERS:
        raise ValueError(f"unknown power meter {kind!r}; use one of {', '.join(METERS)}")
    makers = {"jtop": JtopMeter, "ina3221": lambda: Ina3221Meter(sysfs), "rapl": lambda: RaplMeter(sysfs)}
    if kind in makers:
        return makers[kind]()
    if kind == "auto":
        for name in ("jtop", "ina3221", "rapl"):
            try:
                return makers[name]()
            except MeterUnavailable as exc:
                log.debug("power meter %s: %s", name, exc)
    if profile is None:
        raise MeterUnavailable("no hardware power meter here and no device profile to estimate from")
    return EstimatedMeter(profile)


def read_watts(meter: PowerMeter, seconds: float) -> dict:
    """The meter's rails now, and its mean watts over `seconds` of this process sleeping."""
    e0, t0 = meter.energy_j(), time.monotonic()
    time.sleep(seconds)
    sample = meter.sample()
    watts = (meter.energy_j() - e0) / (time.monotonic() - t0)
    return {"source": meter.source, "rails_w": sample.rails_w, "total_w": sample.total_w,
            "mean_w": watts, "seconds": seconds}


def mean_watts(meter: PowerMeter, seconds: float, work) -> float:
    """Mean watts over at least `seconds` of calling `work()` back to back."""
    e0, t0 = meter.energy_j(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        work()
    return (meter.energy_j() - e0) / (time.monotonic() - t0)


def calibrate(meter: PowerMeter, model, seconds: float) -> tuple[float, float]:
    """(idle, active) watts: the board asleep, then decoding one token at a time with the draft
    `model`: the two numbers a device profile's energy estimate is made of."""
    idle = mean_watts(meter, seconds, lambda: time.sleep(0.05))
    cache = model.new_cache(capacity=64 * 1024)
    active = mean_watts(meter, seconds, lambda: model.forward([1], cache, last_only=True))
    return idle, active
