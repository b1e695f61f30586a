"""The ``podman`` launcher: a task in a rootless Podman container, via podman-py.

Re-exports ``PodmanLauncher`` (``launcher``: probe, launch, adopt) and
``PodmanHandle`` (``handle``: wait, cancel, logs, remove); ``container`` builds
the container's spec, ``outputs`` its output quota, ``image`` stages images in
by digest and ``client`` is the one boundary to podman-py. Talks only to the
REST socket of a ``podman system service`` run by a dedicated unprivileged
user; never shells out and never runs a container as root. Does not decide
whether a task may run (``decision``) nor whether its limits are enforceable
(``unenforceable()``); it re-checks the latter before it starts anything (fail
closed).

The container (DESIGN "Launchers"): image by verified digest (created from the
image *id*), argv as given (entrypoint cleared), env only from the spec (plus
the image's own ``ENV`` and Podman's ``PATH``/``HOSTNAME``/``container``), no
network namespace peers (``none``), read-only root, ``cap-drop=ALL``,
``no-new-privileges``, Podman's default seccomp filter (or the profile's), a user
namespace (profile ``userns``; ``auto`` gives each container its own 65536
subordinate ids), the task process as uid/gid 65534 inside, an init (catatonit)
as PID 1, sized ``noexec`` tmpfs on ``/tmp`` and on the output directory,
inputs bound read-only, no writable bind but the output stream's FIFO, no
devices, host ``/etc/hosts`` and ``resolv.conf`` not copied in, image
``VOLUME``s ignored, ``k8s-file`` logs of a bounded size, labels
``femd.task=<id>`` (+ ``femd.timeout_s``, ``femd.log_max_bytes``,
``femd.output_dir``, ``femd.output_max_bytes``), which a restarted agent
finds containers by but never trusts: ``record`` is femd's own launch record,
and adoption refuses a container that disagrees with it.

Limits: the pids limit is ``RLIMIT_NPROC`` of the task uid inside its user
namespace (plus the cgroup ``pids.max`` where Podman can set it). Memory and cpu
limits need a cgroup controller delegated to the podman user (cgroup v2); on
rootless cgroup v1 Podman silently ignores them, so ``probe()`` reports them
unenforceable and ``launch()`` refuses. Network: containers get ``none``; what
the policy allows is forwarded by femd (``network.TaskNetwork``), attached
between ``init`` and ``start``, which needs femd to run as root (joining the
rootless container's namespaces from outside); otherwise it is unenforceable.

Output directory (``outputs``): a tmpfs of the output cap in the container,
so it never holds more; the container's command is femd's output step (the
host's static busybox), which runs the task and then streams the tmpfs through
a FIFO beside the host output dir; femd writes the files there itself. The
FIFO is writable by any uid (the task's is an anonymous subordinate one), so
the launcher refuses unless some parent directory is closed to "other".

Lifecycle: a ``wait()`` that returns an ``Outcome`` removes the container (after
copying up to ``log_max_bytes`` of its log, which ``logs()`` serves from then on).
Timeouts are wall-clock, from the container's ``StartedAt``, and survive an agent
restart (``adopt()``); a cancel or a timeout leaves a marker in the
launcher's state directory (``<state_dir>/launchers/podman/``) so the
terminal state survives one too. A task whose command ended while no agent
ran is collected, not timed out, when one comes back within the collection
window (``container.COLLECT_WINDOW_S``).
"""

from __future__ import annotations

from femd.launchers.podman.container import LABEL_TASK, TASK_USER
from femd.launchers.podman.handle import PodmanHandle
from femd.launchers.podman.image import verify_image_digest
from femd.launchers.podman.launcher import PodmanLauncher, TrialPodmanLauncher

__all__ = [
    "LABEL_TASK",
    "TASK_USER",
    "PodmanHandle",
    "PodmanLauncher",
    "TrialPodmanLauncher",
    "verify_image_digest",
]
