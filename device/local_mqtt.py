"""The local MQTT topic API: for robot stacks that already speak MQTT on the device.

Requests go to specedge/local/{device}/request as JSON, with the body of an
OpenAI /v1/chat/completions ("messages") or /v1/completions ("prompt") call
plus an "id". Answers go to the MQTT 5 response topic (correlation data echoed),
else to the payload's "reply_to", else to specedge/local/{device}/response/{id}:
with "stream": true one {"id", "delta"} per text increment, and always a last
{"id", "done": true, "text", "finish_reason", "usage", "specedge"} or
{"id", "done": true, "error": {...}} with the HTTP API's error shape and status.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

from specedge.config import DeviceConfig
from specedge.device.http_api import ApiError, json_body, outcome_error, parse_request, spec_summary, submit, usage
from specedge.device.service import DeviceService
from specedge.mqtt import Link, ReplyTo

log = logging.getLogger("specedge.local")

LOCAL_ROOT = "specedge/local"


class LocalMqttApi:
    def __init__(self, service: DeviceService, cfg: DeviceConfig):
        api = cfg.api
        mqtt = replace(cfg.mqtt, host=api.local_mqtt_host, port=api.local_mqtt_port, tls_ca="", tls_cert="",
                       tls_key="", username="", password="")
        self.service, self.device = service, cfg.device.id
        self.prefix = f"{LOCAL_ROOT}/{self.device}"
        self.link = Link(mqtt, f"specedge-local-{self.device}", lambda topic, payload: None)
        self.link.subscribe(f"{self.prefix}/request", self._on_request)

    def start(self) -> "LocalMqttApi":
        self.link.start()
        return self

    def stop(self) -> None:
        self.link.stop()

    def _on_request(self, topic: str, payload: bytes, reply_to: ReplyTo) -> None:
        # Thin: each request is answered from its own thread, which waits on its job.
        threading.Thread(target=self.handle, args=(payload, reply_to), daemon=True).start()

    def handle(self, payload: bytes, reply_to: ReplyTo) -> None:
        body, request_id = None, None
        try:
            if len(payload) > self.service.cfg.api.max_body_kb * 1024:
                raise ApiError(413, f"the request has {len(payload)} bytes; the limit is "
                                    f"{self.service.cfg.api.max_body_kb * 1024} ([api] max_body_kb)")
            body = json_body(payload)
            request_id = body.get("id") if isinstance(body, dict) else None
            request = parse_request(body, isinstance(body, dict) and "messages" in body, self.service)
            job = submit(self.service, request)
        except ApiError as err:
            self.answer(reply_to, body, request_id, {"done": True, "status": err.status, **err.body()})
            return
        for kind, value in job.events():
            if kind == "text":
                if request["stream"]:
                    self.answer(reply_to, body, request_id, {"delta": value})
                continue
            if value.finish_reason in ("error", "cancelled"):
                err = outcome_error(value)
                self.answer(reply_to, body, request_id, {"done": True, "status": err.status, **err.body()})
            else:
                self.answer(reply_to, body, request_id, {"done": True, "text": value.text,
                                                         "finish_reason": value.finish_reason,
                                                         "usage": usage(value), "specedge": spec_summary(value)})

    def answer(self, reply_to: ReplyTo, body, request_id, data: dict) -> None:
        topic = reply_to.topic or (body.get("reply_to") if isinstance(body, dict) else None)
        if not isinstance(topic, str) or not topic or set(topic) & set("+#"):
            safe = isinstance(request_id, str) and request_id and not set(request_id) & set("+#/\0")
            topic = f"{self.prefix}/response/{request_id if safe else '_'}"
        self.link.publish(topic, json.dumps({"id": request_id, **data}).encode(),
                          reply_to=ReplyTo(None, reply_to.correlation) if reply_to.correlation else None)
