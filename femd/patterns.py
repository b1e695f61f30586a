"""The policy's patterns: whole-string globs and image references.

Owns ``glob_match()`` (shell-like, ``*`` and ``?`` stay inside one path
segment) and ``split_image()`` (repository and pinned digest). Pure: no I/O.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

__all__ = ["glob_match", "split_image"]

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")


def split_image(ref: str) -> tuple[str, str | None]:
    """Split an image reference into (repository without tag, digest or None)."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    pinned = _DIGEST.fullmatch(digest) is not None
    return name, digest if pinned else None


@lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def glob_match(pattern: str, text: str) -> bool:
    """Match *text* against a policy glob, on the whole string.

    Like shell pathname globs: ``*`` and ``?`` never match ``/`` (so
    ``https://*.example.org/*`` cannot match ``https://evil.io/x.example.org/y``);
    ``**`` matches anything, ``/`` included. Every other character is literal.
    """
    # SECURITY: anchored at both ends; `*` stays inside one path segment.
    return _glob(pattern).match(text) is not None
