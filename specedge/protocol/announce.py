"""The fleet's target announcement: the retained JSON on `specedge/v1/{fleet}/targets`
(protocol/topics.fleet(fleet, "targets")) that says which target version verifies each device.
Operators publish it, verifiers load what it names, devices show it (docs/fleet.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_ANNOUNCEMENT = 64 * 1024  # bytes of JSON on the targets topic


class AnnouncementError(ValueError):
    pass


@dataclass
class Announcement:
    """The fleet's version and per-device pins."""

    default: str
    pins: dict[str, str] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)  # what each named version is (informative)

    def version_for(self, device: str) -> str:
        return self.pins.get(device, self.default)

    def encode(self) -> bytes:
        return json.dumps({"default": self.default, "pins": self.pins, "versions": self.versions},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> "Announcement":
        if len(payload) > MAX_ANNOUNCEMENT:
            raise AnnouncementError(f"{len(payload)} bytes exceed {MAX_ANNOUNCEMENT}")
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AnnouncementError(f"not JSON: {exc}") from None
        except RecursionError:
            raise AnnouncementError("not an announcement: nested too deeply") from None
        if not isinstance(data, dict) or not isinstance(data.get("default"), str) or not data["default"]:
            raise AnnouncementError('expected {"default": "VERSION", "pins": {"DEVICE": "VERSION"}}')
        pins = data.get("pins", {})
        if not isinstance(pins, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pins.items()):
            raise AnnouncementError("pins must map device names to version names")
        versions = data.get("versions", {})
        if not isinstance(versions, dict):
            raise AnnouncementError("versions must be an object")
        return cls(data["default"], pins, versions)
