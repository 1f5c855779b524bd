"""`specedge certs`: a CA, the broker's certificate, one client certificate per device, verifier
and operator, the Mosquitto ACL that confines each to its own topics, and a mosquitto.conf.

For tests and small deployments; a larger one brings its own PKI and keeps the ACL's shape
(docs/fleet.md). The client certificate's common name is the identity: Mosquitto takes it as
the user name (use_identity_as_username) and the ACL grants topics per user. Running it
again keeps the CA and the certificates already made and adds the new names; the ACL always
covers every certificate in the folder.

Client ids: Mosquitto disconnects a client when another connects with its client id, so devices
and verifiers get their certificate's name as client id (use_username_as_clientid) whatever they
ask for: no certificate can take over another's session. Operators run several commands at once
with one certificate, which one bound client id would not allow: they connect to a listener of
their own (port + 1) whose client ids are free, and which only their own CA's certificates reach.

Revocation (--revoke NAME): NAME's serial goes into the CRL of the CA that issued it (ca.crl or
operators-ca.crl, every earlier revocation kept), mosquitto.conf gets that CRL on the listener the
CA's certificates reach, and the certificate moves to revoked/ (its key is deleted), so the name
can be issued anew. Mosquitto reads CRLs when it starts.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from specedge.protocol import topics
from specedge.protocol.wire import MAX_PACKET

ROLES = ("devices", "verifiers", "operators")
# Signs operator certificates only: the operators' listener trusts it alone, so no device or
# verifier certificate reaches the listener where client ids are not bound.
OPERATORS_CA = "operators-ca.crt"
# OpenSSL refuses every certificate of a CA whose CRL is past its next update: the CRL lasts as
# long as the CA (3650 days), since nothing re-signs it on a schedule.
CRL_DAYS = 3650


def add_parser(sub) -> None:
    c = sub.add_parser("certs", help="CA, broker and client certificates, Mosquitto ACL and config (TLS)")
    c.add_argument("--out", required=True, help="folder for the files (created; existing ones are kept)")
    c.add_argument("--fleet", default="default")
    c.add_argument("--devices", default="", help="comma-separated device ids")
    c.add_argument("--verifiers", default="", help="comma-separated verifier ids")
    c.add_argument("--operators", default="", help="comma-separated operator names")
    c.add_argument("--hosts", default="localhost,127.0.0.1", help="names and addresses the broker is reached at")
    c.add_argument("--port", type=int, default=8883, help="the TLS listener's port in mosquitto.conf")
    c.add_argument("--operator-port", type=int, default=0, help="the operators' TLS listener (default: port + 1)")
    c.add_argument("--days", type=int, default=825, help="validity of the leaf certificates")
    c.add_argument("--revoke", default="", help="comma-separated names whose certificates Mosquitto must refuse "
                                                "(a CRL; restart Mosquitto to apply)")
    c.set_defaults(func=run)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if set(n) & set("/+#\0 ") or n.startswith("_"):
            raise ValueError(f"{n!r}: a name without / + # spaces, not starting with _")
    return names


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # 0600 from the start: written first and chmod'ed after, the key was readable by anyone for a
    # moment. fchmod too, as O_CREAT leaves the mode of a file already there as it was.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate(name: str, key, issuer_name, issuer_key, days: int, ca: bool = False, hosts=(), client=True):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        alt = []
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def acl_text(fleet: str, devices: list[str], verifiers: list[str], operators: list[str]) -> str:
    """Mosquitto ACL: each device its own topics (and the fleet's targets and config), each
    verifier drafts in and verdicts out, operators commands and config out, status in."""
    own = lambda d, leaf: topics.device(fleet, d, leaf)
    every = lambda leaf: topics.device(fleet, topics.ANY, leaf)
    lines = ["# specedge ACL (specedge certs). One block per client certificate (its common name).", ""]
    for d in devices:
        lines += [f"user {d}",
                  f"topic write {own(d, 'draft/#')}", f"topic write {own(d, 'status')}",
                  f"topic write {own(d, 'telemetry')}", f"topic write {own(d, 'reply/#')}",
                  f"topic write {own(d, 'config/applied')}", f"topic read {topics.answers(fleet, d)}",
                  f"topic read {own(d, 'cmd')}", f"topic read {own(d, 'config')}",
                  f"topic read {topics.fleet(fleet, 'config')}", f"topic read {topics.fleet(fleet, 'targets')}",
                  f"topic read {topics.replica(topics.ANY, 'status')}", ""]
    for v in verifiers:
        lines += [f"user {v}",
                  f"topic read {every('draft/#')}", f"topic write {topics.answers(fleet, topics.ANY)}",
                  f"topic read {topics.fleet(fleet, 'targets')}", f"topic readwrite {topics.replica(v, '#')}", ""]
    for o in operators:
        lines += [f"user {o}",
                  f"topic write {every('cmd')}", f"topic readwrite {every('config')}",
                  f"topic readwrite {topics.fleet(fleet, 'config')}", f"topic readwrite {topics.fleet(fleet, 'targets')}",
                  f"topic read {topics.reply(fleet, topics.ANY, o)}", f"topic read {every('status')}",
                  f"topic read {every('telemetry')}", f"topic read {every('config/applied')}",
                  f"topic read {topics.REPLICAS}/#", ""]
    return "\n".join(lines)


def mosquitto_conf(folder: Path, port: int, host: str = "0.0.0.0", operator_port: int = 0) -> str:
    """Two TLS listeners: devices and verifiers on `port`, their client id bound to their
    certificate's name; operators on `operator_port` (port + 1), certificates of the operators' CA
    only. Both: client certificates required, their names as user names, the ACL applied, anything
    larger than the largest specedge message dropped (its sender disconnected), and the CA's CRL
    checked once it has revoked something."""
    folder = Path(folder).resolve()

    def listener(listen: int, ca: str, bound: bool) -> str:
        # Only where a CRL exists: with crlfile set, OpenSSL wants a CRL for every client's CA.
        crl = _crl(folder / ca)
        return (f"listener {listen} {host}\n"
                f"cafile {folder / ca}\ncertfile {folder / 'broker.crt'}\nkeyfile {folder / 'broker.key'}\n"
                f"require_certificate true\nuse_identity_as_username true\n"
                + ("use_username_as_clientid true\n" if bound else "")
                + (f"crlfile {crl}\n" if crl.exists() else "")
                + f"allow_anonymous false\nacl_file {folder / 'acl'}\n")
    return (f"per_listener_settings true\nmax_packet_size {MAX_PACKET}\n"
            + listener(port, "ca.crt", bound=True) + listener(operator_port or port + 1, OPERATORS_CA, bound=False))


def _ca(crt: Path, name: str):
    """(subject, key) of the CA in `crt` (and its .key), made if missing."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key_path = crt.with_suffix(".key")
    if crt.exists() and key_path.exists():
        return x509.load_pem_x509_certificate(crt.read_bytes()).subject, load_pem_private_key(key_path.read_bytes(), None)
    key = _key()
    ca = _certificate(name, key, None, None, 3650, ca=True)
    _write_key(key_path, key)
    _write_cert(crt, ca)
    return ca.subject, key


def _crl(ca_crt: Path) -> Path:
    return ca_crt.with_suffix(".crl")


def _issued(out: Path, name: str) -> Path:
    """NAME's certificate in `out`, whatever its role."""
    found = [out / role / f"{name}.crt" for role in ROLES if (out / role / f"{name}.crt").exists()]
    if not found:
        raise ValueError(f"{name!r}: no certificate to revoke (no {out}/{{{','.join(ROLES)}}}/{name}.crt)")
    return found[0]


def revoke(out: Path, crt_path: Path) -> Path:
    """Add the certificate's serial to its issuer's CRL (made or re-signed), move the certificate
    to revoked/ and delete its key; returns the CRL."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
    for ca_file in ("ca.crt", OPERATORS_CA):  # operators made before operators-ca.crt have ca.crt's
        ca = x509.load_pem_x509_certificate((out / ca_file).read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise ValueError(f"{crt_path}: not issued by {out}/ca.crt or {out}/{OPERATORS_CA}, so no CRL of ours "
                         "can revoke it")
    crl_path = _crl(out / ca_file)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
               .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=CRL_DAYS)))
    earlier = list(x509.load_pem_x509_crl(crl_path.read_bytes())) if crl_path.exists() else []
    for entry in earlier:
        builder = builder.add_revoked_certificate(entry)
    if all(e.serial_number != cert.serial_number for e in earlier):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build())
    ca_key = load_pem_private_key((out / ca_file).with_suffix(".key").read_bytes(), None)
    crl_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    # Out of the role's folder: the ACL drops the name, and `specedge certs` may issue it anew.
    kept = out / "revoked" / crt_path.parent.name / f"{crt_path.stem}-{cert.serial_number:x}.crt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    crt_path.rename(kept)
    crt_path.with_suffix(".key").unlink(missing_ok=True)
    return crl_path


def make(out: str | Path, fleet: str, devices=(), verifiers=(), operators=(), hosts=("localhost", "127.0.0.1"),
         port: int = 8883, days: int = 825, operator_port: int = 0, revoked=()) -> dict:
    """Revoke the `revoked` names' certificates, then create what is missing under `out`; returns
    {role: [names]} of every certificate there."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    to_revoke = {name: _issued(out, name) for name in revoked}  # refused before anything is written
    wanted = {"devices": list(devices), "verifiers": list(verifiers), "operators": list(operators)}
    everyone = {role: sorted({p.stem for p in (out / role).glob("*.crt")} - set(to_revoke) | set(wanted[role]))
                for role in ROLES}
    names = [n for role in ROLES for n in everyone[role]]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # refused before anything is written: a stray certificate would fail every later run
        raise ValueError(f"{clash}: a name may hold one role only (it is the broker's user name)")
    ca_name, ca_key = _ca(out / "ca.crt", f"specedge CA {fleet}")
    signers = {"devices": (ca_name, ca_key), "verifiers": (ca_name, ca_key),
               "operators": _ca(out / OPERATORS_CA, f"specedge operators CA {fleet}")}
    for crt in to_revoke.values():
        revoke(out, crt)
    if not (out / "broker.crt").exists():
        key = _key()
        _write_key(out / "broker.key", key)
        _write_cert(out / "broker.crt", _certificate("specedge broker", key, ca_name, ca_key, days, hosts=hosts,
                                                     client=False))
    for role in ROLES:
        folder = out / role
        folder.mkdir(exist_ok=True)
        for name in wanted[role]:
            if not (folder / f"{name}.crt").exists():
                key = _key()
                _write_key(folder / f"{name}.key", key)
                _write_cert(folder / f"{name}.crt", _certificate(name, key, *signers[role], days))
    (out / "acl").write_text(acl_text(fleet, everyone["devices"], everyone["verifiers"], everyone["operators"]))
    (out / "mosquitto.conf").write_text(mosquitto_conf(out, port, operator_port=operator_port))
    return everyone


def run(args) -> int:
    from specedge.config import ConfigError

    try:
        revoked = _names(args.revoke)
        everyone = make(args.out, args.fleet, _names(args.devices), _names(args.verifiers), _names(args.operators),
                        _names(args.hosts), args.port, args.days, args.operator_port, revoked)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    print(f"CA and broker certificate in {out}/ (ca.crt, broker.crt); Mosquitto: {out}/mosquitto.conf, {out}/acl")
    for role in ROLES:
        if everyone[role]:
            print(f"{role}: {', '.join(everyone[role])}  ({out}/{role}/NAME.crt and .key)")
    if revoked:
        crls = [str(_crl(out / ca)) for ca in ("ca.crt", OPERATORS_CA) if _crl(out / ca).exists()]
        print(f"revoked {', '.join(revoked)} (certificates moved to {out}/revoked/, serials in {', '.join(crls)})")
        print("restart Mosquitto: it reads CRLs when it starts (connections open now stay open until then)")
    print("each client's [mqtt] section: tls_ca = ca.crt, tls_cert/tls_key = its own pair; see docs/fleet.md")
    print(f"devices and verifiers connect to port {args.port}, operators (`specedge fleet --port`) to "
          f"{args.operator_port or args.port + 1}")
    return 0
