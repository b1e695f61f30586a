"""The launcher interface: what every sandbox back-end takes and returns.

Owns the ``Launcher`` and ``Handle`` Protocols, the ``LaunchSpec`` a back-end
receives (site settings already merged, host paths resolved), ``Capabilities``
(what a host can enforce), ``Outcome``, ``unenforceable()`` (pure) and
``start()``, the one place where a back-end's foreign errors become
``LaunchError``. Re-exports the closed registry (``registry.LAUNCHERS``).

Holds no back-end code: ``process`` (bubblewrap), ``podman`` and ``slurm`` do. Does not
build a ``LaunchSpec`` from a task (the agent does, from Task + profile +
policy). DESIGN "Launchers": a limit the host cannot enforce refuses the task.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from math import isclose
from typing import Annotated, ClassVar, Literal, Protocol

from msgspec import Meta

from femd.decision import Reason, Rule
from femd.errors import FemdError, LaunchError, UnenforceableError, cut
from femd.launchers.profile import (
    LauncherProfile,
    PodmanSettings,
    ProcessSettings,
    load_profile,
    load_profiles,
    new_profile,
    profile_type,
)
from femd.model import AbsPath, LauncherName, Strict, TaskId
from femd.usage import Accounting, Traffic, Usage

__all__ = [
    "LAUNCHERS",
    "Accounting",
    "Capabilities",
    "Handle",
    "LaunchSpec",
    "Launcher",
    "LauncherEnv",
    "LauncherFactory",
    "LauncherProfile",
    "Limits",
    "Mount",
    "Outcome",
    "PodmanSettings",
    "ProcessSettings",
    "Registration",
    "Traffic",
    "Trial",
    "Usage",
    "build",
    "build_all",
    "environment",
    "load_profile",
    "load_profiles",
    "new_profile",
    "probe",
    "profile_type",
    "refuse_unenforceable",
    "registration",
    "start",
    "unenforceable",
]


class Mount(Strict, frozen=True, kw_only=True):
    """A host path made visible in the sandbox (inputs and code: read-only)."""

    source: str
    target: AbsPath
    read_only: bool = True


class Limits(Strict, frozen=True, kw_only=True):
    """Resource limits of one task, after the policy's maxima were applied."""

    cpus: Annotated[float, Meta(gt=0)]
    memory_mb: Annotated[int, Meta(ge=1)]
    timeout_s: Annotated[int, Meta(ge=1)]
    pids: Annotated[int, Meta(ge=1)]


class LaunchSpec(Strict, frozen=True, kw_only=True):
    """Everything a launcher needs to run one admitted task; built by the agent.

    ``egress``: ``None`` (or empty) means no outbound network; otherwise the
    allowed ``host:port`` list. ``listen``: ports the task listens on inside
    its sandbox, exposed on the same host ports to ``ingress_peers`` (CIDRs,
    addresses or host names). ``output_dir`` is a host directory the agent created
    empty; it is the only writable place that survives the task.
    """

    task_id: TaskId
    launcher: LauncherName
    profile: LauncherProfile
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    image: str | None = None
    mounts: tuple[Mount, ...] = ()
    workdir: str | None = None
    output_dir: str
    output_target: AbsPath = "/out"
    limits: Limits
    egress: tuple[str, ...] | None = None
    listen: tuple[int, ...] = ()
    ingress_peers: tuple[str, ...] = ()
    log_max_bytes: Annotated[int, Meta(ge=0)] = 1 << 20
    output_max_bytes: Annotated[int, Meta(ge=0)] = 1 << 20

    @property
    def network(self) -> bool:
        """Whether the task asks for any network (egress or listening ports)."""
        return bool(self.egress or self.listen)


class Capabilities(Strict, frozen=True, kw_only=True):
    """What one launcher can enforce on this host, found by ``probe()``.

    ``egress``: the launcher can give a task connections to the destinations
    it lists, and only those (``egress_filtered`` says the same; kept for
    readers of older ``doctor --json``). ``ingress``: it can expose a task's
    listening ports to allowed peers only.
    ``min_cpus``: the smallest ``cpus`` limit it can enforce (e.g. 1.0 when
    cpus are whole cores). ``problems``: why something is missing; ``notes``:
    how limits are enforced, where that differs from a cgroup limit.
    """

    launcher: str
    available: bool
    problems: tuple[str, ...] = ()
    memory_limit: bool = False
    cpu_limit: bool = False
    pids_limit: bool = False
    egress: bool = False
    egress_filtered: bool = False
    ingress: bool = False
    min_cpus: float = 0.0
    notes: tuple[str, ...] = ()
    enforcement: tuple[tuple[str, str], ...] = ()


class Outcome(Strict, frozen=True, kw_only=True):
    """How a task ended. ``log_tail`` is the last few KiB of stdout+stderr.

    ``rule``: the rule id to report when a limit ended it (e.g.
    ``outputs.exceeded``); ``usage``: what it used, when measured.
    ``traffic``: what femd forwarded for the task, per destination.
    """

    state: Literal["succeeded", "failed", "timed_out", "cancelled"]
    exit_code: int | None
    started_at: datetime
    finished_at: datetime
    log_tail: str
    reason: str = ""
    rule: str = ""
    usage: Usage | None = None
    accounting: Accounting | None = None
    traffic: tuple[Traffic, ...] = ()


class Handle(Protocol):
    """A running (or finished) task in some sandbox."""

    task_id: TaskId

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """Wait up to *timeout_s* (forever if None); None while still running."""
        ...

    def cancel(self, grace_s: float = 10.0) -> None:
        """Ask the task to stop (SIGTERM), kill it after *grace_s*."""
        ...

    def logs(self) -> Iterator[bytes]:
        """The captured stdout+stderr, in chunks (bounded by ``log_max_bytes``)."""
        ...


class Launcher(Protocol):
    """Runs admitted tasks in one kind of sandbox. Never sees the raw manifest."""

    name: ClassVar[str]

    def probe(self) -> Capabilities:
        """What this host can enforce; at start and reload."""
        ...

    def launch(self, spec: LaunchSpec) -> Handle:
        """Start *spec*; raises ``LaunchError`` only (``start()`` wraps others)."""
        ...

    def adopt(self, task_id: TaskId) -> Handle | None:
        """Find a task that survived an agent restart, or None."""
        ...


def _refuse(what: str, who: str | None = None) -> Reason:
    message = what if who is None else f"{what} cannot be enforced by {who}"
    return Reason(Rule.LAUNCHER_UNENFORCEABLE, message)


def unenforceable(spec: LaunchSpec, caps: Capabilities) -> list[Reason]:
    """Every limit of *spec* that *caps* says this host cannot enforce.

    Pure. Every task carries cpus, memory, pids and a timeout, so each missing
    capability refuses every task (DESIGN "Launchers": fail closed).

    Raises:
        RuntimeError: *caps* describe another launcher than *spec* names (a bug).
    """
    if caps.launcher != spec.launcher:
        raise RuntimeError(f"capabilities of {caps.launcher} used for {spec.launcher}")
    who = f"{spec.launcher} on this host"
    if not caps.available:
        problems = cut("; ".join(caps.problems), 300, keep_end=True)
        text = (
            f"launcher {spec.launcher} is not available on this host:"
            f" {problems or 'unknown reason'}"
        )
        return [_refuse(text)]

    def why(word: str) -> str:
        # Only the problems that speak of this limit, not every problem found.
        found = [p for p in caps.problems if word in p.lower()]
        return f"{who}: {cut('; '.join(found), 160)}" if found else who

    limits = spec.limits
    reasons: list[Reason] = []
    if not caps.memory_limit:
        reasons.append(_refuse(f"memory limit of {limits.memory_mb} MB", why("memory")))
    if not caps.cpu_limit:
        reasons.append(_refuse(f"cpu limit of {limits.cpus:g} cpus", why("cpu")))
    elif limits.cpus < caps.min_cpus and not isclose(limits.cpus, caps.min_cpus):
        smallest = f"{who}: the smallest is {caps.min_cpus:g}"
        reasons.append(_refuse(f"cpu limit of {limits.cpus:g} cpus", smallest))
    if not caps.pids_limit:
        reasons.append(_refuse(f"pids limit of {limits.pids}", why("pid")))
    if spec.egress and not caps.egress:
        what = f"network egress to [{cut(', '.join(spec.egress), 120)}]"
        reasons.append(_refuse(what, why("egress")))
    if spec.listen and not caps.ingress:
        ports = ", ".join(str(p) for p in spec.listen)
        reasons.append(_refuse(f"listening on ports [{ports}]", why("ingress")))
    return reasons


def refuse_unenforceable(spec: LaunchSpec, caps: Capabilities) -> None:
    """Raise if *caps* cannot enforce *spec* (``unenforceable()``'s reasons).

    What ``start()`` and a back-end's own ``launch()`` both check.

    Raises:
        UnenforceableError: every reason, on one line.
    """
    reasons = unenforceable(spec, caps)
    if reasons:
        raise UnenforceableError(
            f"task {spec.task_id}: " + "; ".join(r.message for r in reasons)
        )


def start(launcher: Launcher, spec: LaunchSpec) -> Handle:
    """Check *spec* against *launcher*'s capabilities, then launch it.

    The one place where a back-end's foreign error becomes ``LaunchError``
    (like TUF's ``fetch()``).

    Raises:
        UnenforceableError: a limit cannot be enforced here (fail closed).
        LaunchError: the back-end failed, for whatever reason.
    """
    # SECURITY: fail closed even if the caller skipped its own check.
    refuse_unenforceable(spec, launcher.probe())
    try:
        return launcher.launch(spec)
    except FemdError:
        raise
    except Exception as e:
        raise LaunchError(
            f"{launcher.name}: cannot start task {spec.task_id}: "
            f"{type(e).__name__}: {cut(e)}"
        ) from e


# The registry needs the types above; it is part of this package's interface.
from femd.launchers.registry import (  # noqa: E402
    LAUNCHERS,
    LauncherEnv,
    LauncherFactory,
    Registration,
    Trial,
    build,
    build_all,
    environment,
    probe,
    registration,
)
