"""Where a task may mount things inside each sandbox: the reserved paths.

Owns the paths each back-end keeps for itself (``PODMAN_RESERVED``,
``PROCESS_RESERVED``) and the pure checks that a launch spec's mount and
output targets stay clear of them (``podman_reasons``, ``sandbox_reasons``),
registered as each launcher's ``spec_reasons``. Admission runs them before
anything is staged; the back-ends refuse the same specs again at launch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Final

from femd.decision import Reason, Rule
from femd.errors import cut

if TYPE_CHECKING:
    from femd.launchers import LaunchSpec

__all__ = [
    "PODMAN_RESERVED",
    "PROCESS_RESERVED",
    "SANDBOX_TMP",
    "podman_reasons",
    "process_reasons",
    "sandbox_reasons",
    "within",
]

SANDBOX_TMP: Final = "/tmp"  # noqa: S108 (inside the sandbox: a private tmpfs)
# Podman's container keeps these (its own /proc, /sys, /dev, /run; the image's /etc).
PODMAN_RESERVED: Final = ("/proc", "/sys", "/dev", "/run", "/etc")
# bubblewrap builds these itself, before any task mount (plus the profile's
# ro_binds); for process tasks and slurm jobs alike.
PROCESS_RESERVED: Final = ("/", "/proc", "/dev", SANDBOX_TMP)


@functools.lru_cache(maxsize=1024)  # pure; each launch asks the same pairs again
def within(path: str, root: str) -> bool:
    """True when *path* is *root* or below it ("/" holds only itself here)."""
    p, r = PurePosixPath(path), PurePosixPath(root)
    return p == r or (r != PurePosixPath("/") and r in p.parents)


def _reserved(target: str) -> Reason:
    return Reason(
        Rule.MOUNT_RESERVED, f"mount target {cut(target)!r} is reserved by the sandbox"
    )


def _podman(mounts: Iterable[str], output: str) -> list[Reason]:
    reasons = []
    taken = {"/", SANDBOX_TMP, output}
    if output in ("/", SANDBOX_TMP) or any(within(output, r) for r in PODMAN_RESERVED):
        reasons.append(_reserved(output))
    for target in mounts:
        if any(within(target, r) for r in PODMAN_RESERVED):
            reasons.append(_reserved(target))
        elif target in taken:
            text = f"mount target {cut(target)!r} is taken by another mount"
            reasons.append(Reason(Rule.MOUNT_RESERVED, text))
        elif within(target, output) or within(output, target):
            # SECURITY: the output step tars the whole output dir: an input
            # below it would leave as an output (and one above would hide it).
            text = f"mount target {cut(target)!r} overlaps the output {cut(output)!r}"
            reasons.append(Reason(Rule.MOUNT_RESERVED, text))
        taken.add(target)
    return reasons


def _process(targets: list[str], ro_binds: Iterable[str]) -> list[Reason]:
    reasons = []
    reserved = [*PROCESS_RESERVED, *ro_binds]
    for i, target in enumerate(targets):
        clash = [r for r in reserved if within(r, target) or within(target, r)]
        clash += [t for t in targets[i + 1 :] if within(t, target) or within(target, t)]
        if clash:
            reasons.append(
                Reason(
                    Rule.MOUNT_RESERVED,
                    f"mount target {cut(target)!r} overlaps {cut(clash[0])!r}",
                )
            )
    return reasons


def podman_reasons(spec: LaunchSpec) -> list[Reason]:
    """Every mount or output target of *spec* that Podman's container keeps.

    Pure. The ``podman`` launcher's ``spec_reasons`` (``LAUNCHERS``).
    """
    return _podman([m.target for m in spec.mounts], spec.output_target)


def sandbox_reasons(spec: LaunchSpec, ro_binds: Iterable[str]) -> list[Reason]:
    """Every target of *spec* that overlaps bubblewrap's own or another one.

    Pure. *ro_binds*: the sandbox settings' read-only host binds.
    """
    return _process([*(m.target for m in spec.mounts), spec.output_target], ro_binds)


def process_reasons(spec: LaunchSpec) -> list[Reason]:
    """``sandbox_reasons`` with the profile's ``process`` settings (``LAUNCHERS``)."""
    settings = spec.profile.process
    return [] if settings is None else sandbox_reasons(spec, settings.ro_binds)
