"""Shared building blocks for every document femd decodes.

Owns the strict base ``Struct``, the constrained string aliases and the one
duplicate-key-refusing JSON reader. Holds no document types of its own
(those live in ``envelope``, ``manifest``, ``policy``, ``config``).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "AbsPath",
    "DuplicateKeyError",
    "EnvName",
    "GitCommit",
    "GitUrl",
    "HostPort",
    "HostPortPattern",
    "ImageName",
    "KeyId",
    "LauncherName",
    "Name",
    "Peer",
    "Port",
    "RelPath",
    "Sha256Hex",
    "Strict",
    "TaskId",
    "UtcTime",
    "explain",
    "json_schema",
    "refuse_duplicate_keys",
    "runs_image",
    "unknown_launcher",
    "utc_now",
]


# The largest envelope femd reads (DESIGN "signed envelope"): the envelope
# decoder's limit and the ceiling of femd.yaml's max_envelope_bytes. Here, not in
# ``envelope``, so that the config and the broker link load without the
# signature code (``femd run`` connects before it imports that).
MAX_ENVELOPE_BYTES: Final = 1024 * 1024


def _full(body: str) -> str:
    # msgspec uses re.search and Python's `$` accepts a final "\n"; `(?!\n)` closes
    # that (and is valid ECMA-262, so the generated JSON Schema means the same).
    return f"^(?:{body})$(?!\\n)"


# A path segment that is exactly ".." anywhere after the current position.
_NO_DOTDOT = r"(?!(?:.*/)?\.\.(?:/|$))"

# The one launcher-name type of manifests, policies and launch specs. Which
# names exist is the registry's to say (``femd.launchers.registry.LAUNCHERS``):
# ``unknown_launcher()`` checks them when a manifest or policy is decoded, so
# a new launcher is one registry line, not an edit here.
LauncherName = Annotated[
    str,
    Meta(
        pattern=_full(r"[a-z][a-z0-9_-]{0,31}"),
        description="A launcher this femd has (`femd doctor` lists them).",
        extra={"registry": "launchers"},
    ),
]


def runs_image(launcher: str) -> bool:
    """Whether *launcher*'s tasks run an image rather than a host command."""
    from femd.launchers.registry import LAUNCHERS

    registration = LAUNCHERS.get(launcher)
    return registration is not None and registration.image


def unknown_launcher(names: Iterable[str]) -> tuple[int, str] | None:
    """The first of *names* that is no launcher of this femd: (index, why).

    Reads the registry at call time (it sits above the parsers, which use it
    only to validate names).
    """
    from femd.launchers.registry import LAUNCHERS

    for i, name in enumerate(names):
        if name not in LAUNCHERS:
            known = ", ".join(sorted(LAUNCHERS))
            return i, f"{json.dumps(name)} is not allowed here; use one of: {known}"
    return None


Name = Annotated[
    str,
    Meta(
        pattern=_full(r"[a-z0-9][a-z0-9._-]{0,62}"),
        description="Lowercase name: letters, digits, `.`, `_`, `-`; at most 63.",
    ),
]
TaskId = Annotated[
    str,
    Meta(
        pattern=_full(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"),
        description="Task id (e.g. a UUID): letters, digits, `_`, `-`; no dots.",
    ),
]
KeyId = Annotated[
    str,
    Meta(
        pattern=_full(r"[0-9a-f]{64}"),
        description="Lowercase hex SHA-256 of an Ed25519 public key's raw 32 bytes.",
    ),
]
Sha256Hex = Annotated[str, Meta(pattern=_full(r"[0-9a-f]{64}"))]
GitCommit = Annotated[
    str,
    Meta(
        pattern=_full(r"[0-9a-f]{40}|[0-9a-f]{64}"),
        description="A full git object id: 40 (SHA-1) or 64 (SHA-256) lowercase hex.",
    ),
]
ImageName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=512,
        pattern=_full(r"[a-z0-9][A-Za-z0-9._/:@-]*"),
        description="Container image reference; policy requires `@sha256:<digest>`.",
    ),
]
GitUrl = Annotated[
    str,
    Meta(
        max_length=2048,
        pattern=_full(r"(?:https|ssh|git|file)://" + _NO_DOTDOT + r"[^\s?#\\]+"),
        description="Git repository URL (https, ssh, git or file); no `..` segment.",
    ),
]
AbsPath = Annotated[
    str,
    Meta(
        max_length=4096,
        pattern=_full(r"/" + _NO_DOTDOT + r"[^\x00-\x1f]*"),
        description="Absolute path without a `..` segment.",
    ),
]
RelPath = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=4096,
        pattern=_full(r"(?!/)" + _NO_DOTDOT + r"[^\x00-\x1f]+"),
        description="Path relative to a root, without a `..` segment.",
    ),
]
EnvName = Annotated[str, Meta(pattern=_full(r"[A-Za-z_][A-Za-z0-9_]{0,127}"))]
HostPort = Annotated[
    str,
    Meta(
        max_length=300,
        pattern=_full(r"[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}"),
        description="`host:port`, a concrete destination (no wildcards).",
    ),
]
HostPortPattern = Annotated[
    str,
    Meta(
        max_length=300,
        pattern=_full(r"[A-Za-z0-9*][A-Za-z0-9.*-]*:(?:[0-9]{1,5}|\*)"),
        description="`host:port` pattern; `*` matches any part of a name or any port.",
    ),
]
# A peer allowed to reach a task's listener: a CIDR (`10.1.0.0/16`, `::1/128`),
# one address, or a host name resolved by femd when the task starts.
Peer = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=253,
        pattern=_full(r"[0-9A-Za-z.:/-]+"),
        description="A CIDR, an IP address or a host name.",
    ),
]
Port = Annotated[int, Meta(ge=1, le=65535, description="A TCP port, 1-65535.")]
UtcTime = Annotated[datetime, Meta(tz=True, description="RFC 3339 time with zone.")]


class Strict(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Base for every document femd decodes: immutable, unknown keys rejected."""


class DuplicateKeyError(ValueError):
    """A JSON object has the same key twice."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


_SCAN: Final = json.JSONDecoder(object_pairs_hook=_pairs)


def refuse_duplicate_keys(data: bytes) -> None:
    """Parse *data* as JSON only to refuse any object with a repeated key.

    DESIGN "manifest": a reviewer must never see one value while the node runs
    another, and msgspec (like most parsers) silently keeps the last one.

    Raises:
        DuplicateKeyError: a key repeats in some object.
        ValueError: the bytes are not UTF-8 JSON or nest too deeply.
    """
    try:
        # SECURITY: the stdlib parser is used for this scan only; values come from
        # msgspec's typed decode of the same bytes. The bytes are read as
        # json.loads reads bytes; the decoder is built once (a hot path).
        _SCAN.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except RecursionError as e:
        raise ValueError("JSON nests too deeply") from e


def _descriptions() -> dict[str, str]:
    found: dict[str, str] = {}
    for alias in (
        Name,
        TaskId,
        KeyId,
        GitCommit,
        ImageName,
        GitUrl,
        AbsPath,
        RelPath,
        EnvName,
        HostPort,
        HostPortPattern,
    ):
        for meta in getattr(alias, "__metadata__", ()):
            if isinstance(meta, Meta) and meta.pattern and meta.description:
                found[meta.pattern] = meta.description.rstrip(".")
    found[_full(r"[0-9a-f]{64}")] = "64 lowercase hex digits"
    return found


_PATTERN_TEXT = _descriptions()
_REGEX_MSG = re.compile(r"Expected `str` matching regex '(.*)'(?= - at |$)")


def explain(message: str) -> str:
    """Turn msgspec's "matching regex '...'" into the alias's plain description."""

    def repl(m: re.Match[str]) -> str:
        pattern = m.group(1).encode().decode("unicode_escape")
        text = _PATTERN_TEXT.get(pattern)
        return f"expected {text[0].lower()}{text[1:]}" if text else m.group(0)

    return _REGEX_MSG.sub(repl, message)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC (what every record stores)."""
    return datetime.now(UTC)


def _dedent(node: Any) -> Any:  # noqa: ANN401 (JSON)
    # Python 3.13 dedents docstrings itself, 3.11 does not: a shipped schema must
    # not depend on the interpreter that printed it.
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v)
            if k == "description" and isinstance(v, str)
            else _dedent(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_dedent(v) for v in node]
    return node


def json_schema(t: Any) -> dict[str, Any]:  # noqa: ANN401 (any msgspec type)
    """Return the JSON Schema of type *t*, descriptions dedented."""
    schema: dict[str, Any] = _dedent(msgspec.json.schema(t))
    return schema
