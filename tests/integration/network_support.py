"""Real sockets for the task-network tests of both launchers.

``Bench`` starts, on the host: a TLS server whose certificate names
``fl-server.test`` (issued by a CA of the test's own), stand-ins for the
broker's port on 127.0.0.1 and ::1, a listener on every address (reachable on
the host's own non-loopback address) and a UDP sink. Each bait records every
connection or datagram it gets, so the tests see from the host side what
reached it, trusting nothing the task reports.

``PROBE`` is a Python script a task runs (python3 bound from the host): it
tries every way out it is given and prints one JSON object of results.

The set-up both launchers' network tests share: the module's ``net`` bench
fixture, the site's pinned server address (``PINNED``), and the checks of an
egress probe's outcome (``check_egress``) and of a listening task served to
allowed peers only (``serve_ingress``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from femd.launchers import Handle, Outcome, Traffic
from femd.launchers.profile import NetworkSettings
from testbed.pki import make_ca

SERVER_NAME = "fl-server.test"
GREETING = b"hello over tls\n"
# The site pins the server's address, as it may for a federation server.
PINNED = NetworkSettings(hosts={SERVER_NAME: ("127.0.0.1",)})

PROBE = r"""
import json, socket, ssl, sys
cfg = json.loads(sys.argv[1])
out = {}

def attempt(name, fn):
    try:
        out[name] = "ok: " + str(fn())
    except Exception as e:
        out[name] = "failed: " + type(e).__name__ + ": " + str(e)

def connect(host, port, family=socket.AF_UNSPEC):
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    s = socket.socket(infos[0][0], socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(infos[0][4])
    return s.recv(100) or "connected"

def tls():
    ctx = ssl.create_default_context(cafile=cfg["cafile"])
    with socket.create_connection((cfg["name"], cfg["port"]), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname=cfg["name"]) as s:
            return s.recv(100).decode().strip() + " / " + s.version()

attempt("tls", tls)
attempt("unlisted_port", lambda: connect(cfg["name"], cfg["bait"]))
attempt("loopback4", lambda: connect("127.0.0.1", cfg["bait"]))
attempt("loopback6", lambda: connect("::1", cfg["bait6"]))
attempt("link_local", lambda: connect("169.254.169.254", 80))
attempt("other_local", lambda: connect(cfg["host_ip"], cfg["bait"]))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = []
    for host in ("127.0.0.1", cfg["host_ip"]):
        try:
            s.sendto(b"leak", (host, cfg["udp"]))
            sent.append(host)
        except OSError as e:
            sent.append(host + ": " + str(e))
    return sent
attempt("udp", udp)
attempt("dns", lambda: socket.getaddrinfo("unlisted.example", 443))
attempt("dns_host", lambda: socket.getaddrinfo("example.org", 443))
print("PROBE " + json.dumps(out))
"""


def free_port() -> int:
    """A TCP port free on every address right now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def host_address() -> str:
    """The host's own non-loopback IPv4 address (a route lookup, nothing sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the source address
        return str(s.getsockname()[0])


def probe_results(log: str) -> dict[str, str]:
    """The JSON a PROBE printed in a task's log."""
    line = next(x for x in log.splitlines() if x.startswith("PROBE "))
    return dict(json.loads(line[len("PROBE ") :]))


class _Bait:
    """A listener that counts whoever reaches it."""

    def __init__(self, family: int, host: str, port: int = 0) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.hits: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.hits.append(str(peer[0]))
            with contextlib.suppress(OSError):
                conn.sendall(b"bait\n")
            conn.close()


class Bench:
    """The host side of a network test: a TLS server and baits."""

    def __init__(self, root: Path) -> None:
        ca = make_ca(root / "ca")
        leaf = ca.issue(SERVER_NAME, root / "leaf", server=True, sans=(SERVER_NAME,))
        self.ca_dir = root / "trust"
        self.ca_dir.mkdir(mode=0o755)
        (self.ca_dir / "ca.pem").write_bytes(ca.cert.read_bytes())
        (self.ca_dir / "ca.pem").chmod(0o644)
        self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls_context.load_cert_chain(leaf.cert, leaf.key)
        self.tls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tls.bind(("127.0.0.1", 0))
        self.tls.listen(16)
        self.tls_port = int(self.tls.getsockname()[1])
        self.tls_served = 0
        threading.Thread(target=self._serve_tls, daemon=True).start()
        self.host_ip = host_address()
        self.bait = _Bait(socket.AF_INET, "0.0.0.0")  # noqa: S104 (every address)
        self.bait6 = _Bait(socket.AF_INET6, "::1")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", 0))  # noqa: S104 (every address)
        self.udp.settimeout(0.5)
        self.udp_port = int(self.udp.getsockname()[1])

    def _serve_tls(self) -> None:
        while True:
            try:
                conn, _ = self.tls.accept()
            except OSError:
                return
            try:
                with self.tls_context.wrap_socket(conn, server_side=True) as s:
                    s.sendall(GREETING)
                    s.recv(10)
                    self.tls_served += 1
            except OSError:
                conn.close()

    def probe_config(self, cafile: str) -> str:
        return json.dumps(
            {
                "name": SERVER_NAME,
                "port": self.tls_port,
                "cafile": cafile,
                "bait": self.bait.port,
                "bait6": self.bait6.port,
                "host_ip": self.host_ip,
                "udp": self.udp_port,
            }
        )

    def udp_received(self) -> list[bytes]:
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(self.udp.recvfrom(100)[0])
        return got

    def close(self) -> None:
        for s in (self.tls, self.bait.sock, self.bait6.sock, self.udp):
            s.close()


@contextlib.contextmanager
def bench() -> Iterator[Bench]:
    root = Path(tempfile.mkdtemp(prefix="femd-netbench-", dir="/tmp"))
    root.chmod(0o755)
    b = Bench(root)
    try:
        yield b
    finally:
        b.close()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def net() -> Iterator[Bench]:
    """The host side of the module's network tests."""
    with bench() as b:
        yield b


def check_egress(outcome: Outcome, b: Bench) -> Traffic:
    """A PROBE task with egress to the TLS server only: what it reached, counted."""
    assert outcome.state == "succeeded", outcome
    assert_only_the_listed_destination(probe_results(outcome.log_tail), b)
    (traffic,) = outcome.traffic
    assert traffic.direction == "egress"
    assert traffic.destination == f"{SERVER_NAME}:{b.tls_port}"
    assert traffic.connections == 1
    assert traffic.bytes_in > len(GREETING)  # the TLS handshake too
    assert traffic.bytes_out > 0
    return traffic


def serve_ingress(
    handle: Handle, port: int, meanwhile: Callable[[], None] = lambda: None
) -> Outcome:
    """Talk to a LISTENER task on *port* (peers 127.0.0.2 only) until it ends.

    An allowed peer is answered, another one is reset before the task sees
    it; *meanwhile* runs while the task listens. Then the task ends, its port
    is closed and the counts are what crossed.
    """
    try:
        assert wait_answer("127.0.0.2", port, b"ping") == b"pong ping 127.0.0.1"
        assert refused("127.0.0.3", port)
        meanwhile()
        assert connect_from("127.0.0.2", port, b"bye") == b"pong bye 127.0.0.1"
        outcome = handle.wait(60)
    finally:
        handle.cancel(0)
    assert outcome is not None
    assert outcome.state == "succeeded", outcome
    assert "sneak" not in outcome.log_tail
    assert_port_closed(port)  # once the task ended
    (traffic,) = outcome.traffic
    assert (traffic.direction, traffic.destination) == ("ingress", str(port))
    assert traffic.connections == 2
    assert traffic.refused >= 1  # 127.0.0.3 (and tries before the task listened)
    assert traffic.bytes_in == len(b"ping") + len(b"bye")
    return outcome


def assert_only_the_listed_destination(results: dict[str, str], b: Bench) -> None:
    """Every way out but the listed TLS server failed (seen from both sides)."""
    assert results["tls"].startswith("ok: hello over tls"), results
    for check in (
        "unlisted_port", "loopback4", "loopback6", "link_local", "other_local",
        "raw", "packet", "dns", "dns_host",
    ):  # fmt: skip
        assert results[check].startswith("failed"), (check, results[check])
    assert b.bait.hits == []
    assert b.bait6.hits == []
    assert b.udp_received() == []
    assert b.tls_served >= 1


def connect_from(source: str, port: int, payload: bytes, timeout_s: float = 5) -> bytes:
    """Connect to 127.0.0.1:*port* from *source*, send, read the answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(payload)
        data = b""
        while chunk := s.recv(100):
            data += chunk
        return data


def wait_answer(source: str, port: int, payload: bytes, timeout_s: float = 20) -> bytes:
    """Retry ``connect_from`` until the task's listener answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = connect_from(source, port, payload)
        except OSError:
            answer = b""
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def refused(source: str, port: int) -> bool:
    """True when femd resets (or closes) a connection from *source* unanswered."""
    try:
        return connect_from(source, port, b"sneak") == b""
    except ConnectionResetError:
        return True


def assert_port_closed(port: int) -> None:
    """Nothing listens on *port* any more (the task ended)."""
    try:
        connect_from("127.0.0.2", port, b"late")
    except ConnectionRefusedError:
        return
    raise AssertionError(f"port {port} still open after the task ended")


# A task that answers each connection with "pong <what it got> <peer>", until
# one sends "bye".
LISTENER = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
while True:
    c, peer = s.accept()
    data = c.recv(100)
    c.sendall(b"pong " + data + b" " + peer[0].encode())
    c.close()
    print("served", data.decode(), peer[0], flush=True)
    if data == b"bye":
        break
"""
