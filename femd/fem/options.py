"""What ``femd import-fem`` is told beside the FEM documents, and what it reports.

Owns ``FemOptions`` (the operator's pins and mappings), the parsers of the
command-line values (``--node``, ``--dataset``, ``--env``, ``--expires-in``,
...), ``Problem`` and ``FemImportError`` (every problem of one conversion, each
with the flag or policy entry that fixes it), ``Converted`` and the output
helpers. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, Literal, TypeVar

import msgspec

from femd.errors import InputError, cut
from femd.manifest import Task, encode_manifest
from femd.model import Name

__all__ = [
    "ENV_NAME",
    "Converted",
    "FemImportError",
    "FemNode",
    "FemOptions",
    "Pass",
    "Problem",
    "Refusal",
    "manifest_json",
    "norm",
    "output_paths",
    "parse_dataset",
    "parse_duration",
    "parse_env",
    "parse_memory_mb",
    "parse_node",
    "parse_port",
]


class FemNode(msgspec.Struct, frozen=True):
    """A target node: its FEM name (params sections, ``%%node_name%%``) and id."""

    fem_name: str
    node: str


class FemOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the operator adds to FEM documents to make femd manifests.

    ``datasets`` maps policy dataset names to FEM volume container paths;
    ``env`` gives the values FEM read from its client's environment (``$NAME``);
    ``ingress`` the ports the task may listen on (its ``port_mappings``);
    ``code_dir`` a FEM volume that held the source code (femd mounts the pinned
    commit at ``/src``, the working directory). ``new_id`` makes task ids.
    """

    nodes: tuple[FemNode, ...]
    project: str
    issued_at: datetime
    expires_in_s: int = 86400
    launcher: Literal["podman", "process"] = "podman"
    profile: str = "default"
    issuer: str | None = None
    image_digest: str | None = None
    commit: str | None = None
    datasets: tuple[tuple[str, str], ...] = ()
    output_dir: str = "/out"
    code_dir: str | None = None
    egress: tuple[str, ...] = ()
    ingress: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    runtime: str | None = None
    execution_id: str | None = None
    user_id: str | None = None
    new_id: Callable[[], str] = lambda: str(uuid.uuid4())


class Converted(msgspec.Struct, frozen=True):
    """One manifest of a conversion and the nodes (femd ids) it lists."""

    nodes: tuple[str, ...]
    task: Task


class Problem(msgspec.Struct, frozen=True):
    """One construct that stops a conversion, and what fixes it."""

    message: str
    fix: str | None = None

    def __str__(self) -> str:
        """``<where>: <problem>`` and, when known, ``(fix: <flag or entry>)``."""
        return self.message + (f" (fix: {self.fix})" if self.fix else "")


class Refusal(InputError):
    """One problem, raised inside a conversion step and collected by ``convert``."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        """Keep the fix beside the message."""
        self.problem = Problem(message, fix)
        super().__init__(str(self.problem))


class FemImportError(InputError):
    """Every problem found in one pass over the FEM documents (like policy lint)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        """Keep the problems; ``str()`` is the first, with the count."""
        self.problems = tuple(problems)
        more = len(self.problems) - 1
        tail = f" (and {more} more)" if more else ""
        super().__init__(f"import-fem: {self.problems[0]}{tail}")


_T = TypeVar("_T")


class Pass:
    """One conversion pass: problems (deduplicated, in order) and notes."""

    def __init__(self) -> None:
        """Start with no problems and no notes."""
        self.problems: dict[str, Problem] = {}
        self.notes: list[str] = []

    def run(self, default: _T, fn: Callable[..., _T], *args: Any) -> _T:  # noqa: ANN401
        """``fn(*args)``; a refusal or input error is kept and *default* returned."""
        try:
            return fn(*args)
        except Refusal as e:
            self.problems.setdefault(str(e.problem), e.problem)
        except InputError as e:
            self.problems.setdefault(str(e), Problem(str(e)))
        return default

    def add(self, message: str, fix: str | None = None) -> None:
        """Keep one problem (once)."""
        p = Problem(message, fix)
        self.problems.setdefault(str(p), p)


# ---------------------------------------------------------------------------
# option parsers (argparse hands these strings over)

_DURATION: Final = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MEMORY: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNIT_B: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# An environment variable name (`--env`, `var_envs`).
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def norm(path: str) -> str:
    """*path* without trailing slashes (``/`` stays ``/``)."""
    return path.rstrip("/") or "/"


def is_name(text: str) -> bool:
    """Whether *text* is a femd name (node id, dataset, project, runtime)."""
    try:
        msgspec.convert(text, Name)
    except msgspec.ValidationError:
        return False
    return True


def parse_node(text: str) -> FemNode:
    """Parse ``--node NODE`` or ``--node FEM_NAME=NODE``.

    Raises:
        InputError: an empty FEM name or a node that is not a femd node id.
    """
    fem_name, sep, node = text.partition("=")
    if not sep:
        fem_name = node = text
    if not fem_name or "%" in fem_name or "," in fem_name or fem_name == "*":
        raise InputError(f"--node: empty or invalid FEM name (got {cut(text)!r})")
    if not is_name(node):
        raise InputError(
            f"--node: {cut(node)!r} is not a femd node id (lowercase letters, "
            "digits, `.`, `_`, `-`); map a FEM name with FEM_NAME=NODE"
        )
    return FemNode(fem_name, node)


def parse_dataset(text: str) -> tuple[str, str]:
    """Parse ``--dataset NAME=CONTAINER_PATH``.

    Raises:
        InputError: no ``=``, a bad dataset name or a relative path.
    """
    name, sep, mount = text.partition("=")
    if not sep or not is_name(name) or not mount.startswith("/"):
        raise InputError(
            f"--dataset: expected NAME=CONTAINER_PATH with a policy dataset name "
            f"and an absolute path (got {cut(text)!r})"
        )
    return name, norm(mount)


def parse_env(text: str) -> tuple[str, str]:
    """Parse ``--env NAME=VALUE``: the value FEM read from ``$NAME`` on its client.

    Raises:
        InputError: no ``=`` or not a variable name.
    """
    name, sep, value = text.partition("=")
    if not sep or not ENV_NAME.fullmatch(name):
        raise InputError(f"--env: expected NAME=VALUE (got {cut(text)!r})")
    return name, value


def parse_port(text: str) -> int:
    """Parse ``--ingress PORT`` (1-65535).

    Raises:
        InputError: not a port number.
    """
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InputError(f"--ingress: expected a port 1-65535 (got {cut(text)!r})")
    return int(text)


def parse_duration(text: str) -> int:
    """Parse ``--expires-in``: seconds, or a number with ``s``, ``m``, ``h``, ``d``.

    Raises:
        InputError: not such a duration, or zero.
    """
    m = _DURATION.fullmatch(text.strip())
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if seconds <= 0:
        raise InputError(
            f"--expires-in: expected e.g. 3600, 90m, 24h, 7d (got {cut(text)!r})"
        )
    return seconds


def parse_memory_mb(value: int | str) -> int | None:
    """FEM ``memory`` (bytes, or Docker units ``512m``, ``4g``) as MiB, rounded up.

    ``0`` and ``""`` mean no request (the policy's maximum applies): None.

    Raises:
        InputError: not a size.
    """
    if isinstance(value, bool):
        raise InputError(f"memory: not a size (got {value!r})")
    if isinstance(value, int):
        size = float(value)
    else:
        if not value.strip():
            return None
        m = _MEMORY.fullmatch(value.strip())
        if m is None:
            raise InputError(f"memory: not a size like 512m or 4g (got {cut(value)!r})")
        size = float(m.group(1)) * _UNIT_B[m.group(2).lower()]
    if size < 0:
        raise InputError(f"memory: negative size (got {value!r})")
    return math.ceil(size / (1 << 20)) if size else None


# ---------------------------------------------------------------------------
# output


def manifest_json(task: Task) -> bytes:
    """The manifest as indented JSON, for review before ``femd sign``."""
    return msgspec.json.format(encode_manifest(task), indent=2) + b"\n"


def output_paths(pattern: str | None, results: Sequence[Converted]) -> list[str | None]:
    """Where each manifest goes: ``-o`` as is, or with ``{node}`` replaced.

    ``{node}`` becomes the manifest's node ids joined by ``+``. Without ``-o``
    (or ``-o -``) a single manifest goes to stdout (None).

    Raises:
        InputError: several manifests but no ``{node}`` in ``-o``.
    """
    if len(results) == 1 and (pattern is None or "{node}" not in pattern):
        return [None if pattern in (None, "-") else pattern]
    if pattern is None or "{node}" not in pattern:
        nodes = "; ".join(", ".join(r.nodes) for r in results)
        raise InputError(
            f"import-fem: per-node values differ, so {len(results)} manifests "
            f"({cut(nodes, 120)}): give -o with a {{node}} pattern, "
            "e.g. -o task-{node}.json"
        )
    return [pattern.replace("{node}", "+".join(r.nodes)) for r in results]
