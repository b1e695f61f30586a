"""The node's status message: what ``femd nodes`` shows the orchestrator.

Builds the ``femd.nodes`` message (routing key ``<node>.status``, body
``events.NodeStatus``) that the agent publishes at start, after a policy
reload, every ``node_status_interval_s`` and once more when it stops: femd
version, policy
sha256, each launcher and what it can enforce, running and queued counts, free
disk in the state dir, the client certificate's expiry. It is best effort (a
newer one supersedes a lost one), never a task record. Publishing is the
broker link's business; when to publish is the agent's.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import msgspec

from femd import __version__
from femd.events import NODES_EXCHANGE, LauncherStatus, NodeStatus
from femd.launchers import Capabilities
from femd.messages import SideMessage
from femd.tlsfiles import decoded_certificate

__all__ = ["cert_not_after", "status_message"]

logger = logging.getLogger(__name__)

_RFC3339: Final = "%Y-%m-%dT%H:%M:%SZ"


def cert_not_after(path: str) -> str | None:
    """The certificate's notAfter as RFC 3339 UTC, or None if it cannot be read.

    Read with ``ssl``'s decoder (the one the connection's library has), else
    with cryptography, which an agent then loads only here.
    """
    try:
        decoded = decoded_certificate(path)
        if decoded is not None:
            seconds = ssl.cert_time_to_seconds(decoded["notAfter"])
            return datetime.fromtimestamp(seconds, UTC).strftime(_RFC3339)
    except (OSError, ValueError, KeyError, OverflowError) as e:
        logger.warning("node status: cannot read certificate %s: %s", path, e)
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        logger.warning("node status: cannot read certificate %s: %s", path, e)
        return None
    return cert.not_valid_after_utc.strftime(_RFC3339)


def _disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def status_message(
    *,
    node: str,
    state: Literal["up", "stopping"],
    policy_sha256: str,
    caps: Mapping[tuple[str, str], Capabilities],
    running: int,
    queued: int,
    state_dir: Path,
    cert_not_after: str | None,
    interval_s: float,
) -> SideMessage:
    """Build the status message of *node* as it is now."""
    launchers = tuple(
        LauncherStatus(
            profile=profile,
            launcher=name,
            available=cap.available,
            memory_limit=cap.memory_limit,
            cpu_limit=cap.cpu_limit,
            pids_limit=cap.pids_limit,
            egress=cap.egress,
            egress_filtered=cap.egress_filtered,
            problems=cap.problems,
        )
        for (profile, name), cap in sorted(caps.items())
    )
    body = NodeStatus(
        node=node,
        state=state,
        at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        version=__version__,
        policy_sha256=policy_sha256,
        launchers=launchers,
        running=running,
        queued=queued,
        disk_free_bytes=_disk_free(state_dir),
        cert_not_after=cert_not_after,
        interval_s=interval_s,
    )
    return SideMessage(NODES_EXCHANGE, f"{node}.status", msgspec.json.encode(body))
