"""The newcomer's path: a bare Debian 12, `scripts/install.sh`, then real work.

The README promises that on a fresh Debian 12 where only ``python3`` and
``git`` were added, ``scripts/install.sh`` brings everything the demo, the
tests and the agent need. This test holds it to that, wherever CI runs:

1. a minimal Debian 12 root (debootstrap minbase, an init, ``python3``,
   ``git``: nothing else) is built once and cached in the test cache dir;
2. it boots in ``systemd-nspawn`` on a throw-away layer, sharing the host's
   network (install.sh needs Debian's mirrors and PyPI: the host's apt
   sources, apt proxy settings, local CAs and pip configuration are copied in).
   On a cgroup v1 host its v1 controller mounts are made writable from the
   host (``Container.boot(writable_cgroup_v1=True)``): nspawn mounts them
   read-only, a bare machine has them writable for root, and femd refuses
   every process task where it cannot make the task's cgroup;
3. a ``git clone`` of this checkout (plus uncommitted edits, never ``.venv``)
   is copied in and ``scripts/install.sh`` runs as root;
4. ``femd doctor`` runs a trivial real task per launcher, then one real test
   task per launcher runs through the integration suite's own fixtures:
   bubblewrap, and rootless Podman in its test-only mode (this host is cgroup
   v1: rootless Podman cannot enforce memory/cpu limits).

A package install.sh forgets (catatonit, ca-certificates, busybox...) fails
here. Downloaded .debs are kept in the test cache dir so a rerun fetches no
Debian package again; the install itself runs every time.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn_support import REPO, Container

from testbed.nspawn import (
    BARE_BASE,
    BARE_PACKAGES,
    cache_dir,
    ensure_rootfs,
    host_is_cgroup_v1,
)

pytestmark = pytest.mark.systemd

PODMAN_SOCKET = "unix:///run/femd/podman/podman.sock"
# One real task per launcher, through the integration suite's own fixtures.
TASKS = (
    "tests/integration/test_process_launcher.py::"
    "test_output_is_visible_on_the_host_written_by_femd",
    "tests/integration/test_podman_launcher.py::test_task_writes_its_output_dir",
)
_PIP_DIRS = (Path("/etc/pip.conf"), Path("/etc/xdg/pip"))


def _checkout(dest: Path) -> Path:
    """A ``git clone`` of this checkout, with its uncommitted edits on top."""
    clone = dest / "femd"
    subprocess.run(  # noqa: S603 - fixed tool, our own checkout
        ["/usr/bin/git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)],
        check=True,
        capture_output=True,
    )
    changed = subprocess.run(
        [
            "/usr/bin/git",
            "ls-files",
            "-z",
            "--modified",
            "--others",
            "--exclude-standard",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, changed):
        src = REPO / raw.decode()
        if src.is_file():
            (clone / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / raw.decode())
    return clone


def _apt_settings() -> list[tuple[Path, str]]:
    """The host's apt sources and proxy/acquire settings (what install.sh needs)."""
    out: list[tuple[Path, str]] = []
    etc = Path("/etc/apt")
    if (etc / "sources.list").is_file():
        out.append((etc / "sources.list", "/etc/apt/sources.list"))
    for f in sorted((etc / "sources.list.d").glob("*")):
        if f.suffix in (".list", ".sources") and f.is_file():
            out.append((f, f"/etc/apt/sources.list.d/{f.name}"))
    for f in sorted((etc / "apt.conf.d").glob("*")):
        if f.is_file() and re.search(r"Proxy|Acquire::", f.read_text(errors="replace")):
            out.append((f, f"/etc/apt/apt.conf.d/{f.name}"))
    return out


def _pip_binds() -> list[str]:
    """Read-only binds of the local package directories pip's config names."""
    binds = []
    for top in _PIP_DIRS:
        files = (
            [top] if top.is_file() else sorted(top.glob("*")) if top.is_dir() else []
        )
        for f in files:
            for path in re.findall(r"(?:file://)?(/opt/[^\s'\"]+)", f.read_text()):
                root = Path(*Path(path).parts[:3])  # /opt/<name>
                if root.is_dir() and f"--bind-ro={root}" not in binds:
                    binds.append(f"--bind-ro={root}")
    return binds


@pytest.fixture(scope="module")
def bare() -> Iterator[Container]:
    rootfs = ensure_rootfs(BARE_PACKAGES, base=BARE_BASE)
    caches = cache_dir() / "bare-install"
    debs = caches / "apt-archives"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    # Podman's overlay storage cannot live on the container's own overlayfs
    # root: femd-podman's home is a directory of the host's file system.
    podman_home = Path(tempfile.mkdtemp(prefix="femd-bare-podman-", dir="/var/tmp"))
    try:
        box = Container.boot(
            rootfs,
            private_network=False,
            writable_cgroup_v1=host_is_cgroup_v1(),
            extra_args=[
                f"--bind={debs}:/var/cache/apt/archives",
                f"--bind={podman_home}:/var/lib/femd-podman",
                # nspawn refuses the kernel keyring (not namespaced); a real
                # machine does not, and runc joins a session keyring.
                "--system-call-filter=add_key keyctl request_key",
                *_pip_binds(),
            ],
        )
        try:
            yield box
        finally:
            box.poweroff()
    finally:
        shutil.rmtree(podman_home, ignore_errors=True)


def test_bare_debian_install_then_doctor_and_a_task_per_launcher(bare: Container):
    box = bare
    # The promise: nothing but python3 and git (and an init) is there.
    for absent in ("podman", "bwrap", "catatonit", "gcc"):
        assert box.exec(["sh", "-c", f"command -v {absent}"], check=False).returncode
    settings = _apt_settings()
    if settings and not any(dst.endswith("/sources.list") for _, dst in settings):
        box.write("/etc/apt/sources.list", "")  # the host's sources replace ours
    for src, dst in settings:
        box.write(dst, src.read_bytes())
    # The host's local CAs (e.g. a proxy's): ca-certificates, which install.sh
    # adds, takes them into the trust store pip uses.
    for ca in sorted(Path("/usr/local/share/ca-certificates").glob("*.crt")):
        box.write(f"/usr/local/share/ca-certificates/{ca.name}", ca.read_bytes())
    for top in _PIP_DIRS:
        if top.is_file():
            box.write(str(top), top.read_bytes())
        elif top.is_dir():
            box.copy_in(top, str(top))
    with tempfile.TemporaryDirectory(prefix="femd-bare-") as tmp:
        box.copy_in(_checkout(Path(tmp)), "/root/femd")

    started = time.monotonic()
    # Test speed only, not what gets installed: no fsync per unpacked file.
    box.write("/etc/dpkg/dpkg.cfg.d/femd-test-unsafe-io", "force-unsafe-io\n")
    done = box.exec(
        ["sh", "/root/femd/scripts/install.sh"],
        check=False,
        timeout_s=1200,
    )
    took = time.monotonic() - started
    print(f"install.sh on a bare Debian 12: {took:.0f} s")  # noqa: T201
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("install: ok")

    # The rootless Podman service, as femd-podman.service would run it.
    uid = box.exec(["id", "-u", "femd-podman"]).stdout.strip()
    box.exec(["install", "-d", "-o", "femd-podman", "-m", "0700", f"/run/user/{uid}"])
    box.exec(
        [
            "systemd-run",
            "--unit=femd-test-podman",
            "--uid=femd-podman",
            f"--setenv=XDG_RUNTIME_DIR=/run/user/{uid}",
            "--setenv=HOME=/var/lib/femd-podman",
            "podman",
            "system",
            "service",
            "--time=0",
            PODMAN_SOCKET,
        ]
    )
    box.wait_unit("femd-test-podman.service", ("active",), timeout_s=30)
    box.shell("for i in $(seq 100); do [ -S /run/femd/podman/podman.sock ] && exit 0; "
              "sleep 0.1; done; exit 1")  # fmt: skip

    doctor = box.exec(
        ["/root/femd/.venv/bin/femd", "doctor", "--json",
         "--launchers", "/root/femd/launchers", "--podman-socket", PODMAN_SOCKET],
        check=False,
    )  # fmt: skip
    report = json.loads(doctor.stdout)
    status = {c["name"]: c for c in report["checks"]}
    # Both launchers ran their trivial task; podman may only warn (limits).
    shown = json.dumps(status, indent=1)
    assert status["process (profile default)"]["status"] == "ok", shown
    # ...in its own cgroup, with the limits enforced (not refused, not waived).
    process = status["process (profile default)"]["details"]
    assert any(d.startswith("enforces: memory yes") for d in process), shown
    assert status["podman (profile default)"]["status"] in ("ok", "warn"), shown
    assert "trivial task ran" in status["podman (profile default)"]["summary"]
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr

    tests = box.exec(
        ["sh", "-c", 'cd /root/femd && exec .venv/bin/python -m pytest -q '
         '-p no:cacheprovider "$@"', "pytest", *TASKS],
        check=False,
        timeout_s=600,
        env={"FEMD_TEST_REQUIRE": "all"},
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert "2 passed" in tests.stdout
