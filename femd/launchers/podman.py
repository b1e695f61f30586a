"""The ``podman`` launcher: a task in a rootless Podman container, via podman-py.

Owns ``PodmanLauncher`` (probe, image stage-in by digest, launch, adopt) and
``PodmanHandle`` (wait, cancel, logs, remove). Talks only to the REST socket of a
``podman system service`` run by a dedicated unprivileged user; never shells out
and never runs a container as root. Does not decide whether a task may run
(``decision``) nor whether its limits are enforceable (``unenforceable()``); it
re-checks the latter before it starts anything (fail closed).

The container (DESIGN "Launchers"): image by verified digest (created from the
image *id*), argv as given (entrypoint cleared), env only from the spec (plus
the image's own ``ENV`` and Podman's ``PATH``/``HOSTNAME``/``container``), no
network namespace peers (``none``), read-only root, ``cap-drop=ALL``,
``no-new-privileges``, Podman's default seccomp filter (or the profile's), a user
namespace (profile ``userns``; ``auto`` gives each container its own 65536
subordinate ids), the task process as uid/gid 65534 inside, an init (catatonit)
as PID 1, a sized ``noexec`` tmpfs on ``/tmp``, inputs bound read-only, the output
directory the only writable bind, no devices, host ``/etc/hosts`` and
``resolv.conf`` not copied in, image ``VOLUME``s ignored, ``k8s-file`` logs of a
bounded size, labels ``femd.task=<id>`` (+ ``femd.node``, ``femd.timeout_s``).

Limits: the pids limit is ``RLIMIT_NPROC`` of the task uid inside its user
namespace (plus the cgroup ``pids.max`` where Podman can set it). Memory and cpu
limits need a cgroup controller delegated to the podman user (cgroup v2); on
rootless cgroup v1 Podman silently ignores them, so ``probe()`` reports them
unenforceable and ``launch()`` refuses. Network: containers get ``none``; what
the policy allows is forwarded by femd (``network.TaskNetwork``), attached
between ``init`` and ``start``, which needs femd to run as root (joining the
rootless container's namespaces from outside); otherwise it is unenforceable.

Output directory: the task uid is an anonymous subordinate id, so the launcher
makes the agent-created output directory mode 0777 (``0o777``), and refuses to
unless some parent directory is closed to "other" (no ``x`` bit): only the agent,
the podman user (by group) and this container can reach it. The files a task
writes belong to that subordinate id; with the default umask (022) the agent
reads them as "other".

Lifecycle: a ``wait()`` that returns an ``Outcome`` removes the container (after
copying up to ``log_max_bytes`` of its log, which ``logs()`` serves from then on).
Timeouts are wall-clock, from the container's ``StartedAt``, and survive an agent
restart (``adopt()``); a cancel or a timeout leaves a marker in the
launcher's state directory (``<state_dir>/launchers/podman/``) so the
terminal state survives one too.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import math
import os
import pwd
import re
import socket
import stat
import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar

import msgspec
from podman import PodmanClient
from podman.errors import ImageNotFound, NotFound, PodmanError

from femd.errors import (
    ImageDigestMismatchError,
    LaunchError,
    StageInError,
    UnenforceableError,
    cut,
)
from femd.launchers import Capabilities, LaunchSpec, Outcome
from femd.launchers.netns import probe_join
from femd.launchers.network import TaskNetwork
from femd.launchers.profile import LauncherProfile, PodmanSettings
from femd.launchers.targets import PODMAN_RESERVED as _RESERVED
from femd.model import TaskId

__all__ = ["TASK_USER", "PodmanHandle", "PodmanLauncher", "verify_image_digest"]

logger = logging.getLogger(__name__)

TASK_USER: Final = "65534:65534"
"""uid:gid of the task process inside the container (never root)."""
LABEL_TASK: Final = "femd.task"
_LABEL_NODE: Final = "femd.node"
_LABEL_TIMEOUT: Final = "femd.timeout_s"
_LABEL_LOG_MAX: Final = "femd.log_max_bytes"
_AUTO_USERNS_SIZE: Final = 65536
_STOP_GRACE_S: Final = 10
_CONMON_SLACK_S: Final = 5
_TAIL_BYTES: Final = 4096
_API_TIMEOUT_S: Final = 120.0
_PROBE_TTL_S: Final = 30.0
_REF: Final = re.compile(r"(?P<repo>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})")
_DONE: Final = frozenset({"exited", "stopped", "dead"})
_NEVER_STARTED: Final = frozenset({"created", "configured", "initialized"})
_UNSAFE_OK: Final = frozenset({"memory", "cpu"})
# Paths a task mount may not cover: the sandbox's own plumbing.
_TMP: Final = "/tmp"  # noqa: S108 (the container's own tmpfs, not the host's)
# Foreign errors met at this module's boundary (APIError and requests' errors are
# OSError subclasses; a malformed reply shows up as ValueError/KeyError/TypeError).
_FOREIGN: Final = (PodmanError, OSError, ValueError, KeyError, TypeError)

T = TypeVar("T")
_State = Literal["succeeded", "failed", "timed_out", "cancelled"]


def _api(what: str, call: Callable[[], T]) -> T:
    """Run one podman-py call; any foreign error becomes ``LaunchError``."""
    try:
        return call()
    except _FOREIGN as e:
        raise LaunchError(f"podman: {what}: {cut(e, 160)}") from e


def _client(url: str) -> PodmanClient:
    return PodmanClient(base_url=url, timeout=_API_TIMEOUT_S)


def _on_container(
    url: str, cid: str, what: str, call: Callable[[Any], T], gone: T
) -> T:
    """Run *call* on container *cid* with a fresh client; *gone* if it is missing.

    Raises:
        LaunchError: podman could not be asked.
    """

    def run() -> T:
        with _client(url) as client:
            try:
                container = client.containers.get(cid)
            except NotFound:
                return gone
            return call(container)

    return _api(what, run)


def _socket_problem(url: str) -> str | None:
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


def _parse_ref(ref: str) -> tuple[str, str]:
    m = _REF.fullmatch(ref)
    if m is None:
        raise ImageDigestMismatchError(
            f"image {cut(ref)}: not pinned by digest (expected <repo>@sha256:<64 hex>)"
        )
    return m["repo"], m["digest"]


def verify_image_digest(attrs: dict[str, Any], ref: str) -> None:
    """Check that an image (its inspect data) has the digest *ref* pins.

    Raises:
        ImageDigestMismatchError: *ref* is unpinned or the digest differs.
    """
    _, digest = _parse_ref(ref)
    have = {str(attrs.get("Digest") or "")}
    have |= {str(d).partition("@")[2] for d in attrs.get("RepoDigests") or ()}
    have.discard("")
    # SECURITY: the pinned digest is the task's identity of the code that runs.
    if digest not in have:
        got = ", ".join(sorted(have)) or "none"
        raise ImageDigestMismatchError(
            f"image {cut(ref)}: digest mismatch (got {cut(got)}, expected {digest})"
        )


def _parse_time(text: object) -> datetime | None:
    """Podman's RFC 3339 times (nanoseconds, ``Z``); None for the zero time."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    m = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        return None
    frac = (m[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(f"{m[1]}.{frac}{zone}").astimezone(UTC)


def _registry(repo: str) -> str:
    first = repo.split("/", 1)[0]
    has_host = "/" in repo and ("." in first or ":" in first or first == "localhost")
    return first if has_host else "docker.io"


def _auth_config(auth_file: str | None, repo: str) -> dict[str, str] | None:
    """Credentials for *repo*'s registry from a containers-auth.json file.

    Raises:
        StageInError: the file cannot be read or is not valid auth JSON.
    """
    if auth_file is None:
        return None
    try:
        auths = json.loads(Path(auth_file).read_text(encoding="utf-8"))["auths"]
        entry = auths.get(_registry(repo)) or auths.get(f"https://{_registry(repo)}")
        if not entry:
            return None
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # binascii.Error (bad base64) is a ValueError.
        raise StageInError(f"auth file {cut(auth_file)}: unusable: {cut(e)}") from e
    return {"username": user, "password": password}


def _prepare_output(path: Path) -> None:
    """Make the (agent-created) output dir writable by the task's anonymous uid.

    Raises:
        LaunchError: not a directory, a symlink, or reachable by any host user.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise LaunchError(f"output dir {cut(path)}: {e.strerror}") from e
    try:
        # SECURITY: 0777 is safe only behind a parent closed to "other".
        closed = [p for p in path.parents if not os.stat(p).st_mode & stat.S_IXOTH]
        if not closed:
            raise LaunchError(
                f"output dir {cut(path)}: every parent is searchable by any user; "
                "close one (e.g. mode 0750, group of the podman user)"
            )
        os.fchmod(fd, 0o777)
    finally:
        os.close(fd)


def _security_options(settings: PodmanSettings) -> dict[str, Any]:
    """Map the profile's extra ``--security-opt`` values onto SpecGenerator fields.

    Raises:
        LaunchError: an unknown option, or one that would weaken the sandbox.
    """
    out: dict[str, Any] = {"selinux_opts": [], "mask": []}
    if settings.seccomp_profile is not None:
        out["seccomp_profile_path"] = settings.seccomp_profile
    for opt in settings.extra_security_opt:
        key, _, value = opt.partition("=")
        if key == "no-new-privileges" and value in ("", "true"):
            continue
        if key == "label" and value and value != "disable":
            out["selinux_opts"].append(value)
        elif key == "apparmor" and value and value != "unconfined":
            out["apparmor_profile"] = value
        elif key == "seccomp" and value.startswith("/"):
            out["seccomp_profile_path"] = value
        elif key == "mask" and value.startswith("/"):
            out["mask"] += value.split(":")
        else:
            # SECURITY: unconfined seccomp/apparmor, unmask, label=disable: never.
            raise LaunchError(f"podman: security option {cut(opt)!r} is not accepted")
    return out


class PodmanHandle:
    """A task's container: wait for it, cancel it, read its logs, remove it."""

    def __init__(
        self,
        url: str,
        container_id: str,
        task_id: TaskId,
        *,
        timeout_s: float,
        log_max_bytes: int,
        markers: Path,
        net: TaskNetwork | None = None,
    ) -> None:
        """Follow container *container_id* (use ``launch()``/``adopt()``)."""
        self.task_id = task_id
        self._net = net
        self.container_id = container_id
        self._url = url
        self._timeout_s = timeout_s
        self._log_max = log_max_bytes
        self._markers = markers
        self._outcome: Outcome | None = None
        self._log: bytes | None = None
        self._expired = False

    def _marker(self, kind: str) -> Path:
        return self._markers / f"{self.task_id}.{kind}"

    def _mark(self, kind: str) -> None:
        self._markers.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._marker(kind).touch()

    def _attrs(self) -> dict[str, Any] | None:
        return _on_container(
            self._url,
            self.container_id,
            f"inspect {self.task_id}",
            lambda c: dict(c.attrs),
            None,
        )

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """Wait up to *timeout_s* (forever if None); None while still running.

        Enforces the task's timeout (stop, then kill after the grace period).
        The ``Outcome`` is collected once; the container is then removed.

        Raises:
            LaunchError: podman could not be asked.
        """
        if self._outcome is not None:
            return self._outcome
        end = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.02
        while True:
            attrs = self._attrs()
            if attrs is None:
                return self._finish(None)
            state = attrs.get("State") or {}
            status = str(state.get("Status", ""))
            if status in _DONE or status in _NEVER_STARTED:
                return self._finish(attrs)
            started = _parse_time(state.get("StartedAt"))
            deadline = started + timedelta(seconds=self._timeout_s) if started else None
            if (
                deadline is not None
                and datetime.now(UTC) >= deadline
                and not self._expired
            ):
                self._expire()
                continue
            if end is not None and time.monotonic() >= end:
                return None
            left = math.inf if end is None else end - time.monotonic()
            time.sleep(max(0.0, min(pause, left)))
            pause = min(pause * 1.5, 0.25)

    def _expire(self) -> None:
        logger.info(
            "task %s: timeout of %gs reached, stopping", self.task_id, self._timeout_s
        )
        self._expired = True
        self._mark("timed_out")
        self._stop(_STOP_GRACE_S)

    def _stop(self, grace_s: float) -> None:
        _on_container(
            self._url,
            self.container_id,
            f"stop {self.task_id}",
            lambda c: c.stop(timeout=max(1, math.ceil(grace_s)), ignore=True),
            None,
        )

    def cancel(self, grace_s: float = 10.0) -> None:
        """Stop the container: SIGTERM, SIGKILL after *grace_s*; it ends ``cancelled``.

        Raises:
            LaunchError: podman could not be asked.
        """
        if self._outcome is not None:
            return
        self._mark("cancelled")
        self._stop(grace_s)

    def _read_log(self) -> tuple[bytes, bytes]:
        """(head up to log_max_bytes, tail up to 4 KiB) of the container's log."""

        def read(container: Any) -> tuple[bytes, bytes]:  # noqa: ANN401 (untyped podman-py)
            head = bytearray()
            tail: collections.deque[bytes] = collections.deque()
            kept = 0
            for chunk in container.logs(stream=True, follow=False):
                if not isinstance(chunk, bytes):
                    continue
                if len(head) < self._log_max:
                    head += chunk[: self._log_max - len(head)]
                tail.append(chunk)
                kept += len(chunk)
                while kept - len(tail[0]) >= _TAIL_BYTES:
                    kept -= len(tail.popleft())
            return bytes(head), b"".join(tail)[-_TAIL_BYTES:]

        return _on_container(
            self._url, self.container_id, f"logs of {self.task_id}", read, (b"", b"")
        )

    def logs(self) -> Iterator[bytes]:
        """stdout+stderr (interleaved), at most ``log_max_bytes``.

        Raises:
            LaunchError: podman could not be asked.
        """
        data = self._log if self._log is not None else self._read_log()[0]
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    def _finish(self, attrs: dict[str, Any] | None) -> Outcome:
        outcome = self._collect(attrs)
        if self._net is not None:
            # The task ended: its ports close now; the counts go in the outcome.
            traffic = self._net.close()
            self._net = None
            outcome = msgspec.structs.replace(outcome, traffic=traffic)
        self._outcome = outcome
        return outcome

    def _collect(self, attrs: dict[str, Any] | None) -> Outcome:
        now = datetime.now(UTC)
        if attrs is None:
            self._outcome = Outcome(
                state="failed",
                exit_code=None,
                started_at=now,
                finished_at=now,
                log_tail="",
                reason="the container disappeared",
            )
            self._log = b""
            self._drop_markers()
            return self._outcome
        state = attrs.get("State") or {}
        head, tail = self._read_log()
        started = _parse_time(state.get("StartedAt"))
        finished = _parse_time(state.get("FinishedAt")) or now
        code = state.get("ExitCode")
        result: _State
        exit_code = int(code) if isinstance(code, int) and started else None
        if self._marker("cancelled").exists():
            result, reason = "cancelled", "cancelled on request"
        elif self._marker("timed_out").exists() or (
            started is not None
            and exit_code != 0
            and (finished - started).total_seconds() >= self._timeout_s
        ):
            # (the second case: conmon's own timeout, while no agent waited)
            result, reason = "timed_out", f"timed out after {self._timeout_s:g}s"
        elif started is None:
            result, reason = "failed", "the container was created but never started"
        elif state.get("OOMKilled"):
            result, reason = "failed", "killed: out of memory"
        elif exit_code == 0:
            result, reason = "succeeded", ""
        else:
            result, reason = "failed", f"exit code {exit_code}"
        self._outcome = Outcome(
            state=result,
            exit_code=exit_code,
            started_at=started or finished,
            # podman stamps start and finish from different clocks' readings;
            # a task shorter than their skew must not end before it began.
            finished_at=max(finished, started or finished),
            log_tail=tail.decode("utf-8", errors="replace"),
            reason=reason,
        )
        self._log = head
        try:
            self.remove()
        except LaunchError as e:
            # The outcome stands; a leftover container is found again by adopt().
            logger.warning("task %s: container not removed: %s", self.task_id, e)
        return self._outcome

    def _drop_markers(self) -> None:
        for kind in ("cancelled", "timed_out"):
            self._marker(kind).unlink(missing_ok=True)

    def remove(self) -> None:
        """Remove the container (killing it if still running) and its markers.

        Raises:
            LaunchError: podman could not be asked.
        """
        _on_container(
            self._url,
            self.container_id,
            f"remove {self.task_id}",
            lambda c: c.remove(force=True, v=True),
            None,
        )
        self._drop_markers()


def _enforcement(
    version: str, memory: bool, cpu: bool, pids: bool
) -> tuple[tuple[str, str], ...]:
    """How podman enforces each limit here (femd doctor), never a per-process cap."""
    by = f"cgroup {version} (podman)"
    return (
        ("memory", by if memory else "none"),
        ("pids", by if pids else "RLIMIT_NPROC of the container's own uids"),
        ("cpus", by if cpu else "none"),
        ("outputs", "checked at stage-out (no quota during the run)"),
        ("time", "wall-clock timeout, kills the container"),
    )


class PodmanLauncher:
    """Runs tasks in rootless Podman containers through the service's socket."""

    name: ClassVar[str] = "podman"

    def __init__(
        self,
        profile: LauncherProfile,
        *,
        state_dir: Path,
        podman_socket: str | None,
        node: str | None = None,
        unsafe_unenforced_limits: Collection[str] = (),
    ) -> None:
        """Prepare (not connect); ``probe()`` reports what is missing.

        *unsafe_unenforced_limits* (``"memory"``, ``"cpu"``) lets ``launch()`` run a
        task whose limit this host cannot enforce. It is for the integration
        tests on hosts without cgroup delegation, is never set from any
        configuration, and every such launch logs a warning.

        Raises:
            RuntimeError: an unknown name in *unsafe_unenforced_limits* (a bug).
        """
        unknown = set(unsafe_unenforced_limits) - _UNSAFE_OK
        if unknown:
            raise RuntimeError(f"podman: cannot run without {sorted(unknown)} limits")
        self._profile = profile
        self._markers = state_dir
        self._node = node
        self._unsafe = frozenset(unsafe_unenforced_limits)
        sock = podman_socket or ""
        self._url = sock if "://" in sock or not sock else f"unix://{sock}"
        self._cgroup_pids = False
        self._cached: tuple[float, Capabilities] | None = None

    # -- what this host can do --------------------------------------------------
    def probe(self) -> Capabilities:
        """Ask the podman service what it can enforce (``info``).

        Podman's ``info`` takes ~0.3 s, and ``start()`` and ``launch()`` both
        probe, so an available result is reused for ``_PROBE_TTL_S`` (a reload
        builds a new launcher, hence probes afresh).
        """
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < _PROBE_TTL_S:
            return cached[1]
        caps = self._probe()
        self._cached = (time.monotonic(), caps) if caps.available else None
        return caps

    def _probe(self) -> Capabilities:
        problem = "no podman socket configured" if not self._url else None
        problem = problem or _socket_problem(self._url)
        if problem is not None:
            return Capabilities(
                launcher=self.name, available=False, problems=(problem,)
            )
        try:
            with _client(self._url) as client:
                info = client.info()  # type: ignore[no-untyped-call]
            host = info["host"]
            rootless = bool(host["security"]["rootless"])
            version = str(host.get("cgroupVersion", ""))
            controllers = set(host.get("cgroupControllers") or ())
            runtime = str((host.get("ociRuntime") or {}).get("name", ""))
        except _FOREIGN as e:
            return Capabilities(
                launcher=self.name,
                available=False,
                problems=(f"podman service {self._url}: {cut(e)}",),
            )
        problems: list[str] = []
        settings = self._profile.podman
        if settings is None:
            problems.append(f"profile {self._profile.name!r} has no podman section")
        elif runtime != settings.runtime:
            problems.append(
                f"OCI runtime is {runtime!r}, profile wants {settings.runtime!r}"
            )
        if not rootless:
            problems.append("the podman service runs as root; femd needs it rootless")
        available = not problems
        delegated = version == "v2"
        memory = delegated and "memory" in controllers
        cpu = delegated and "cpu" in controllers
        self._cgroup_pids = delegated and "pids" in controllers
        if not (memory and cpu):
            problems.append(
                f"rootless cgroup {version or '?'} without delegated "
                "memory/cpu controllers: podman would ignore those limits"
            )
        net = self._probe_network()
        if net is not None:
            problems.append(f"egress and ingress: {net}")
        notes = [
            "pids: RLIMIT_NPROC of the task uid in its user namespace"
            + (" and the cgroup pids controller" if self._cgroup_pids else "")
        ]
        return Capabilities(
            launcher=self.name,
            available=available,
            problems=tuple(problems),
            memory_limit=memory,
            cpu_limit=cpu,
            pids_limit=available,
            egress=net is None,
            egress_filtered=net is None,
            ingress=net is None,
            notes=(
                *notes,
                "network: none; femd forwards allowed egress and ingress (TCP only)",
            ),
            enforcement=_enforcement(version, memory, cpu, self._cgroup_pids),
        )

    def _probe_network(self) -> str | None:
        """Why femd cannot forward a container's network here, or None."""
        if not self._profile.network.enabled:
            return f"profile {self._profile.name!r} gives tasks no network"
        if os.geteuid() != 0:
            # A rootless container's namespaces belong to the podman user's
            # user namespace: only root may join them from outside.
            return (
                "joining a rootless container's network namespace needs femd "
                f"to run as root (it runs as uid {os.geteuid()})"
            )
        return probe_join(None)

    # -- stage-in -----------------------------------------------------------------
    def ensure_image(self, ref: str, settings: PodmanSettings | None = None) -> str:
        """Make the image pinned by *ref* present locally; return its image id.

        Uses the local image if podman has one with that digest, else pulls
        ``repo@digest`` (credentials from the ``auth_file`` of *settings*, the
        task's profile; this launcher's profile by default), then checks the
        digest of what podman stored.

        Raises:
            ImageDigestMismatchError: *ref* is unpinned or the digest differs.
            StageInError: the pull failed or the signature policy cannot be
                verified.
        """
        repo, _ = _parse_ref(ref)
        settings = settings or self._profile.podman or PodmanSettings()
        try:
            with _client(self._url) as client:
                try:
                    image = client.images.get(ref)
                except ImageNotFound:
                    self._check_signature_policy(client, settings)
                    logger.info("pulling %s", ref)
                    auth = _auth_config(settings.auth_file, repo)
                    client.images.pull(ref, auth_config=auth, policy="always")
                    image = client.images.get(ref)
                attrs = dict(image.attrs)
        except _FOREIGN as e:
            raise StageInError(
                f"image {cut(ref)}: cannot stage in: {cut(e, 160)}"
            ) from e
        verify_image_digest(attrs, ref)
        return str(attrs["Id"])

    def _check_signature_policy(
        self, client: PodmanClient, settings: PodmanSettings
    ) -> None:
        """Refuse to pull unless the service applies the profile's policy.json.

        The libpod pull endpoint takes no policy path: the service applies its
        user's ``~/.config/containers/policy.json``, else
        ``/etc/containers/policy.json``. So the profile's file must have the
        same bytes as that one.

        Raises:
            StageInError: the files differ or cannot be read.
        """
        if settings.signature_policy is None:
            return
        try:
            want = Path(settings.signature_policy).read_bytes()
            info = client.info()  # type: ignore[no-untyped-call]
            uid = int(info["host"]["idMappings"]["uidmap"][0]["host_id"])
            own = Path(pwd.getpwuid(uid).pw_dir) / ".config/containers/policy.json"
            used = own if own.exists() else Path("/etc/containers/policy.json")
            same = used.read_bytes() == want
        except _FOREIGN as e:
            raise StageInError(f"signature policy: cannot verify: {cut(e)}") from e
        if not same:
            raise StageInError(
                f"signature policy: the podman service uses {used}, not "
                f"{settings.signature_policy}; install it there before pulling"
            )

    # -- running ------------------------------------------------------------------
    def _refusals(self, spec: LaunchSpec, caps: Capabilities) -> list[str]:
        out = (
            []
            if caps.available
            else [f"podman unavailable: {'; '.join(caps.problems)}"]
        )
        if not caps.memory_limit and "memory" not in self._unsafe:
            out.append(f"memory limit of {spec.limits.memory_mb} MB cannot be enforced")
        if not caps.cpu_limit and "cpu" not in self._unsafe:
            out.append(f"cpu limit of {spec.limits.cpus:g} cpus cannot be enforced")
        if not caps.pids_limit:
            out.append(f"pids limit of {spec.limits.pids} cannot be enforced")
        if spec.egress and not caps.egress:
            out.append("network egress cannot be enforced by podman here")
        if spec.listen and not caps.ingress:
            out.append("listening ports cannot be enforced by podman here")
        return out

    def launch(self, spec: LaunchSpec) -> PodmanHandle:
        """Create and start the task's container.

        Raises:
            UnenforceableError: a limit of *spec* cannot be enforced (nothing ran).
            LaunchError: bad spec, image not stageable, or podman failed.
        """
        settings = spec.profile.podman
        if spec.launcher != self.name or settings is None or spec.image is None:
            raise LaunchError(
                f"podman: task {spec.task_id}: not a podman task "
                "(launcher, profile podman section and image needed)"
            )
        caps = self.probe()
        # SECURITY: fail closed even when the caller skipped unenforceable().
        refusals = self._refusals(spec, caps)
        if refusals:
            raise UnenforceableError(f"task {spec.task_id}: " + "; ".join(refusals))
        unenforced = {"memory": not caps.memory_limit, "cpu": not caps.cpu_limit}
        for kind in sorted(k for k in self._unsafe if unenforced[k]):
            logger.warning(
                "task %s: runs WITHOUT an enforced %s limit (unsafe mode)",
                spec.task_id,
                kind,
            )
        try:
            image_id = self.ensure_image(spec.image, settings)
        except StageInError as e:
            raise LaunchError(str(e)) from e
        body = self._container_spec(spec, settings, caps, image_id)
        _prepare_output(Path(spec.output_dir))
        net = TaskNetwork(spec, spec.profile.network) if spec.network else None
        for source, target in net.prepare() if net else ():
            # femd's /etc/hosts, resolv.conf, nsswitch.conf (docs/network.md)
            body["mounts"].append(
                {"destination": target, "type": "bind", "source": source,
                 "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}
            )  # fmt: skip
        try:
            cid = self._create_and_start(spec, body, net)
        except LaunchError:
            if net is not None:
                net.close()
            raise
        logger.info("task %s: container %s started", spec.task_id, cid[:12])
        return PodmanHandle(
            self._url,
            cid,
            spec.task_id,
            timeout_s=spec.limits.timeout_s,
            log_max_bytes=spec.log_max_bytes,
            markers=self._markers,
            net=net,
        )

    def _create_and_start(
        self, spec: LaunchSpec, body: dict[str, Any], net: TaskNetwork | None
    ) -> str:
        """Create the container; forward its network (if any); start it.

        Raises:
            LaunchError: podman or the network helper failed (nothing runs).
        """
        with _client(self._url) as client:
            reply = _api(
                f"create {spec.task_id}",
                lambda: client.api.post(
                    "/containers/create",
                    data=json.dumps(body),
                    headers={"content-type": "application/json"},
                ),
            )
            if reply.status_code != 201:
                text = reply.text.strip()
                hint = (
                    " (the podman user needs search permission on every parent "
                    "of the output dir and the inputs)"
                    if "permission denied" in text
                    else ""
                )
                raise LaunchError(
                    f"podman: create {spec.task_id}: {cut(text, 200)}{hint}"
                )
            cid = str(reply.json()["Id"])
            try:
                if net is not None:
                    # Namespaces exist, the command waits: attach, then start.
                    container = _api("init", lambda: client.containers.get(cid))
                    _api(f"init {spec.task_id}", container.init)
                    container.reload()
                    net.attach_pid(int(container.attrs["State"]["Pid"]))
                _api(
                    f"start {spec.task_id}", lambda: client.containers.get(cid).start()
                )
            except LaunchError:
                _api(
                    f"remove {spec.task_id}",
                    lambda: client.containers.get(cid).remove(force=True),
                )
                raise
        return cid

    def _container_spec(
        self,
        spec: LaunchSpec,
        settings: PodmanSettings,
        caps: Capabilities,
        image_id: str,
    ) -> dict[str, Any]:
        """The libpod SpecGenerator for *spec* (what ``podman create`` would send).

        Raises:
            LaunchError: a mount or security option the sandbox cannot accept.
        """
        mounts: list[dict[str, Any]] = [
            {
                "destination": _TMP,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [
                    "rw",
                    "nosuid",
                    "nodev",
                    "noexec",
                    "mode=1777",
                    f"size={settings.tmp_size_mb}m",
                ],
            },
            {
                "destination": spec.output_target,
                "type": "bind",
                "source": spec.output_dir,
                "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
            },
        ]
        if spec.output_target in ("/", _TMP) or any(
            spec.output_target == r or spec.output_target.startswith(r + "/")
            for r in _RESERVED
        ):
            raise LaunchError(
                f"podman: output target {cut(spec.output_target)} is reserved"
            )
        taken = {"/", _TMP, spec.output_target}
        for m in spec.mounts:
            reserved = any(
                m.target == r or m.target.startswith(r + "/") for r in _RESERVED
            )
            if not m.read_only or m.target in taken or reserved:
                raise LaunchError(
                    f"podman: task {spec.task_id}: mount "
                    f"{cut(m.target)} must be read-only, unique, and "
                    "outside /proc /sys /dev /run /etc"
                )
            if not os.path.isabs(m.source) or not os.path.exists(m.source):
                raise LaunchError(f"podman: mount source {cut(m.source)} is missing")
            taken.add(m.target)
            mounts.append(
                {
                    "destination": m.target,
                    "type": "bind",
                    "source": m.source,
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                }
            )
        userns = {"nsmode": settings.userns}
        # The CLI turns `--userns=auto` into both fields; the REST API needs both.
        idmappings = (
            {"AutoUserNs": True, "AutoUserNsOpts": {"Size": _AUTO_USERNS_SIZE}}
            if settings.userns == "auto"
            else None
        )
        limits: dict[str, Any] = {}
        if caps.memory_limit:
            size = spec.limits.memory_mb << 20
            limits["memory"] = {"limit": size, "swap": size}
        if caps.cpu_limit:
            limits["cpu"] = {"period": 100000, "quota": int(spec.limits.cpus * 100000)}
        if self._cgroup_pids:
            limits["pids"] = {"limit": spec.limits.pids}
        labels = {
            LABEL_TASK: spec.task_id,
            _LABEL_TIMEOUT: str(spec.limits.timeout_s),
            _LABEL_LOG_MAX: str(spec.log_max_bytes),
            "femd.profile": spec.profile.name,
        }
        if self._node:
            labels[_LABEL_NODE] = self._node
        body: dict[str, Any] = {
            "name": f"femd-{spec.task_id}",
            "image": image_id,
            "raw_image_name": spec.image,
            "entrypoint": [],
            "command": list(spec.argv),
            "env": dict(spec.env),
            "env_host": False,
            "httpproxy": False,
            "labels": labels,
            "hostname": "femd-task",
            "user": TASK_USER,
            "userns": userns,
            **({"idmappings": idmappings} if idmappings else {}),
            "netns": {"nsmode": "none"},
            "read_only_filesystem": settings.read_only,
            "read_write_tmpfs": False,
            "privileged": False,
            "cap_drop": ["ALL"],
            "no_new_privileges": True,
            "devices": [],
            "init": True,
            "systemd": "false",
            "oci_runtime": settings.runtime,
            "mounts": mounts,
            "image_volume_mode": "ignore",
            "use_image_hosts": True,
            "use_image_resolve_conf": True,
            "umask": "0022",
            "stop_timeout": _STOP_GRACE_S,
            # SECURITY: conmon kills the task even if no agent is there to wait().
            "timeout": spec.limits.timeout_s + _STOP_GRACE_S + _CONMON_SLACK_S,
            "resource_limits": limits,
            "r_limits": [
                {"type": "nproc", "soft": spec.limits.pids, "hard": spec.limits.pids},
                {"type": "core", "soft": 0, "hard": 0},
            ],
            "log_configuration": {
                "driver": "k8s-file",
                "size": max(2 * spec.log_max_bytes, 1 << 20),
            },
            **_security_options(settings),
        }
        if spec.workdir:
            body["work_dir"] = spec.workdir
        return body

    def adopt(self, task_id: TaskId) -> PodmanHandle | None:
        """Find the container of *task_id* (running or exited) by its label.

        Raises:
            LaunchError: podman could not be asked.
        """
        # podman-py: a list of "key=value" strings (a dict takes one value per key).
        labels = [f"label={LABEL_TASK}={task_id}"]
        if self._node:
            labels.append(f"label={_LABEL_NODE}={self._node}")
        with _client(self._url) as client:
            found = _api(
                f"list {task_id}",
                lambda: client.containers.list(all=True, filters=labels),
            )
            if not found:
                return None
            attrs = dict(found[0].attrs)
            cid = str(attrs.get("Id") or found[0].id)
            full = _api(
                f"inspect {task_id}", lambda: dict(client.containers.get(cid).attrs)
            )
        config_labels = (full.get("Config") or {}).get("Labels") or {}
        try:
            timeout_s = float(config_labels[_LABEL_TIMEOUT])
            log_max = int(config_labels.get(_LABEL_LOG_MAX, 1 << 20))
        except (KeyError, ValueError) as e:
            raise LaunchError(
                f"podman: container of {task_id} lacks femd labels"
            ) from e
        logger.info("task %s: adopted container %s", task_id, cid[:12])
        return PodmanHandle(
            self._url,
            cid,
            task_id,
            timeout_s=timeout_s,
            log_max_bytes=log_max,
            markers=self._markers,
        )
