"""Power meters and device profiles: parsers on sysfs trees and jtop records written from the
documented formats (values as a Jetson Orin Nano, a JetPack 4 Nano and an x86 host report
them), the meter selection, integration, and profile validation."""
from __future__ import annotations

import time

import pytest

from specedge.config import ConfigError, DeviceConfig, build
from specedge.device import checks
from specedge.device.power import (EstimatedMeter, Ina3221Meter, JtopMeter, MeterUnavailable, RaplMeter,
                                   board_total, find_ina3221_channels, find_rapl_zones, open_meter,
                                   parse_jtop_power, read_ina3221)
from specedge.device.profiles import get_profile, load_profiles
from specedge.device.scheduler import objective


def write(root, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def orin_nano_hwmon(root, vdd_in_ma: int = 1120) -> None:
    """JetPack 5/6 layout of an Orin Nano dev kit: three named rails and the shunt-sum channel."""
    base = "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, label, mv, ma in ((1, "VDD_IN", 5056, vdd_in_ma), (2, "VDD_CPU_GPU_CV", 5048, 344),
                             (3, "VDD_SOC", 5040, 288)):
        write(root, f"{base}/in{n}_label", label)
        write(root, f"{base}/in{n}_input", str(mv))
        write(root, f"{base}/curr{n}_input", str(ma))
    write(root, f"{base}/in7_label", "sum of shunt voltages")
    write(root, f"{base}/in7_input", "80")


def jetpack4_nano_iio(root) -> None:
    base = "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, label, mw in ((0, "POM_5V_IN", 3247), (1, "POM_5V_GPU", 412), (2, "POM_5V_CPU", 1024)):
        write(root, f"{base}/rail_name_{n}", label)
        write(root, f"{base}/in_power{n}_input", str(mw))


def rapl_host(root, package_uj: int = 1_000_000, dram_uj: int = 500_000) -> None:
    for zone, name, uj in (("intel-rapl:0", "package-0", package_uj), ("intel-rapl:0:0", "core", 700_000),
                           ("intel-rapl:0:1", "dram", dram_uj)):
        write(root, f"class/powercap/{zone}/name", name)
        write(root, f"class/powercap/{zone}/energy_uj", str(uj))
        write(root, f"class/powercap/{zone}/max_energy_range_uj", "262143328850")


JTOP_ORIN_RECORD = {  # jetson-stats 4.x `jtop().power` on an Orin Nano (mV, mA, mW)
    "rail": {"VDD_CPU_GPU_CV": {"volt": 5048, "curr": 344, "warn": 32760, "crit": 32760, "power": 1736,
                                "online": True, "avg": 1620},
             "VDD_SOC": {"volt": 5040, "curr": 288, "warn": 32760, "crit": 32760, "power": 1451, "online": True,
                         "avg": 1440}},
    "tot": {"volt": 5056, "curr": 1128, "warn": 32760, "crit": 32760, "power": 5703, "online": True, "avg": 5600,
            "name": "VDD_IN"},
}


def test_jtop_record_parses_to_watts_with_the_input_rail_as_total():
    rails = parse_jtop_power(JTOP_ORIN_RECORD)
    assert rails == pytest.approx({"VDD_CPU_GPU_CV": 1.736, "VDD_SOC": 1.451, "VDD_IN": 5.703})
    assert board_total(rails) == pytest.approx(5.703)
    with pytest.raises(ValueError):
        parse_jtop_power({"unexpected": 1})


class FakeJtopClient:
    """Stands in for jetson-stats' jtop client (no Jetson here): same `power` record, `close()`."""

    def __init__(self):
        self.power = JTOP_ORIN_RECORD
        self.closed = False

    def close(self):
        self.closed = True


def test_jtop_meter_integrates_the_total():
    client = FakeJtopClient()
    with JtopMeter(interval_s=0.01, client=client) as meter:
        e0 = meter.energy_j()
        time.sleep(0.2)
        joules = meter.energy_j() - e0
        assert meter.source == "jtop" and meter.sample().total_w == pytest.approx(5.703)
    assert joules == pytest.approx(5.703 * 0.2, rel=0.25) and client.closed


def test_ina3221_hwmon_rails_skip_the_shunt_sum(tmp_path):
    orin_nano_hwmon(tmp_path)
    channels = find_ina3221_channels(tmp_path)
    rails = read_ina3221(channels)
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert rails["VDD_IN"] == pytest.approx(5.056 * 1.120)
    assert board_total(rails) == rails["VDD_IN"]  # the other rails are inside VDD_IN


def test_ina3221_iio_rails_of_jetpack4(tmp_path):
    jetpack4_nano_iio(tmp_path)
    rails = read_ina3221(find_ina3221_channels(tmp_path))
    assert rails == pytest.approx({"POM_5V_IN": 3.247, "POM_5V_GPU": 0.412, "POM_5V_CPU": 1.024})
    assert board_total(rails) == pytest.approx(3.247)


def test_ina3221_meter_follows_a_changing_rail(tmp_path):
    orin_nano_hwmon(tmp_path, vdd_in_ma=1000)
    with Ina3221Meter(tmp_path, interval_s=0.01) as meter:
        time.sleep(0.1)
        write(tmp_path, "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/curr1_input", "2000")
        time.sleep(0.15)
        assert meter.sample().total_w == pytest.approx(5.056 * 2.0)
        assert meter.energy_j() > 5.056 * 1.0 * 0.2


def test_rapl_zones_and_counter_wraparound(tmp_path):
    rapl_host(tmp_path)
    assert [z[0] for z in find_rapl_zones(tmp_path)] == ["package-0", "dram"]  # core is inside the package
    meter = RaplMeter(tmp_path)
    write(tmp_path, "class/powercap/intel-rapl:0/energy_uj", "3000000")  # +2 J
    write(tmp_path, "class/powercap/intel-rapl:0:1/energy_uj", "100")  # wrapped: +range - 499900 uJ + 1
    joules = meter.energy_j()
    assert joules == pytest.approx(2.0 + (262143328850 + 1 - 500_000 + 100) / 1e6)
    write(tmp_path, "class/powercap/psys/name", "x")  # not a zone directory: ignored
    write(tmp_path, "class/powercap/intel-rapl:1/name", "psys")
    write(tmp_path, "class/powercap/intel-rapl:1/energy_uj", "5")
    write(tmp_path, "class/powercap/intel-rapl:1/max_energy_range_uj", "1000")
    assert [z[0] for z in find_rapl_zones(tmp_path)] == ["psys"]  # the whole platform wins


def test_estimated_meter_is_profile_times_busy_time_and_says_so():
    profile = get_profile("orin-nano-15w")
    meter = EstimatedMeter(profile)
    time.sleep(0.1)
    meter.note_busy(0.05)
    joules = meter.energy_j()
    expected = profile.idle_w * 0.1 + (profile.active_w - profile.idle_w) * 0.05
    assert joules == pytest.approx(expected, rel=0.2)
    assert meter.source == "estimated:orin-nano-15w"


def test_auto_selection_prefers_rails_then_rapl_then_the_estimate(tmp_path):
    profile = get_profile("x86-host")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert isinstance(open_meter("auto", profile, sysfs=empty), EstimatedMeter)
    with pytest.raises(MeterUnavailable):
        open_meter("auto", None, sysfs=empty)
    rapl_host(tmp_path)
    assert open_meter("auto", profile, sysfs=tmp_path).source == "rapl"
    orin_nano_hwmon(tmp_path)
    meter = open_meter("auto", profile, sysfs=tmp_path)
    assert meter.source == "ina3221"
    meter.close()
    with pytest.raises(MeterUnavailable):
        open_meter("rapl", profile, sysfs=empty)
    with pytest.raises(ValueError):
        open_meter("multimeter", profile)


def test_jtop_without_jetson_stats_or_service_is_a_clear_error():
    with pytest.raises(MeterUnavailable, match="jetson-stats|jtop service"):
        JtopMeter()


def test_shipped_profiles_load_and_cover_the_boards():
    profiles = load_profiles()
    for name in ("orin-nano-7w", "orin-nano-15w", "orin-nano-25w", "orin-nx-25w", "agx-orin-30w",
                 "xavier-nx-15w", "x86-host"):
        p = profiles[name]
        assert 0 < p.idle_w < p.active_w
        for link in ("wifi", "lte", "5g"):
            assert p.radio(link).active_w > 0
    lte = profiles["orin-nano-15w"].radio("lte")
    assert lte.energy_j(10.0, 1000, 1000) == pytest.approx(10 * 1.288 + 1000 * 3.51e-6 + 1000 * 4.16e-7)


@pytest.mark.parametrize("bad, message", [
    ("[profile.x]\nnvpmodel_id = 0\nidle_w = 5\nactive_w = 3\n[radio.lte]\nactive_w=1\nj_per_byte_up=0\n"
     "j_per_byte_down=0\ntail_s=0\ntail_w=0\n", "below idle_w"),
    ("[profile.x]\nnvpmodel_id = 0\nidle_w = 1\nactive_w = 3\nwatts = 2\n[radio.lte]\nactive_w=1\n"
     "j_per_byte_up=0\nj_per_byte_down=0\ntail_s=0\ntail_w=0\n", "unknown key"),
    ("[profile.x]\nnvpmodel_id = 0\nidle_w = 1\nactive_w = 3\n[radio.lte]\nactive_w=-1\nj_per_byte_up=0\n"
     "j_per_byte_down=0\ntail_s=0\ntail_w=0\n", "radio.lte.active_w"),
    ("[profile.x]\nnvpmodel_id = 'zero'\nidle_w = 1\nactive_w = 3\n[radio.lte]\nactive_w=1\nj_per_byte_up=0\n"
     "j_per_byte_down=0\ntail_s=0\ntail_w=0\n", "nvpmodel_id"),
    ("[profile.x]\nnvpmodel_id = 0\nidle_w = 1\nactive_w = 3\n", "no \\[radio"),
    ("[profile.x\n", "not valid TOML"),
])
def test_bad_profile_tables_name_the_entry_and_key(tmp_path, bad, message):
    path = tmp_path / "profiles.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match=message):
        load_profiles(path)


def test_device_config_checks_profile_link_meter_and_mode():
    cfg = checks.build({"energy": {"profile": "agx-orin-30w", "link": "5g", "budget_j_per_token": 1.5}})
    assert objective(cfg.energy).budget_j_per_token == 1.5
    for energy, message in (({"profile": "pi-zero"}, "unknown device profile"), ({"link": "carrier-pigeon"}, "link"),
                            ({"meter": "multimeter"}, "energy.meter"), ({"mode": "fastest"}, "energy.mode"),
                            ({"budget_j_per_token": -1.0}, "budget")):
        with pytest.raises(ConfigError, match=message):
            checks.build({"energy": energy})
    # config.py checks the range; the meter, the mode and the profile are the device's (device/checks.py),
    # worded as config words its own errors.
    cfg = build(DeviceConfig, {"energy": {"meter": "multimeter"}}, "dev.toml")
    with pytest.raises(ConfigError) as err:
        checks.validate(cfg, "dev.toml")
    assert str(err.value) == "dev.toml: energy.meter: allowed values are auto, jtop, ina3221, rapl, estimated"
    with pytest.raises(ConfigError, match="^dev.toml: speculation.policy: unknown policy 'fastest'"):
        checks.build({"speculation": {"policy": "fastest"}}, "dev.toml")
