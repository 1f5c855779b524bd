"""systemd integration: the notify protocol (READY, WATCHDOG, STATUS, STOPPING) and the unit
files with their installer (`specedge install-service device|cloud [--dry-run]`).

The notify protocol is one datagram per message to the unix socket named by $NOTIFY_SOCKET
(a leading "@" is Linux's abstract namespace). Without it (not under systemd) every call is a
no-op. The watchdog pings at half of $WATCHDOG_USEC, and only while the service's own health
check passes, so a hung worker is restarted by systemd instead of being kept alive by a
healthy ping thread.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from specedge.resources import resource

UNITS = resource("systemd")
SERVICES = {"device": "specedge-device", "cloud": "specedge-cloud"}


def notify(message: str, env: dict | None = None) -> bool:
    """Send one notify message ("READY=1", "WATCHDOG=1", "STATUS=..."); False when not under systemd."""
    address = (env or os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def watchdog_interval_s(env: dict | None = None) -> float | None:
    """Half of the watchdog timeout systemd gave this process, or None when it gave none."""
    env = env or os.environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings WATCHDOG=1 while `healthy()` holds; stops pinging (and says why) when it fails."""

    def __init__(self, healthy, env: dict | None = None):
        self.healthy, self.env = healthy, env
        self.interval = watchdog_interval_s(env)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sd-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.interval:
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.healthy()
            if problem:
                notify(f"STATUS=unhealthy: {problem}", self.env)
                return  # systemd's watchdog fires and restarts us (Restart=on-failure)
            notify("WATCHDOG=1", self.env)

    def stop(self) -> None:
        self._stop.set()


def ready(status: str, healthy, env: dict | None = None) -> Watchdog:
    """READY=1 with a status line, and the watchdog started."""
    notify(f"READY=1\nSTATUS={status}", env)
    return Watchdog(healthy, env).start()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM: how every long-running command (services, broker, channel) waits."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_until_signal(status: str, healthy, stop) -> None:
    """A started service's life under systemd: READY=1 and the watchdog, then block until SIGINT or
    SIGTERM; on the way out STOPPING=1, the watchdog stopped, then `stop()`."""
    watchdog = ready(status, healthy)
    try:
        wait_for_signal()
    finally:
        notify("STOPPING=1")
        watchdog.stop()
        stop()


# -- unit files and the installer ------------------------------------------------------------------
def render_unit(kind: str, exe: str, config: str, user: str = "specedge") -> str:
    template = (UNITS / f"{SERVICES[kind]}.service").read_text()
    return (template.replace("@EXE@", exe).replace("@CONFIG@", config).replace("@USER@", user))


# A step: (description, the command to run or the (file, text) to write).
Step = tuple[str, "list[str] | tuple[Path, str]"]


def install_plan(kind: str, exe: str, unit_dir: Path, config_dir: Path, user: str) -> list[Step]:
    """What installing does, step by step. Idempotent: steps already done are left out."""
    import grp
    import pwd

    service = SERVICES[kind]
    example = resource("firmware_config", f"{kind}.toml")
    config = config_dir / f"{kind}.toml"
    steps: list[Step] = []
    try:
        pwd.getpwnam(user)
        member_of = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    except KeyError:
        # --user-group: the unit runs as Group=<user>, and that group is what may read the config.
        steps.append((f"create the system user {user}", ["useradd", "--system", "--user-group", "--home-dir",
                                                         f"/var/lib/{user}", "--shell", "/usr/sbin/nologin", user]))
        member_of = set()
    if kind == "device":
        # The GPU (video, render) and the power rails (i2c; jtop's socket group) without root.
        present = {g.gr_name for g in grp.getgrall()}
        for group in ("video", "render", "i2c", "jtop"):
            if group in present and group not in member_of:
                steps.append((f"add {user} to {group}", ["usermod", "--append", "--groups", group, user]))
    # The config holds broker credentials: root owns it, the service's group (Group=<user>) reads it.
    if not config.exists():
        steps.append((f"copy the example config to {config} (edit it: broker, identity, TLS)",
                       ["install", "-D", "-o", "root", "-g", user, "-m", "0640", str(example), str(config)]))
    else:
        steps += file_steps(config, user, secret=True)
        for path, secret in named_files(config):
            steps += file_steps(path, user, secret)
    unit = unit_dir / f"{service}.service"
    text = render_unit(kind, exe, str(config), user)
    if not unit.exists() or unit.read_text() != text:
        steps.append((f"write {unit}", (unit, text)))
    steps.append(("reload systemd", ["systemctl", "daemon-reload"]))
    steps.append((f"enable and start {service}", ["systemctl", "enable", "--now", f"{service}.service"]))
    return steps


def named_files(config: Path) -> list[tuple[Path, bool]]:
    """The files an existing config names (TLS, the API key), resolved as the service resolves
    them, each with whether it is a secret (a private key, an API key)."""
    from specedge.config import FILE_KEYS, ConfigError, read_toml

    try:
        data = read_toml(config)
    except ConfigError:
        return []  # the service's own start-up says what is wrong with it
    found = []
    for section, keys in FILE_KEYS.items():
        values = data.get(section)
        for key in keys if isinstance(values, dict) else ():
            if isinstance(values.get(key), str) and values[key]:
                found.append((config.absolute().parent / values[key], key in ("tls_key", "api_key_file")))
    return found


def file_steps(path: Path, group: str, secret: bool) -> list[Step]:
    """The service (Group=<group>) must read `path`; a secret must not be readable by others."""
    if not path.is_file():
        return []  # a missing file is the config check's error, at start-up
    steps: list[Step] = []
    if not readable_by_group(path, group):
        steps.append((f"let the group {group} read {path}", ["chgrp", group, str(path)]))
        steps.append((f"make {path} group-readable", ["chmod", "g+r", str(path)]))
    if secret and path.stat().st_mode & 0o007:
        steps.append((f"make {path} unreadable to other users (a secret)", ["chmod", "o-rwx", str(path)]))
    return steps


def readable_by_group(path: Path, group: str) -> bool:
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False  # the group comes with the user the plan creates
    st = path.stat()
    return st.st_gid == gid and bool(st.st_mode & 0o040)


# ProtectHome= empties /home, /root and /run/user for the service, PrivateTmp= gives it its own
# empty /tmp and /var/tmp: an executable (or its interpreter) there is "not found" at start.
HIDDEN = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")


def hidden_from_service(exe: str) -> list[str]:
    """The paths among `exe` and its #! interpreter that the units hide from the service."""
    paths = [exe]
    with contextlib.suppress(OSError):
        with open(exe, "rb") as f:
            first = f.readline(256)
        if first.startswith(b"#!") and first[2:].split():
            interpreter = first[2:].split()[0].decode(errors="replace")
            # A venv's python is a link to the Python it was made from (pyenv's lives under ~).
            paths += [interpreter, str(Path(interpreter).resolve())]
    return [p for p in paths if any(p == h or p.startswith(h + "/") for h in HIDDEN)]


def uninstall_plan(kind: str, unit_dir: Path) -> list[Step]:
    service = SERVICES[kind]
    unit = unit_dir / f"{service}.service"
    if not unit.exists():
        return []
    return [(f"stop and disable {service}", ["systemctl", "disable", "--now", f"{service}.service"]),
            (f"remove {unit}", ["rm", "-f", str(unit)]),
            ("reload systemd", ["systemctl", "daemon-reload"])]


def add_parser(sub) -> None:
    for name, what in (("install-service", "install, enable and start"), ("uninstall-service", "stop and remove")):
        p = sub.add_parser(name, help=f"{what} the systemd unit of the device agent or the verifier")
        p.add_argument("kind", choices=sorted(SERVICES))
        p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
        p.add_argument("--unit-dir", default="/etc/systemd/system")
        if name == "install-service":
            p.add_argument("--config-dir", default="/etc/specedge")
            p.add_argument("--user", default="specedge")
            p.add_argument("--exe", default=shutil.which("specedge") or sys.argv[0],
                           help="the specedge executable the unit runs")
        p.set_defaults(func=run)


def run(args) -> int:
    unit_dir = Path(args.unit_dir)
    if args.command == "install-service":
        exe = str(Path(args.exe).resolve())
        hidden = hidden_from_service(exe)
        if hidden:
            print(f"specedge: error: the service could not run {exe}: {', '.join(hidden)} is hidden from it "
                  "(ProtectHome= hides /home, /root and /run/user; PrivateTmp= hides /tmp and /var/tmp). "
                  "Install specedge into a virtual environment under /opt or /usr/local, made from "
                  "a system Python (/usr/bin/python3 -m venv /opt/specedge; /opt/specedge/bin/pip "
                  "install <this project>), and pass --exe /opt/specedge/bin/specedge", file=sys.stderr)
            return 2
        steps = install_plan(args.kind, exe, unit_dir, Path(args.config_dir), args.user)
    else:
        steps = uninstall_plan(args.kind, unit_dir)
    if not steps:
        print(f"{SERVICES[args.kind]} is not installed in {unit_dir}: nothing to do")
        return 0
    for what, action in steps:
        writes = isinstance(action, tuple)
        shown = f"write {action[0]}" if writes else shlex.join(action)
        print(f"{'would ' if args.dry_run else ''}{what}:\n    {shown}", flush=True)
        if args.dry_run:
            continue
        if writes:
            action[0].parent.mkdir(parents=True, exist_ok=True)
            action[0].write_text(action[1])
        else:
            done = subprocess.run(action)
            if done.returncode != 0:
                print(f"failed ({done.returncode}): {shlex.join(action)}", file=sys.stderr)
                return 1
    return 0
