"""MQTT transport shared by both services (paho-mqtt 2.x).

Callbacks stay thin: a received message is handed to `on_message(topic,
payload)`, which the services point at a queue; a connection that goes down or
comes back calls `on_connection(up)`. Subscriptions and the birth message are
restored on every (re)connect (a broker restarted without persistence forgot
both); paho's network thread reconnects with backoff. MQTT 5 is used where the
broker speaks it, 3.1.1 otherwise ("auto").
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from specedge.config import MqttConfig

log = logging.getLogger("specedge.mqtt")
NO_MATCHING_SUBSCRIBERS = 16  # an MQTT 5 PUBACK's reason code
UNHEARD_KEEP_S = 10.0  # how long a PUBACK that overtook its publish() is kept for it (Link.publish)

def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_bytes(topic: str, payload_len: int, qos: int, v5: bool, alias: bool = False) -> int:
    """Bytes of the PUBLISH packet on the wire, plus its PUBACK (QoS 1): MQTT framing included.
    `alias`: the topic travels as an MQTT 5 topic alias (pass "" once the alias is set up)."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + (3 if alias else 0) + payload_len
    return 1 + _varint_len(body) + body + (4 if qos else 0)


class BrokerUnavailable(ConnectionError):
    pass


class ReplyTo(NamedTuple):
    """Where a request wants its answer: MQTT 5's response topic and correlation data."""
    topic: str | None
    correlation: bytes | None


class Link:
    """One MQTT client connection with explicit state and byte accounting."""

    def __init__(self, cfg: MqttConfig, client_id: str, on_message,
                 will: tuple[str, bytes, bool] | None = None, birth: tuple | None = None,
                 on_connection=None, max_packet: int = 0):
        """`max_packet`: the largest packet we take (MQTT 5 asks the broker to drop larger ones
        for us; 3.1.1 has no way to say it: only the broker's own max_packet_size bounds it)."""
        self.cfg, self.client_id, self.on_message, self.will = cfg, client_id, on_message, will
        self.max_packet = max_packet
        self.birth, self.on_connection = birth, on_connection
        self.subscriptions: dict[str, int] = {}  # topic -> the QoS asked for
        self.handlers: dict[str, object] = {}  # topic filter -> handler(topic, payload, ReplyTo)
        self.bytes_sent = self.bytes_received = 0
        # MQTT 5 topic aliases towards the broker, this connection's (CONNACK says how many):
        # topic -> alias. Only QoS 0 messages use them: paho drops a QoS 0 publish while
        # disconnected instead of queueing it, so no aliased message can outlive its connection.
        self._aliases: dict[str, int] = {}
        self._alias_max = 0
        self._alias_lock = threading.Lock()
        self.protocol = None  # "5" or "3.1.1" once connected
        self.connected = threading.Event()
        self.connects = 0  # successful connections so far: a change means messages in flight may be lost
        self._connack = threading.Event()
        self._refused = None
        self._client = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._retrying: threading.Thread | None = None
        # QoS 1 publishes whose sender wants to know if nobody subscribes (MQTT 5's PUBACK says so):
        # mid -> unheard(); and the mids the broker already said so for, before their publish()
        # returned (a PUBACK can overtake it), kept UNHEARD_KEEP_S.
        self._watched: dict[int, object] = {}
        self._unheard_early: dict[int, float] = {}
        self._watch_lock = threading.Lock()
        # SUBSCRIBEs the broker has not acknowledged yet (mids), and SUBACKs that overtook their
        # subscribe() call: a service that says it started must already hear its topics, or a
        # message sent the moment after (from another connection) is lost for want of a subscriber.
        self._unacked: set[int] = set()
        self._acked_early: set[int] = set()
        self._subacks = threading.Condition()
        self._net_thread: int | None = None  # paho's network thread, which must never wait on itself

    # paho callbacks: record state, hand messages on, nothing else.
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
        else:
            with self._alias_lock:  # aliases live and die with their connection
                self._aliases = {}
                self._alias_max = getattr(properties, "TopicAliasMaximum", 0) if self.protocol == "5" else 0
            self._net_thread = threading.get_ident()
            with self._subacks:  # the last connection's SUBACKs will never come
                self._unacked.clear()
                self._acked_early.clear()
            for topic, qos in list(self.subscriptions.items()):  # subscribe() may add one meanwhile
                self._sent_subscribe(client.subscribe(topic, qos=qos)[1])
            if self.birth:
                topic, payload, retain = self.birth
                client.publish(topic, payload() if callable(payload) else payload, qos=1, retain=retain)
            self.connects += 1
            self.connected.set()
            if self.on_connection:
                self.on_connection(True)
        self._connack.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        heard = getattr(reason_code, "value", 0) != NO_MATCHING_SUBSCRIBERS
        with self._watch_lock:
            unheard = self._watched.pop(mid, None)
            if unheard is None and not heard:
                now = time.monotonic()
                self._unheard_early = {m: t for m, t in self._unheard_early.items() if now - t < UNHEARD_KEEP_S}
                self._unheard_early[mid] = now
        if unheard is not None and not heard:
            unheard()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._subacks:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._subacks.notify_all()
            else:
                self._acked_early.add(mid)

    def _sent_subscribe(self, mid: int | None) -> None:
        with self._subacks:
            if mid in self._acked_early:
                self._acked_early.discard(mid)
            elif mid is not None:
                self._unacked.add(mid)

    def _wait_subscribed(self, timeout: float) -> bool:
        """Until the broker has acknowledged every SUBSCRIBE sent so far (never from paho's own
        thread: the SUBACKs arrive there). False if `timeout` passed first."""
        if threading.get_ident() == self._net_thread:
            return True
        with self._subacks:
            done = self._subacks.wait_for(lambda: not self._unacked, timeout)
        if not done:
            log.warning("MQTT broker %s:%s has not acknowledged a subscription in %.0f s",
                        self.cfg.host, self.cfg.port, timeout)
        return done

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self._connack.set()
        if self.on_connection:
            self.on_connection(False)

    @staticmethod
    def _on_socket_open(client, userdata, sock):
        # Rounds are small request/response messages: Nagle plus delayed ACKs would add ~40 ms each.
        if hasattr(sock, "setsockopt"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _count(self, msg) -> None:
        self.bytes_received += publish_packet_bytes(msg.topic, len(msg.payload), msg.qos, self.protocol == "5")

    def _on_message(self, client, userdata, msg):
        self._count(msg)
        self.on_message(msg.topic, msg.payload)

    def _routed(self, handler):
        def on_message(client, userdata, msg):
            self._count(msg)
            props = msg.properties
            handler(msg.topic, msg.payload, ReplyTo(getattr(props, "ResponseTopic", None),
                                                    getattr(props, "CorrelationData", None)))
        return on_message

    def _make_client(self, protocol: str) -> paho.Client:
        v5 = protocol == "5"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                             clean_session=None if v5 else True)
        client.on_connect, client.on_disconnect, client.on_message = (
            self._on_connect, self._on_disconnect, self._on_message)
        client.on_socket_open = self._on_socket_open
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=8)
        for topic, handler in self.handlers.items():
            client.message_callback_add(topic, self._routed(handler))
        if self.cfg.tls_ca:
            client.tls_set(ca_certs=self.cfg.tls_ca, certfile=self.cfg.tls_cert or None,
                           keyfile=self.cfg.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password or None)
        if self.will:
            topic, payload, retain = self.will
            client.will_set(topic, payload, qos=1, retain=retain)
        return client

    def start(self, timeout: float = 10.0, retry: bool = False) -> "Link":
        """Connect, or raise BrokerUnavailable. `retry`: if the broker cannot be had now, return
        at once and keep trying in the background (`connected` says when it worked): a service
        that exits instead is restarted by its supervisor in a loop, reloading its model each time."""
        self._stopping.clear()
        try:
            return self._connect(timeout)
        except BrokerUnavailable as exc:
            if not retry:
                raise
            log.warning("%s; trying again in the background", exc)
        self._retrying = threading.Thread(target=self._retry, args=(timeout,), name="mqtt-connect", daemon=True)
        self._retrying.start()
        return self

    def _retry(self, timeout: float) -> None:
        delay = 1.0
        while not self._stopping.wait(delay):
            try:
                self._connect(timeout)
            except BrokerUnavailable as exc:
                log.debug("%s", exc)
                delay = min(2 * delay, 8.0)  # paho's own reconnect backoff, once connected
            else:
                log.info("connected to MQTT broker %s:%s", self.cfg.host, self.cfg.port)
                return

    def _connect(self, timeout: float) -> "Link":
        protocols = ["5", "3.1.1"] if self.cfg.protocol == "auto" else [self.cfg.protocol]
        errors = []
        for protocol in protocols:
            self._connack.clear()
            if self._stopping.is_set():  # stop() wakes a CONNACK wait: a service stops promptly
                raise BrokerUnavailable("the link is stopping")
            self._refused = None
            client = self._make_client(protocol)
            self.protocol = protocol
            props = None
            if protocol == "5" and self.max_packet:
                props = Properties(PacketTypes.CONNECT)
                props.MaximumPacketSize = self.max_packet
            # Set before connecting: whoever sees `connected` (set by the CONNACK) may publish at once.
            self._client = client
            try:
                client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, properties=props)
            except OSError as exc:
                self._client = None
                raise BrokerUnavailable(f"MQTT broker {self.cfg.host}:{self.cfg.port} unreachable: {exc}") from exc
            client.loop_start()
            if self._connack.wait(timeout) and self.connected.is_set():
                self._wait_subscribed(timeout)
                return self
            client.loop_stop()
            client.disconnect()
            self._client = None
            errors.append(f"MQTT {protocol}: {self._refused or 'no CONNACK'}")
        raise BrokerUnavailable(f"MQTT broker {self.cfg.host}:{self.cfg.port} refused us ({'; '.join(errors)})")

    def subscribe(self, topic: str, handler=None, qos: int | None = None, timeout_s: float = 10.0) -> None:
        """Subscribe (now and after every reconnect) at `qos` ([mqtt] qos unless given); messages
        on `topic` go to `handler(topic, payload, ReplyTo)` when given, to `on_message` otherwise.
        While connected, returns once the broker has acknowledged it (or after `timeout_s`)."""
        qos = self.subscriptions[topic] = self.cfg.qos if qos is None else qos
        if handler is not None:
            self.handlers[topic] = handler
        if self._client is not None:
            if handler is not None:
                self._client.message_callback_add(topic, self._routed(handler))
            rc, mid = self._client.subscribe(topic, qos=qos)
            if rc == paho.MQTT_ERR_SUCCESS:
                self._sent_subscribe(mid)
                self._wait_subscribed(timeout_s)

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int | None = None,
                reply_to: ReplyTo | None = None, unheard=None) -> None:
        """`reply_to` asks for an answer there (MQTT 5 properties; on 3.1.1 it must travel in the
        payload). `unheard()` is called (from paho's thread) if the broker says that nobody
        subscribes to `topic`: MQTT 5 and QoS 1 only, where the PUBACK says so."""
        qos = self.cfg.qos if qos is None else qos
        v5 = self.protocol == "5"
        props = Properties(PacketTypes.PUBLISH) if v5 else None
        if reply_to is not None and v5:
            if reply_to.topic:
                props.ResponseTopic = reply_to.topic
            if reply_to.correlation:
                props.CorrelationData = reply_to.correlation
        # Held across the send: a reconnect (which forgets the aliases) cannot slip in between.
        with self._alias_lock:
            sent_topic, alias = topic, None
            if v5 and qos == 0 and not retain:
                alias = self._aliases.get(topic)
                if alias is not None:
                    sent_topic = ""  # the broker knows it by its alias on this connection
                elif len(self._aliases) < self._alias_max:
                    alias = self._aliases[topic] = len(self._aliases) + 1  # set up by this message
            if alias is not None:
                props.TopicAlias = alias
            self.bytes_sent += publish_packet_bytes(sent_topic, len(payload), qos, v5, alias is not None)
            info = self._client.publish(sent_topic, payload, qos=qos, retain=retain, properties=props)
        if unheard is not None and v5 and qos:
            with self._watch_lock:
                said = self._unheard_early.pop(info.mid, None)
                if said is None or time.monotonic() - said >= UNHEARD_KEEP_S:
                    self._watched[info.mid] = unheard
                    return
            unheard()

    def stop(self) -> None:
        self._stopping.set()
        self._connack.set()  # a connect waiting for its CONNACK gives up now (_connect)
        if self._retrying is not None:
            self._retrying.join(timeout=30)  # a connect under way finishes first: then it is closed below
            self._retrying = None
        client = self._client  # a connect giving up may clear it meanwhile
        if client is not None:
            client.disconnect()
            client.loop_stop()  # callbacks may still publish until it returns
        self._client = None
        self.connected.clear()
