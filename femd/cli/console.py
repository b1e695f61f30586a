"""The command line's conventions: one-line usage errors, input and output files.

Owns how every ``femd`` command reads its input (a file or ``-``) and writes
its output (a file, ``-`` or stdout), and how argparse reports a bad command
line. It does not parse commands or do their work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, TypeAlias

from femd.errors import InputError

__all__ = ["Parser", "Subcommands", "read_input", "write_output"]

# What `add_subparsers()` returns: each command group adds its commands to it.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        # One line, not usage + error (DESIGN: one clear line for any bad input).
        self.exit(2, f"femd: error: {message} (see `femd --help`)\n")


def read_input(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``-``: stdin).

    Raises:
        InputError: it cannot be read; the message names ``what`` and the path.
    """
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror}") from e


def write_output(path: str | None, data: bytes) -> None:
    """Write ``data`` to ``path`` (``None`` or ``-``: stdout).

    Raises:
        InputError: the file cannot be written.
    """
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise InputError(f"output {path}: {e.strerror}") from e
