"""`specedge fleet`: the operator's view of a fleet, over the same MQTT topics the devices use.

  ls                      devices from their retained status and telemetry, and the verifier replicas
  watch                   the same table, refreshed as telemetry arrives
  cmd DEVICE COMMAND k=v  one command, waiting for the device's answer (MQTT 5 correlation)
  config set [--device D] section.key=value ...   the retained desired config, then the devices' acks
  config show [--device D]

Exit codes: 0 done; 1 a device refused or rejected something, or no device matched;
2 usage, configuration or broker errors; 3 no answer in time.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import sys
import time

from specedge.config import ConfigError, MqttConfig
from specedge.mqtt import Link, ReplyTo
from specedge.protocol import topics

REFUSED, NO_ANSWER = 1, 3


def add_parser(sub) -> None:
    f = sub.add_parser("fleet", help="operators: list, watch, command and configure a fleet's devices")
    f.add_argument("--host", default=os.environ.get("SPECEDGE_MQTT_HOST", "127.0.0.1"))
    f.add_argument("--port", type=int, default=int(os.environ.get("SPECEDGE_MQTT_PORT", "1883")),
                   help="the broker's port; with `specedge certs` TLS, the operators' listener (8884)")
    f.add_argument("--fleet", default=os.environ.get("SPECEDGE_FLEET", "default"))
    f.add_argument("--ca", default=os.environ.get("SPECEDGE_MQTT_TLS_CA", ""), help="CA certificate (TLS)")
    f.add_argument("--cert", default=os.environ.get("SPECEDGE_MQTT_TLS_CERT", ""), help="operator certificate")
    f.add_argument("--key", default=os.environ.get("SPECEDGE_MQTT_TLS_KEY", ""), help="operator key")
    f.add_argument("--operator", default="", help="who asks (the certificate's name by default): answers "
                                                  f"come on {topics.reply('{fleet}', '{device}', '{operator}')}")
    f.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for answers")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    fsub = f.add_subparsers(dest="fleet_command", required=True)
    ls = fsub.add_parser("ls", help="devices and verifiers, from retained status and telemetry")
    ls.add_argument("--wait", type=float, default=1.0, help="seconds to collect retained messages")
    w = fsub.add_parser("watch", help="the device table, refreshed")
    w.add_argument("--interval", type=float, default=2.0)
    w.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0 = until Ctrl-C)")
    c = fsub.add_parser("cmd", help="send one command to one device and print its answer")
    c.add_argument("device")
    c.add_argument("name", metavar="COMMAND",
                   help="set_budget budget_j_per_token=J [mode=throughput|energy] | set_policy policy=P | "
                        "drain [wait_s=S] | resume | reload_config | report")
    c.add_argument("args", nargs="*", metavar="KEY=VALUE")
    cf = fsub.add_parser("config", help="the retained desired config of one device or the whole fleet")
    cfs = cf.add_subparsers(dest="config_command", required=True)
    cs = cfs.add_parser("set", help="merge section.key=value into the desired config and wait for the acks")
    cs.add_argument("--device", help="one device (default: the whole fleet)")
    cs.add_argument("--replace", action="store_true", help="replace the desired config instead of merging")
    cs.add_argument("--no-wait", action="store_true", help="do not wait for the devices' acknowledgements")
    cs.add_argument("values", nargs="*", metavar="SECTION.KEY=VALUE")
    sh = cfs.add_parser("show", help="the desired config and each device's acknowledgement")
    sh.add_argument("--device")
    f.set_defaults(func=run)


def parse_value(text: str):
    """JSON where it parses (numbers, true/false, quoted strings), else the text itself; NaN and
    Infinity stay text (devices refuse them as numbers either way, this way with a clearer reason)."""
    try:
        return json.loads(text, parse_constant=_text)
    except ValueError:
        return text


def _text(constant: str):
    raise ValueError(constant)


def parse_pairs(pairs: list[str], dotted: bool) -> dict:
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{pair!r}: expected KEY=VALUE")
        if dotted:
            section, dot, name = key.partition(".")
            if not dot or not name:
                raise ConfigError(f"{key!r}: expected SECTION.KEY (as in the device's TOML file)")
            out.setdefault(section, {})[name] = parse_value(value)
        else:
            out[key] = parse_value(value)
    return out


class Operator:
    """An MQTT connection that collects what arrives on a queue."""

    def __init__(self, args):
        self.args, self.fleet = args, args.fleet
        cfg = MqttConfig(host=args.host, port=args.port, tls_ca=args.ca, tls_cert=args.cert, tls_key=args.key)
        cfg.validate()
        self.name = args.operator or (certificate_name(args.cert) if args.cert else "operator")
        self.inbox: queue.Queue = queue.Queue()
        self.link = Link(cfg, f"specedge-operator-{self.name}-{secrets.token_hex(3)}",
                         lambda topic, payload: self.inbox.put((topic, payload)))

    def __enter__(self) -> "Operator":
        self.link.start()
        return self

    def __exit__(self, *exc):
        self.link.stop()

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            self.link.subscribe(topic)

    def collect(self, seconds: float, until=None) -> list[tuple[str, bytes]]:
        """Messages for `seconds`, or until `until(messages)` is true."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
            if until is not None and until(got):
                break
        return got

    def topic(self, device: str, leaf: str) -> str:
        return topics.device(self.fleet, device, leaf)


def certificate_name(path: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(open(path, "rb").read())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _json(payload: bytes):
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


# -- ls and watch ------------------------------------------------------------------------------
class Table:
    def __init__(self, fleet: str):
        self.fleet, self.status, self.telemetry, self.verifiers = fleet, {}, {}, {}

    def add(self, topic: str, payload: bytes) -> None:
        data = _json(payload)
        if not isinstance(data, dict):
            return
        replica, device = topics.parse_replica(topic), topics.parse_device(topic)
        if replica is not None and replica[1] == "status":
            self.verifiers[replica[0]] = data
        elif device is not None and device[2] in ("status", "telemetry"):
            getattr(self, device[2])[device[1]] = data

    def rows(self) -> list[dict]:
        out = []
        for device in sorted(set(self.status) | set(self.telemetry)):
            s, t = self.status.get(device, {}), self.telemetry.get(device, {})
            if t and not t.get("requests") and isinstance(t.get("last_request"), dict):
                t = {**t, **t["last_request"], "from_last_request": True}  # nothing finished this interval
            out.append({"device": device, "state": s.get("state", "?"), "policy": s.get("policy", ""),
                        "budget_j_per_token": (s.get("energy") or {}).get("budget_j_per_token"),
                        "backend": s.get("backend", ""), "draft": (s.get("versions") or {}).get("draft", ""),
                        "target": t.get("target_version") or (s.get("target") or {}).get("announced", ""),
                        "power_mode": (s.get("power_mode") or {}).get("profile", ""),
                        "tokens_per_s": t.get("tokens_per_s"), "acceptance_rate": t.get("acceptance_rate"),
                        "mean_accepted_len": t.get("mean_accepted_len"),
                        "mean_draft_len": t.get("mean_draft_len"), "rtt_s": t.get("rtt_s_p50"),
                        "watts": t.get("watts"), "j_per_token": t.get("j_per_token"),
                        "queue_depth": t.get("queue_depth"), "in_flight": t.get("in_flight"),
                        "requests": t.get("requests"), "exact": t.get("exact"),
                        "from_last_request": t.get("from_last_request", False),
                        "telemetry_age_s": time.time() - t["time"] if isinstance(t.get("time"), (int, float))
                        else None})
        return out

    def render(self) -> str:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        head = (f"{'DEVICE':14}{'STATE':10}{'POLICY':20}{'BUDGET':>7}  {'BACKEND':12}{'DRAFT':20}{'TARGET':20}"
                f"{'TOK/S':>7}{'ACCEPT':>8}{'MAL':>6}{'DRAFT':>6}{'RTT ms':>8}{'W':>7}{'J/TOK':>7}{'QUEUE':>6}"
                f"{'BUSY':>5}{'EXACT':>6}{'AGE s':>7}")
        lines = [f"fleet {self.fleet}: {len(self.status)} device(s), "
                 f"{sum(1 for s in self.status.values() if s.get('state') in ('online', 'draining'))} up", head]
        for r in self.rows():
            lines.append(
                f"{r['device'][:13]:14}{r['state'][:9]:10}{r['policy'][:19]:20}"
                f"{num(r['budget_j_per_token'] or None, '.2f'):>7}  {r['backend'][:11]:12}{r['draft'][:19]:20}"
                f"{r['target'][:19]:20}{num(r['tokens_per_s'], '.1f'):>7}{num(r['acceptance_rate'], '.2f'):>8}"
                f"{num(r['mean_accepted_len'], '.2f'):>6}{num(r['mean_draft_len'], '.1f'):>6}"
                f"{num(r['rtt_s'] and r['rtt_s'] * 1000, '.0f'):>8}{num(r['watts'], '.1f'):>7}"
                f"{num(r['j_per_token'], '.2f'):>7}{num(r['queue_depth'], 'd'):>6}{num(r['in_flight'], 'd'):>5}"
                f"{'-' if r['exact'] is None else 'yes' if r['exact'] else 'NO':>6}"
                f"{num(r['telemetry_age_s'], '.0f'):>7}" + ("  (last request)" if r["from_last_request"] else ""))
        if self.verifiers:
            lines.append("verifiers: " + ", ".join(
                f"{name} {v.get('state', '?')} ({v.get('default', '')}{_exact_note(v)})"
                for name, v in sorted(self.verifiers.items())))
        return "\n".join(lines)


def _exact_note(verifier_status: dict) -> str:
    exact = (verifier_status.get("exact") or {}).get(verifier_status.get("default"))
    return "" if exact is None else ", exact" if exact else ", NOT EXACT (its status says why)"


def _table_topics(fleet: str) -> list[str]:
    return [topics.device(fleet, topics.ANY, "status"), topics.device(fleet, topics.ANY, "telemetry"),
            topics.replica(topics.ANY, "status")]


def ls(args, op: Operator) -> int:
    op.subscribe(*_table_topics(op.fleet))
    table = Table(op.fleet)
    for topic, payload in op.collect(args.wait):
        table.add(topic, payload)
    if args.json:
        print(json.dumps({"devices": table.rows(), "verifiers": table.verifiers}, indent=2))
    else:
        print(table.render())
    return 0 if table.status else REFUSED


def watch(args, op: Operator) -> int:
    op.subscribe(*_table_topics(op.fleet))
    table, shown = Table(op.fleet), 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.json else ""
    while not args.count or shown < args.count:
        for topic, payload in op.collect(args.interval):
            table.add(topic, payload)
        out = json.dumps({"time": time.time(), "devices": table.rows()}) if args.json else table.render()
        print(clear + out + ("" if clear or args.json else "\n"), flush=True)
        shown += 1
    return 0


# -- commands ----------------------------------------------------------------------------------
def command(args, op: Operator) -> int:
    request_id = secrets.token_hex(8)
    reply = topics.reply(op.fleet, args.device, op.name)
    op.subscribe(reply)
    time.sleep(0.1)  # the SUBACK before the answer can come
    request = {"command": args.name, "args": parse_pairs(args.args, dotted=False), "id": request_id,
               "reply_to": reply}  # the MQTT 3.1.1 fallback: the answer's address in the payload
    op.link.publish(op.topic(args.device, "cmd"), json.dumps(request).encode(),
                    reply_to=ReplyTo(reply, request_id.encode()))
    answers = [a for a in (_json(p) for _, p in op.collect(
        args.timeout, lambda got: any((_json(p) or {}).get("id") == request_id for _, p in got)))
        if isinstance(a, dict) and a.get("id") == request_id]
    if not answers:
        print(f"no answer from {args.device} in {args.timeout:.0f}s (is it up? `specedge fleet ls`)", file=sys.stderr)
        return NO_ANSWER
    answer = answers[0]
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        print(f"{args.device}: {args.name} ok")
        print(json.dumps(answer.get("result"), indent=2))
    else:
        print(f"{args.device}: {args.name} refused: {answer.get('error')}")
    return 0 if answer.get("ok") else REFUSED


# -- desired config ----------------------------------------------------------------------------
def _config_topic(op: Operator, device: str | None) -> str:
    return op.topic(device, "config") if device else topics.fleet(op.fleet, "config")


def config_set(args, op: Operator) -> int:
    from specedge.protocol.desired import digest, merge

    changes = parse_pairs(args.values, dotted=True)
    topic = _config_topic(op, args.device)
    op.subscribe(topic, topics.device(op.fleet, topics.ANY, "status"))
    current, statuses = {}, {}
    for t, payload in op.collect(min(args.timeout, 1.0)):
        if t == topic:
            current = _json(payload) or {}
        elif (status := topics.parse_device(t)) and status[0] == op.fleet and status[2] == "status":
            statuses[status[1]] = _json(payload) or {}
    kept = {} if args.replace else {s: v for s, v in current.items() if isinstance(v, dict)}
    desired = merge(kept, changes)
    payload = json.dumps(desired, sort_keys=True).encode()
    devices = [args.device] if args.device else sorted(
        d for d, s in statuses.items() if s.get("state") in ("online", "draining"))
    op.subscribe(*(op.topic(d, "config/applied") for d in devices))
    time.sleep(0.1)
    op.link.publish(topic, payload, retain=True)
    print(f"desired config of {'device ' + args.device if args.device else 'fleet ' + op.fleet} "
          f"({digest(payload)}): {json.dumps(desired, sort_keys=True)}")
    if args.no_wait:
        return 0
    if not devices:
        print("no device is online to apply it", file=sys.stderr)
        return REFUSED
    source, want = ("device" if args.device else "fleet"), digest(payload)
    acks: dict = {}

    def complete(got):
        for t, p in got:
            ack = _json(p)
            if isinstance(ack, dict) and (ack.get("sources") or {}).get(source) == want:
                acks[topics.parse_device(t)[1]] = ack
        return set(acks) >= set(devices)

    op.collect(args.timeout, complete)
    code = 0
    for device in devices:
        ack = acks.get(device)
        if ack is None:
            print(f"{device}: no acknowledgement in {args.timeout:.0f}s")
            code = max(code, NO_ANSWER)
            continue
        print(f"{device}: applied {json.dumps(ack['applied'], sort_keys=True)}"
              + (f"; needs restart {ack['needs_restart']}" if ack["needs_restart"] else "")
              + (f"; rejected {json.dumps(ack['rejected'], sort_keys=True)}" if ack["rejected"] else ""))
        if ack["rejected"]:
            code = max(code, REFUSED) if code != NO_ANSWER else code
    return code


def config_show(args, op: Operator) -> int:
    fleet_topic = _config_topic(op, None)
    op.subscribe(fleet_topic, op.topic(args.device or "+", "config"), op.topic(args.device or "+", "config/applied"))
    shown = {}
    for topic, payload in op.collect(min(args.timeout, 1.0)):
        shown[topic] = _json(payload)
    if args.json:
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        for topic, data in sorted(shown.items()):
            print(f"{topic}: {json.dumps(data, sort_keys=True)}")
    return 0


def run(args) -> int:
    with Operator(args) as op:
        if args.fleet_command == "ls":
            return ls(args, op)
        if args.fleet_command == "watch":
            try:
                return watch(args, op)
            except KeyboardInterrupt:
                return 0
        if args.fleet_command == "cmd":
            return command(args, op)
        return config_set(args, op) if args.config_command == "set" else config_show(args, op)

