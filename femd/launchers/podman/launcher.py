"""``PodmanLauncher``: probe what the podman service enforces, launch, adopt.

Owns the launcher of the ``podman`` back-end (see the package docstring for
the sandbox): ``probe()`` asks the service (``info``), ``launch()`` re-checks
the limits (fail closed), stages the image, creates the container, forwards
its network if any, and starts it; ``adopt()`` finds a container again by its
``femd.task`` label after an agent restart and checks it against femd's
launch record (``record``). ``TrialPodmanLauncher`` is
``femd doctor``'s, for its trivial task.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec

from femd.errors import LaunchError, StageInError, cut
from femd.launchers import (
    Capabilities,
    LauncherEnv,
    LaunchSpec,
    refuse_unenforceable,
)
from femd.launchers.netns import probe_join
from femd.launchers.network import TaskNetwork
from femd.launchers.podman.client import (
    FOREIGN,
    call,
    connect,
    service_url,
    socket_problem,
)
from femd.launchers.podman.container import LABEL_TASK, container_spec
from femd.launchers.podman.handle import PodmanHandle
from femd.launchers.podman.image import ensure_image
from femd.launchers.podman.outputs import OutputStream, helper_problem
from femd.launchers.podman.record import LaunchRecord
from femd.launchers.profile import LauncherProfile, PodmanSettings
from femd.model import TaskId

__all__ = ["PodmanLauncher", "TrialPodmanLauncher"]

logger = logging.getLogger(__name__)

_PROBE_TTL_S: Final = 30.0


def _enforcement(
    version: str, memory: bool, cpu: bool, pids: bool
) -> tuple[tuple[str, str], ...]:
    """How podman enforces each limit here (femd doctor), never a per-process cap."""
    by = f"cgroup {version} (podman)"
    charged = " (charged to its memory)" if memory else ""
    return (
        ("memory", by if memory else "none"),
        ("pids", by if pids else "RLIMIT_NPROC of the container's own uids"),
        ("cpus", by if cpu else "none"),
        ("outputs", f"tmpfs of the cap in the container{charged}, streamed out"),
        ("time", "wall-clock timeout, kills the container"),
    )


class PodmanLauncher:
    """Runs tasks in rootless Podman containers through the service's socket."""

    name: ClassVar[str] = "podman"

    def __init__(self, profile: LauncherProfile, env: LauncherEnv) -> None:
        """Prepare (not connect); ``probe()`` reports what is missing.

        ``env.state_dir``: where the launcher keeps its records and markers;
        ``env.config``: the ``podman`` section of femd.yaml (its ``socket``).
        """
        self._profile = profile
        self._markers = env.state_dir
        self._url = service_url(str(getattr(env.config, "socket", None) or ""))
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
        problem = problem or socket_problem(self._url)
        if problem is not None:
            return Capabilities(
                launcher=self.name, available=False, problems=(problem,)
            )
        try:
            with connect(self._url) as client:
                info = client.info()  # type: ignore[no-untyped-call]
            host = info["host"]
            rootless = bool(host["security"]["rootless"])
            version = str(host.get("cgroupVersion", ""))
            controllers = set(host.get("cgroupControllers") or ())
            runtime = str((host.get("ociRuntime") or {}).get("name", ""))
        except FOREIGN as e:
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
        helper = helper_problem()
        if helper is not None:
            problems.append(helper)
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
            + (" and the cgroup pids controller" if self._cgroup_pids else ""),
            "outputs: a tmpfs of the output cap in the container"
            + (", charged to its memory" if memory else "")
            + "; femd's step (static busybox) streams it out",
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

        *settings*: the task's profile's (this launcher's profile by default);
        see ``image.ensure_image``.

        Raises:
            ImageDigestMismatchError: *ref* is unpinned or the digest differs.
            StageInError: the pull failed or the signature policy cannot be
                verified.
        """
        chosen = settings or self._profile.podman or PodmanSettings()
        return ensure_image(self._url, ref, chosen)

    # -- running ------------------------------------------------------------------
    def launch(self, spec: LaunchSpec) -> PodmanHandle:
        """Create and start the task's container.

        Raises:
            UnenforceableError: a limit of *spec* cannot be enforced (nothing ran).
            LaunchError: bad spec, image not stageable, or podman failed.
        """
        caps = self.probe()
        # SECURITY: fail closed even when the caller skipped unenforceable().
        refuse_unenforceable(spec, caps)
        return self._start(spec, caps)

    def _start(self, spec: LaunchSpec, caps: Capabilities) -> PodmanHandle:
        """Stage the image, create and start the container under *caps*.

        Raises:
            LaunchError: bad spec, image not stageable, or podman failed.
        """
        settings = spec.profile.podman
        if spec.launcher != self.name or settings is None or spec.image is None:
            raise LaunchError(
                f"podman: task {spec.task_id}: not a podman task "
                "(launcher, profile podman section and image needed)"
            )
        try:
            image_id = self.ensure_image(spec.image, settings)
        except StageInError as e:
            raise LaunchError(str(e)) from e
        stream = OutputStream.create(Path(spec.output_dir), spec.output_max_bytes)
        net: TaskNetwork | None = None
        try:
            body = container_spec(
                spec,
                settings,
                caps,
                image_id,
                stream=stream.path,
                cgroup_pids=self._cgroup_pids,
            )
            net = TaskNetwork(spec, spec.profile.network) if spec.network else None
            for source, target in net.prepare() if net else ():
                # femd's /etc/hosts, resolv.conf, nsswitch.conf (docs/network.md)
                body["mounts"].append(
                    {"destination": target, "type": "bind", "source": source,
                     "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}
                )  # fmt: skip
            # SECURITY: femd's own record of what it launched, before the
            # container exists: after a restart adopt() trusts it, not labels.
            record = LaunchRecord.of(spec)
            record.save(self._markers, spec.task_id)
            cid = self._create_and_start(spec, body, net, record)
        except LaunchError:
            stream.close()
            if net is not None:
                net.close()
            LaunchRecord.drop(self._markers, spec.task_id)
            raise
        logger.info("task %s: container %s started", spec.task_id, cid[:12])
        return PodmanHandle(
            self._url,
            cid,
            spec.task_id,
            timeout_s=spec.limits.timeout_s,
            log_max_bytes=spec.log_max_bytes,
            markers=self._markers,
            stream=stream,
            net=net,
        )

    def _create_and_start(
        self,
        spec: LaunchSpec,
        body: dict[str, Any],
        net: TaskNetwork | None,
        record: LaunchRecord,
    ) -> str:
        """Create the container, record its id; forward its network (if any); start it.

        Raises:
            LaunchError: podman or the network helper failed (nothing runs).
        """
        with connect(self._url) as client:
            reply = call(
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
                msgspec.structs.replace(record, container_id=cid).save(
                    self._markers, spec.task_id
                )
                if net is not None:
                    # Namespaces exist, the command waits: attach, then start.
                    container = call("init", lambda: client.containers.get(cid))
                    call(f"init {spec.task_id}", container.init)
                    container.reload()
                    net.attach_pid(int(container.attrs["State"]["Pid"]))
                call(
                    f"start {spec.task_id}", lambda: client.containers.get(cid).start()
                )
            except LaunchError:
                call(
                    f"remove {spec.task_id}",
                    lambda: client.containers.get(cid).remove(force=True),
                )
                raise
        return cid

    def adopt(self, task_id: TaskId) -> PodmanHandle | None:
        """Find the container of *task_id* (running or exited) by its label.

        Only a container femd recorded launching is adopted, and its output
        dir, output cap, timeout and log cap are femd's record's: the labels
        (which the podman account could have written) must agree with it.

        Raises:
            LaunchError: podman could not be asked, or the container is
                refused (no launch record, or it disagrees with it).
        """
        # podman-py: a list of "key=value" strings (a dict takes one value per key).
        labels = [f"label={LABEL_TASK}={task_id}"]
        with connect(self._url) as client:
            found = call(
                f"list {task_id}",
                lambda: client.containers.list(all=True, filters=labels),
            )
            if not found:
                LaunchRecord.drop(self._markers, task_id)
                return None
            if len(found) > 1:
                raise LaunchError(
                    f"podman: {len(found)} containers claim task {task_id}: refused"
                )
            attrs = dict(found[0].attrs)
            cid = str(attrs.get("Id") or found[0].id)
            full = call(
                f"inspect {task_id}", lambda: dict(client.containers.get(cid).attrs)
            )
        record = LaunchRecord.load(self._markers, task_id)
        if record is None:
            raise LaunchError(
                f"podman: container {cid[:12]} claims task {task_id}, which femd "
                "has no launch record of: refused"
            )
        record.check(task_id, cid, (full.get("Config") or {}).get("Labels") or {})
        try:
            # The step still waits to send its outputs, or is sending them.
            stream: OutputStream | None = OutputStream(
                Path(record.output_dir), record.output_max_bytes
            )
        except LaunchError as e:
            logger.warning("task %s: outputs cannot be collected: %s", task_id, e)
            stream = None
        logger.info("task %s: adopted container %s", task_id, cid[:12])
        return PodmanHandle(
            self._url,
            cid,
            task_id,
            timeout_s=record.timeout_s,
            log_max_bytes=record.log_max_bytes,
            markers=self._markers,
            stream=stream,
        )


class TrialPodmanLauncher(PodmanLauncher):
    """``femd doctor``'s launcher for its trivial task (never for a task).

    On a host where podman cannot enforce memory or cpu limits (rootless
    cgroup v1), the doctor's trivial task (``catatonit -V``) still runs, to
    prove the runtime works, without those two limits: each such launch logs a
    warning. Every other limit is checked as ``launch()`` does; the probe still
    reports the missing limits, so the agent refuses every real task.
    """

    def launch(self, spec: LaunchSpec) -> PodmanHandle:
        """Start *spec* without the memory and cpu limits this host lacks.

        Raises:
            UnenforceableError: another limit cannot be enforced (nothing ran).
            LaunchError: bad spec, image not stageable, or podman failed.
        """
        caps = self.probe()
        waived = {"memory": not caps.memory_limit, "cpu": not caps.cpu_limit}
        relaxed = msgspec.structs.replace(caps, memory_limit=True, cpu_limit=True)
        refuse_unenforceable(spec, relaxed)
        for kind in sorted(k for k, missing in waived.items() if missing):
            logger.warning(
                "task %s: runs WITHOUT an enforced %s limit (trial)",
                spec.task_id,
                kind,
            )
        return self._start(spec, caps)
