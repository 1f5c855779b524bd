"""MQTT 5 topic aliases on the device's uplink (issue 21): a round's topic crosses once per
connection, every message still arrives under its full topic, a reconnect sets the alias up
again, and MQTT 3.1.1 carries the topic as before. Against a real Mosquitto."""
from __future__ import annotations

import queue
import time

import pytest

from specedge.broker import MosquittoBroker
from specedge.config import MqttConfig
from specedge.mqtt import Link, publish_packet_bytes

TOPIC = "specedge/v1/bench/device0/draft/replica-a"


def _pair(port: int, protocol: str):
    got: queue.Queue = queue.Queue()
    sub = Link(MqttConfig(port=port), f"sub-{time.monotonic_ns()}", lambda t, p: got.put((t, p))).start()
    sub.subscribe(TOPIC)
    pub = Link(MqttConfig(port=port, protocol=protocol), f"pub-{time.monotonic_ns()}", lambda t, p: None).start()
    time.sleep(0.2)
    return sub, pub, got


def _receive(got: queue.Queue, n: int) -> list:
    return [got.get(timeout=5) for _ in range(n)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_round_messages_go_by_topic_alias_on_mqtt5_and_arrive_under_their_topic(mosquitto, protocol):
    sub, pub, got = _pair(mosquitto.port, protocol)
    try:
        sizes = []
        for i in range(4):
            before = pub.bytes_sent
            pub.publish(TOPIC, b"round %d" % i, qos=0)
            sizes.append(pub.bytes_sent - before)
        assert _receive(got, 4) == [(TOPIC, b"round %d" % i) for i in range(4)]
        full = publish_packet_bytes(TOPIC, 7, 0, protocol == "5")
        if protocol == "5":  # the first names the topic and its alias, the rest send the alias alone
            assert sizes == [full + 3] + [full - len(TOPIC) + 3] * 3
        else:
            assert sizes == [full] * 4
        before = pub.bytes_sent  # QoS 1 (fleet messages) never uses an alias
        pub.publish(TOPIC, b"control", qos=1)
        assert pub.bytes_sent - before == publish_packet_bytes(TOPIC, 7, 1, protocol == "5")
        assert _receive(got, 1) == [(TOPIC, b"control")]
    finally:
        pub.stop()
        sub.stop()


def test_a_reconnect_sets_the_alias_up_again(tmp_path):
    broker = MosquittoBroker().start()
    port = broker.port
    try:
        sub, pub, got = _pair(port, "5")
        pub.publish(TOPIC, b"a", qos=0)
        pub.publish(TOPIC, b"b", qos=0)
        assert _receive(got, 2) == [(TOPIC, b"a"), (TOPIC, b"b")]
        connects = pub.connects
        broker.stop()
        broker = MosquittoBroker(port=port).start()
        deadline = time.monotonic() + 20
        while (pub.connects == connects or not sub.connected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pub.connects > connects
        time.sleep(1.5)  # the subscriber's subscription is renewed on its reconnect
        before = pub.bytes_sent
        pub.publish(TOPIC, b"c", qos=0)  # a new connection: the topic crosses again with its alias
        assert pub.bytes_sent - before == publish_packet_bytes(TOPIC, 1, 0, True) + 3
        pub.publish(TOPIC, b"d", qos=0)
        assert _receive(got, 2) == [(TOPIC, b"c"), (TOPIC, b"d")]
        assert pub.connected.is_set()  # the broker took every alias: no protocol error
        pub.stop()
        sub.stop()
    finally:
        broker.stop()
