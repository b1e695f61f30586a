"""The layout of the node's state directory (``state_dir`` in ``femd.yaml``).

Owns the names under it, so that no module spells them on its own:

- ``state.sqlite`` (+ ``-wal``, ``-shm``) and ``state.created``: the task
  history, replay protection and outbox (``State``, ``statemark``), 0600;
- ``work/<task id>/``: a task's work dir while it stages and runs;
- ``outgoing/``: packed outputs until their last chunk is confirmed;
- ``git/``: the mirrors staging clones from;
- ``launchers/<name>/``: what a launcher keeps for itself (logs, markers);
- ``doctor/``: the work root ``femd doctor`` probes with.

Creates the directory and opens the database; does not decide what goes in
the files.
"""

from __future__ import annotations

from pathlib import Path

from femd.state import State

__all__ = ["StateDir"]

DB_NAME = "state.sqlite"


class StateDir:
    """One state directory (see the module for its layout).

    Args:
        root: the directory, normally ``AgentConfig.state_path``.
    """

    def __init__(self, root: Path) -> None:
        """Name the directory; nothing is created before ``open_state()``."""
        self.root = root

    def __repr__(self) -> str:
        """Return ``StateDir('<root>')``."""
        return f"StateDir({str(self.root)!r})"

    @property
    def db(self) -> Path:
        """The state database."""
        return self.root / DB_NAME

    @property
    def work(self) -> Path:
        """Where tasks' work dirs go (admission builds specs under it too)."""
        return self.root / "work"

    def work_of(self, task_id: str) -> Path:
        """The work dir of task *task_id*."""
        return self.work / task_id

    @property
    def outgoing(self) -> Path:
        """Packed outputs waiting for their chunks to be confirmed."""
        return self.root / "outgoing"

    @property
    def git(self) -> Path:
        """The git mirrors' cache."""
        return self.root / "git"

    @property
    def doctor(self) -> Path:
        """The work root of ``femd doctor``'s probes."""
        return self.root / "doctor"

    def launcher(self, name: str) -> Path:
        """What launcher *name* keeps for itself."""
        return self.root / "launchers" / name

    def open_state(self) -> State:
        """Create the directory (0750) if needed and open the database (0600).

        Raises:
            StateError: the database cannot be opened (see ``State``).
            OSError: the directory cannot be created.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        state = State(self.db)
        for f in self.root.glob(DB_NAME + "*"):
            f.chmod(0o600)  # SECURITY: history, payloads and outbox are femd's alone
        return state
