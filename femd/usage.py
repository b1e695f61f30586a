"""What a task used and what femd forwarded for it: the terminal event's numbers.

Owns ``Usage`` (a launcher's measurement), ``Accounting`` (a batch system's)
and ``Traffic`` (femd's forwarding, per destination). Light on purpose: the
wire (``femd.events``) and the state database carry these, and importing them
must not import the launchers (``femd.launchers`` re-exports them).
"""

from __future__ import annotations

from typing import Literal

from femd.model import Strict

__all__ = ["Accounting", "Traffic", "Usage"]


class Usage(Strict, frozen=True, kw_only=True, omit_defaults=True):
    """What a task used (None: not measured by this launcher on this host).

    ``cpu_s``: CPU seconds of all its processes; ``memory_peak_bytes``: the
    peak of its cgroup's memory (anonymous, page cache, tmpfs, shm);
    ``pids_peak``: most processes at once (sampled where the kernel keeps no
    peak); ``output_bytes``: bytes of its collected outputs; ``wall_s``.
    """

    cpu_s: float | None = None
    memory_peak_bytes: int | None = None
    pids_peak: int | None = None
    output_bytes: int | None = None
    wall_s: float | None = None


class Accounting(Strict, frozen=True, kw_only=True, omit_defaults=True):
    """What a batch system measured of one task (the ``slurm`` launcher).

    Sent in the terminal status event as ``accounting``; a field the batch
    system did not report is absent.
    """

    job_id: str
    state: str
    node: str | None = None
    elapsed_s: int | None = None
    cpu_s: float | None = None
    max_rss_kb: int | None = None
    exit_code: int | None = None
    signal: int | None = None


class Traffic(Strict, frozen=True, kw_only=True):
    """Connections femd forwarded for a task to (or from) one destination.

    ``destination``: the allowed ``host:port`` (egress) or the task's port
    (ingress). Bytes are counted from the task's side: ``bytes_in`` entered
    the sandbox, ``bytes_out`` left it.
    """

    direction: Literal["egress", "ingress"]
    destination: str
    connections: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
