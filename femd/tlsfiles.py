"""The node's TLS files, checked one by one before any connection.

Owns ``check_tls_files()``: the CA bundle, the client certificate and its
private key are each read and parsed on their own, so that a problem names the
file that has it and what is wrong (missing, unreadable, not PEM, encrypted,
a certificate and key from different pairs), instead of one OpenSSL error
about all three, or a handshake that never happened. With *expected_cn* the
certificate's subject CN must be that name: RabbitMQ's EXTERNAL mechanism takes
the user name from it (DESIGN "broker"), so a certificate for another node is
refused here rather than by the broker's 403. Does not connect.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from femd.errors import BrokerError, cut

__all__ = ["check_tls_files"]


def _read(role: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError as e:
        raise BrokerError(f"broker {role} {path}: is a directory, not a file") from e
    except OSError as e:
        raise BrokerError(f"broker {role} {path}: cannot read: {e.strerror}") from e


def _certificates(role: str, path: str) -> list[x509.Certificate]:
    data = _read(role, path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise BrokerError(
            f"broker {role} {path}: not a PEM certificate ({cut(e, 60)})"
        ) from e
    if not found:
        raise BrokerError(f"broker {role} {path}: not a PEM certificate (empty)")
    return found


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_tls_files(
    ca: str, cert: str, key: str, *, expected_cn: str | None = None
) -> None:
    """Check the broker TLS files; each problem names its file.

    Raises:
        BrokerError: a file is missing, unreadable or malformed, the key is
            encrypted or not the certificate's, or the CN is not *expected_cn*.
    """
    _certificates("ca", ca)
    leaf = _certificates("cert", cert)[0]
    try:
        private = serialization.load_pem_private_key(_read("key", key), password=None)
    except TypeError as e:
        raise BrokerError(
            f"broker key {key}: is encrypted (femd needs it without a passphrase)"
        ) from e
    except ValueError as e:
        raise BrokerError(
            f"broker key {key}: not a PEM private key ({cut(e, 60)})"
        ) from e
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise BrokerError(
            f"broker cert {cert} and key {key} do not match (different key pairs)"
        )
    if expected_cn is None:
        return
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if cn != expected_cn:
        raise BrokerError(
            f"broker cert {cert}: has CN {cut(cn, 64)!r}, but this is node"
            f" {expected_cn!r} (the broker takes the node's user name from the CN)"
        )
