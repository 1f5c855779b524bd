"""Config files: validated with clear messages, environment overrides."""
from __future__ import annotations

import pytest

from specedge.config import CloudConfig, ConfigError, DeviceConfig, build, load


def test_defaults_are_valid():
    assert build(DeviceConfig, {}, env={}).speculation.policy == "adaptive"
    assert build(CloudConfig, {}, env={}).target.batch_invariant


def test_example_files_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "firmware_config"
    assert load(DeviceConfig, root / "device.toml").device.id
    assert load(CloudConfig, root / "cloud.toml").verifier.id


@pytest.mark.parametrize("data,message", [
    ({"mqtt": {"prot": 5}}, "unknown key"),
    ({"nonsense": {}}, "unknown section"),
    ({"mqtt": {"port": "many"}}, "mqtt.port: expected int"),
    ({"mqtt": {"port": 70000}}, "mqtt.port"),
    ({"mqtt": {"protocol": "4"}}, "mqtt.protocol"),
    ({"speculation": {"policy": "fixed:x"}}, "speculation.policy"),
    ({"device": {"id": "a/b"}}, "device.id"),
    ({"generation": {"top_p": 0}}, "generation.top_p"),
    ({"mqtt": 3}, "must be a table"),
    ({"draft": {"sources": "model,lookup"}}, "draft.sources: allowed values are model, lookup or lookup,model"),
    ({"draft": {"sources": ""}}, "draft.sources"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        build(DeviceConfig, data, "dev.toml", env={})


def test_environment_overrides_file():
    cfg = build(DeviceConfig, {"mqtt": {"port": 1883}}, env={"SPECEDGE_MQTT_PORT": "1999",
                                                             "SPECEDGE_GENERATION_TEMPERATURE": "0.5"})
    assert cfg.mqtt.port == 1999 and cfg.generation.temperature == 0.5
    with pytest.raises(ConfigError, match="SPECEDGE_MQTT_PORT"):
        build(DeviceConfig, {}, env={"SPECEDGE_MQTT_PORT": "x"})


def test_unreadable_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(DeviceConfig, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(DeviceConfig, bad)


def test_the_shipped_device_and_cloud_configs_and_examples_load():
    from pathlib import Path

    from specedge.config import CloudConfig, DeviceConfig, load

    root = Path(__file__).resolve().parent.parent / "firmware_config"
    load(DeviceConfig, root / "device.toml")
    load(CloudConfig, root / "cloud.toml")
    # The examples name certificate files of a real deployment: the environment blanks them here.
    env = {f"SPECEDGE_MQTT_TLS_{k}": "" for k in ("CA", "CERT", "KEY")}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        robot = load(DeviceConfig, root / "examples" / "robot.toml")
        voice = load(DeviceConfig, root / "examples" / "voice-assistant.toml")
    assert robot.faults.on_verifier_loss == "fail" and voice.energy.mode == "energy"


def test_config_imports_nothing_from_device_or_cloud():
    """Config checks shapes and ranges only; the device and the cloud check their own domain
    (device/checks.py), so config.py imports neither, not even inside a function."""
    import ast
    from pathlib import Path

    import specedge.config

    def forbidden(name: str) -> bool:
        parts = name.split(".")
        return parts[:2] in (["specedge", "device"], ["specedge", "cloud"]) or parts[0] in ("device", "cloud")

    found = []
    for node in ast.walk(ast.parse(Path(specedge.config.__file__).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from specedge import device` and relative imports too
            module = ".".join(filter(None, ["specedge" if node.level else "", node.module or ""]))
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names if forbidden(name)]
    assert not found, f"specedge/config.py imports from device/ or cloud/: {found}"
