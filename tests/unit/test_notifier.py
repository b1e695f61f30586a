"""femd.notifier: sd_notify messages and the watchdog's timing."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.notifier import Notifier  # noqa: E402


@pytest.fixture(name="systemd")
def systemd_fixture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """The notify socket systemd would read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.getsockname())
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def _said(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_messages_reach_the_socket_and_no_ping_without_a_watchdog(
    systemd: socket.socket,
) -> None:
    n = Notifier()
    n.notify("READY=1")
    n.ping()
    assert n.next_at() is None
    assert _said(systemd) == [b"READY=1"]
    n.close()


def test_the_watchdog_is_pinged_at_half_its_interval(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    n.ping()
    n.ping()  # within 15 s of the first: not again
    assert _said(systemd) == [b"WATCHDOG=1"]
    due = n.next_at()
    assert due is not None
    assert 14 < due - time.monotonic() <= 15
    n.close()
    n2 = Notifier()
    assert n2.next_at() == 15.0  # never pinged: due at once
    n2.close()


def test_a_watchdog_meant_for_another_process_is_not_ours(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    n = Notifier()
    n.ping()
    assert n.next_at() is None
    assert _said(systemd) == []
    n.close()
