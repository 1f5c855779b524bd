"""The wheel stands alone: built from the working tree and installed into a fresh virtualenv, it
finds its configs, unit files, traces and prompts with the repository out of sight."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "specedge", "device", "cloud", "kernels", "firmware_config", "systemd")


def _run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(the venv's bin folder, an environment for it, a working folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy, so the build leaves nothing in the checkout.
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "build"))
        else:
            shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("specedge-*.whl")

    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp)
    python = env_dir / "bin" / "python"
    # Installed before the dependencies become visible, so pip sees no other specedge.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
          wheel], tmp)
    # The dependencies: this environment's site-packages as a plain path (its .pth files, among them
    # the editable install of the repository, are not run).
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "specedge-test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SPECEDGE_"))}
    work = tmp / "work"
    work.mkdir()
    return env_dir / "bin", env, work


CHECK = """
import json, specedge
from specedge.tools.channel import preset
from specedge.config import CloudConfig, load
from specedge.device import checks
from specedge.resources import resource
from specedge.tools.bench import default_prompts, load_prompts
device = checks.load(resource("firmware_config", "device.toml"))
cloud = load(CloudConfig, resource("firmware_config", "cloud.toml"))
checks.load(None)  # the built-in defaults read the shipped profile table
lte = preset("lte")
print(json.dumps({"package": specedge.__file__, "device": device.device.id, "cloud": cloud.verifier.id,
                  "lte": lte.description, "trace": lte.up.trace_file, "prompts": len(load_prompts(default_prompts(), 3)),
                  "units": sorted(p.name for p in resource("systemd").glob("*.service")),
                  "page": sorted(p.name for p in resource("data", "web").iterdir())}))
"""


def test_the_installed_wheel_loads_its_configs_traces_and_prompts(venv):
    bin_dir, env, work = venv
    found = json.loads(_run([bin_dir / "python", "-c", CHECK], work, env).stdout.splitlines()[-1])
    package = Path(found["package"]).resolve()
    assert package.is_relative_to(bin_dir.parent.resolve()) and not package.is_relative_to(REPO)
    assert found["device"] and found["cloud"]
    assert Path(found["trace"]).resolve().is_relative_to(package.parent)
    assert "Verizon-LTE-short.up (5.95 Mbit/s mean)" in found["lte"]
    assert found["prompts"] == 3
    assert found["units"] == ["specedge-cloud.service", "specedge-device.service"]
    assert found["page"] == ["chat.css", "chat.js", "index.html"]  # the chat page at / (device/http_api.py)


def test_the_installed_commands_run(venv):
    bin_dir, env, work = venv
    assert "--up-trace" in _run([bin_dir / "specedge", "bench", "--help"], work, env).stdout
    # This venv lies under /tmp, which the units' PrivateTmp hides: plan for one under /opt.
    plan = _run([bin_dir / "specedge", "install-service", "device", "--dry-run", "--unit-dir", work / "units",
                 "--config-dir", work / "etc", "--exe", "/opt/specedge/bin/specedge"], work, env).stdout
    assert "would write" in plan and "firmware_config/device.toml" in plan
    assert str(REPO) not in plan
