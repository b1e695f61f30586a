"""femd's own record of a podman task it launched: what ``adopt()`` trusts.

Owns ``LaunchRecord`` and its file ``<launcher state dir>/<task id>.launch``
(0600, in a 0700 directory of femd's). A container's labels are written by
femd but stored by the podman service: its account can create a container
labelled ``femd.task=<id>`` saying anything. So after a restart femd takes
where it writes (the output dir) and how much (the output cap), the timeout
and the log cap from this record, never from labels, and refuses a container
whose id or labels disagree with it (``check``). Does not talk to podman.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from femd.errors import LaunchError, cut

if TYPE_CHECKING:
    from femd.launchers import LaunchSpec

__all__ = ["LaunchRecord"]

_SUFFIX: Final = ".launch"
_MAX_BYTES: Final = 64 * 1024


class LaunchRecord(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """What femd launched for one task (written before the container exists)."""

    output_dir: str
    output_max_bytes: int
    timeout_s: float
    log_max_bytes: int
    container_id: str = ""
    """Empty until podman created the container."""

    @classmethod
    def of(cls, spec: LaunchSpec) -> LaunchRecord:
        """The record of launching *spec* (no container yet)."""
        return cls(
            output_dir=spec.output_dir,
            output_max_bytes=spec.output_max_bytes,
            timeout_s=spec.limits.timeout_s,
            log_max_bytes=spec.log_max_bytes,
        )

    @staticmethod
    def path(state_dir: Path, task_id: str) -> Path:
        """Where the record of *task_id* lives."""
        return state_dir / f"{task_id}{_SUFFIX}"

    def save(self, state_dir: Path, task_id: str) -> None:
        """Write the record atomically (0600; the directory 0700).

        Raises:
            LaunchError: it cannot be written (nothing may start without it).
        """
        path = self.path(state_dir, task_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
                f.write(msgspec.json.encode(self))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise LaunchError(f"podman: launch record {cut(path)}: {e.strerror}") from e

    @classmethod
    def load(cls, state_dir: Path, task_id: str) -> LaunchRecord | None:
        """The record of *task_id*, or None if femd never wrote one.

        Raises:
            LaunchError: it exists but cannot be read or decoded.
        """
        path = cls.path(state_dir, task_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LaunchError(f"podman: launch record {cut(path)}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_BYTES)
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.DecodeError as e:
            raise LaunchError(f"podman: launch record {cut(path)}: {cut(e)}") from e

    @classmethod
    def drop(cls, state_dir: Path, task_id: str) -> None:
        """Remove the record of *task_id* (the container is gone)."""
        with contextlib.suppress(OSError):
            cls.path(state_dir, task_id).unlink(missing_ok=True)

    def check(self, task_id: str, container_id: str, labels: Mapping[str, str]) -> None:
        """Refuse a container that is not the one this record describes.

        *labels*: the container's, as podman reports them.

        Raises:
            LaunchError: its id or one of femd's labels disagrees.
        """
        from femd.launchers.podman.container import labels_of

        if self.container_id and container_id != self.container_id:
            raise LaunchError(
                f"podman: container {cut(container_id, 12)} claims task {task_id}, "
                f"which femd launched as {self.container_id[:12]}: refused"
            )
        for key, value in labels_of(self).items():
            if labels.get(key) != value:
                raise LaunchError(
                    f"podman: container {cut(container_id, 12)} of task {task_id}: "
                    f"label {key} disagrees with femd's launch record: refused"
                )
