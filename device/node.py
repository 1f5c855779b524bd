"""Everything a device runs as a service: the agent's request queue, its fleet membership,
the local HTTP API and (optionally) the local MQTT API. `specedge device serve` is this."""
from __future__ import annotations

from specedge.config import DeviceConfig
from specedge.device.agent import device_link
from specedge.device.fleet import FleetMember
from specedge.device.http_api import LocalHttpApi
from specedge.device.local_mqtt import LocalMqttApi
from specedge.device.service import DeviceService


class DeviceNode:
    def __init__(self, cfg: DeviceConfig, engine, tokenizer, config_path: str | None = None):
        # The node owns the device's one MQTT connection: the agent and the fleet member share it.
        self.link = device_link(cfg)
        self.service = DeviceService(cfg, engine, tokenizer, config_path, self.link)
        api = cfg.api
        self.http = LocalHttpApi(self.service, api.http_host, api.http_port) if api.http_port >= 0 else None
        # Before the link starts: the fleet member sets its will and birth.
        self.fleet = FleetMember(self.service, self.link, self.http.port if self.http else None)
        self.local = LocalMqttApi(self.service, cfg) if api.local_mqtt_host else None

    def start(self) -> "DeviceNode":
        self.service.start()
        # Without a broker, keep trying: requests are answered 503 broker_unreachable until one comes.
        self.link.start(retry=True)
        self.fleet.start()
        if self.http:
            self.http.start()
        if self.local:
            self.local.start(retry=True)
        return self

    def describe(self) -> dict:
        s = self.service
        return {"ready": True, "device": s.cfg.device.id, "fleet": s.cfg.device.fleet,
                "http_port": self.http.port if self.http else None, "backend": s.engine.backend,
                "policy": s.policy.name, "protocol": self.link.protocol,
                "local_mqtt": f"{s.cfg.api.local_mqtt_host}:{s.cfg.api.local_mqtt_port}" if self.local else None}

    def problem(self) -> str:
        """"" while healthy, else what is wrong (the systemd watchdog stops pinging)."""
        threads = {"request worker": self.service._worker, "fleet": self.fleet._thread}
        if self.http:
            threads["http"] = self.http._thread
        return ", ".join(f"the {name} thread died" for name, t in threads.items() if not t.is_alive())

    def stop(self) -> None:
        if self.http:
            self.http.stop()
        if self.local:
            self.local.stop()
        self.fleet.stop()
        self.service.stop()
        self.link.stop()


def serve_command(args) -> int:
    """`specedge device serve`: the node from its config file, until SIGINT or SIGTERM."""
    import json

    from specedge import systemd
    from specedge.device import checks
    from specedge.device.backends import open_engine
    from specedge.progress import say

    cfg = checks.load(args.config)
    engine, tok = open_engine(cfg.draft, say)
    node = DeviceNode(cfg, engine, tok, args.config).start()
    # One JSON line on stdout tells supervisors (tests, scripts) where the local API listens.
    print(json.dumps(node.describe()), flush=True)
    systemd.serve_until_signal(f"serving {cfg.device.fleet}/{cfg.device.id}", node.problem, node.stop)
    return 0
