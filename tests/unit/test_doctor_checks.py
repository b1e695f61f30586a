"""femd doctor's checks that need no backend: certificates, hints, output."""

import datetime as dt
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from femd import doctor
from femd.doctor import trial


def _cert(tmp_path, cn, days):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _cert_check(tmp_path, cn, days, node="fdn-01"):
    cert = _cert(tmp_path, cn, days)
    # Port 9 on localhost: nothing listens; the broker check fails, not crashes.
    checks = doctor.check_broker(
        "amqps://127.0.0.1:9/", cert, cert, cert, node, timeout_s=2
    )
    return {c.name: c for c in checks}


def test_certificate_cn_must_be_the_node(tmp_path):
    c = _cert_check(tmp_path, "fdn-02", 300)["certificate"]
    assert c.status == "fail"
    assert "CN is 'fdn-02', but node is 'fdn-01'" in c.summary


def test_certificate_expiring_within_30_days_warns(tmp_path):
    c = _cert_check(tmp_path, "fdn-01", 10)["certificate"]
    assert c.status == "warn"
    assert "renew" in (c.fix or "")
    assert _cert_check(tmp_path, "fdn-01", 90)["certificate"].status == "ok"


def test_broker_that_is_not_there_is_a_plain_failure(tmp_path):
    c = _cert_check(tmp_path, "fdn-01", 90)["broker"]
    assert c.status == "fail"
    assert "Error" not in c.summary  # no exception class names


def test_certificate_info_of_a_non_certificate(tmp_path):
    bad = tmp_path / "x.pem"
    bad.write_text("hello")
    c = _cert_check(tmp_path, "fdn-01", 90)
    assert c["certificate"].status == "ok"
    checks = doctor.check_broker("amqps://127.0.0.1:9/", bad, bad, bad, "fdn-01")
    assert "not a PEM certificate" in checks[0].summary


def test_hints_name_the_cause():
    assert "apt-get install catatonit" in trial._hint(
        "container-init binary not found on the host: stat "
        "/usr/libexec/podman/catatonit: no such file or directory"
    )
    assert "/etc/subuid" in trial._hint(
        "cannot find UID/GID for user femd-podman: no subuid ranges found"
    )
    assert "seccomp" in trial._hint("runc: seccomp: operation not permitted")
    assert "keyctl" in trial._hint(
        "runc create failed: unable to start container process: error during "
        "container init: unable to join session keyring"
    )


def test_state_dir_and_exit_code(tmp_path):
    ok = doctor.check_state_dir(tmp_path)
    assert ok.status in ("ok", "warn")
    missing = doctor.check_state_dir(tmp_path / "absent")
    assert missing.status == "fail"
    assert "not writable" in missing.summary
    assert doctor.exit_code([ok], ["process (default)"]) == 0
    assert doctor.exit_code([missing], ["process (default)"]) == 1
    assert doctor.exit_code([ok], []) == 1
    data = json.loads(doctor.to_json([missing], []))
    assert data["ok"] is False
    assert data["checks"][0]["status"] == "fail"
    text = doctor.render([missing], [])
    assert text.startswith("FAIL  state dir: ")
    assert "every task would be refused" in text


def test_clock_check_says_something():
    c = doctor.check_clock(300)
    assert c.name == "clock"
    assert c.status in ("ok", "warn")


def test_a_dead_broker_is_described_in_plain_words():
    import socket

    import pika.exceptions
    from pika.adapters.utils.connection_workflow import (
        AMQPConnectionWorkflowFailed,
        AMQPConnectorSocketConnectError,
    )

    from femd.amqpconn import describe

    refused = pika.exceptions.AMQPConnectionError(
        AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "refused"))
    )
    text = describe(refused)
    assert text.startswith("connection refused: nothing listens there")
    assert "AMQP" not in text
    assert "111" not in text
    unknown = AMQPConnectionWorkflowFailed(
        [AMQPConnectorSocketConnectError(socket.gaierror(-2, "Name not known"))]
    )
    assert describe(unknown) == (
        "cannot resolve the broker's host name (check broker.url and DNS)"
    )


def test_policy_check_lints_and_names_the_node(tmp_path):
    from tests.conftest import keypair, make_policy

    keys = {name: keypair() for name in ("orchestrator", "pi-smith")}
    path = make_policy(tmp_path, keys)  # its dataset path does not exist here
    c = doctor.check_policy(path, "fdn-01")
    assert c.status == "warn"
    assert "does not exist on this host" in c.details[0]
    assert doctor.check_policy(path, "fdn-02").status == "fail"
    path.write_text(path.read_text().replace("threshold: 2", "threshold: two"))
    bad = doctor.check_policy(path, "fdn-01")
    assert bad.status == "fail"
    assert "expected a whole number" in bad.details[0]
    assert bad.fix == f"femd policy lint {path}"
