"""A private, TLS-only RabbitMQ node for tests and demos.

:class:`RabbitNode` runs the distribution's RabbitMQ (Debian's ``rabbitmq-server``
package) as a throwaway node that shares nothing with the system's default node:
its own node name, data, logs, config, Erlang cookie (``HOME``), ports, and its own
``epmd`` on a private port. It listens for AMQPS only, on loopback, requires a client
certificate from the node's test CA and maps the certificate's CN to the user name
(SASL EXTERNAL), like a production femd broker.

The node is started by calling RabbitMQ's own ``rabbitmq-server`` script directly
(not the ``/usr/sbin`` wrapper that switches to the ``rabbitmq`` user), so it runs as
whoever calls it, root included. By default the node gets a minimal plugins directory
holding only the Erlang applications it needs (computed from the ``.app`` files):
scanning the sixty-odd bundled plugins is what makes a stock boot slow.

Readiness comes from the node itself: ``NOTIFY_SOCKET`` points at a datagram socket
we own, and RabbitMQ sends the systemd ``READY=1`` notification once it has booted.

It also provisions femd's broker topology into a vhost with
``packaging/rabbitmq/femd-definitions`` and ``rabbitmqctl import_definitions``, and
offers the fault knobs the agent's tests need (close connections, suspend listeners,
freeze the VM, restart with the same data).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from testbed.pki import CA, Issued, client_context, make_ca

if TYPE_CHECKING:
    import pika

__all__ = ["RabbitNode", "RabbitNodeError", "Vhost", "rabbitmq_available"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFINITIONS_SCRIPT = REPO / "packaging" / "rabbitmq" / "femd-definitions"
_RABBIT_LIBS = (Path("/usr/lib/rabbitmq/lib"),)
_SCRIPTS = ("rabbitmq-env", "rabbitmq-defaults", "rabbitmq-server", "rabbitmqctl")
_ROOT_APPS = ("rabbit", "rabbitmq_auth_mechanism_ssl")
_PLUGINS = ("rabbitmq_auth_mechanism_ssl",)
_LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class RabbitNodeError(RuntimeError):
    """The private RabbitMQ node could not be set up, started, stopped or driven."""


def find_rabbitmq_home() -> Path | None:
    """Return the installed RabbitMQ server tree (``.../rabbitmq_server-X``), if any."""
    candidates: list[Path] = []
    for lib in _RABBIT_LIBS:
        if lib.is_dir():
            candidates += [p for p in lib.glob("rabbitmq_server-*") if p.is_dir()]

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.name.split("-", 1)[1]))

    for home in sorted(candidates, key=version, reverse=True):
        if (home / "sbin" / "rabbitmq-server").is_file():
            return home
    return None


def rabbitmq_available() -> bool:
    """Tell whether a RabbitMQ server and Erlang are installed on this host."""
    return (
        find_rabbitmq_home() is not None
        and shutil.which("erl") is not None
        and shutil.which("epmd") is not None
    )


def _app_dirs(plugins: Path) -> dict[str, Path]:
    apps: dict[str, Path] = {}
    for entry in plugins.iterdir():
        if entry.is_dir() and "-" in entry.name:
            apps[entry.name.rsplit("-", 1)[0]] = entry
    return apps


def _app_deps(app_dir: Path, name: str) -> list[str]:
    text = (app_dir / "ebin" / f"{name}.app").read_text(encoding="utf-8")
    deps: list[str] = []
    for key in ("applications", "included_applications", "optional_applications"):
        match = re.search(r"\{\s*" + key + r"\s*,\s*\[([^\]]*)\]", text)
        if match:
            deps += [a.strip() for a in match.group(1).split(",") if a.strip()]
    return deps


def _minimal_home(real: Path, dest: Path) -> Path | None:
    """Build a RabbitMQ home with only the applications the node needs.

    ``rabbitmq-env`` derives ``RABBITMQ_HOME`` (and so the plugins directory and
    ``ERL_LIBS``) from where its scripts really are, so the four scripts are
    copied and the applications linked. Returns ``None`` if the installed layout is
    not the expected one; the caller then uses the stock home.
    """
    plugins = real / "plugins"
    if not plugins.is_dir() or not (real / "escript" / "rabbitmqctl").is_file():
        return None
    apps = _app_dirs(plugins)
    need: set[str] = set()
    todo = list(_ROOT_APPS)
    while todo:
        app = todo.pop()
        if app in need or app not in apps:
            continue  # OTP applications (kernel, ssl, ...) live with Erlang
        need.add(app)
        todo += _app_deps(apps[app], app)
    if not set(_ROOT_APPS) <= need:
        return None
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "sbin").mkdir(parents=True)
    (dest / "plugins").mkdir()
    for script in _SCRIPTS:
        shutil.copy2(real / "sbin" / script, dest / "sbin" / script)
    (dest / "escript").symlink_to(real / "escript")
    for app in sorted(need):
        (dest / "plugins" / apps[app].name).symlink_to(apps[app])
    return dest


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_ports(count: int) -> list[int]:
    """Pick *count* distinct free loopback TCP ports below the ephemeral range.

    Ports handed out by ``bind(0)`` come from the range the kernel also uses for
    outgoing connections, which could take one between now and the node's start.
    """
    low = _ephemeral_range()[0]
    pool = range(10000, low) if low > 11000 else range(low, 65535)
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        for _ in range(200):
            port = secrets.choice(pool)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((_LOOPBACK, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)  # held until all are chosen: no duplicates
            ports.append(port)
            if len(ports) == count:
                return ports
    finally:
        for s in sockets:
            s.close()
    raise RabbitNodeError(f"rabbitmq: no {count} free loopback ports found")


def _ipv6_loopback_free(port: int) -> bool:
    """Tell whether ``[::1]:port`` can be listened on (IPv6 loopback exists)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", port))
    except OSError:
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((_LOOPBACK, port)) == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux/glibc
    _libc = None


def _die_with_parent() -> None:
    """Runs in the child: SIGKILL it if the process that started it dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_RUNNING: weakref.WeakSet[RabbitNode] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for node in list(_RUNNING):
        with contextlib.suppress(Exception):
            node.stop()


@dataclass(frozen=True)
class Vhost:
    """A vhost provisioned with femd's topology, and the identities that may use it.

    Attributes:
        name: the vhost name.
        url: ``amqps://localhost:<port>/<quoted vhost>``, as femd.yaml's broker url.
        ca: the CA certificate that signed the broker (and the identities).
        identities: client certificate and key per CN (the nodes, the orchestrator).
        nodes: the node ids provisioned.
        orchestrator: the orchestrator's CN.
        host: the broker host name (matches the server certificate).
        port: the AMQPS port.
    """

    name: str
    url: str
    ca: Path
    identities: Mapping[str, Issued]
    nodes: tuple[str, ...]
    orchestrator: str
    host: str
    port: int
    node: RabbitNode = field(repr=False, compare=False)

    def identity(self, cn: str) -> Issued:
        """Return the certificate and key for *cn* (issuing one if needed)."""
        known = self.identities.get(cn)
        return known if known is not None else self.node.identity(cn)

    def cert(self, cn: str) -> Path:
        """Path of *cn*'s client certificate."""
        return self.identity(cn).cert

    def key(self, cn: str) -> Path:
        """Path of *cn*'s private key."""
        return self.identity(cn).key

    def ssl_context(self, cn: str | None) -> ssl.SSLContext:
        """A client TLS context trusting the broker, presenting *cn* (or nothing)."""
        return client_context(self.ca, None if cn is None else self.identity(cn))

    def broker_config(self, cn: str) -> dict[str, str]:
        """The ``broker:`` section of a femd.yaml for identity *cn*."""
        ident = self.identity(cn)
        return {
            "url": self.url,
            "ca": str(self.ca),
            "cert": str(ident.cert),
            "key": str(ident.key),
        }

    def parameters(self, cn: str | None, **overrides: Any) -> pika.ConnectionParameters:  # noqa: ANN401
        """pika connection parameters for *cn* over mTLS with SASL EXTERNAL.

        Args:
            cn: the identity to present; ``None`` presents no client certificate.
            **overrides: other ``pika.ConnectionParameters`` keywords.
        """
        import pika

        settings: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "virtual_host": self.name,
            "credentials": pika.credentials.ExternalCredentials(),
            "ssl_options": pika.SSLOptions(self.ssl_context(cn), self.host),
            "connection_attempts": 1,
            "socket_timeout": 5,
            "blocked_connection_timeout": 30,
        }
        settings.update(overrides)
        return pika.ConnectionParameters(**settings)


class RabbitNode:
    """A private RabbitMQ node (AMQPS + SASL EXTERNAL only) in its own directory.

    Args:
        base_dir: where everything lives (data, logs, config, PKI). ``None`` makes a
            temporary directory that :meth:`close` removes.
        ca: the CA that issues the server and client certificates; by default a new
            one is made under ``base_dir/pki``.
        minimal_plugins: boot with only the applications needed (much faster).
        start_timeout_s: how long :meth:`start` waits for the node to be ready.

    Attributes:
        base_dir, nodename, port (AMQPS), dist_port, epmd_port, ca, server (its
        certificate), host (``localhost``), last_start_s (duration of the last
        successful :meth:`start`).
    """

    host = "localhost"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        ca: CA | None = None,
        minimal_plugins: bool = True,
        start_timeout_s: float = 90.0,
    ) -> None:
        """Prepare (but do not start) the node; see the class docstring."""
        real = find_rabbitmq_home()
        if real is None or shutil.which("erl") is None or shutil.which("epmd") is None:
            raise RabbitNodeError("rabbitmq: rabbitmq-server or erlang not installed")
        self._owns_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="femd-rabbit-"))
            if base_dir is None
            else base_dir.resolve()
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout_s = start_timeout_s
        self.nodename = f"femdtest-{secrets.token_hex(4)}@localhost"
        self.port, self.dist_port, self.epmd_port = _free_ports(3)
        self.ca = ca if ca is not None else make_ca(self.base_dir / "pki")
        self.server = self.ca.issue(
            "localhost", self.base_dir / "pki" / "server", server=True, client=False
        )
        self._identities: dict[str, Issued] = {}
        home = None
        if minimal_plugins:
            home = _minimal_home(real, self.base_dir / "rabbitmq-home")
        self.home = home if home is not None else real
        self.last_start_s: float | None = None
        self._beam: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._suspended = False
        self._console_offset = 0
        self._background: list[subprocess.Popen[bytes]] = []
        self._write_config()

    # -- files -----------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        """Where the node's logs are."""
        return self.base_dir / "log"

    @property
    def console_log(self) -> Path:
        """The node's stdout and stderr."""
        return self.log_dir / "console.log"

    @property
    def node_log(self) -> Path:
        """The node's main log file."""
        return self.log_dir / f"{self.nodename}.log"

    def _write_config(self) -> None:
        for sub in ("home", "mnesia", "log", "definitions"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        (self.base_dir / "home").chmod(0o700)
        listeners = [f"listeners.ssl.1 = {_LOOPBACK}:{self.port}"]
        if _ipv6_loopback_free(self.port):  # "localhost" may resolve to ::1 first
            listeners.append(f"listeners.ssl.2 = ::1:{self.port}")
        conf = [
            "# written by testbed.rabbit: a private, TLS-only test node",
            "listeners.tcp = none",
            *listeners,
            f"ssl_options.cacertfile = {self.ca.cert}",
            f"ssl_options.certfile = {self.server.cert}",
            f"ssl_options.keyfile = {self.server.key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "ssl_options.depth = 2",
            "auth_mechanisms.1 = EXTERNAL",
            "ssl_cert_login_from = common_name",
            # Definitions to import at boot (none): this also stops a first boot
            # from creating the "guest" administrator and the "/" vhost.
            "definitions.import_backend = local_filesystem",
            f"definitions.local.path = {self.base_dir / 'boot-definitions.json'}",
            "log.console = true",
            "log.console.level = info",
            "log.file.level = info",
            # a shared CI box may be low on disk; tests hold few messages
            "disk_free_limit.absolute = 10MB",
        ]
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.base_dir / "enabled_plugins").write_text(
            "[" + ",".join(_PLUGINS) + "].\n"
        )
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        (self.base_dir / "boot-definitions.json").write_text(
            '{"users": [], "vhosts": [], "permissions": []}\n'
        )
        # Fresher queue statistics for queues()/await_messages() (defaults: 5 s).
        (self.base_dir / "advanced.config").write_text(
            "[{rabbit, [{collect_statistics_interval, 500},"
            " {quorum_tick_interval, 500}]}].\n"
        )

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "NOTIFY_SOCKET"))
        }
        dist_iface = (
            f"-kernel inet_dist_use_interface {{{_LOOPBACK.replace('.', ',')}}}"
        )
        env.update(
            HOME=str(self.base_dir / "home"),
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.base_dir / "rabbitmq.pid"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=dist_iface,
            RABBITMQ_CTL_ERL_ARGS=dist_iface,
            # CLI tools listen on any free port (the default range is shared)
            RABBITMQ_CTL_DIST_PORT_MIN="0",
            RABBITMQ_CTL_DIST_PORT_MAX="0",
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS=_LOOPBACK,
            ERL_CRASH_DUMP=str(self.base_dir / "erl_crash.dump"),
        )
        return env

    # -- identities ------------------------------------------------------------

    def identity(self, cn: str) -> Issued:
        """Return a client certificate for *cn* from the node's CA (made once)."""
        issued = self._identities.get(cn)
        if issued is None:
            issued = self.ca.issue(cn, self.base_dir / "pki" / "clients", sans=())
            self._identities[cn] = issued
        return issued

    def url(self, vhost: str = "/") -> str:
        """The AMQPS url of *vhost* on this node."""
        return f"amqps://{self.host}:{self.port}/{quote(vhost, safe='')}"

    # -- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the node's VM process is alive (it may be paused)."""
        return self._beam is not None and self._beam.poll() is None

    @property
    def pid(self) -> int | None:
        """The Erlang VM's process id while the node runs."""
        return self._beam.pid if self.running and self._beam is not None else None

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        log = (self.log_dir / "epmd.log").open("ab")
        with log:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", _LOOPBACK],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 10
        while not _port_open(self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                self._stop_epmd()
                raise RabbitNodeError(
                    f"epmd: did not listen on port {self.epmd_port}: "
                    + _tail(self.log_dir / "epmd.log", 5)
                )
            time.sleep(0.05)

    def _stop_epmd(self) -> None:
        proc, self._epmd = self._epmd, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _notify_socket(self) -> tuple[socket.socket, Path]:
        path = self.base_dir / "notify.sock"
        if len(os.fsencode(path)) > 100:  # sun_path is 108 bytes
            path = Path(tempfile.mkdtemp(prefix="femd-rabbit-")) / "notify.sock"
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(0.2)
        return sock, path

    def start(self) -> None:
        """Start the node and wait until it is ready to accept AMQPS connections.

        Raises:
            RabbitNodeError: the node exited or was not ready in time; the message
                holds the tail of its logs. Nothing is left running.
        """
        if self.running:
            return
        began = time.monotonic()
        self._start_epmd()
        sock, sock_path = self._notify_socket()
        env = self._env()
        env["NOTIFY_SOCKET"] = str(sock_path)  # also makes the script exec the VM
        self._console_offset = (
            self.console_log.stat().st_size if self.console_log.exists() else 0
        )
        try:
            with self.console_log.open("ab") as console:
                self._beam = subprocess.Popen(
                    [str(self.home / "sbin" / "rabbitmq-server")],
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            _RUNNING.add(self)
            self._await_ready(sock, began)
        except BaseException:
            self.stop()
            raise
        finally:
            sock.close()
            sock_path.unlink(missing_ok=True)
        self.last_start_s = time.monotonic() - began
        logger.info(
            "rabbitmq node %s ready in %.1f s", self.nodename, self.last_start_s
        )

    def _await_ready(self, sock: socket.socket, began: float) -> None:
        deadline = began + self.start_timeout_s
        beam = self._beam
        if beam is None:
            raise RuntimeError("rabbitmq: _await_ready without a process")
        while True:
            try:
                message = sock.recv(4096).decode("utf-8", errors="replace")
            except TimeoutError:
                message = ""
            if "READY=1" in message.splitlines():
                if not _port_open(self.port):
                    raise RabbitNodeError(
                        f"rabbitmq: ready but port {self.port} closed\n"
                        + self.log_tail()
                    )
                return
            if beam.poll() is not None:
                raise RabbitNodeError(
                    f"rabbitmq: node exited with status {beam.returncode} "
                    f"while starting\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RabbitNodeError(
                    f"rabbitmq: node not ready after {self.start_timeout_s:.0f} s\n"
                    + self.log_tail()
                )

    def log_tail(self, lines: int = 25) -> str:
        """The first errors and the last lines the node printed since its last start."""
        try:
            with self.console_log.open("rb") as f:
                f.seek(self._console_offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        printed = text.splitlines()
        errors = [line for line in printed if "[error]" in line][:10]
        return (
            f"--- first errors in {self.console_log}\n"
            + "\n".join(errors)
            + "\n--- last lines\n"
            + "\n".join(printed[-lines:])
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the node (gracefully, then by force) and its epmd.

        Leaves no process of this node behind; other nodes and the system's epmd
        are never touched. Safe to call when not running.
        """
        self._reap_background(block=True)
        beam, self._beam = self._beam, None
        _RUNNING.discard(self)
        if beam is not None:
            pid = beam.pid
            if beam.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self._paused:
                        os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGTERM)  # RabbitMQ stops gracefully
                if not self._wait_exited(pid, timeout_s):
                    logger.warning("rabbitmq node %s: SIGKILL", self.nodename)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self._wait_exited(pid, None)
                # The VM's helpers (erl_child_setup, inet_gethost) share its
                # process group; the unreaped VM keeps the group id reserved.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            beam.wait()
        self._paused = False
        self._suspended = False
        self._stop_epmd()

    @staticmethod
    def _wait_exited(pid: int, timeout_s: float | None) -> bool:
        """Wait for *pid* to exit without reaping it; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start again with the same name, ports and data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and remove its directory if it made a temporary one."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        """Start the node."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the node and clean up (see :meth:`close`)."""
        self.close()

    # -- control ---------------------------------------------------------------

    def _ctl_command(self) -> list[str]:
        return [str(self.home / "sbin" / "rabbitmqctl"), "-n", self.nodename, "-q"]

    def ctl(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> str:
        """Run ``rabbitmqctl`` against this node and return its standard output.

        Raises:
            RabbitNodeError: the node is not running, or the command failed (when
                *check*) or timed out.
        """
        if not self.running:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)[:60]}: node not running"
            )
        if self._paused:
            raise RabbitNodeError(f"rabbitmqctl {' '.join(args)[:60]}: node paused")
        try:
            done = subprocess.run(
                [*self._ctl_command(), *args],
                env=self._env(),
                cwd=self.base_dir,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)[:60]}: timed out after {timeout_s:.0f} s"
            ) from e
        if check and done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)[:60]}: exit {done.returncode}: "
                + " | ".join(detail[-3:])[:300]
            )
        return done.stdout

    def provision(
        self,
        vhost: str,
        nodes: Iterable[str],
        orchestrator: str = "orchestrator",
        *,
        delivery_limit: int | None = None,
    ) -> Vhost:
        """Create *vhost* with femd's topology for *nodes* and the orchestrator.

        Runs ``packaging/rabbitmq/femd-definitions`` and imports its output with
        ``rabbitmqctl import_definitions``; issues client certificates for every
        node and the orchestrator.

        Raises:
            RabbitNodeError: the definitions could not be made or imported.
        """
        nodes = tuple(nodes)
        command = [
            sys.executable,
            str(DEFINITIONS_SCRIPT),
            f"--vhost={vhost}",
            *(f"--node={n}" for n in nodes),
            f"--orchestrator={orchestrator}",
        ]
        if delivery_limit is not None:
            command.append(f"--delivery-limit={delivery_limit}")
        made = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False
        )
        if made.returncode != 0:
            raise RabbitNodeError(
                f"femd-definitions: exit {made.returncode}: {made.stderr.strip()[:300]}"
            )
        digest = hashlib.sha256(vhost.encode()).hexdigest()[:16]
        path = self.base_dir / "definitions" / f"{digest}.json"
        path.write_text(made.stdout)
        self.ctl("import_definitions", str(path))
        identities = {cn: self.identity(cn) for cn in (*nodes, orchestrator)}
        return Vhost(
            name=vhost,
            url=self.url(vhost),
            ca=self.ca.cert,
            identities=identities,
            nodes=nodes,
            orchestrator=orchestrator,
            host=self.host,
            port=self.port,
            node=self,
        )

    def delete_vhost(self, vhost: str, *, wait: bool = True) -> None:
        """Delete *vhost* and everything in it.

        Args:
            vhost: the vhost to delete.
            wait: wait for the deletion; with ``False`` it runs in the background
                (best effort: the next :meth:`stop` waits for it, errors ignored).

        Raises:
            RabbitNodeError: the vhost could not be deleted (only when *wait*).
        """
        if wait:
            self.ctl("delete_vhost", vhost)
            return
        self._reap_background(block=False)
        if not self.running or self._paused:
            return
        self._background.append(
            subprocess.Popen(
                [*self._ctl_command(), "delete_vhost", vhost],
                env=self._env(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _reap_background(self, *, block: bool) -> None:
        """Collect finished background commands; with *block*, all of them."""
        pending = []
        for proc in self._background:
            if block:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            elif proc.poll() is None:
                pending.append(proc)
        self._background = pending

    def queues(self, vhost: str) -> dict[str, int]:
        """Return ``{queue name: ready messages}`` for the queues of *vhost*.

        The counts are the broker's statistics: they lag behind by up to about a
        second (see :meth:`await_messages`).
        """
        out = self.ctl(
            "list_queues", "-p", vhost, "--no-table-headers", "name", "messages_ready"
        )
        counts: dict[str, int] = {}
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name:
                counts[name] = int(count)
        return counts

    def await_messages(
        self, vhost: str, queue: str, count: int, timeout_s: float = 15.0
    ) -> None:
        """Wait until *queue* in *vhost* holds exactly *count* ready messages.

        Raises:
            RabbitNodeError: it did not within *timeout_s* (says what it saw).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.queues(vhost).get(queue)
            if seen == count:
                return
            if time.monotonic() > deadline:
                raise RabbitNodeError(
                    f"rabbitmq: queue {queue} in {vhost}: {seen} ready messages "
                    f"after {timeout_s:.0f} s (expected {count})"
                )
            time.sleep(0.25)

    # -- faults ----------------------------------------------------------------

    def close_connections(self, vhost: str | None = None) -> None:
        """Force-close client connections (all, or those of *vhost*).

        Clients see the broker close the connection (``CONNECTION_FORCED``) and may
        reconnect at once; combine with :meth:`suspend_listeners` to keep them out.
        """
        if vhost is None:
            self.ctl("close_all_connections", "--global", "femd testbed: cut")
        else:
            self.ctl(
                "close_all_connections",
                "--vhost",
                vhost,
                "--limit",
                "100000",
                "femd testbed: cut",
            )

    def suspend_listeners(self) -> None:
        """Stop accepting client connections (new ones are refused) until resumed."""
        self.ctl("eval", "rabbit_maintenance:suspend_all_client_listeners().")
        self._suspended = True

    def resume_listeners(self) -> None:
        """Accept client connections again after :meth:`suspend_listeners`."""
        self.ctl("eval", "rabbit_maintenance:resume_all_client_listeners().")
        self._suspended = False

    @property
    def listeners_suspended(self) -> bool:
        """Whether :meth:`suspend_listeners` is in effect."""
        return self._suspended

    def pause(self) -> None:
        """Freeze the node's VM (SIGSTOP): connections hang, nothing is refused.

        This is a black-holed network as the clients see it: heartbeats go
        unanswered, connects time out. :meth:`resume` thaws it.
        """
        pid = self.pid
        if pid is None:
            raise RabbitNodeError("rabbitmq: pause: node not running")
        os.kill(pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw the node after :meth:`pause` (no-op if not paused)."""
        pid = self.pid
        if pid is not None and self._paused:
            os.kill(pid, signal.SIGCONT)
        self._paused = False

    @property
    def paused(self) -> bool:
        """Whether the node is frozen by :meth:`pause`."""
        return self._paused
