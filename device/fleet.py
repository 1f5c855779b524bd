"""The device as a fleet member: status, telemetry, commands and desired config over MQTT.

Topics (docs/fleet.md), all under specedge/v1/{fleet}/{device}/:
  status          retained; birth on connect, last will "offline" on loss
  telemetry       retained, every [fleet] telemetry_interval_s
  cmd             commands in; answers go to the MQTT 5 response topic with its correlation
                  data, or (MQTT 3.1.1) to the payload's "reply_to" with its "id"
  config          retained desired config for this device; specedge/v1/{fleet}/config for all
  config/applied  retained: what the device actually applied, rejected, or needs a restart for
and it follows the fleet's retained specedge/v1/{fleet}/targets.

MQTT callbacks only queue what arrived; one thread handles it and publishes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import re
import threading
import time
from importlib.metadata import PackageNotFoundError, version

from specedge.protocol import wire
from specedge.config import COMMANDS, ConfigError, DeviceConfig
from specedge.device import checks
from specedge.device.service import DeviceService
from specedge.metrics import percentile, spec_rates
from specedge.mqtt import Link, ReplyTo
from specedge.protocol import topics
from specedge.protocol.desired import DesiredError, digest, is_live, json_object, merge, overlay_keys, parse_desired

log = logging.getLogger("specedge.fleet")

# Set only in the device's own file: a remote config must not widen what remote operators may do.
LOCAL_ONLY = ("fleet.allowed_commands", "fleet.remote_config", "api.allowed_origins", "mqtt.tls_ca", "mqtt.tls_cert",
              "mqtt.tls_key")
# Keys whose values name files: validating them opens or stats the file, so from afar they would
# let a sender probe what exists, block the fleet thread on a FIFO or fill memory from /dev/zero.
# Refused by name, before anything reads them. (draft.model: only a registry name from afar.)
REMOTE_PATHS = ("energy.profiles", "draft.head", "api.api_key_file", "mqtt.tls_ca", "mqtt.tls_cert", "mqtt.tls_key")
# What remote configs and commands may set, narrower than a local file: a value from afar must not
# make the device storm the broker with resends, wait for ever, or go quiet.
REMOTE_RANGES = {
    "faults.round_timeout_s": (0.5, 600.0),
    "faults.max_wait_s": (1.0, 3600.0),
    "faults.max_retries": (0, 20),
    "fleet.telemetry_interval_s": (1.0, 3600.0),
    "energy.budget_j_per_token": (0.0, 1000.0),
    "energy.min_tokens_per_s": (0.0, 10000.0),
    "generation.max_new_tokens": (1, 32768),
}
FAULT_POLICY_KEYS = ("faults.on_verifier_loss", "faults.on_broker_loss")
MAX_DRAIN_WAIT_S = 60.0  # the fleet thread answers nothing else meanwhile
# Operator messages waiting for the fleet thread (which may sit in a drain for MAX_DRAIN_WAIT_S):
# more is a flood, dropped and counted (`fleet_inbox_full`), never held without bound.
MAX_FLEET_INBOX = 64
# The last part of a key that holds a secret; its value never leaves the device.
SECRET = re.compile(r"(^|_)(password|secret|token|api_key)$")
REDACTED = "<redacted>"


def package_version() -> str:
    try:
        return version("specedge")
    except PackageNotFoundError:
        return "unknown"


def flatten(cfg: DeviceConfig) -> dict:
    return {f"{section}.{key}": value for section, table in dataclasses.asdict(cfg).items()
            for key, value in table.items()}


def config_changes(current: DeviceConfig, new: DeviceConfig) -> tuple[dict, list[str]]:
    """({key: value} that changes live, [keys] that change only with a restart)."""
    old, fresh = flatten(current), flatten(new)
    changed = {k: v for k, v in fresh.items() if old[k] != v}
    live = {k: v for k, v in changed.items() if is_live(k)}
    return live, sorted(set(changed) - set(live))


def redact(flat: dict) -> dict:
    """`flat` (flatten's shape) with every set secret replaced by REDACTED; an empty one stays, as
    "none set" is worth seeing."""
    return {k: REDACTED if v and SECRET.search(k.rsplit(".", 1)[-1]) else v for k, v in flat.items()}


def remote_paths(overlay: dict) -> list[str]:
    """The keys of `overlay` that name files, found without touching the file system."""
    from specedge.fetch import MODELS

    keys = [k for k in overlay_keys(overlay) if k in REMOTE_PATHS]
    model = overlay.get("draft", {}).get("model")
    if model is not None and model not in MODELS:  # anything else is resolved as a path
        keys.append("draft.model")
    return keys


def remote_problems(new: DeviceConfig, keys: list[str], local: DeviceConfig) -> dict[str, str]:
    """{key: why} for each of `keys`, set remotely to the value it has in `new`, that a remote
    operator may not set so: not finite, outside REMOTE_RANGES, or fault handling that lets
    unverified tokens through where the device's own file (`local`) does not."""
    values, own = flatten(new), flatten(local)
    problems = {}
    for key in keys:
        value = values[key]
        if isinstance(value, float) and not math.isfinite(value):
            problems[key] = f"{value} is not a finite number"
        elif key in REMOTE_RANGES and not REMOTE_RANGES[key][0] <= value <= REMOTE_RANGES[key][1]:
            low, high = REMOTE_RANGES[key]
            problems[key] = f"{value} is outside {low}..{high}, the range remote configs and commands may set"
        elif key in FAULT_POLICY_KEYS and value == "draft" and own[key] != "draft":
            problems[key] = "draft (unverified tokens) only where the device's own file chose it"
        elif key == "faults.unverified_max_tokens" and value > own[key]:
            problems[key] = f"{value} is above the device's own file's {own[key]}"
    return problems


def finite_number(value, name: str) -> float:
    """`value` as a float if it is a finite number >= 0; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


class FleetMember:
    def __init__(self, service: DeviceService, link: Link, http_port: int | None = None):
        """`link`: the device's connection, the one its agent uses (device/node.py makes and runs it)."""
        self.service, self.agent, self.link = service, service.agent, link
        ident = service.cfg.device
        self.fleet, self.device = ident.fleet, ident.id
        self.topic = lambda leaf: topics.device(self.fleet, self.device, leaf)
        self.reply_prefix = self.topic("reply") + "/"
        self.http_port = http_port
        self.inbox: queue.Queue = queue.Queue(maxsize=MAX_FLEET_INBOX)
        self.desired: dict[str, bytes] = {}  # "fleet" / "device" -> retained desired config payload
        self.announced_target = ""
        self.commands_handled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="specedge-fleet", daemon=True)
        self._last_energy = (time.monotonic(), 0.0)
        # The will and birth ride on the agent's connection: its loss is the device's loss.
        link.will = (self.topic("status"), json.dumps({"state": "offline", "device": self.device,
                                                       "fleet": self.fleet}).encode(), True)
        link.birth = (self.topic("status"), self.status_payload, True)
        queued = lambda kind: lambda topic, payload, reply_to: self._offer((kind, topic, payload, reply_to))
        link.subscribe(self.topic("cmd"), queued("cmd"))
        link.subscribe(self.topic("config"), queued("config"))
        link.subscribe(topics.fleet(self.fleet, "config"), queued("config"))
        link.subscribe(topics.fleet(self.fleet, "targets"), queued("targets"))
        service.on_state_change = lambda: self._offer(("status", None, None, None))

    # paho's network thread and the service's: nothing here may block.
    def _offer(self, item) -> None:
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.agent.count_error("fleet_inbox_full")

    def start(self) -> "FleetMember":
        self._last_energy = (time.monotonic(), self.agent.status().energy_j)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._offer(None)  # wake the thread (if the inbox is full, it sees _stop after its next item)
        self._thread.join(timeout=10)
        if self.link.connected.is_set():  # a clean goodbye does not fire the will
            self.link.publish(self.topic("status"), self.status_payload("offline"), retain=True, qos=1)

    # -- the one thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        next_telemetry = time.monotonic() + self.service.cfg.fleet.telemetry_interval_s
        while not self._stop.is_set():
            try:
                item = self.inbox.get(timeout=max(0.0, next_telemetry - time.monotonic()))
            except queue.Empty:
                item = ("telemetry", None, None, None)
            if item is None:
                return
            kind, topic, payload, reply_to = item
            try:
                if kind == "cmd":
                    self.on_command(payload, reply_to)
                elif kind == "config":
                    self.desired["fleet" if topics.parse_fleet(topic) else "device"] = payload
                    self.apply_desired()
                elif kind == "targets":
                    self.on_targets(payload)
                elif kind == "status":
                    self.publish_status()
            except Exception:  # a bad message must not stop the fleet thread
                log.exception("fleet: handling %s failed", kind)
            if kind == "telemetry" or time.monotonic() >= next_telemetry:
                if self.link.connected.is_set():
                    self.publish(self.topic("telemetry"), self.telemetry(), retain=True)
                next_telemetry = time.monotonic() + self.service.cfg.fleet.telemetry_interval_s

    def publish(self, topic: str, data: dict, retain: bool = False, reply_to: ReplyTo | None = None) -> None:
        self.link.publish(topic, json.dumps(data, sort_keys=True).encode(), retain=retain, qos=1,
                          reply_to=reply_to)

    # -- status and telemetry ------------------------------------------------------------------
    def status_payload(self, state: str | None = None) -> bytes:
        s, cfg = self.service, self.service.cfg
        profile = self.agent.profile
        data = {
            "state": state or s.state, "device": self.device, "fleet": self.fleet, "time": time.time(),
            "versions": {"specedge": package_version(), "protocol": wire.PROTOCOL_VERSION,
                         "draft": self.agent.draft_name},
            "backend": s.engine.backend,
            "power_mode": {"profile": profile.name, "board": profile.board, "nvpmodel": profile.nvpmodel_name,
                           "meter": self.agent.energy_source},
            "policy": s.policy.name,
            "energy": {"mode": cfg.energy.mode, "budget_j_per_token": cfg.energy.budget_j_per_token,
                       "min_tokens_per_s": cfg.energy.min_tokens_per_s},
            "target": {"announced": self.announced_target,
                       "serving": s.agent.current.rounds.target_version if s.agent.current else ""},
            "http_port": self.http_port,
            "protocol": self.link.protocol,
        }
        return json.dumps(data, sort_keys=True).encode()

    def publish_status(self) -> None:
        if self.link.connected.is_set():
            self.link.publish(self.topic("status"), self.status_payload(), retain=True, qos=1)

    def telemetry(self) -> dict:
        s = self.service
        w = s.take_window()
        now = time.monotonic()
        snapshot = self.agent.status()
        (then, energy0), self._last_energy = self._last_energy, (now, snapshot.energy_j)
        return {
            "device": self.device, "time": time.time(), "window_s": now - then, "state": s.state,
            "requests": w.requests, "failed": w.failed, "tokens": w.tokens,
            "tokens_per_s": w.tokens / w.busy_s if w.busy_s else None,
            **spec_rates(w.drafted, w.accepted, w.rounds),
            "mean_draft_len": w.drafted / w.rounds if w.rounds else None,
            "rtt_s_p50": percentile(w.round_trip_s, 0.5),
            "rtt_s_estimate": snapshot.rtt_s,
            "uplink_bps_estimate": snapshot.up_bps if snapshot.up_bps != float("inf") else None,
            "watts": (snapshot.energy_j - energy0) / (now - then) if now > then else 0.0,
            "j_per_token": w.energy_j / w.tokens if w.tokens else None,
            "wire_bytes_per_token": w.wire_bytes / w.tokens if w.tokens else None,
            "queue_depth": s.queue_depth, "in_flight": s.in_flight, "policy": s.policy.name,
            "budget_j_per_token": s.cfg.energy.budget_j_per_token,
            "target_version": s.agent.current.rounds.target_version if s.agent.current else "",
            # The running request's: every token so far verified by a self-tested exact target.
            "exact": s.agent.current.stats.exact if s.agent.current else None,
            "connected": snapshot.connected,
            "last_request": self.last_request(),
        }

    def last_request(self) -> dict | None:
        """The last finished request's numbers: what an operator sees while the device is idle
        (or busy with a long request) and the interval's own rates are null."""
        if self.service.last_request is None:
            return None
        ended, stats = self.service.last_request
        s = stats.summary()
        return {"ended_s_ago": time.monotonic() - ended, "tokens": s["generated_tokens"],
                "tokens_per_s": s["tokens_per_s"],
                **spec_rates(stats.drafted_tokens, stats.accepted_tokens, stats.rounds),
                "mean_draft_len": s["mean_draft_len"] if stats.rounds else None,
                "rtt_s_p50": percentile(stats.round_trip_s, 0.5),
                "j_per_token": s["energy_j_per_token"] if stats.generated_tokens else None,
                "exact": stats.exact}

    # -- commands ------------------------------------------------------------------------------
    def on_command(self, payload: bytes, reply_to: ReplyTo) -> None:
        request: dict = {}
        try:
            request = json_object(payload, '{"command": NAME, "args": {...}}')
        except ValueError as exc:
            answer = {"ok": False, "error": f"malformed command: {exc}"}
        else:
            answer = self.run_command(request.get("command"), request.get("args", {}))
        self.commands_handled += 1
        topic = reply_to.topic or request.get("reply_to")
        if not isinstance(topic, str) or not topic.startswith(self.reply_prefix) or set(topic) & set("+#"):
            log.warning("command %r: reply topic %r is not under %s; answer dropped",
                        request.get("command"), topic, self.reply_prefix)
            return
        answer.update(device=self.device, command=request.get("command"))
        if "id" in request:
            answer["id"] = request["id"]
        self.publish(topic, answer, reply_to=ReplyTo(None, reply_to.correlation) if reply_to.correlation else None)

    def run_command(self, command, args) -> dict:
        """{"ok": True, "result": ...} or {"ok": False, "error": reason}; never raises."""
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command {command!r}; known: {', '.join(COMMANDS)}"}
        if command not in self.service.cfg.fleet.allowed():
            return {"ok": False, "error": f"unauthorised: {command} is not in this device's fleet.allowed_commands"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            return {"ok": True, "result": getattr(self, f"cmd_{command}")(**args)}
        except TypeError as exc:  # unexpected or missing arguments
            return {"ok": False, "error": f"bad arguments for {command}: {exc}"}
        except (ValueError, ConfigError) as exc:
            return {"ok": False, "error": f"{command}: {exc}"}

    def cmd_set_budget(self, budget_j_per_token, mode: str | None = None, min_tokens_per_s=None) -> dict:
        energy = self.service.cfg.energy
        changes = {"budget_j_per_token": budget_j_per_token, "mode": mode or energy.mode,
                   "min_tokens_per_s": energy.min_tokens_per_s if min_tokens_per_s is None else min_tokens_per_s}
        self.service.set_energy(self.live_overlay({"energy": changes}).energy)
        e = self.service.cfg.energy
        return {"mode": e.mode, "budget_j_per_token": e.budget_j_per_token, "min_tokens_per_s": e.min_tokens_per_s}

    def cmd_set_policy(self, policy: str) -> dict:
        if not isinstance(policy, str):
            raise ValueError("policy must be a string such as adaptive, fixed:4 or cloud-ar")
        self.service.set_policy(policy)
        return {"policy": self.service.policy.name}

    def cmd_drain(self, wait_s: float = 0.0) -> dict:
        wait_s = min(finite_number(wait_s, "wait_s"), MAX_DRAIN_WAIT_S)
        in_flight = self.service.drain()
        idle = self.service.wait_idle(wait_s) if wait_s else in_flight == 0
        return {"state": "draining", "in_flight": self.service.in_flight, "idle": idle}

    def cmd_resume(self) -> dict:
        self.service.resume()
        return {"state": self.service.state}

    def cmd_reload_config(self) -> dict:
        return self.apply_desired(reread_file=True)

    def cmd_report(self) -> dict:
        s = self.service
        return {"status": json.loads(self.status_payload()), "config": redact(flatten(s.cfg)),
                "requests_done": s.requests_done, "uptime_s": time.time() - s.started_s,
                "decode_errors": dict(self.agent.decode_errors), "totals": s.metrics.totals()}

    def live_overlay(self, overlay: dict) -> DeviceConfig:
        """The current config with `overlay` on top, validated as from afar; ConfigError names what
        is wrong."""
        new = checks.build(merge(dataclasses.asdict(self.service.cfg), overlay), "command", env={})
        problems = remote_problems(new, overlay_keys(overlay), self.service.local_cfg)
        if problems:
            raise ConfigError("; ".join(f"{key}: {why}" for key, why in sorted(problems.items())))
        return new

    # -- desired config ------------------------------------------------------------------------
    def apply_desired(self, reread_file: bool = False) -> dict:
        """Build the config from the file plus the fleet's and the device's desired overlays, apply
        what changes live, acknowledge on config/applied; returns the acknowledgement."""
        s = self.service
        rejected: dict[str, str] = {}
        overlay: dict = {}
        if s.cfg.fleet.remote_config:
            for source in ("fleet", "device"):
                payload = self.desired.get(source)
                if not payload:
                    continue
                try:
                    overlay = merge(overlay, parse_desired(payload))
                except DesiredError as exc:
                    rejected[source] = str(exc)
            for key in remote_paths(overlay):
                section, name = key.split(".")
                del overlay[section][name]
                rejected[key] = "a file path: set only in the device's own config file"
            for key in LOCAL_ONLY:
                section, name = key.split(".")
                if name in overlay.get(section, {}):
                    del overlay[section][name]
                    rejected[key] = "set only in the device's own config file"
        elif self.desired:
            rejected["config"] = "remote config is off on this device (fleet.remote_config = false)"
        applied, restart = {}, []
        try:
            if set(rejected) & {"fleet", "device", "config"}:
                raise ConfigError("nothing applied: the desired config is not valid")
            if reread_file and s.config_path:
                s.local_cfg = checks.load(s.config_path)
            new = checks.build(merge(dataclasses.asdict(s.local_cfg), overlay), "desired config", env={})
            problems = remote_problems(new, overlay_keys(overlay), s.local_cfg)
            if problems:
                rejected.update(problems)
                raise ConfigError("nothing applied: " + ", ".join(sorted(problems)) + " may not be set so remotely")
        except ConfigError as exc:
            rejected.setdefault("config", str(exc))
        else:
            applied, restart = config_changes(s.cfg, new)
            if applied:
                s.apply_config(new)
        ack = {"device": self.device, "time": time.time(), "applied": applied, "rejected": rejected,
               "needs_restart": restart, "reread_file": reread_file,
               "sources": {k: digest(v) for k, v in self.desired.items() if v}}
        if self.link.connected.is_set():
            self.publish(self.topic("config/applied"), ack, retain=True)
        return ack

    def on_targets(self, payload: bytes) -> None:
        from specedge.protocol.announce import Announcement, AnnouncementError

        if not payload:
            self.announced_target = ""
        else:
            try:
                self.announced_target = Announcement.decode(payload).version_for(self.device)
            except AnnouncementError as exc:
                log.warning("ignored the fleet's targets announcement: %s", exc)
                return
        self.publish_status()
