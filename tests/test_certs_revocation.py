"""`specedge certs --revoke NAME` (issue 20, point 17): a CRL from the CA that issued NAME, on the
listener that CA's certificates reach, proved against a real Mosquitto started from the
mosquitto.conf `specedge certs` writes; and private keys that are never readable by others."""
from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import mqtt_connects
from specedge import certs, cli
from specedge.broker import MosquittoBroker, free_port

FLEET = "plant"


class Pki:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port, self.operator_port = free_port(), free_port()
        self.broker = None
        self.saved = folder.parent / "saved"  # copies of pairs that revoking takes out of the folder
        self.saved.mkdir()

    def certs(self, *argv: str) -> int:
        return cli.main(["certs", "--out", str(self.folder), "--fleet", FLEET, "--port", str(self.port),
                         "--operator-port", str(self.operator_port), *argv])

    def save(self, role: str, name: str) -> tuple[Path, Path]:
        pair = []
        for suffix in (".crt", ".key"):
            copy = self.saved / f"{name}-{time.monotonic_ns()}{suffix}"
            shutil.copy(self.folder / role / f"{name}{suffix}", copy)
            pair.append(copy)
        return pair[0], pair[1]

    def serve(self) -> None:
        """Mosquitto with the mosquitto.conf `specedge certs` wrote (on loopback), started afresh:
        it reads its CRLs at start."""
        conf = (self.folder / "mosquitto.conf").read_text().replace(" 0.0.0.0\n", " 127.0.0.1\n")
        if self.broker is not None:
            self.broker.stop()
        self.broker = MosquittoBroker(self.port, listener=conf).start()

    def connects(self, pair: tuple[Path, Path], operator: bool = False) -> bool:
        """Whether a client with this certificate gets a successful CONNACK within 3 s."""
        return mqtt_connects(self.operator_port if operator else self.port, self.folder / "ca.crt", *pair)

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


@pytest.fixture
def pki(tmp_path):
    p = Pki(tmp_path / "pki")
    assert p.certs("--devices", "d1,d2", "--verifiers", "v1", "--operators", "op,op2") == 0
    yield p
    p.stop()


def listeners(conf: str) -> list[str]:
    """The listener blocks of a mosquitto.conf, in order."""
    return ["listener " + block for block in conf.split("\nlistener ")[1:]]


def test_a_revoked_device_certificate_can_no_longer_connect_and_a_reissued_one_can(pki, capsys):
    d1, d2, v1 = pki.save("devices", "d1"), pki.save("devices", "d2"), pki.save("verifiers", "v1")
    pki.serve()
    assert pki.connects(d1) and pki.connects(d2)  # the control: before the revocation

    assert pki.certs("--revoke", "d1") == 0
    assert "revoked d1" in capsys.readouterr().out
    device_listener, operator_listener = listeners((pki.folder / "mosquitto.conf").read_text())
    assert f"crlfile {pki.folder.resolve() / 'ca.crl'}\n" in device_listener
    assert "crlfile" not in operator_listener  # the operators' CA revoked nothing
    assert not (pki.folder / "devices/d1.crt").exists() and not (pki.folder / "devices/d1.key").exists()
    assert "user d1\n" not in (pki.folder / "acl").read_text()
    pki.serve()
    assert not pki.connects(d1)
    assert pki.connects(d2) and pki.connects(v1)

    # A second revocation keeps the first; a new certificate for the name is a new serial.
    assert pki.certs("--revoke", "d2", "--devices", "d1") == 0
    new_d1 = pki.save("devices", "d1")
    pki.serve()
    assert not pki.connects(d1) and not pki.connects(d2)
    assert pki.connects(new_d1) and pki.connects(v1)


def test_a_revoked_operator_certificate_can_no_longer_reach_the_operators_listener(pki):
    op, op2, d2 = pki.save("operators", "op"), pki.save("operators", "op2"), pki.save("devices", "d2")
    assert pki.certs("--revoke", "op") == 0
    device_listener, operator_listener = listeners((pki.folder / "mosquitto.conf").read_text())
    assert f"crlfile {pki.folder.resolve() / 'operators-ca.crl'}\n" in operator_listener
    assert "crlfile" not in device_listener
    pki.serve()
    assert not pki.connects(op, operator=True)
    assert pki.connects(op2, operator=True) and pki.connects(d2)


def test_the_crl_is_signed_by_the_ca_that_issued_the_certificate_and_lists_its_serial(pki):
    from cryptography import x509

    crt = x509.load_pem_x509_certificate((pki.folder / "operators/op.crt").read_bytes())
    assert pki.certs("--revoke", "op") == 0
    crl = x509.load_pem_x509_crl((pki.folder / "operators-ca.crl").read_bytes())
    issuer = x509.load_pem_x509_certificate((pki.folder / certs.OPERATORS_CA).read_bytes())
    assert crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())
    assert crl.get_revoked_certificate_by_serial_number(crt.serial_number) is not None
    assert not (pki.folder / "ca.crl").exists()


def test_revoking_a_name_with_no_certificate_is_a_clear_error(pki, capsys):
    assert pki.certs("--revoke", "nobody") == 2
    err = capsys.readouterr().err
    assert "nobody" in err and "no certificate" in err
    assert not (pki.folder / "ca.crl").exists() and not (pki.folder / "operators-ca.crl").exists()


def test_private_keys_are_never_readable_by_others_not_even_while_being_written(tmp_path):
    """Keys were written with the umask's mode (0644, typically) and chmod'ed afterwards: for a
    moment, anyone on the machine could read them. Here the umask allows everything, and one key
    path is a FIFO left world-readable: its first byte must arrive through a file that is already
    0600, i.e. the key is written through a descriptor opened (and set) 0600."""
    old = os.umask(0)
    try:
        certs.make(tmp_path / "a", FLEET, devices=["d1"], verifiers=["v1"], operators=["op"])
    finally:
        os.umask(old)
    keys = sorted((tmp_path / "a").rglob("*.key"))
    assert len(keys) == 6  # two CAs, the broker, three clients
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    folder = tmp_path / "b"
    certs.make(folder, FLEET, devices=["d1"])
    fifo = folder / "devices" / "d2.key"
    os.mkfifo(fifo, 0o644)
    os.chmod(fifo, 0o644)
    seen = {}

    def read():
        with open(fifo, "rb") as f:  # blocks until the writer opens it
            first = f.read(1)
            seen["mode"] = stat.S_IMODE(os.stat(fifo).st_mode)
            seen["key"] = first + f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    certs.make(folder, FLEET, devices=["d2"])
    reader.join(10)
    assert seen["key"].startswith(b"-----BEGIN PRIVATE KEY-----")
    assert seen["mode"] == 0o600


def test_an_old_operator_certificate_from_the_fleet_ca_is_revoked_there_and_reissued_from_the_operators_ca(pki):
    """Operators made before operators-ca.crt were signed by ca.crt: their revocation belongs in
    ca.crl (the device listener is where such a certificate connects)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = x509.load_pem_x509_certificate((pki.folder / "ca.crt").read_bytes())
    ca_key = load_pem_private_key((pki.folder / "ca.key").read_bytes(), None)
    key = certs._key()
    certs._write_key(pki.folder / "operators/old.key", key)
    certs._write_cert(pki.folder / "operators/old.crt", certs._certificate("old", key, ca.subject, ca_key, 30))
    old = pki.save("operators", "old")
    assert pki.certs("--revoke", "old", "--operators", "old") == 0
    assert (pki.folder / "ca.crl").exists() and not (pki.folder / "operators-ca.crl").exists()
    new = x509.load_pem_x509_certificate((pki.folder / "operators/old.crt").read_bytes())
    operators_ca = x509.load_pem_x509_certificate((pki.folder / certs.OPERATORS_CA).read_bytes())
    assert new.issuer == operators_ca.subject
    pki.serve()
    assert not pki.connects(old)
    assert pki.connects(pki.save("operators", "old"), operator=True)
