"""A throwaway certificate authority for tests and demos.

Makes a self-signed CA and issues TLS server and client certificates from it with
``cryptography``, written as PEM files (private keys PKCS#8, mode 0600). Validity
windows are parameters so that expired or not-yet-valid certificates can be made on
purpose. Nothing here is meant for production PKI: keys are unencrypted on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "Issued", "KeyType", "client_context", "make_ca"]

KeyType = Literal["ec", "rsa"]
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# File names are derived from the CN; keep them boring.
_SAFE_CN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(kind: KeyType) -> _PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: _PrivateKey) -> None:
    """Write *key* as unencrypted PKCS#8 PEM, readable by the owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        os.write(fd, pem)
    finally:
        os.close(fd)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


class CA:
    """A certificate authority whose key lives in a directory (``ca.pem``/``ca.key``).

    Attributes:
        cert: path of the CA certificate (the trust anchor to hand to peers).
        key: path of the CA private key.
        name: the CA's common name.
    """

    def __init__(
        self, cert: Path, key: Path, certificate: x509.Certificate, private: _PrivateKey
    ) -> None:
        """Wrap an existing CA; use :func:`make_ca` or :meth:`load` instead."""
        self.cert = cert
        self.key = key
        self._certificate = certificate
        self._private = private
        attrs = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.name = str(attrs[0].value) if attrs else ""

    @classmethod
    def load(cls, dir: Path) -> CA:
        """Load the CA previously written by :func:`make_ca` into *dir*."""
        cert_path, key_path = dir / "ca.pem", dir / "ca.key"
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        private = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: unsupported ca key type")
        return cls(cert_path, key_path, certificate, private)

    def issue(
        self,
        cn: str,
        dir: Path,
        *,
        server: bool = False,
        client: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        sans: Iterable[str] = ("localhost", "127.0.0.1"),
        key_type: KeyType = "ec",
    ) -> Issued:
        """Issue a leaf certificate for *cn*, written to ``dir/<cn>.pem`` and ``.key``.

        Args:
            cn: the subject common name (RabbitMQ maps it to the user name).
            dir: where to write the files (created if missing).
            server: add the serverAuth extended key usage.
            client: add the clientAuth extended key usage.
            not_before: start of validity (default: one hour ago).
            not_after: end of validity (default: 30 days from now); a past value
                makes an expired certificate.
            sans: subjectAltName entries; IP literals become IP addresses.
            key_type: ``"ec"`` (P-256) or ``"rsa"`` (2048 bits).

        Returns:
            The paths of the certificate and its private key.

        Raises:
            ValueError: *cn* is not usable as a file name, no key usage was asked
                for, or the validity window is empty.
        """
        if not _SAFE_CN.fullmatch(cn):
            raise ValueError(f"certificate cn: not a safe file name (got {cn!r})")
        if not (server or client):
            raise ValueError("certificate: needs server or client usage")
        now = _now()
        start = not_before if not_before is not None else now - dt.timedelta(hours=1)
        end = not_after if not_after is not None else now + dt.timedelta(days=30)
        if end <= start:
            raise ValueError(f"certificate validity: not_after {end} <= {start}")
        private = _new_key(key_type)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(self._private.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._certificate.subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=key_type == "rsa",
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(private.public_key()), False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        names = [_general_name(s) for s in sans]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(self._private, hashes.SHA256())
        dir.mkdir(parents=True, exist_ok=True)
        issued = Issued(cert=dir / f"{cn}.pem", key=dir / f"{cn}.key")
        _write_key(issued.key, private)
        _write_cert(issued.cert, cert)
        return issued


def make_ca(
    dir: Path,
    name: str = "femd test CA",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_type: KeyType = "ec",
) -> CA:
    """Make a self-signed CA and write ``dir/ca.pem`` and ``dir/ca.key``.

    Args:
        dir: where to write the CA (created if missing).
        name: the CA's common name.
        not_before: start of validity (default: one hour ago).
        not_after: end of validity (default: one year from now).
        key_type: ``"ec"`` (P-256) or ``"rsa"`` (2048 bits).

    Returns:
        The CA, ready to :meth:`CA.issue` certificates.
    """
    now = _now()
    start = not_before if not_before is not None else now - dt.timedelta(hours=1)
    end = not_after if not_after is not None else now + dt.timedelta(days=365)
    private = _new_key(key_type)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "femd testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private.public_key()), False
        )
        .sign(private, hashes.SHA256())
    )
    dir.mkdir(parents=True, exist_ok=True)
    ca = CA(dir / "ca.pem", dir / "ca.key", cert, private)
    _write_key(ca.key, private)
    _write_cert(ca.cert, cert)
    return ca


def client_context(
    ca: Path, identity: Issued | None, *, server_hostname_check: bool = True
) -> ssl.SSLContext:
    """Build a TLS client context that trusts *ca* and presents *identity*.

    Args:
        ca: the CA certificate that signed the server.
        identity: the client certificate and key, or ``None`` to present none.
        server_hostname_check: verify the server's name (on by default).

    Returns:
        A ``PROTOCOL_TLS_CLIENT`` context with certificate verification on.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = server_hostname_check
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(certfile=str(identity.cert), keyfile=str(identity.key))
    return context
