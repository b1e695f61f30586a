"""The node's TLS files, checked one by one before any connection.

Owns ``check_tls_files()``: the CA bundle, the client certificate and its
private key are each read and parsed on their own, so that a problem names the
file that has it and what is wrong (missing, unreadable, not PEM, encrypted,
a certificate and key from different pairs), instead of one OpenSSL error
about all three, or a handshake that never happened. With *expected_cn* the
certificate's subject CN must be that name: RabbitMQ's EXTERNAL mechanism takes
the user name from it (DESIGN "broker"), so a certificate for another node is
refused here rather than by the broker's 403. Does not connect.

The files are first loaded as the connection will load them, by Python's
``ssl`` (OpenSSL), with the CN read by its certificate decoder; only when that
refuses, or cannot tell, does cryptography's X.509 parser (~30 ms of imports
and ~3 MB that an agent otherwise never loads) look at each file to say what
is wrong. Also owns ``decoded_certificate()``, that decoder's view of a
certificate file (the node status reads its expiry).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from femd.errors import BrokerError, cut

__all__ = ["check_tls_files", "decoded_certificate"]


class _Encrypted(Exception):
    """The key file asked for a passphrase."""


def _passphrase() -> str:
    raise _Encrypted


def decoded_certificate(path: str) -> dict[str, Any] | None:
    """The first certificate of the PEM file *path*, as ``ssl`` decodes it.

    The keys are those of ``SSLSocket.getpeercert()`` (``subject``,
    ``notAfter``, ...). None when this Python has no such decoder, or when
    the file holds other PEM blocks than plain certificates (the callers
    then ask cryptography).

    Raises:
        OSError: the file cannot be read.
        ssl.SSLError: it holds no PEM certificate.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None or not _plain_certificates(Path(path).read_bytes()):
        return None
    decoded: dict[str, Any] = decode(path)
    return decoded


def _plain_certificates(pem: bytes) -> bool:
    """True when every PEM block of *pem* is a plain ``CERTIFICATE``.

    The decoder reads the first such block, while OpenSSL's chain loader also
    takes ``TRUSTED CERTIFICATE`` blocks as the leaf: in a file that mixes
    them, the CN read and the certificate presented could differ. Such files
    are left to cryptography, as before.
    """
    labels = [
        line.removeprefix(b"-----BEGIN ").removesuffix(b"-----").strip()
        for line in pem.splitlines()
        if line.startswith(b"-----BEGIN ")
    ]
    return bool(labels) and all(label == b"CERTIFICATE" for label in labels)


def _common_name(decoded: dict[str, Any]) -> str:
    for rdn in decoded.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def _ssl_verdict(ca: str, cert: str, key: str, expected_cn: str | None) -> str | None:
    """What ``ssl`` says of the files, loaded as the connection will load them.

    Returns the empty string when it takes them (and the CN is right), None
    when it cannot tell (no certificate decoder), else what it refused.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca)
        if not context.cert_store_stats().get("x509"):
            return f"no certificate in {ca}"
        context.load_cert_chain(cert, key, password=_passphrase)
        decoded = decoded_certificate(cert)
    except (OSError, ValueError, _Encrypted) as e:  # ssl.SSLError is an OSError
        return cut(e) or type(e).__name__
    if decoded is None:
        return None
    if expected_cn is not None and _common_name(decoded) != expected_cn:
        return "the certificate's CN is not the node's"
    return ""


def _read(role: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except IsADirectoryError as e:
        raise BrokerError(f"broker {role} {path}: is a directory, not a file") from e
    except OSError as e:
        raise BrokerError(f"broker {role} {path}: cannot read: {e.strerror}") from e


def _certificates(role: str, path: str) -> list[Any]:
    from cryptography import x509

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
    from cryptography.hazmat.primitives import serialization

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
    verdict = _ssl_verdict(ca, cert, key, expected_cn)
    if verdict == "":
        return
    _explain(ca, cert, key, expected_cn)
    if verdict is not None:
        # cryptography found nothing wrong, but the connection's own loader
        # refuses the files: that is what counts.
        raise BrokerError(f"broker TLS files {ca}, {cert}, {key}: {verdict}")


def _explain(ca: str, cert: str, key: str, expected_cn: str | None) -> None:
    """Each file on its own with cryptography; raise what is wrong, if anything."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

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
