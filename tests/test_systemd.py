"""systemd: the units verify, the installer is idempotent and dry-runs, and the services speak the
notify protocol (READY, WATCHDOG, STOPPING) to a socket the test provides."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specedge import systemd


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: `make test` installs the systemd Debian package")
    return exe


@pytest.mark.parametrize("kind", ["device", "cloud"])
def test_unit_files_verify(kind, tmp_path):
    unit = tmp_path / f"{systemd.SERVICES[kind]}.service"
    unit.write_text(systemd.render_unit(kind, str(Path(sys.executable).parent / "specedge"),
                                        f"/etc/specedge/{kind}.toml"))
    text = unit.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text
    assert "User=specedge" in text and "@" not in text.split("[Service]")[1].split("\n", 2)[1]
    done = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_install_is_a_dry_run_then_idempotent(tmp_path, capsys):
    from specedge import cli

    units, configs = tmp_path / "units", tmp_path / "etc"
    argv = ["install-service", "device", "--unit-dir", str(units), "--config-dir", str(configs),
            "--user", "root", "--exe", "/opt/specedge/bin/specedge"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would write" in out and "systemctl enable --now specedge-device.service" in out
    assert not units.exists() and not configs.exists()  # a dry run changes nothing
    steps = systemd.install_plan("device", sys.executable, units, configs, "root")
    assert any("copy the example config" in what for what, _ in steps)
    (units).mkdir()
    (units / "specedge-device.service").write_text(systemd.render_unit("device", sys.executable,
                                                                         str(configs / "device.toml"), "root"))
    (configs).mkdir()
    (configs / "device.toml").write_text("")
    again = [what for what, _ in systemd.install_plan("device", sys.executable, units, configs, "root")]
    assert not any("write" in w or "copy" in w or "create the system user" in w for w in again)
    assert systemd.uninstall_plan("cloud", units) == []


class NotifySocket:
    """A datagram socket standing in for systemd's."""

    def __init__(self, folder: Path):
        self.path = str(folder / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(30)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()


def test_notify_ready_and_watchdog_while_healthy(tmp_path):
    sock = NotifySocket(tmp_path)
    env = {"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    health = {"problem": ""}
    watchdog = systemd.ready("serving", lambda: health["problem"], env)
    assert sock.receive() == "READY=1\nSTATUS=serving"
    assert watchdog.interval == 0.1
    assert sock.receive() == "WATCHDOG=1" and sock.receive() == "WATCHDOG=1"
    health["problem"] = "the request worker thread died"
    message = sock.receive()
    while message == "WATCHDOG=1":
        message = sock.receive()
    assert message == "STATUS=unhealthy: the request worker thread died"
    sock.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):  # no more pings: systemd restarts the service
        sock.receive()
    watchdog.stop()
    assert systemd.notify("READY=1", {}) is False  # not under systemd: nothing to do
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None  # another pid's


def test_the_verifier_process_notifies_ready_and_stopping(tmp_path, tiny_files, mosquitto):
    sock = NotifySocket(tmp_path)
    _, target = tiny_files
    config = tmp_path / "cloud.toml"
    config.write_text(f'[mqtt]\nport = {mosquitto.port}\n[verifier]\nid = "v-notify"\nfleet = "notify"\n'
                      f'group = "notify"\n[target]\nmodel = "{target}"\nweights = "fp32"\n')
    with service_process(["cloud", "run", "--config", str(config)],
                         {"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "400000"}) as proc:
        ready = sock.receive()
        assert ready.startswith("READY=1\nSTATUS=verifier v-notify serving"), ready
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter_messages(sock)), daemon=True)
        reader.start()
        time.sleep(1.0)
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read()
        reader.join(5)
        assert "WATCHDOG=1" in seen and seen[-1] == "STOPPING=1", seen


@contextlib.contextmanager
def service_process(argv: list[str], env: dict):
    """`specedge ARGV` as a child process with `env` added, killed if the test leaves it running."""
    proc = subprocess.Popen([sys.executable, "-m", "specedge.cli", *argv], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()


def iter_messages(sock: NotifySocket):
    sock.sock.settimeout(3)
    try:
        while True:
            message = sock.receive()
            yield message
            if message == "STOPPING=1":
                return
    except socket.timeout:
        return


def test_power_profile_commands_and_the_fan_edit(tmp_path):
    import dataclasses

    from specedge.device.profiles import get_profile, power_commands

    assert power_commands(get_profile("x86-host")) == []
    assert power_commands(get_profile("orin-nano-15w")) == [["nvpmodel", "-m", "0"]]
    profile = dataclasses.replace(get_profile("orin-nano-25w"), jetson_clocks=True, fan="cool")
    commands = power_commands(profile)
    assert commands[:2] == [["nvpmodel", "-m", "1"], ["jetson_clocks"]]  # the mode first: it resets clocks
    sed = next(c for c in commands if c[0] == "sed")
    conf = tmp_path / "nvfancontrol.conf"
    conf.write_text("POLLING_INTERVAL 2\n\tFAN_DEFAULT_PROFILE quiet\n\tFAN_PROFILE quiet {\n")
    subprocess.run([*sed[:-1], str(conf)], check=True)
    assert "\tFAN_DEFAULT_PROFILE cool\n\tFAN_PROFILE quiet {" in conf.read_text()


def test_apply_power_profile_dry_run_prints_the_exact_commands(capsys):
    from specedge import cli

    assert cli.main(["device", "apply-power-profile", "--profile", "agx-orin-30w", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nvpmodel -m 2"
    assert cli.main(["device", "apply-power-profile", "--profile", "no-such-board", "--dry-run"]) == 2


def test_the_device_service_process_serves_http_and_notifies(tmp_path, tiny_files, mosquitto):
    import json
    import urllib.request

    sock = NotifySocket(tmp_path)
    draft, _ = tiny_files
    config = tmp_path / "device.toml"
    config.write_text(f'[device]\nid = "svc"\nfleet = "svc"\n[mqtt]\nport = {mosquitto.port}\n'
                      f'[draft]\nmodel = "{draft}"\n[energy]\nmeter = "estimated"\n[api]\nhttp_port = 0\n')
    with service_process(["device", "serve", "--config", str(config)],
                         {"NOTIFY_SOCKET": sock.path, "SPECEDGE_CACHE": str(tmp_path / "cache")}) as proc:
        ready = json.loads(proc.stdout.readline())
        assert ready["backend"] == "llama.cpp" and ready["device"] == "svc"  # auto, on this machine
        assert sock.receive() == "READY=1\nSTATUS=serving svc/svc"
        with urllib.request.urlopen(f"http://127.0.0.1:{ready['http_port']}/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read()
        assert "STOPPING=1" in list(iter_messages(sock))


# -- issue 20, point 19: the installer and the units -----------------------------------------------
def config_step(steps):
    return next(action for what, action in steps if "copy the example config" in what)


def test_the_installed_config_is_group_readable_by_the_service_user(tmp_path):
    import grp

    # daemon:daemon exists on every Debian system: a service user that is neither root nor us.
    steps = systemd.install_plan("cloud", sys.executable, tmp_path / "units", tmp_path / "etc", "daemon")
    command = config_step(steps)
    assert command[:2] == ["install", "-D"] and ["-g", "daemon"] == command[command.index("-g"):][:2]
    assert "0640" in command
    fresh = systemd.install_plan("cloud", sys.executable, tmp_path / "units", tmp_path / "etc", "no-such-user-0")
    useradd = next(action for what, action in fresh if "create the system user" in what)
    assert "--user-group" in useradd and ["-g", "no-such-user-0"] == (c := config_step(fresh))[c.index("-g"):][:2]
    if os.geteuid() != 0:
        return  # the group can only be set by root (which the installer runs as)
    subprocess.run(command, check=True)
    written = (tmp_path / "etc" / "cloud.toml").stat()
    assert written.st_mode & 0o777 == 0o640 and written.st_gid == grp.getgrnam("daemon").gr_gid


def test_an_existing_config_the_service_cannot_read_is_given_to_its_group(tmp_path):
    configs = tmp_path / "etc"
    configs.mkdir()
    (configs / "cloud.toml").write_text("")
    (configs / "cloud.toml").chmod(0o600)
    steps = systemd.install_plan("cloud", sys.executable, tmp_path / "units", configs, "daemon")
    commands = [action for _, action in steps if isinstance(action, list)]
    assert ["chgrp", "daemon", str(configs / "cloud.toml")] in commands
    assert ["chmod", "g+r", str(configs / "cloud.toml")] in commands


@pytest.mark.parametrize("exe", ["/home/ana/.venv/bin/specedge", "/root/venv/bin/specedge",
                                 "/tmp/venv/bin/specedge", "/var/tmp/venv/bin/specedge",
                                 "/run/user/1000/specedge"])
def test_install_refuses_an_executable_the_units_hide(exe, tmp_path, capsys):
    from specedge import cli

    argv = ["install-service", "device", "--unit-dir", str(tmp_path / "units"), "--config-dir",
            str(tmp_path / "etc"), "--user", "root", "--exe", exe, "--dry-run"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert exe in err and "ProtectHome" in err and "/opt" in err


def test_install_refuses_a_script_whose_interpreter_the_units_hide(tmp_path):
    script = tmp_path / "specedge"
    script.write_text("#!/home/ana/.venv/bin/python3\nimport specedge.cli\n")
    assert "/home/ana/.venv/bin/python3" in systemd.hidden_from_service(str(script))
    assert systemd.hidden_from_service("/opt/specedge/bin/specedge") == []
    (tmp_path / "python3").symlink_to("/home/ana/.pyenv/versions/3.11/bin/python3.11")
    script.write_text(f"#!{tmp_path / 'python3'}\n")  # a venv made from pyenv's Python
    assert "/home/ana/.pyenv/versions/3.11/bin/python3.11" in systemd.hidden_from_service(str(script))


@pytest.mark.parametrize("kind", ["device", "cloud"])
def test_relative_tls_paths_are_relative_to_the_config_file(kind, tmp_path, monkeypatch):
    from specedge import config

    folder = tmp_path / "etc"
    (folder / "pki").mkdir(parents=True)
    for name in ("ca.crt", "me.crt", "me.key"):
        (folder / "pki" / name).write_text("")
    path = folder / f"{kind}.toml"
    path.write_text('[mqtt]\ntls_ca = "pki/ca.crt"\ntls_cert = "pki/me.crt"\ntls_key = "pki/me.key"\n')
    monkeypatch.chdir(tmp_path)  # systemd starts services in /, not in the config's folder
    cls = config.DeviceConfig if kind == "device" else config.CloudConfig
    cfg = config.load(cls, path)
    assert cfg.mqtt.tls_ca == str(folder / "pki" / "ca.crt") and cfg.mqtt.tls_key == str(folder / "pki" / "me.key")


def test_a_relative_api_key_file_is_relative_to_the_config_file(tmp_path, monkeypatch):
    from specedge import config

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "api.key").write_text("secret\n")
    path = tmp_path / "etc" / "device.toml"
    path.write_text('[api]\napi_key_file = "api.key"\n')
    monkeypatch.chdir(tmp_path)
    assert config.load(config.DeviceConfig, path).api.api_key_file == str(tmp_path / "etc" / "api.key")


def unit_text(kind: str) -> str:
    return systemd.render_unit(kind, "/opt/specedge/bin/specedge", f"/etc/specedge/{kind}.toml")


@pytest.mark.parametrize("kind", ["device", "cloud"])
def test_units_filter_syscalls_hide_proc_and_close_devices(kind):
    lines = set(unit_text(kind).splitlines())
    for line in ("SystemCallFilter=@system-service", "ProtectProc=invisible", "DevicePolicy=closed",
                 "DeviceAllow=char-nvidia* rw"):
        assert line in lines, line
    assert ("ProcSubset=pid" in lines) == (kind == "device")  # vLLM, a target engine, reads /proc/meminfo
    assert any(line.startswith(("MemoryMax=", "TasksMax=", "LimitNOFILE=")) for line in lines)
    assert ("DeviceAllow=char-i2c rw" in lines) == (kind == "device")  # the power rails are the device's
    assert any(line.startswith("DeviceAllow=/dev/nvmap") for line in lines) == (kind == "device")


@pytest.mark.parametrize("kind", ["device", "cloud"])
def test_units_security_exposure_is_at_most_2_5(kind, tmp_path):
    import re

    unit = tmp_path / f"{systemd.SERVICES[kind]}.service"
    unit.write_text(unit_text(kind))
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, cwd=tmp_path)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout


def test_the_files_a_config_names_are_given_to_the_service_group_and_secrets_closed_to_others(tmp_path):
    """TLS files and the API key the config names (relative to it, as the service reads them):
    the service's group must read them, and the private key and API key must not be readable by
    every user, as `certs` and a careless `cp` can leave them."""
    configs = tmp_path / "etc"
    (configs / "tls").mkdir(parents=True)
    for name, mode in (("ca.crt", 0o644), ("device.crt", 0o600), ("device.key", 0o644), ("api.key", 0o604)):
        (configs / "tls" / name).write_text("x")
        (configs / "tls" / name).chmod(mode)
    (configs / "device.toml").write_text('[mqtt]\ntls_ca = "tls/ca.crt"\ntls_cert = "tls/device.crt"\n'
                                         'tls_key = "tls/device.key"\n[api]\napi_key_file = "tls/api.key"\n')
    steps = systemd.install_plan("device", sys.executable, tmp_path / "units", configs, "daemon")
    commands = [action for _, action in steps if isinstance(action, list)]
    for name in ("ca.crt", "device.crt", "device.key", "api.key"):
        assert ["chgrp", "daemon", str(configs / "tls" / name)] in commands
    assert ["chmod", "o-rwx", str(configs / "tls" / "device.key")] in commands
    assert ["chmod", "o-rwx", str(configs / "tls" / "api.key")] in commands
    assert ["chmod", "o-rwx", str(configs / "tls" / "ca.crt")] not in commands  # public: may stay readable
