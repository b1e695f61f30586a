"""The state directory's layout is named in one place."""

import stat
from pathlib import Path

from femd.statedir import StateDir


def test_layout_names(tmp_path: Path):
    d = StateDir(tmp_path)
    assert d.db == tmp_path / "state.sqlite"
    assert d.work_of("t-1") == tmp_path / "work" / "t-1"
    assert d.outgoing == tmp_path / "outgoing"
    assert d.git == tmp_path / "git"
    assert d.doctor == tmp_path / "doctor"
    assert d.launcher("process") == tmp_path / "launchers" / "process"


def test_open_state_creates_private_files(tmp_path: Path):
    d = StateDir(tmp_path / "state")
    state = d.open_state()
    try:
        assert stat.S_IMODE(d.root.stat().st_mode) & 0o027 == 0
        files = sorted(d.root.glob("state.sqlite*"))
        assert d.db in files
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    finally:
        state.close()
