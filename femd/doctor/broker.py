"""The doctor's broker check: the node certificate and a real TLS handshake.

Owns what an operator is told about the certificate (CN against ``node``,
validity, expiry soon) and whether the broker answers TLS with the
configured files. Does not open an AMQP connection (``femd.broker`` does).
"""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from femd.doctor.report import Check, Status
from femd.errors import FemdError

__all__ = ["CertificateInfo", "certificate_info", "check_broker"]

CERT_WARN_DAYS: Final = 30


class CertificateInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator needs to know of a PEM certificate."""

    subject_cn: str | None
    issuer_cn: str | None
    not_before: datetime
    not_after: datetime


def certificate_info(path: Path) -> CertificateInfo:
    """Read the first certificate of the PEM file *path*.

    Raises:
        FemdError: the file cannot be read or holds no PEM certificate.
    """
    from femd.errors import InputError

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise InputError(f"certificate {path}: {e.strerror}") from e
    except ValueError as e:
        raise InputError(f"certificate {path}: not a PEM certificate") from e

    def cn(name: x509.Name) -> str | None:
        found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(found[0].value) if found else None

    return CertificateInfo(
        subject_cn=cn(cert.subject),
        issuer_cn=cn(cert.issuer),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str:
    """A real TLS handshake; the protocol version agreed."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return str(tls.version())


def check_broker(
    url: str, ca: Path, cert: Path, key: Path, node: str, *, timeout_s: float = 10.0
) -> list[Check]:
    """The node's certificate (CN, expiry) and a TLS handshake with the broker."""
    from femd.amqpconn import connection_parameters, describe
    from femd.config import BrokerConfig

    out: list[Check] = []
    try:
        info = certificate_info(cert)
    except FemdError as e:
        out.append(Check(name="certificate", status="fail", summary=str(e)))
    else:
        now = datetime.now(UTC)
        left = (info.not_after - now).days
        if info.subject_cn != node:
            out.append(
                Check(
                    name="certificate",
                    status="fail",
                    summary=f"{cert}: CN is {info.subject_cn!r}, but node is {node!r}",
                    fix="the broker knows a node by its certificate's CN: "
                    "get a certificate for this node id, or fix `node` in femd.yaml",
                )
            )
        elif info.not_after <= now or info.not_before > now:
            out.append(
                Check(
                    name="certificate",
                    status="fail",
                    summary=f"{cert}: not valid now (valid "
                    f"{info.not_before:%Y-%m-%d} to {info.not_after:%Y-%m-%d})",
                    fix="renew the node certificate",
                )
            )
        else:
            status: Status = "warn" if left < CERT_WARN_DAYS else "ok"
            out.append(
                Check(
                    name="certificate",
                    status=status,
                    summary=f"{cert}: CN {node}, expires "
                    f"{info.not_after:%Y-%m-%d} (in {left} days)",
                    fix="renew the node certificate soon" if status == "warn" else None,
                )
            )
    try:
        params = connection_parameters(
            BrokerConfig(url=url, ca=str(ca), cert=str(cert), key=str(key))
        )
        ssl_options = params.ssl_options
        if ssl_options is None:  # pragma: no cover (connection_parameters sets it)
            raise RuntimeError("no TLS options")
        version = _handshake(
            str(params.host), int(params.port), ssl_options.context, timeout_s
        )
    except FemdError as e:
        out.append(Check(name="broker", status="fail", summary=str(e)))
    except (OSError, ssl.SSLError) as e:
        out.append(
            Check(
                name="broker",
                status="fail",
                summary=f"{url}: {describe(e)}",
                fix="is the broker running and reachable from here (host, port, "
                "firewall)? does its CA match broker.ca?",
            )
        )
    else:
        out.append(
            Check(
                name="broker", status="ok", summary=f"{url}: TLS handshake ({version})"
            )
        )
    return out
