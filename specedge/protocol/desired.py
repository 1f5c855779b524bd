"""Desired configs and operator commands on the wire: the rules the device and the operator's
tools share (docs/fleet.md). A desired config is a JSON object {"section": {"key": value}}, as in
the TOML file, retained per device and per fleet; the device merges fleet, then device, over its
own file, and acknowledges by the digest of each payload it applied."""
from __future__ import annotations

import hashlib
import json

MAX_COMMAND = 64 * 1024  # bytes of a command or desired-config payload
# What a desired config may change without a restart; everything else is reported as needing one.
LIVE_SECTIONS = ("speculation", "generation", "faults")
LIVE_KEYS = ("energy.mode", "energy.budget_j_per_token", "energy.min_tokens_per_s", "fleet.telemetry_interval_s")


class DesiredError(ValueError):
    """A desired-config payload that is not one: protocol/'s own, so it imports nothing above it."""


def is_live(key: str) -> bool:
    """Whether `key` ("section.key") changes without a restart."""
    return key.split(".")[0] in LIVE_SECTIONS or key in LIVE_KEYS


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number (JSON has no Infinity or NaN)")


def merge(base: dict, overlay: dict) -> dict:
    out = {section: dict(table) for section, table in base.items()}
    for section, table in overlay.items():
        out.setdefault(section, {}).update(table)
    return out


def overlay_keys(overlay: dict) -> list[str]:
    return [f"{section}.{key}" for section, table in overlay.items() for key in table]


def json_object(payload: bytes, shape: str) -> dict:
    """A JSON object of at most MAX_COMMAND bytes; ValueError says what is wrong."""
    if len(payload) > MAX_COMMAND:
        raise ValueError(f"{len(payload)} bytes exceed {MAX_COMMAND}")
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not JSON this device takes: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected {shape}")
    return data


def parse_desired(payload: bytes) -> dict:
    """A desired config: {"section": {"key": value}}, as in the TOML file."""
    shape = '{"section": {"key": value, ...}, ...}'
    try:
        data = json_object(payload, shape)
    except ValueError as exc:
        raise DesiredError(str(exc)) from None
    if not all(isinstance(t, dict) for t in data.values()):
        raise DesiredError(f"expected {shape}")
    return data


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]
