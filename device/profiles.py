"""Device profiles: board power per power mode and a radio energy model per link type.

The table lives in firmware_config/profiles.toml (sources cited there); it is
validated on load so a typo fails with the file, the entry and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from specedge.config import ConfigError, read_toml

DEFAULT_PROFILES = Path(__file__).resolve().parents[1] / "firmware_config" / "profiles.toml"
FAN_MODES = ("", "quiet", "cool", "max")
NVFANCONTROL_CONF = "/etc/nvfancontrol.conf"


@dataclass(frozen=True)
class RadioModel:
    active_w: float  # connected-state power (the radio stays connected between rounds)
    j_per_byte_up: float
    j_per_byte_down: float
    tail_s: float  # high-power tail after the last transfer of a request
    tail_w: float

    @property
    def tail_j(self) -> float:
        return self.tail_s * self.tail_w

    def energy_j(self, seconds: float, bytes_up: int, bytes_down: int) -> float:
        """Connected for `seconds`, moving these bytes; the tail is apart (`tail_j`)."""
        return self.active_w * seconds + self.j_per_byte_up * bytes_up + self.j_per_byte_down * bytes_down


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    board: str
    nvpmodel_id: int  # -1: the board has no nvpmodel
    nvpmodel_name: str
    idle_w: float
    active_w: float
    radios: dict  # link type -> RadioModel
    jetson_clocks: bool = False  # pin CPU, GPU and EMC clocks at the mode's maximum
    fan: str = ""  # nvfancontrol profile: quiet | cool; max = full speed (jetson_clocks --fan); "" = leave

    def radio(self, link: str) -> RadioModel:
        try:
            return self.radios[link]
        except KeyError:
            raise ConfigError(f"unknown link type {link!r}; known: {', '.join(sorted(self.radios))}") from None


def _number(table: dict, key: str, where: str, minimum: float = 0.0) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{where}.{key}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def _radio(table: dict, where: str) -> RadioModel:
    names = [f.name for f in fields(RadioModel)]
    extra = set(table) - set(names)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; known: {names}")
    return RadioModel(**{k: _number(table, k, where) for k in names})


def load_profiles(path: str | Path = DEFAULT_PROFILES) -> dict[str, DeviceProfile]:
    path = Path(path)
    data = read_toml(path, "profile table")
    unknown = set(data) - {"profile", "radio"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; known: ['profile', 'radio']")
    radios = {name: _radio(t, f"{path}: radio.{name}") for name, t in data.get("radio", {}).items()}
    if not radios:
        raise ConfigError(f"{path}: no [radio.*] tables")
    profiles = {}
    allowed = {"board", "nvpmodel_id", "nvpmodel_name", "idle_w", "active_w", "jetson_clocks", "fan"}
    for name, t in data.get("profile", {}).items():
        where = f"{path}: profile.{name}"
        extra = set(t) - allowed
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; known: {sorted(allowed)}")
        mode = t.get("nvpmodel_id")
        if isinstance(mode, bool) or not isinstance(mode, int) or mode < -1:
            raise ConfigError(f"{where}.nvpmodel_id: expected an integer >= -1, got {mode!r}")
        idle, active = _number(t, "idle_w", where, 0.01), _number(t, "active_w", where, 0.01)
        if active < idle:
            raise ConfigError(f"{where}: active_w ({active}) is below idle_w ({idle})")
        clocks, fan = t.get("jetson_clocks", False), t.get("fan", "")
        if not isinstance(clocks, bool):
            raise ConfigError(f"{where}.jetson_clocks: expected true or false, got {clocks!r}")
        if fan not in FAN_MODES:
            raise ConfigError(f"{where}.fan: expected one of {', '.join(map(repr, FAN_MODES))}, got {fan!r}")
        profiles[name] = DeviceProfile(name, str(t.get("board", "")), mode, str(t.get("nvpmodel_name", "")),
                                       idle, active, radios, clocks, fan)
    if not profiles:
        raise ConfigError(f"{path}: no [profile.*] tables")
    return profiles


def get_profile(name: str, path: str | Path | None = None) -> DeviceProfile:
    profiles = load_profiles(path or DEFAULT_PROFILES)
    try:
        return profiles[name]
    except KeyError:
        raise ConfigError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}") from None


def power_commands(profile: DeviceProfile) -> list[list[str]]:
    """The commands that put a Jetson into `profile` (run as root), in order. Setting the nvpmodel
    mode resets the clocks to the mode's defaults, so jetson_clocks comes after it."""
    if profile.nvpmodel_id < 0:
        return []
    commands = [["nvpmodel", "-m", str(profile.nvpmodel_id)]]
    if profile.jetson_clocks:
        commands.append(["jetson_clocks"])
    if profile.fan == "max":
        commands.append(["jetson_clocks", "--fan"])
    elif profile.fan:
        commands += [["systemctl", "stop", "nvfancontrol"],
                     ["sed", "-i", f"s/^\\([[:space:]]*FAN_DEFAULT_PROFILE[[:space:]]\\+\\).*/\\1{profile.fan}/",
                      NVFANCONTROL_CONF],
                     ["rm", "-f", "/var/lib/nvfancontrol/status"],  # else it restores the old profile
                     ["systemctl", "start", "nvfancontrol"]]
    return commands


def apply_power_profile(profile: DeviceProfile, dry_run: bool = False) -> int:
    """Put the board into its profile's power mode: nvpmodel, jetson_clocks, fan. With `dry_run`,
    print the exact commands instead. 1 when a command fails."""
    import shlex

    commands = power_commands(profile)
    if not commands:
        print(f"profile {profile.name} ({profile.board}) has no nvpmodel mode: nothing to apply")
        return 0
    print(f"profile {profile.name}: {profile.board}, nvpmodel {profile.nvpmodel_id} ({profile.nvpmodel_name}), "
          f"jetson_clocks {'on' if profile.jetson_clocks else 'off'}, fan {profile.fan or 'unchanged'}")
    if dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    _check_can_run(commands)
    return _run_all(commands)


def _check_can_run(commands: list[list[str]]) -> None:
    """Refuse (ConfigError) before the first command when root or a Jetson tool is missing, so a
    profile is never left half applied for a reason known in advance."""
    import os
    import shutil

    if os.geteuid() != 0:
        raise ConfigError("applying a power profile needs root: run it with sudo (or --dry-run to see the commands)")
    missing = sorted({c[0] for c in commands if shutil.which(c[0]) is None})
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: this is not a Jetson (or JetPack is incomplete)")


def _run_all(commands: list[list[str]]) -> int:
    """Each command echoed and run in order; the first failure stops the rest (exit 1)."""
    import shlex
    import subprocess
    import sys

    for command in commands:
        print(f"$ {shlex.join(command)}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            print(f"failed ({done.returncode})", file=sys.stderr)
            return 1
    return 0
