"""The device's own checks of a DeviceConfig: what only the device's modules know.

specedge/config.py checks shapes and ranges only and imports nothing from device/ (nor cloud/).
Whether the speculation policy parses (device/policy.py), the power meter exists
(device/power.py), the scheduler knows the mode (device/scheduler.py) and the profile table
has the board and its link (device/profiles.py) is checked here, with the messages config.build
words its own errors in: "SOURCE: speculation.policy: ...", "SOURCE: energy.meter: allowed
values are ...". `load` and `build` are config's, then these checks; the Agent runs `validate`
at start-up whatever built its config, and the fleet runs `build` on every remote config.
"""
from __future__ import annotations

from pathlib import Path

from specedge import config
from specedge.config import ConfigError, DeviceConfig
from specedge.device.policy import parse_policy
from specedge.device.power import METERS
from specedge.device.profiles import get_profile
from specedge.device.scheduler import MODES


def validate(cfg: DeviceConfig, source: str = "config") -> DeviceConfig:
    """`cfg` once the device's modules accept it; else ConfigError naming the source and the key."""
    try:
        _check_speculation(cfg)
        _check_energy(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def build(data: dict, source: str = "config", env: dict | None = None) -> DeviceConfig:
    """config.build(DeviceConfig, ...) and the device's checks."""
    return validate(config.build(DeviceConfig, data, source, env), source)


def load(path: str | Path | None) -> DeviceConfig:
    """config.load(DeviceConfig, path) and the device's checks."""
    return validate(config.load(DeviceConfig, path), "defaults" if path is None else str(path))


def _check_speculation(cfg: DeviceConfig) -> None:
    try:
        parse_policy(cfg.speculation.policy, cfg.speculation.max_draft)
    except ValueError as exc:
        raise ConfigError(f"speculation.policy: {exc}") from None


def _check_energy(cfg: DeviceConfig) -> None:
    energy = cfg.energy
    _allowed(energy.meter in METERS, "energy.meter", ", ".join(METERS))
    _allowed(energy.mode in MODES, "energy.mode", ", ".join(MODES))
    try:
        get_profile(energy.profile, energy.profiles or None).radio(energy.link)
    except ConfigError as exc:
        raise ConfigError(f"energy: {exc}") from None


def _allowed(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: allowed values are {allowed}")
