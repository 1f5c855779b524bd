"""Brokers to run next to the services: embedded amqtt (zero-setup demo) or Mosquitto."""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class EmbeddedBroker:
    """amqtt (MQTT 3.1.1) on an asyncio loop in a background thread."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host, self.port = host, port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    def start(self) -> "EmbeddedBroker":
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):  # per-packet logging would flood the demo
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()

        async def boot():
            self._broker = Broker(config)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=15)  # returns once listening
        return self

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            except Exception:  # shutting down is best effort; the loop goes regardless
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class MosquittoBroker:
    """A private Mosquitto on a free loopback port, for tests, benchmarks and fault injection.
    `persistence` keeps retained messages and sessions on disk across `restart()`; `listener`
    replaces the plain anonymous loopback listener (a TLS one from `specedge certs`, say)."""

    def __init__(self, port: int | None = None, extra_conf: str = "", persistence: bool = False,
                 listener: str | None = None):
        self.port = port or free_port()
        self.extra_conf, self.persistence = extra_conf, persistence
        self.listener = listener or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        self.proc = None
        self._dir = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)

    def start(self) -> "MosquittoBroker":
        exe = self.binary()
        if exe is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="specedge-mosquitto-")
        folder = Path(self._dir.name)
        persistence = (f"persistence true\npersistence_location {folder}/\n" if self.persistence
                       else "persistence false\n")
        conf = folder / "mosquitto.conf"
        # Run as whoever started us: as root, Mosquitto would switch to its own user, which cannot
        # read a key file that `specedge certs` made for this user.
        conf.write_text(f"{self.listener}{persistence}user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                        f"set_tcp_nodelay true\n"
                        f"log_dest stderr\nlog_type error\n{self.extra_conf}")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the broker (clients see their connections drop) and start it again on the same port."""
        self.stop_process()
        time.sleep(down_s)
        self.start()

    def stop_process(self) -> None:
        """Stop the broker, keeping its data folder for a later start() (persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def stop(self) -> None:
        self.stop_process()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


# -- `specedge broker` ------------------------------------------------------------------------------
def add_parser(sub) -> None:
    b = sub.add_parser("broker", help="a zero-setup MQTT 3.1.1 broker (amqtt)")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=1883)
    b.set_defaults(func=run)


def run(args) -> int:
    """The embedded broker until SIGINT or SIGTERM."""
    import sys

    from specedge.systemd import wait_for_signal

    broker = EmbeddedBroker(args.port, args.host).start()
    print(f"MQTT 3.1.1 broker (amqtt) on {broker.host}:{broker.port}", file=sys.stderr)
    try:
        wait_for_signal()
    finally:
        broker.stop()
    return 0
