"""Every error femd raises on purpose.

Each ``FemdError`` prints as one line a person can act on
(``<what>: <problem> (got X, expected Y)``) and carries the exit code the CLI
returns. Foreign errors (pika, podman, pygit2, sqlite3, OSError) are wrapped at
the module boundary that meets them, never leaked. Programmer bugs stay plain
``RuntimeError``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BrokerError",
    "ConfigError",
    "DatasetMissingError",
    "EnvelopeError",
    "FemdError",
    "GitCommitMissingError",
    "ImageDigestMismatchError",
    "InputError",
    "LaunchError",
    "LauncherUnavailableError",
    "ManifestError",
    "OutputTooLargeError",
    "PolicyError",
    "RuntimeMissingError",
    "StageInError",
    "StageOutError",
    "StateError",
    "UnenforceableError",
    "UnsafeOutputPathError",
    "cut",
    "printable",
]


def printable(value: object) -> str:
    r"""Return ``str(value)`` as text that any UTF-8 store accepts.

    File names and tool output may not be UTF-8: Python carries such bytes as
    lone surrogates, which sqlite, JSON encoders and the journal refuse. They
    become visible escapes (``\xff``, ``\udc80``) instead.
    """
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
            text = raw.decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def cut(value: object, limit: int = 80, *, keep_end: bool = False) -> str:
    """Return ``repr``-free text of *value*, on one line, at most *limit* chars.

    With *keep_end* the middle goes instead of the end: error text from a tool
    names its cause last (``bwrap: Creating new namespace failed: <cause>``).
    """
    text = printable(value).replace("\n", "\\n").replace("\r", "\\r")
    if len(text) <= limit:
        return text
    if keep_end:
        head = (limit - 3) // 3
        return text[:head] + "..." + text[len(text) - (limit - 3 - head) :]
    return text[: limit - 3] + "..."


class FemdError(Exception):
    """Base for every error femd raises on purpose; str(e) is one line for a human."""

    exit_code: ClassVar[int] = 2


class InputError(FemdError):
    """A document given to femd (envelope, manifest, policy, config) is invalid."""


class EnvelopeError(InputError):
    """The DSSE envelope cannot be decoded (size, JSON, base64, fields)."""


class ManifestError(InputError):
    """The signed payload is not a valid ``femd/v1`` manifest."""


class PolicyError(InputError):
    """The policy is invalid; names the file, and where known the line and field."""

    def __init__(
        self,
        file: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        """Build ``file:line: field: message``."""
        self.file = file
        self.line = line
        self.field = field
        self.message = message
        where = file if line is None else f"{file}:{line}"
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")


class ConfigError(InputError):
    """The agent configuration (``femd.yaml`` or its environment) is invalid."""


class StageInError(FemdError):
    """Something a task needs could not be staged in."""


class ImageDigestMismatchError(StageInError):
    """The pulled image does not have the pinned digest."""


class GitCommitMissingError(StageInError):
    """The pinned git commit cannot be fetched or checked out."""


class DatasetMissingError(StageInError):
    """A dataset named by the task is missing on this host or escapes its path."""


class RuntimeMissingError(StageInError):
    """A runtime named by the task is missing on this host or escapes its path."""


class LaunchError(FemdError):
    """A sandbox could not be started or controlled."""


class UnenforceableError(LaunchError):
    """A limit the policy requires cannot be enforced on this host (fail closed)."""


class LauncherUnavailableError(LaunchError):
    """The launcher's back-end (podman, bubblewrap) is missing or not usable."""


class StageOutError(FemdError):
    """Outputs could not be collected safely."""


class OutputTooLargeError(StageOutError):
    """The outputs exceed the allowed size."""


class UnsafeOutputPathError(StageOutError):
    """The output directory holds a symlink, device, hard link or escaping path."""


class BrokerError(FemdError):
    """The message broker could not be reached or refused us."""


class StateError(FemdError):
    """The local state database could not be read or written."""
