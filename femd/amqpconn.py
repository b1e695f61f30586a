"""The broker connection's identity and failures: mTLS + SASL EXTERNAL parameters.

``connection_parameters()`` builds the pika parameters both sides (the node's
link and the orchestrator's client) connect with; ``describe()`` turns any
pika, TLS or socket error into one plain line for the operator.
"""

from __future__ import annotations

import socket
import ssl
from typing import Final
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorException,
)

from femd.config import BrokerConfig
from femd.errors import BrokerError, cut
from femd.tlsfiles import check_tls_files

__all__ = ["connection_parameters", "describe"]

# OpenSSL alert names the broker sends when it refuses our client certificate.
# pika reports them only as text inside a StreamLostError.
_REFUSED: Final = "TLS: the broker refused our client certificate"
_TLS_ALERTS: Final = (
    (
        "UNKNOWN_CA",
        "TLS: the broker does not trust our client certificate (unknown CA)",
    ),
    ("CERTIFICATE_EXPIRED", f"{_REFUSED}: expired"),
    ("CERTIFICATE_REVOKED", f"{_REFUSED}: revoked"),
    ("UNSUPPORTED_CERTIFICATE", f"{_REFUSED}: unsupported key usage"),
    ("BAD_CERTIFICATE", f"{_REFUSED} (bad certificate)"),
    ("CERTIFICATE_REQUIRED", "TLS: the broker requires a client certificate"),
    ("HANDSHAKE_FAILURE", "TLS handshake failed (no common protocol or cipher)"),
)


def _stream_lost(text: str) -> str:
    for marker, why in _TLS_ALERTS:
        if marker in text:
            return why
    if "EOF occurred" in text or "Transport indicated EOF" in text:
        return "TLS: the broker closed the connection (EOF)"
    if "ConnectionResetError" in text:
        return "connection reset by the broker"
    return f"connection lost ({cut(text.removeprefix('Stream connection lost: '))})"


def describe(e: BaseException) -> str:
    """Return one plain line saying why a broker operation failed."""
    text = str(e) or repr(e)
    if isinstance(e, BrokerError):
        return text
    if isinstance(e, pika.exceptions.AMQPConnectionError) and (
        "Stream connection lost" in text or "Transport indicated EOF" in text
    ):
        # A stream lost during the TLS handshake reaches us as a StreamLostError,
        # or as an IncompatibleProtocolError quoting it (pika was waiting for
        # the protocol header).
        return _stream_lost(text)
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate is not trusted ({cut(e.verify_message)})"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed ({cut(e.reason or text)})"
    if isinstance(
        e,
        pika.exceptions.ProbableAuthenticationError
        | pika.exceptions.AuthenticationError,
    ):
        return "the broker refused our certificate identity (SASL EXTERNAL)"
    if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
        return "the broker denied access to the virtual host"
    if isinstance(e, pika.exceptions.ChannelClosedByBroker):
        return f"the broker closed the channel: {e.reply_code} {cut(e.reply_text)}"
    if isinstance(e, pika.exceptions.ConnectionClosedByBroker):
        return f"the broker closed the connection: {e.reply_code} {cut(e.reply_text)}"
    if isinstance(e, pika.exceptions.AMQPConnectionError) and e.args:
        inner = e.args[0]
        if isinstance(inner, BaseException):
            return describe(inner)
        return cut(text, 160)
    if isinstance(e, AMQPConnectorException | AMQPConnectionWorkflowFailed):
        # pika's connection workflow wraps the socket's own error (once or
        # twice); say what that error means, not the wrappers' names.
        inner = [getattr(e, "exception", None), *(getattr(e, "exceptions", ()))]
        inner = [x for x in [*inner, *e.args] if isinstance(x, BaseException)]
        if inner:
            return describe(inner[-1])
    if isinstance(e, ConnectionRefusedError):
        return (
            "connection refused: nothing listens there (is the broker running, "
            "and are the host and port in broker.url right?)"
        )
    if isinstance(e, socket.gaierror):
        return "cannot resolve the broker's host name (check broker.url and DNS)"
    if isinstance(e, TimeoutError):
        return "no answer from the broker in time (a firewall, or the wrong host?)"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror[:1].lower()}{e.strerror[1:]}"
    return f"{type(e).__name__}: {cut(text, 160)}"


def connection_parameters(cfg: BrokerConfig) -> pika.ConnectionParameters:
    """Build mTLS + EXTERNAL connection parameters from the broker config.

    Raises:
        BrokerError: the URL is not amqps, or the TLS files cannot be loaded.
    """
    url = urlsplit(cfg.url)
    if url.scheme != "amqps" or not url.hostname:
        raise BrokerError(
            f"broker url: expected amqps://host[:port]/vhost (got {cut(cfg.url)})"
        )
    if url.username or url.password:
        raise BrokerError(
            "broker url: must carry no user or password (mTLS + EXTERNAL)"
        )
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    check_tls_files(cfg.ca, cfg.cert, cfg.key)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as e:
        raise BrokerError(
            f"broker TLS files: {describe(e)} (ca {cfg.ca}, cert {cfg.cert})"
        ) from e
    return pika.ConnectionParameters(
        host=url.hostname,
        port=url.port or 5671,
        virtual_host=vhost,
        credentials=pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(context, server_hostname=url.hostname),
        heartbeat=cfg.heartbeat_s,
        blocked_connection_timeout=max(60, 2 * cfg.heartbeat_s),
        connection_attempts=1,
        socket_timeout=cfg.connect_timeout_s,
        stack_timeout=cfg.connect_timeout_s * 2,
    )
