"""The task runtimes scripts/install.sh builds: every package pinned and hashed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = sorted((REPO / "runtimes").glob("*/requirements.txt"))
_LINE = re.compile(r"[a-z0-9][a-z0-9._-]*==[A-Za-z0-9.+!-]+ --hash=sha256:[0-9a-f]{64}")


def test_there_is_a_flower_runtime():
    assert [p.parent.name for p in REQUIREMENTS] == ["flower"]


@pytest.mark.parametrize("path", REQUIREMENTS, ids=lambda p: p.parent.name)
def test_every_requirement_is_pinned_with_a_hash(path: Path):
    text = path.read_text().replace("\\\n", " ")
    lines = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines
    names = set()
    for words in lines:
        assert _LINE.fullmatch(" ".join(words)), words
        names.add(words[0].partition("==")[0])
    assert {"flwr", "numpy"} <= names
    assert len(names) == len(lines)  # one pin per package


def test_install_builds_runtimes_with_require_hashes():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "--require-hashes" in script
    assert "runtimes/*/requirements.txt" in script
