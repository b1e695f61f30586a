"""The podman service's REST API, as the podman launcher uses it (podman-py).

Owns the one boundary where podman-py's errors become ``LaunchError``
(``call``), a fresh client per use (``connect``), the service URL of a
configured socket (``service_url``), the socket pre-check and podman's time
format. Knows nothing of tasks.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from podman import PodmanClient
from podman.errors import NotFound, PodmanError

from femd.errors import LaunchError, cut

__all__ = [
    "FOREIGN",
    "call",
    "connect",
    "on_container",
    "parse_time",
    "service_url",
    "socket_problem",
]

_API_TIMEOUT_S: Final = 120.0
# Foreign errors met at this package's boundary (APIError and requests' errors are
# OSError subclasses; a malformed reply shows up as ValueError/KeyError/TypeError).
FOREIGN: Final = (PodmanError, OSError, ValueError, KeyError, TypeError)

T = TypeVar("T")


def call(what: str, fn: Callable[[], T]) -> T:
    """Run one podman-py call; any foreign error becomes ``LaunchError``."""
    try:
        return fn()
    except FOREIGN as e:
        raise LaunchError(f"podman: {what}: {cut(e, 160)}") from e


def service_url(sock: str) -> str:
    """The API URL of a configured socket: a bare path is ``unix://``; "" stays."""
    return sock if "://" in sock or not sock else f"unix://{sock}"


def connect(url: str) -> PodmanClient:
    """A new client of the service at *url* (use it in a ``with``)."""
    return PodmanClient(base_url=url, timeout=_API_TIMEOUT_S)


def on_container(url: str, cid: str, what: str, fn: Callable[[Any], T], gone: T) -> T:
    """Run *fn* on container *cid* with a fresh client; *gone* if it is missing.

    Raises:
        LaunchError: podman could not be asked.
    """

    def run() -> T:
        with connect(url) as client:
            try:
                container = client.containers.get(cid)
            except NotFound:
                return gone
            return fn(container)

    return call(what, run)


def socket_problem(url: str) -> str | None:
    """Why the service's unix socket cannot be connected to, or None.

    Checked with a plain socket first: podman-py leaks its socket (a
    ``ResourceWarning``) when a connection is refused.
    """
    if not url.startswith("unix://"):
        return None  # tcp/ssh: left to podman-py
    path = url[len("unix://") :]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)
        try:
            probe.connect(path)
        except OSError as e:
            return f"podman service {url}: cannot connect: {e.strerror or e}"
    return None


def parse_time(text: object) -> datetime | None:
    """Podman's RFC 3339 times (nanoseconds, ``Z``); None for the zero time."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    m = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        return None
    frac = (m[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(f"{m[1]}.{frac}{zone}").astimezone(UTC)
