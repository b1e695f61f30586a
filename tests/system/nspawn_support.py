"""Helpers for system tests: femd's .deb installed in a booted Debian 12.

Built on ``testbed.nspawn`` (the booted container). What a system test needs:

- ``build_deb()``: ``packaging/deb/build.sh``, cached by a hash of every input
  file, so a rerun without changes reuses the package.
- ``femd_container()``: boot a throw-away container and ``apt-get install`` the
  package in it (offline: the cached root has every dependency).
- ``write_etc()``: place config, policy and TLS material the way an operator
  does (root:femd 0640).
- ``drop_in()``: override a unit (e.g. ``ExecStart=``) and reload systemd.
- ``start()`` / ``Container.wait_unit()``: start a unit, wait for a state.
- ``audit()``: femd's audit entries (``SYSLOG_IDENTIFIER=femd``) as
  ``journalctl -o json`` dicts, filtered by journal fields.

A test that goes further (``systemctl enable --now femd`` against a broker run
inside the container, then ``journalctl FEMD_TASK_ID=...``) composes these:
``write_etc(box, {...})``, ``start(box, "femd.service")`` (READY means
"active" for ``Type=notify``), then ``audit(box, FEMD_TASK_ID=task_id)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # testbed/ is not installed: it lives beside femd/
    sys.path.insert(0, str(REPO))

from testbed.nspawn import Container, available, cache_dir, ensure_rootfs  # noqa: E402

__all__ = [
    "REPO",
    "Container",
    "audit",
    "available",
    "build_deb",
    "drop_in",
    "femd_container",
    "install_deb",
    "start",
    "wait_for",
    "write_etc",
]

# Everything that ends up in the package; a change to any of them rebuilds it.
_INPUTS = (
    "femd",
    "units",
    "packaging/deb",
    "scripts/setup-podman-user.sh",
    "launchers",
    "policies",
    "docs",
    "femd.yaml",
    "pyproject.toml",
    "README.md",
)
_KEEP_DEBS = 3
T = TypeVar("T")


def _input_hash() -> str:
    digest = hashlib.sha256()
    for name in _INPUTS:
        top = REPO / name
        files = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in files:
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(REPO)).encode() + b"\0")
            digest.update(oct(path.stat().st_mode & 0o111).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_deb() -> Path:
    """The .deb of the current tree, built once per content hash.

    Raises:
        RuntimeError: build.sh failed (the end of its output is attached).
    """
    base = cache_dir() / "deb"
    key = _input_hash()
    done = base / key
    debs = sorted(done.glob("femd_*_amd64.deb")) if done.is_dir() else []
    if debs:
        return debs[0]
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=base))
    try:
        built = subprocess.run(  # noqa: S603 - our own build script
            ["/bin/sh", str(REPO / "packaging/deb/build.sh"), str(tmp)],
            check=False,
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            raise RuntimeError(
                f"build.sh failed ({built.returncode}):\n{built.stdout[-3000:]}"
                f"\n{built.stderr[-3000:]}"
            )
        tmp.rename(done)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = sorted(
        (p for p in base.iterdir() if p.is_dir() and p != done),
        key=lambda p: p.stat().st_mtime,
    )
    for stale in old[: max(0, len(old) - (_KEEP_DEBS - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return next(done.glob("femd_*_amd64.deb"))


def install_deb(box: Container, deb: Path) -> str:
    """Copy *deb* in and ``apt-get install`` it; return apt's output."""
    box.copy_in(deb, "/root/" + deb.name)
    done = box.exec(
        ["apt-get", "install", "-y", "/root/" + deb.name],
        timeout_s=600,
    )
    return done.stdout + done.stderr


@contextlib.contextmanager
def femd_container(deb: Path | None = None) -> Iterator[Container]:
    """A booted container with femd's package installed; powered off after."""
    package = deb or build_deb()
    box = Container.boot(ensure_rootfs())
    try:
        install_deb(box, package)
        yield box
    finally:
        box.poweroff()


def write_etc(box: Container, files: Mapping[str, bytes | str]) -> None:
    """Write files under /etc/femd as an operator would: root:femd, 0640.

    Keys are paths relative to /etc/femd (``"tls/node.key"``); missing
    directories are created root:femd 0750.
    """
    for rel, data in files.items():
        path = Path("/etc/femd") / rel
        if not path.is_relative_to("/etc/femd") or ".." in path.parts:
            raise ValueError(f"not below /etc/femd: {rel}")
        box.exec(["install", "-d", "-o", "root", "-g", "femd", "-m", "0750",
                  str(path.parent)])  # fmt: skip
        box.write(str(path), data, mode=0o640)
        box.exec(["chown", "root:femd", str(path)])


def drop_in(box: Container, unit: str, text: str, name: str = "test") -> None:
    """Install ``/etc/systemd/system/UNIT.d/NAME.conf`` (empty *text*: remove)."""
    path = f"/etc/systemd/system/{unit}.d/{name}.conf"
    if text:
        box.write(path, text)
    else:
        box.exec(["rm", "-f", path])
    box.systemctl("daemon-reload")


def start(
    box: Container,
    unit: str,
    *,
    timeout_s: float = 90.0,
    states: Sequence[str] = ("active",),
) -> str:
    """``systemctl start --no-block UNIT`` and wait for one of *states*.

    For ``Type=notify`` (femd.service) "active" means READY=1 was sent.
    """
    box.systemctl("reset-failed", unit, check=False)
    box.systemctl("start", "--no-block", unit)
    return box.wait_unit(unit, states, timeout_s=timeout_s)


def audit(box: Container, **matches: str) -> list[dict[str, Any]]:
    """femd's audit entries (``SYSLOG_IDENTIFIER=femd``) matching *matches*."""
    box.journal_sync()
    return box.journal(identifier="femd", **matches)


def wait_for(
    predicate: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.2
) -> T:
    """Poll *predicate* until it returns a truthy value; return that value.

    Raises:
        TimeoutError: it never did.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
