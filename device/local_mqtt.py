"""The local MQTT topic API: for robot stacks that already speak MQTT on the device.

Requests go to specedge/local/{device}/request as JSON, with the body of an
OpenAI /v1/chat/completions ("messages") or /v1/completions ("prompt") call
plus an "id". Answers go to the MQTT 5 response topic (correlation data echoed),
else to the payload's "reply_to", else to specedge/local/{device}/response/{id}:
with "stream": true one {"id", "delta"} per text increment ("unverified": true added where it
holds text of tokens the target never saw, under the `draft` fault policy), and always a last
{"id", "done": true, "text", "finish_reason", "usage", "specedge"} or
{"id", "done": true, "error": {...}} with the HTTP API's error shape and status.

A reply topic must lie under specedge/local/{device}/response/: any other is refused
(400 reply_to_not_allowed, on the default topic). The device holds at most
[api] queue_size + 1 requests; more are answered 503 busy at once.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

from specedge.config import DeviceConfig
from specedge.device.openai_api import (ApiError, chat_logprobs, json_body, outcome_error, parse_request,
                                        spec_summary, submit, usage)
from specedge.device.service import DeviceService
from specedge.mqtt import Link, ReplyTo
from specedge.protocol import topics

log = logging.getLogger("specedge.local")

class LocalMqttApi:
    def __init__(self, service: DeviceService, cfg: DeviceConfig):
        api = cfg.api
        mqtt = replace(cfg.mqtt, host=api.local_mqtt_host, port=api.local_mqtt_port, tls_ca="", tls_cert="",
                       tls_key="", username="", password="")
        self.service, self.device = service, cfg.device.id
        self.prefix = topics.local(self.device)
        self.replies = f"{self.prefix}/response/"
        # What the service can hold: one running, queue_size waiting. More would be refused by it
        # anyway, so they are refused here, before a thread is spent on them.
        self.capacity = cfg.api.queue_size + 1
        self._slots = threading.BoundedSemaphore(self.capacity)
        self.link = Link(mqtt, f"specedge-local-{self.device}", lambda topic, payload: None)
        self.link.subscribe(f"{self.prefix}/request", self._on_request)

    def start(self, retry: bool = False) -> "LocalMqttApi":
        """retry: a broker that is not there yet is waited for (as the service's own link), not fatal."""
        self.link.start(retry=retry)
        return self

    def stop(self) -> None:
        self.link.stop()

    def _on_request(self, topic: str, payload: bytes, reply_to: ReplyTo) -> None:
        # Runs on the MQTT client's thread: what needs no thread to refuse (an answer aimed
        # elsewhere, no room) is refused here; the rest goes to a thread that waits on the job.
        body = self._peek(payload)
        request_id = body.get("id") if isinstance(body, dict) else None
        asked = self.destination(reply_to, body, request_id)[1]
        if asked is not None:
            log.warning("local request %.100r asked for its answer on %.200r, outside %s: refused",
                        request_id, asked, self.replies)
            err = ApiError(400, f"reply_to must be a topic under {self.replies} (this device's own answers)",
                           param="reply_to", code="reply_to_not_allowed")
        elif not self._slots.acquire(blocking=False):
            err = ApiError(503, f"the device holds {self.capacity} requests already ([api] queue_size + 1); "
                                "retry shortly", kind="service_unavailable", code="busy")
        else:
            threading.Thread(target=self._serve, args=(payload, reply_to), name="specedge-local-request",
                             daemon=True).start()
            return
        self.answer(reply_to, body, request_id, {"done": True, "status": err.status, **err.body()})

    def _serve(self, payload: bytes, reply_to: ReplyTo) -> None:
        try:
            self.handle(payload, reply_to)
        finally:
            self._slots.release()

    def _peek(self, payload: bytes):
        """The body for its id and reply_to, or None; handle() says what is wrong with it."""
        if len(payload) > self.service.cfg.api.max_body_kb * 1024:
            return None
        try:
            return json_body(payload)
        except ApiError:
            return None

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
            if kind == "logprobs":  # all of them come with the answer (Outcome.logprobs)
                continue
            if kind in ("text", "unverified"):
                if request["stream"]:
                    delta = {"delta": value, **({"unverified": True} if kind == "unverified" else {})}
                    self.answer(reply_to, body, request_id, delta)
                continue
            if value.finish_reason in ("error", "cancelled"):
                err = outcome_error(value)
                self.answer(reply_to, body, request_id, {"done": True, "status": err.status, **err.body()})
            else:
                logprobs = {"logprobs": chat_logprobs(self.service.tokenizer, value.logprobs)} if value.logprobs else {}
                self.answer(reply_to, body, request_id, {"done": True, "text": value.text,
                                                         "finish_reason": value.finish_reason, **logprobs,
                                                         "usage": usage(value), "specedge": spec_summary(value)})

    def destination(self, reply_to: ReplyTo, body, request_id) -> tuple[str, str | None]:
        """(the topic to answer on, the reply topic asked for if it was refused). Only topics under
        the device's own response/ are answered on: the device publishes with its own rights on the
        broker, so a requester must not aim it at a robot's command topics or another device's
        answers, nor at its own request topic (the answer would come back as a request)."""
        asked = reply_to.topic or (body.get("reply_to") if isinstance(body, dict) else None)
        safe = isinstance(request_id, str) and request_id and not set(request_id) & set("+#/\0")
        default = f"{self.prefix}/response/{request_id if safe else '_'}"
        if asked is None or asked == "":
            return default, None
        if (isinstance(asked, str) and asked.startswith(self.replies) and len(asked) > len(self.replies)
                and not set(asked) & set("+#\0")):
            return asked, None
        return default, asked

    def answer(self, reply_to: ReplyTo, body, request_id, data: dict) -> None:
        topic = self.destination(reply_to, body, request_id)[0]
        self.link.publish(topic, json.dumps({"id": request_id, **data}).encode(),
                          reply_to=ReplyTo(None, reply_to.correlation) if reply_to.correlation else None)
