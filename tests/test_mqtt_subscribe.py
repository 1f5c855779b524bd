"""A Link that says it subscribed (or started) already hears its topics: a message sent the
moment after, from another connection, reaches it. Against a real Mosquitto, the subscriber
behind the channel emulator's 300 ms each way, so an unacknowledged SUBSCRIBE is still on the
way when the message reaches the broker, and the message would be lost."""
from __future__ import annotations

import queue
import time

from specedge.config import MqttConfig
from specedge.mqtt import Link
from specedge.tools.channel import ChannelConfig, ChannelEmulator, LinkSpec

TOPIC = "specedge/v1/subtest/device0/answers"
SLOW = ChannelConfig(up=LinkSpec(delay_ms=300), down=LinkSpec(delay_ms=300))


def _links(broker_port: int, channel_port: int):
    got: queue.Queue = queue.Queue()
    sub = Link(MqttConfig(port=channel_port), f"sub-{time.monotonic_ns()}", lambda t, p: got.put((t, p)))
    pub = Link(MqttConfig(port=broker_port), f"pub-{time.monotonic_ns()}", lambda t, p: None).start()
    return sub, pub, got


def test_a_subscription_is_heard_as_soon_as_subscribe_returns(mosquitto):
    with ChannelEmulator(SLOW, ("127.0.0.1", mosquitto.port)) as channel:
        sub, pub, got = _links(mosquitto.port, channel.port)
        sub.start()
        try:
            sub.subscribe(TOPIC)
            pub.publish(TOPIC, b"right after", qos=0)
            assert got.get(timeout=5) == (TOPIC, b"right after")
        finally:
            pub.stop()
            sub.stop()


def test_a_link_hears_its_topics_as_soon_as_start_returns(mosquitto):
    """The services subscribe before they connect: the SUBSCRIBEs go out on the CONNACK."""
    with ChannelEmulator(SLOW, ("127.0.0.1", mosquitto.port)) as channel:
        sub, pub, got = _links(mosquitto.port, channel.port)
        sub.subscribe(TOPIC)
        sub.start()
        try:
            pub.publish(TOPIC, b"right after", qos=0)
            assert got.get(timeout=5) == (TOPIC, b"right after")
        finally:
            pub.stop()
            sub.stop()
