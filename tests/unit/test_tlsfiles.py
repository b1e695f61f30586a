"""Each TLS file problem names that file and what is wrong with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.errors import BrokerError  # noqa: E402
from femd.tlsfiles import check_tls_files  # noqa: E402
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
