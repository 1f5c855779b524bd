"""Target versions on one verifier: which are loaded, which serves whom, loading more meanwhile.

No MQTT here. The verifier hands over each fleet's retained announcement and asks which
version serves a device; a version the fleet wants and this verifier lacks is loaded (and
self-tested) on a thread of its own, and the verifier's worker takes it in with poll() between
passes. moves() names the sessions whose version changed; the verifier switches them.
"""
from __future__ import annotations

import logging
import queue
import threading

from specedge.cloud.registry import Target, TargetSpec, load_target
from specedge.protocol.announce import Announcement, AnnouncementError
from specedge.config import TargetConfig
from specedge.exactness import establish
from specedge.exit_head import default_exit_layer, load_exit_head

log = logging.getLogger("specedge.cloud")


class Versions:
    def __init__(self, cfg: TargetConfig, default: Target, registry: dict[str, TargetSpec] | None, count):
        self.cfg, self.count = cfg, count  # count(kind): the verifier's error counter
        self.registry = dict(registry or {})
        self.registry.setdefault(default.name, default.spec)
        self.default = default.name
        self.targets: dict[str, Target] = {}
        self.announcements: dict[str, Announcement] = {}  # fleet -> its retained announcement
        self._loading: set[str] = set()
        self._loaded: queue.Queue = queue.Queue()  # versions loaded in the background
        self.add(default)

    def add(self, target: Target) -> None:
        exactness = establish(target.model, self.cfg.block)
        (log.info if exactness.exact else log.warning)("target %s: %s", target.name, exactness.summary())
        if target.exit_head is None and target.model.hints:
            trained = self.cfg.exit_head if target.name == self.default else ""  # a head fits one model
            target.exit_head = load_exit_head(target.model, self.cfg.exit_layer or default_exit_layer(
                target.model.cfg.n_layers), trained or None)
        self.targets[target.name] = target

    def version_for(self, fleet: str, device: str) -> str:
        """The version this device should be verified by: its pin, its fleet's default, ours."""
        announcement = self.announcements.get(fleet)
        wanted = announcement.version_for(device) if announcement else self.default
        return wanted if wanted in self.targets else self.default

    def announce(self, fleet: str, payload: bytes) -> None:
        """A fleet's retained announcement (empty: cleared); starts loading what it names and we lack."""
        if not payload:
            self.announcements.pop(fleet, None)
            return
        try:
            announcement = Announcement.decode(payload)
        except AnnouncementError as exc:
            self.count("bad_announcement")
            log.warning("ignored the targets announcement of fleet %s: %s", fleet, exc)
            return
        self.announcements[fleet] = announcement
        for name in {announcement.default, *announcement.pins.values()}:
            if name in self.targets or name in self._loading:
                continue
            if name not in self.registry:
                self.count("unknown_version")
                log.warning("fleet %s asks for target %s, which is not in this verifier's registry", fleet, name)
                continue
            self._loading.add(name)
            threading.Thread(target=self._load, args=(self.registry[name],), daemon=True).start()

    def _load(self, spec: TargetSpec) -> None:
        try:
            log.info("loading target version %s", spec.name)
            target = load_target(spec, self.cfg.batch_invariant)
            establish(target.model, self.cfg.block)  # here, not in the worker: it takes seconds
            self._loaded.put(target)
        except Exception:
            log.exception("could not load target version %s", spec.name)
            self.count("version_load_failed")

    def poll(self) -> bool:
        """Take in the versions loaded since the last call; True if there were any."""
        added = False
        while not self._loaded.empty():
            self.add(self._loaded.get_nowait())
            added = True
        return added

    def moves(self, sessions: dict) -> list:
        """(key, session, target) for each session its fleet's announcement gives another loaded,
        compatible version (an incompatible one stays, counted)."""
        out = []
        for key, session in sessions.items():
            name = self.version_for(key[0], key[1])
            if name == session.target.name:
                continue
            target = self.targets[name]
            if session.contract is not None and session.contract.mismatch(target.contract):
                self.count("incompatible_switch")
                continue
            out.append((key, session, target))
        return out
