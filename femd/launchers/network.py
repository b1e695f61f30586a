"""The network a task's policy allows, enforced by femd itself (both launchers).

Owns ``TaskNetwork``: a task keeps its own empty network namespace (loopback
only) and femd forwards exactly what the policy allows, per task:

- egress: each allowed ``host:port`` is resolved by femd at launch (the
  profile's fixed ``network.hosts`` first, else the host's resolver). Inside
  the sandbox, ``/etc/hosts`` maps the name to a loopback address of its own
  (``127.0.1.N``; an IPv4 literal keeps its address, added to ``lo``) where a
  listener, created in the sandbox's namespace by the ``nsjoin`` helper, is
  owned and served by femd: femd accepts, connects to the resolved
  destination only, and copies bytes. TLS stays end to end. There is no
  resolver inside: ``resolv.conf`` names no nameserver, so any other name
  does not resolve, and no other address is reachable.
- ingress: femd listens on the host port (``network.ingress_bind``, default
  every address), refuses peers outside the policy's ``peers``, and connects
  the others to the task's listener on its loopback, through the helper.
  The host port is open while the task runs, and closed when it ends.

Each forwarded (or refused) connection is one audit record at its close;
``close()`` returns the per-destination counts for the terminal event. Does
not start sandboxes: the launchers call ``prepare()`` before the task's
command runs, ``attach()`` with the sandbox's network namespace while the
command is still held back, and ``close()`` when it ended. Why this design,
and what it cannot do (UDP, ...): docs/network.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Final, Literal

from femd import audit
from femd.errors import LaunchError, cut
from femd.launchers import LaunchSpec, Traffic
from femd.launchers.netns import Helper
from femd.launchers.profile import NetworkSettings
from femd.launchers.routes import (
    Address,
    Route,
    hosts_file,
    peer_address,
    peer_networks,
    plan_routes,
    resolve,
)

__all__ = ["TaskNetwork"]

logger = logging.getLogger(__name__)

_MAX_CONNECTIONS: Final = 256  # per task, both directions together
_CONNECT_TIMEOUT_S: Final = 10.0
_CHUNK: Final = 65536
_FLUSH_S: Final = 5.0  # after the task ended: what it sent still goes out
_RESOLV: Final = "# femd: no resolver in the sandbox; names are in /etc/hosts\n"
_NSSWITCH: Final = "hosts: files\n"


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)


class TaskNetwork:
    """The forwarders of one task: egress routes and ingress ports."""

    def __init__(self, spec: LaunchSpec, settings: NetworkSettings) -> None:
        """Plan the routes of *spec*; nothing is opened before ``prepare()``."""
        self.task_id = spec.task_id
        self._spec = spec
        self._settings = settings
        self._routes = plan_routes(spec.egress or ())
        self._files = Path(spec.output_dir + ".net")
        self._helper: Helper | None = None
        self._inner: dict[socket.socket, Route] = {}
        self._outer: dict[socket.socket, int] = {}  # host listener -> task port
        self._peers: list[Address] = []
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[tuple[threading.Thread, threading.Event]] = []
        self._closed = False

    # -- before the sandbox ----------------------------------------------------

    def prepare(self) -> list[tuple[str, str]]:
        """Resolve, open the host ports, write the sandbox's name files.

        Returns (host file, sandbox path) pairs to bind read-only.

        Raises:
            LaunchError: a name does not resolve, a port is taken, a file
                cannot be written. Nothing stays open then.
        """
        try:
            self._routes = [
                r._replace(targets=resolve(r.host, r.port, self._settings))
                for r in self._routes
            ]
            self._peers = peer_networks(self._spec.ingress_peers)
            for port in self._spec.listen:
                for s in self._bind_host(port):
                    self._outer[s] = port
            self._files.mkdir(mode=0o755)
            self._files.chmod(0o755)
            _write(self._files / "hosts", hosts_file(self._routes))
            _write(self._files / "resolv.conf", _RESOLV)
            _write(self._files / "nsswitch.conf", _NSSWITCH)
        except LaunchError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise LaunchError(
                f"network: cannot prepare task {self.task_id}: {cut(e)}"
            ) from e
        names = ("hosts", "resolv.conf", "nsswitch.conf")
        return [(str(self._files / n), f"/etc/{n}") for n in names]

    def _bind_host(self, port: int) -> list[socket.socket]:
        binds = self._settings.ingress_bind or ("::",)
        made = []
        for address in binds:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                s = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                if self._settings.ingress_bind:
                    raise
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = "0.0.0.0"  # noqa: S104 (default: every address; IPv6 off)
            made.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if s.family == socket.AF_INET6 and not self._settings.ingress_bind:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind((address, port))
                s.listen(128)
            except OSError as e:
                for m in made:
                    m.close()
                raise LaunchError(
                    f"network: cannot listen on {address} port {port}: {e.strerror}"
                ) from e
        return made

    # -- while the command is held back ---------------------------------------

    def attach(self, netns_fd: int) -> None:
        """Open the in-sandbox listeners in *netns_fd* and start forwarding.

        Raises:
            LaunchError: the helper could not join or listen.
        """
        self._helper = Helper(netns_fd)
        for address in sorted({r.inside for r in self._routes}):
            if not address.startswith("127."):
                self._helper.ask(f"address {address}")
        for r in self._routes:
            listener = self._helper.ask(f"listen {r.inside} {r.port}")
            if listener is not None:
                self._inner[listener] = r
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve,
            args=(self._wake_r,),
            name=f"femd-net-{self.task_id}",
            daemon=True,
        )
        self._thread.start()

    def attach_pid(self, pid: int) -> None:
        """``attach()`` to the network namespace of process *pid*.

        Raises:
            LaunchError: the process is gone, or the helper failed.
        """
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise LaunchError(f"network: cannot open the task's namespace: {e}") from e
        try:
            self.attach(fd)
        finally:
            os.close(fd)

    def _serve(self, wake: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        for s in [*self._inner, *self._outer]:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj is wake:
                        self._drain()
                        return
                    self._accept(key.fileobj)  # type: ignore[arg-type]
        finally:
            sel.close()

    def _drain(self) -> None:
        """Serve what the ended task opened but femd did not accept yet.

        Those connections hold what it sent. No new ingress is taken.
        """
        for listener in self._inner:
            while self._accept(listener):
                pass

    def _accept(self, listener: socket.socket) -> bool:
        """Accept one connection and start its worker; False when none waits."""
        try:
            conn, peer = listener.accept()
        except OSError:
            return False
        conn.setblocking(True)
        done = threading.Event()  # set once the task's side is forwarded
        with self._lock:
            busy = len(self._live) >= 2 * _MAX_CONNECTIONS
        if listener in self._inner:
            route = self._inner[listener]
            if busy:
                self._refuse(
                    conn, "egress", route.allowed, "task", "too many connections"
                )
                return True
            work = threading.Thread(
                target=self._egress, args=(conn, route, done), daemon=True
            )
        else:
            port = self._outer[listener]
            where = f"{peer_address(peer[0])}:{peer[1]}"
            if not any(peer_address(peer[0]) in n for n in self._peers):
                self._refuse(conn, "ingress", str(port), where, "peer not allowed")
                return True
            if busy:
                self._refuse(conn, "ingress", str(port), where, "too many connections")
                return True
            work = threading.Thread(
                target=self._ingress, args=(conn, port, where, done), daemon=True
            )
        with self._lock:
            alive = [(w, d) for w, d in self._workers if w.is_alive()]
            self._workers = [*alive, (work, done)]
        work.start()
        return True

    # -- one connection ----------------------------------------------------------

    def _egress(
        self, inner: socket.socket, route: Route, done: threading.Event
    ) -> None:
        outer = None
        error = ""
        for target in route.targets:
            try:
                outer = socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S)
                break
            except OSError as e:
                error = str(e)
        if outer is None:
            self._refuse(
                inner, "egress", route.allowed, "task", f"cannot connect: {error}"
            )
            done.set()
            return
        outer.settimeout(None)
        peer = "{}:{}".format(*outer.getpeername()[:2])
        self._relay(inner, outer, ("egress", route.allowed, peer), done)

    def _ingress(
        self, outer: socket.socket, port: int, peer: str, done: threading.Event
    ) -> None:
        helper = self._helper  # None once the task ended
        try:
            inner = helper.ask(f"connect {port}") if helper else None
        except LaunchError as e:
            self._refuse(outer, "ingress", str(port), peer, str(e))
            done.set()
            return
        if inner is None:
            self._refuse(outer, "ingress", str(port), peer, "the task ended")
            done.set()
            return
        self._relay(inner, outer, ("ingress", str(port), peer), done)

    def _relay(
        self,
        inner: socket.socket,
        outer: socket.socket,
        what: tuple[Literal["egress", "ingress"], str, str],
        done: threading.Event,
    ) -> None:
        """Copy both ways; *what* is (direction, destination, peer)."""
        with self._lock:
            if self._closed:
                inner.close()
                outer.close()
                done.set()
                return
            self._live |= {inner, outer}
        moved = [0, 0]  # into the sandbox, out of it
        back = threading.Thread(target=self._copy, args=(outer, inner, moved, 0))
        back.start()
        self._copy(inner, outer, moved, 1)
        done.set()  # everything the task sent is out
        back.join()
        with self._lock:
            self._live -= {inner, outer}
        inner.close()
        outer.close()
        self._record(*what, "closed", moved)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, moved: list[int], i: int) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
                moved[i] += len(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _refuse(
        self, conn: socket.socket, direction: Literal["egress", "ingress"],
        destination: str, peer: str, why: str,
    ) -> None:  # fmt: skip
        # SECURITY: a reset, not a clean close: the peer learns nothing more.
        with contextlib.suppress(OSError):
            linger = struct.pack("ii", 1, 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        conn.close()
        self._record(direction, destination, peer, f"refused: {why}", None)

    def _record(
        self,
        direction: Literal["egress", "ingress"],
        destination: str,
        peer: str,
        verdict: str,
        moved: list[int] | None,
    ) -> None:
        with self._lock:
            count = self._counts.setdefault((direction, destination), [0, 0, 0, 0])
            if moved is None:
                count[1] += 1
            else:
                count[0] += 1
                count[2] += moved[0]
                count[3] += moved[1]
        into, out = moved or (0, 0)
        audit.emit(
            audit.Event.NETWORK_CONNECTION,
            f"task {self.task_id}: {direction} {destination} peer {peer}: {verdict}"
            f" ({into} bytes in, {out} bytes out)",
            priority=6 if moved is not None else 5,
            task_id=self.task_id,
            extra={
                "DIRECTION": direction,
                "DESTINATION": destination,
                "PEER": peer,
                "VERDICT": verdict,
                "BYTES_IN": str(into),
                "BYTES_OUT": str(out),
            },
        )

    # -- after the task ----------------------------------------------------------

    def close(self) -> tuple[Traffic, ...]:
        """Close every port and connection of the task; return its traffic.

        Called when the task ended: connections it opened are still served
        until what it sent is out (at most ``_FLUSH_S``), then everything is
        cut and the ports are closed.
        """
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")  # the serve thread drains, then ends
        if self._thread is not None:
            self._thread.join(timeout=10)
        for s in [*self._inner, *self._outer]:
            s.close()
        deadline = time.monotonic() + _FLUSH_S
        with self._lock:
            workers = list(self._workers)
        for _, done in workers:
            done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            live = list(self._live)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for work, _ in workers:
            work.join(timeout=5)  # each writes its audit record as it ends
        if self._helper is not None:
            self._helper.close()
            self._helper = None
        for wake in (self._wake_r, self._wake_w):
            if wake is not None:
                wake.close()
        shutil.rmtree(self._files, ignore_errors=True)
        with self._lock:
            return tuple(
                Traffic(
                    direction=d,  # type: ignore[arg-type]
                    destination=dest,
                    connections=c[0],
                    refused=c[1],
                    bytes_in=c[2],
                    bytes_out=c[3],
                )
                for (d, dest), c in sorted(self._counts.items())
            )
