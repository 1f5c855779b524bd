"""Files the package ships beside its code, found alike in a source checkout (or an editable
install of one) and in an installed wheel.

The product brief keeps `firmware_config/` and `systemd/` at the repository's top level; a wheel
carries them inside the package instead (see pyproject.toml), as `specedge/firmware_config/` and
`specedge/systemd_units/` (`specedge/systemd/` would sit beside the module `specedge/systemd.py`).
Traces and prompts live in `specedge/data/` in both.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_IN_WHEEL = {"firmware_config": "firmware_config", "systemd": "systemd_units", "data": "data"}


def resource(folder: str, *parts: str) -> Path:
    """A shipped file or folder: `resource("firmware_config", "device.toml")`,
    `resource("systemd")`, `resource("data", "traces")`."""
    if folder not in _IN_WHEEL:
        raise ValueError(f"unknown resource folder {folder!r}; known: {', '.join(_IN_WHEEL)}")
    installed = _PACKAGE / _IN_WHEEL[folder]
    root = installed if installed.is_dir() else _PACKAGE.parent / folder
    return root.joinpath(*parts)
