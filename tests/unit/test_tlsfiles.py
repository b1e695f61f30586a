"""Each TLS file problem names that file and what is wrong with it.

And the agent's start-up reads them with ``ssl`` alone, as its connection will;
cryptography's X.509 parser only explains a refusal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import nodestatus, tlsfiles  # noqa: E402
from femd.errors import BrokerError  # noqa: E402
from femd.nodestatus import cert_not_after  # noqa: E402
from femd.tlsfiles import check_tls_files  # noqa: E402
from testbed.fresh import last_json  # noqa: E402
from testbed.pki import make_ca  # noqa: E402


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> dict[str, str]:
    ca = make_ca(tmp_path / "ca")
    mine = ca.issue("fdn-01", tmp_path / "c", sans=())
    other = ca.issue("fdn-02", tmp_path / "c", sans=())
    return {
        "ca": str(ca.cert),
        "cert": str(mine.cert),
        "key": str(mine.key),
        "other_key": str(other.key),
        "dir": str(tmp_path),
    }


def test_good_files_pass(pki: dict[str, str]) -> None:
    check_tls_files(pki["ca"], pki["cert"], pki["key"], expected_cn="fdn-01")


def test_encrypted_key(pki: dict[str, str], tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(
        Path(pki["key"]).read_bytes(), password=None
    )
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(BrokerError, match=f"^broker key {locked}: is encrypted"):
        check_tls_files(pki["ca"], pki["cert"], str(locked))


@pytest.mark.parametrize(
    ("role", "value", "message"),
    [
        ("ca", "{dir}", "is a directory"),
        ("cert", "{dir}/missing.pem", "cannot read: No such file"),
        ("cert", "{key}", "not a PEM certificate"),
        ("key", "{cert}", "not a PEM private key"),
        ("key", "{other_key}", "do not match"),
    ],
    ids=["ca-dir", "cert-missing", "cert-is-key", "key-is-cert", "mismatch"],
)
def test_problem_names_its_file(
    pki: dict[str, str], role: str, value: str, message: str
) -> None:
    files = {k: pki[k] for k in ("ca", "cert", "key")}
    files[role] = value.format(**pki)
    with pytest.raises(BrokerError, match=message) as e:
        check_tls_files(files["ca"], files["cert"], files["key"])
    assert f"{role} {files[role]}" in str(e.value)
    others = [files[r] for r in files if r != role and files[r] != files[role]]
    if message != "do not match":
        assert not any(o in str(e.value) for o in others)


def test_cn_must_be_the_node(pki: dict[str, str]) -> None:
    with pytest.raises(BrokerError, match="has CN 'fdn-01', but this is node 'fdn-02'"):
        check_tls_files(pki["ca"], pki["cert"], pki["key"], expected_cn="fdn-02")


# -- the start-up path: ssl first, cryptography only to explain -----------------


def test_ssl_takes_good_files_as_the_connection_will(pki: dict[str, str]) -> None:
    verdict = tlsfiles._ssl_verdict(pki["ca"], pki["cert"], pki["key"], "fdn-01")
    assert verdict == ""
    tlsfiles._explain(pki["ca"], pki["cert"], pki["key"], "fdn-01")  # agrees


@pytest.mark.parametrize(
    ("role", "value"),
    [
        ("ca", "{dir}"),
        ("ca", "{key}"),
        ("cert", "{dir}/missing.pem"),
        ("cert", "{key}"),
        ("key", "{cert}"),
        ("key", "{other_key}"),
    ],
)
def test_ssl_refuses_what_cryptography_refuses(
    pki: dict[str, str], role: str, value: str
) -> None:
    files = {k: pki[k] for k in ("ca", "cert", "key")}
    files[role] = value.format(**pki)
    assert tlsfiles._ssl_verdict(files["ca"], files["cert"], files["key"], None)
    with pytest.raises(BrokerError):
        tlsfiles._explain(files["ca"], files["cert"], files["key"], None)


def test_ssl_refuses_a_wrong_cn(pki: dict[str, str]) -> None:
    assert tlsfiles._ssl_verdict(pki["ca"], pki["cert"], pki["key"], "fdn-02")


def test_without_the_decoder_cryptography_decides(
    pki: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfiles, "decoded_certificate", lambda _path: None)
    assert tlsfiles._ssl_verdict(pki["ca"], pki["cert"], pki["key"], "x") is None
    check_tls_files(pki["ca"], pki["cert"], pki["key"], expected_cn="fdn-01")
    with pytest.raises(BrokerError, match="has CN 'fdn-01', but this is node 'x'"):
        check_tls_files(pki["ca"], pki["cert"], pki["key"], expected_cn="x")


def test_what_ssl_refuses_is_refused_even_if_cryptography_takes_it(
    pki: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tlsfiles, "_ssl_verdict", lambda *_a: "[SSL] no good")
    with pytest.raises(BrokerError, match=r"^broker TLS files .*: \[SSL\] no good$"):
        check_tls_files(pki["ca"], pki["cert"], pki["key"], expected_cn="fdn-01")


def test_cert_expiry_is_read_alike_both_ways(
    pki: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(pki["cert"]).read_bytes())
    want = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cert_not_after(pki["cert"]) == want
    monkeypatch.setattr(nodestatus, "decoded_certificate", lambda _path: None)
    assert cert_not_after(pki["cert"]) == want
    assert cert_not_after(pki["key"]) is None


_START_UP = """
import json, sys
from pathlib import Path
from femd.agent import Agent
from femd.keys import load_public_key
from femd.nodestatus import cert_not_after
from femd.tlsfiles import check_tls_files
check_tls_files({ca!r}, {cert!r}, {key!r}, expected_cn="fdn-01")
assert cert_not_after({cert!r})
load_public_key(Path({pub!r}).read_bytes(), "test")
heavy = ("cryptography.x509", "cryptography.hazmat.primitives.serialization")
print(json.dumps([m for m in heavy if m in sys.modules]))
"""


def test_an_agent_starting_never_loads_x509_nor_pem_serialization(
    pki: dict[str, str], tmp_path: Path
) -> None:
    """What femd run reads before READY, in a fresh interpreter (~45 ms, ~3 MB)."""
    from femd.keys import generate, public_pem

    pub = tmp_path / "orchestrator.pub"
    pub.write_bytes(public_pem(generate().public_key()))
    code = _START_UP.format(
        ca=pki["ca"], cert=pki["cert"], key=pki["key"], pub=str(pub)
    )
    assert last_json(code) == []


def test_a_trusted_certificate_block_leaves_the_check_to_cryptography(
    tmp_path: Path,
) -> None:
    """OpenSSL's chain loader takes a ``TRUSTED CERTIFICATE`` block as the leaf,
    the decoder skips it: a file mixing them must not pass with the key of one
    certificate and the CN of another."""
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import load_pem_x509_certificate

    ca = make_ca(tmp_path / "ca")
    other = ca.issue("other-node", tmp_path / "a", sans=())
    mine = ca.issue("fdn-01", tmp_path / "b", sans=())
    der = load_pem_x509_certificate(other.cert.read_bytes()).public_bytes(Encoding.DER)
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    trusted = b"\n".join(
        [
            b"-----BEGIN TRUSTED CERTIFICATE-----",
            *lines,
            b"-----END TRUSTED CERTIFICATE-----",
            b"",
        ]
    )
    combo = tmp_path / "combo.pem"
    combo.write_bytes(trusted + mine.cert.read_bytes())
    assert tlsfiles.decoded_certificate(str(combo)) is None
    with pytest.raises(BrokerError):
        check_tls_files(str(ca.cert), str(combo), str(other.key), expected_cn="fdn-01")
    assert cert_not_after(str(combo)) is not None  # cryptography reads it
