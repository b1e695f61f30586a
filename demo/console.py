"""Live progress for a person watching the demo: steps, commands, events.

Every line starts with the time since the demo began. Colour is used only on a
terminal and never when ``NO_COLOR`` is set. Output goes to stdout and is
flushed line by line, so ``./scripts/demo | tee demo.log`` follows live too.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Final, TextIO

__all__ = ["Console"]

_CODES: Final = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33"}


class Console:
    """Writes the demo's story; one method per kind of line."""

    def __init__(self, out: TextIO | None = None, *, steps: int = 0) -> None:
        """Start the clock; *steps* is the number of numbered steps to come."""
        self.out = out if out is not None else sys.stdout
        self.began = time.monotonic()
        self.steps = steps
        self._step = 0
        self.colour = self.out.isatty() and not os.environ.get("NO_COLOR")

    def elapsed(self) -> float:
        """Seconds since the demo began."""
        return time.monotonic() - self.began

    def paint(self, text: str, style: str) -> str:
        """*text* in *style* (``bold``, ``dim``, ``red``, ``green``, ``yellow``)."""
        if not self.colour:
            return text
        return f"\033[{_CODES[style]}m{text}\033[0m"

    def _line(self, text: str) -> None:
        stamp = self.paint(f"[{self.elapsed():5.1f}s]", "dim")
        self.out.write(f"{stamp} {text}\n")
        self.out.flush()

    def title(self, text: str) -> None:
        """The banner line."""
        self.out.write(self.paint(text, "bold") + "\n")
        self.out.flush()

    def step(self, title: str) -> None:
        """Start the next numbered step."""
        self._step += 1
        self.out.write("\n")
        self._line(self.paint(f"{self._step}/{self.steps} {title}", "bold"))

    def section(self, title: str) -> None:
        """Start an unnumbered section (the clean-up)."""
        self.out.write("\n")
        self._line(self.paint(title, "bold"))

    def say(self, text: str) -> None:
        """An ordinary line of explanation."""
        self._line("  " + text)

    def command(self, argv: Sequence[str]) -> None:
        """Show a command about to run, as a person would type it."""
        self._line(self.paint("  $ " + shlex.join(argv), "dim"))

    def good(self, text: str) -> None:
        """Something went as it should."""
        self._line("  " + self.paint("OK", "green") + " " + text)

    def bad(self, text: str) -> None:
        """Something did not."""
        self._line("  " + self.paint("FAILED", "red") + " " + text)

    def warn(self, text: str) -> None:
        """Something worth knowing that is not a failure of the demo."""
        self._line("  " + self.paint("NOTE", "yellow") + " " + text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A small left/right aligned table (first column left, others right)."""
        widths = [
            max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))
        ]

        def fmt(row: Sequence[str]) -> str:
            cells = [str(row[0]).ljust(widths[0])]
            cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            return "    " + "  ".join(cells)

        self.out.write(self.paint(fmt(header), "bold") + "\n")
        for row in rows:
            self.out.write(fmt(row) + "\n")
        self.out.flush()
