"""Run a snippet in a fresh interpreter and read back what it printed as JSON.

What a module imports is only visible before anything else has imported it:
tests of "this path never loads that module" run their code here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def last_json(code: str, cwd: Path = REPO, timeout_s: float = 60) -> Any:  # noqa: ANN401
    """``python -c code`` in *cwd*; the JSON of its last line of output.

    Raises:
        AssertionError: the snippet failed (with its stderr).
    """
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
