"""Every MQTT topic specedge uses, built and parsed here and nowhere else.

    specedge/v1/{fleet}/{device}/{leaf}   a device's topics: draft (up; draft/{replica} once a
                                          replica holds the session), status, telemetry, cmd,
                                          config, config/applied, reply/{who}
    sv/{fleet}/{device}                   a device's answers: OPENED, VERDICT, HINT, TOKENS, ERROR
    specedge/v1/{fleet}/{leaf}            the fleet's retained config and targets
    specedge/v1/_verifiers/{replica}/{leaf}   a verifier replica's status (retained, its will) and stats
    specedge/local/{device}/...           the device's local API (device/local_mqtt.py)

A fleet, device or replica name is one topic level: `_` starts no fleet name (the _verifiers
level), and no name holds `/`, `+` or `#` (config's TOPIC_NAME).
"""
from __future__ import annotations

ROOT = "specedge/v1"
# Every answer the device receives carries this topic: Mosquitto 2.0 sends subscribers no topic
# aliases, so its length is paid on every round (drafts go up by alias). Version: the payload's.
ANSWERS = "sv"
REPLICAS = f"{ROOT}/_verifiers"
LOCAL_ROOT = "specedge/local"
ANY = "+"  # one level, in a subscription


def device(fleet: str, device: str, leaf: str) -> str:
    return f"{ROOT}/{fleet}/{device}/{leaf}"


def draft(fleet: str, device_id: str, replica: str | None = None) -> str:
    """Drafts go to the group until a replica holds the session, then to that replica."""
    return device(fleet, device_id, "draft" if replica is None else f"draft/{replica}")


def answers(fleet: str, device_id: str) -> str:
    """Where the verifier answers a device's OPEN, DRAFT and GENERATE."""
    return f"{ANSWERS}/{fleet}/{device_id}"


def reply(fleet: str, device_id: str, who: str) -> str:
    """Where a device answers `who`'s command (an operator's name)."""
    return device(fleet, device_id, f"reply/{who}")


def fleet(fleet_name: str, leaf: str) -> str:
    """The fleet's own topics: config (retained, for every device), targets (retained)."""
    return f"{ROOT}/{fleet_name}/{leaf}"


def replica(name: str, leaf: str) -> str:
    return f"{REPLICAS}/{name}/{leaf}"


def shared(group: str, topic: str) -> str:
    """MQTT 5 shared subscription: each message to one member of the group."""
    return f"$share/{group}/{topic}"


def parse_device(topic: str) -> tuple[str, str, str] | None:
    """(fleet, device, leaf) of a device's topic, where a draft addressed to one replica
    (draft/{replica}) counts as a draft and reply/{who} as reply; None for any other topic."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[4] in ("draft", "reply"):
        parts = parts[:5]
    if len(parts) == 6 and parts[4:] == ["config", "applied"]:
        parts = parts[:4] + ["config/applied"]
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or parts[2].startswith("_"):
        return None
    return parts[2], parts[3], parts[4]


def parse_answers(topic: str) -> tuple[str, str] | None:
    """(fleet, device) of a device's answers topic; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != ANSWERS:
        return None
    return parts[1], parts[2]


def parse_fleet(topic: str) -> tuple[str, str] | None:
    """(fleet, leaf) of a fleet's own topic (config, targets); None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != ROOT or parts[2].startswith("_"):
        return None
    return parts[2], parts[3]


def parse_replica(topic: str) -> tuple[str, str] | None:
    """(replica, leaf) of a verifier replica's topic; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != REPLICAS:
        return None
    return parts[3], parts[4]


def local(device_id: str, leaf: str = "") -> str:
    return f"{LOCAL_ROOT}/{device_id}" + (f"/{leaf}" if leaf else "")
