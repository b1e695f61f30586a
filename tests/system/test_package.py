"""femd's .deb in a booted Debian 12: install, units, hardening, journal, purge.

One container (module scope) holds an installed package for the read-only
checks; the remove/purge test boots its own. The container has no network
(``--private-network``): installing proves the package needs none.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nspawn_support import (
    REPO,
    Container,
    audit,
    build_deb,
    drop_in,
    femd_container,
    install_deb,
    start,
    wait_for,
)

from femd.audit import Event

pytestmark = pytest.mark.systemd

UNITS = ("femd.service", "femd-podman.service", "femd-podman.socket")

# Run inside femd.service (its real hardening, user femd) in place of the agent:
# the audit trail through both journal transports, a bubblewrap sandbox with
# the namespaces the process launcher uses, and the Podman socket.
PROBE = r"""
import json, socket, subprocess, sys
from femd import audit

report = {}
audit.configure("auto")  # stderr is the journal stream: python3-systemd
report["auto_transport"] = type(audit._sink.journal).__name__
for event in audit.Event:
    audit.emit(event, f"probe {event.name}", task_id="probe-1", project="proj",
               node="fdn-test", state="succeeded", decision="allow",
               rules=["a.b", "c.d"], signer_keyids=["ab" * 32], exit_code=0,
               datasets=["ds-1", "ds-2"], priority=5)
audit.task_log("probe-1", "proj", b"task says hello\n")
audit.configure("journal", journal_socket="/run/systemd/journal/socket")
report["native_transport"] = type(audit._sink.journal).__name__
audit.emit(audit.Event.TASK_FINISHED, "native\nwith a newline", task_id="probe-2")

bwrap = ["bwrap", "--unshare-user", "--unshare-ipc", "--unshare-pid",
         "--unshare-net", "--disable-userns", "--die-with-parent",
         "--new-session", "--cap-drop", "ALL", "--clearenv",
         "--setenv", "PATH", "/usr/bin:/bin", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp", "--",
         "/bin/sh", "-c",
         "echo pid=$$; id -u; touch /tmp/ok && echo tmp=ok; "
         "unshare -U true 2>/dev/null && echo userns=yes || echo userns=no; "
         "cat /proc/net/dev | grep -c :"]
run = subprocess.run(["prlimit", "--nproc=64", "--core=0", "--"] + bwrap,
                     capture_output=True, text=True)
report["bwrap"] = [run.returncode, run.stdout, run.stderr]
taskset = subprocess.run(["taskset", "--cpu-list", "0", "true"],
                         capture_output=True, text=True)
report["taskset"] = [taskset.returncode, taskset.stderr]
import os
try:
    os.nice(1)
    report["nice"] = "allowed"
except PermissionError:
    report["nice"] = "EPERM"

s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect("/run/femd/podman/podman.sock")
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
report["podman_ping"] = s.recv(4096).decode(errors="replace").splitlines()[-1]
s.close()
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect("/run/femd/podman/podman.sock")
s.sendall(b"GET /v4.0.0/libpod/info HTTP/1.0\r\nHost: d\r\n\r\n")
reply = b""
while chunk := s.recv(65536):
    reply += chunk
store = json.loads(reply.split(b"\r\n\r\n", 1)[1])["store"]
report["podman_store"] = {k: store[k] for k in ("runRoot", "graphRoot")}
with open("/var/lib/femd/probe.json", "w") as f:
    json.dump(report, f)
"""

PROBE_UNIT = """[Service]
Type=oneshot
WatchdogSec=0
Restart=no
ExecStart=
ExecStart=/opt/femd/bin/python /usr/local/lib/femd-probe.py
"""


@pytest.fixture(scope="module")
def deb() -> Path:
    return build_deb()


@pytest.fixture(scope="module")
def box(deb: Path) -> Iterator[Container]:
    with femd_container(deb) as container:
        yield container


def stat(box: Container, path: str) -> str:
    return box.exec(["stat", "-c", "%a %U:%G %F", path]).stdout.strip()


# --- install -------------------------------------------------------------------


def test_users_and_subordinate_ids(box: Container) -> None:
    for user in ("femd", "femd-podman"):
        entry = box.exec(["getent", "passwd", user]).stdout.strip().split(":")
        assert int(entry[2]) < 1000, f"{user} is not a system user"
        assert entry[6] == "/usr/sbin/nologin"
    assert box.exec(["id", "-nG", "femd"]).stdout.split() == ["femd"]
    groups = box.exec(["id", "-nG", "femd-podman"]).stdout.split()
    assert sorted(groups) == ["femd", "femd-podman"]
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = box.read(path).splitlines()
        mine = [line for line in lines if line.startswith("femd-podman:")]
        assert len(mine) == 1
        _, first, count = mine[0].split(":")
        assert int(first) >= 100000
        assert int(count) == 9 * 65536  # userns=auto: 8 concurrent containers
        assert not any(line.startswith("femd:") for line in lines)


def test_files_and_permissions(box: Container) -> None:
    assert stat(box, "/etc/femd") == "750 root:femd directory"
    for conf in ("femd.yaml", "policy.yaml"):
        assert stat(box, f"/etc/femd/{conf}") == "640 root:femd regular file"
    assert stat(box, "/var/lib/femd") == "750 femd:femd directory"
    assert stat(box, "/var/lib/femd-podman") == "711 femd-podman:femd-podman directory"
    assert stat(box, "/run/femd") == "750 femd:femd directory"
    assert stat(box, "/run/femd/podman") == "750 femd-podman:femd directory"
    link = box.exec(["readlink", "/usr/bin/femd"]).stdout.strip()
    assert link == "/opt/femd/bin/femd"
    shipped = set(box.exec(["ls", "/usr/share/femd/launchers"]).stdout.split())
    assert shipped == {p.name for p in (REPO / "launchers").glob("*.yaml")}
    box.exec(["test", "-f", "/usr/lib/systemd/catalog/femd.catalog"])
    conffiles = box.exec(["dpkg-query", "-W", "-f", "${Conffiles}", "femd"]).stdout
    assert "/etc/femd/femd.yaml" in conffiles
    assert "/etc/femd/policy.yaml" in conffiles


def test_femd_runs_from_its_venv(box: Container) -> None:
    box.exec(["/opt/femd/bin/python", "-c", "import femd, msgspec, pika, pygit2"])
    # Every subpackage of femd is in the wheel, not only the top-level modules.
    packages = sorted(
        "femd." + ".".join(p.parent.relative_to(REPO / "femd").parts)
        for p in (REPO / "femd").glob("*/**/__init__.py")
    )
    box.exec(["/opt/femd/bin/python", "-c", "import " + ", ".join(packages)])
    assert box.exec(["femd", "--help"]).stdout.startswith("usage: femd")
    out = box.exec(["femd", "policy", "lint", "/etc/femd/policy.yaml"]).stdout
    assert "0 project(s)" in out
    # python3-systemd is reachable from the venv (the audit trail uses it)
    box.exec(["/opt/femd/bin/python", "-c", "import systemd.journal"])


def test_units_load_and_verify(box: Container) -> None:
    for unit in UNITS:
        assert box.unit_property(unit, "LoadState") == "loaded"
        # installing never enables or starts the agent: certificates first
        assert box.unit_property(unit, "UnitFileState") == "disabled"
    assert box.unit_property("femd.service", "ActiveState") == "inactive"
    verify = box.exec(["systemd-analyze", "verify", *UNITS], check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == ""


def test_exposure_of_the_installed_unit(box: Container) -> None:
    out = box.exec(["systemd-analyze", "security", "femd.service"]).stdout
    found = re.search(r"Overall exposure level for femd.service: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= 2.0


def test_catalog_is_installed(box: Container) -> None:
    listed = box.exec(["journalctl", "--list-catalog"]).stdout
    ids = {line.split()[0] for line in listed.splitlines() if " femd: " in line}
    assert ids == {e.value for e in Event}


# --- the hardened unit: journald, bubblewrap, podman -----------------------------


@pytest.fixture(scope="module")
def probe(box: Container) -> dict[str, object]:
    start(box, "femd-podman.socket")
    box.write("/usr/local/lib/femd-probe.py", PROBE)
    drop_in(box, "femd.service", PROBE_UNIT, name="probe")
    try:
        box.systemctl("start", "femd.service")  # oneshot: returns when done
    finally:
        drop_in(box, "femd.service", "", name="probe")
    report = json.loads(box.read("/var/lib/femd/probe.json"))
    assert isinstance(report, dict)
    return report


def test_audit_entries_in_the_journal(box: Container, probe: dict[str, object]) -> None:
    assert probe["auto_transport"] == "_LibJournal"
    entries = audit(box, FEMD_TASK_ID="probe-1")
    assert [e["MESSAGE_ID"] for e in entries] == [e.value for e in Event]
    for entry in entries:
        assert entry["_SYSTEMD_UNIT"] == "femd.service"
        assert entry["PRIORITY"] == "5"
        # repeated fields: journalctl -o json shows them as a list
        assert entry["FEMD_RULES"] == ["a.b", "c.d"]
        assert entry["FEMD_DATASETS"] == ["ds-1", "ds-2"]
        assert entry["FEMD_SIGNER_KEYIDS"] == "ab" * 32
        assert entry["FEMD_EXIT_CODE"] == "0"
        assert "CODE_FILE" not in entry
        assert "FEMD_IMAGE_DIGEST" not in entry
    # the auditor's query from DESIGN, as documented in docs/auditor.md
    query = box.journal("femd.service", FEMD_TASK_ID="probe-1")
    assert len(query) == len(entries) + 1  # and the task's own output line
    # journalctl FEMD_DATASETS=x matches every entry that used x
    by_dataset = box.journal("femd.service", FEMD_DATASETS="ds-2")
    assert [e["MESSAGE_ID"] for e in by_dataset] == [e.value for e in Event]
    by_rule = box.journal("femd.service", FEMD_RULES="c.d")
    assert len(by_rule) == len(entries)
    [task_line] = box.journal(identifier="femd-task", FEMD_TASK_ID="probe-1")
    assert task_line["MESSAGE"] == "task says hello"


def test_native_protocol_reaches_journald(
    box: Container, probe: dict[str, object]
) -> None:
    assert probe["native_transport"] == "_NativeJournal"
    [entry] = audit(box, FEMD_TASK_ID="probe-2")
    assert entry["MESSAGE"] == "native\nwith a newline"
    assert entry["MESSAGE_ID"] == Event.TASK_FINISHED.value
    assert entry["_SYSTEMD_UNIT"] == "femd.service"


def test_catalog_text_explains_entries(
    box: Container, probe: dict[str, object]
) -> None:
    out = box.exec(
        ["journalctl", "-x", "-u", "femd.service", "--no-pager",
         f"MESSAGE_ID={Event.TASK_REJECTED.value}", "FEMD_TASK_ID=probe-1"]
    ).stdout  # fmt: skip
    assert "Subject: femd rejected task probe-1\n" in out
    assert "Defined-By: femd" in out


def test_bwrap_sandbox_works_under_the_hardening(probe: dict[str, object]) -> None:
    result = probe["bwrap"]
    assert isinstance(result, list)
    code, out, err = result
    assert code == 0, err
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert int(lines["pid"]) <= 2  # own pid namespace (bwrap is 1), own /proc
    assert lines["tmp"] == "ok"
    assert lines["userns"] == "no"  # --disable-userns works (/proc/sys/user)
    assert out.splitlines()[-1] == "1"  # own network namespace: loopback only
    # @resources is refused as a whole (a task's cpus are a cgroup quota, its
    # rlimits are set with prlimit64, in @default): no affinity, no priority.
    code, err = probe["taskset"]
    assert code != 0
    assert "Operation not permitted" in err
    assert probe["nice"] == "EPERM"


def test_agent_reaches_podman_and_others_do_not(
    box: Container, probe: dict[str, object]
) -> None:
    assert probe["podman_ping"] == "OK"
    assert box.unit_property("femd-podman.service", "ActiveState") == "active"
    ping = (
        "import socket; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/run/femd/podman/podman.sock')"
    )
    denied = box.exec(["python3", "-c", ping], user="nobody", check=False)
    assert denied.returncode != 0
    assert "PermissionError" in denied.stderr


def test_podman_user_configuration(box: Container, probe: dict[str, object]) -> None:
    """postinst ran scripts/setup-podman-user.sh; its config suits the unit."""
    conf = "/var/lib/femd-podman/.config/containers"
    for name in ("containers.conf", "storage.conf"):
        assert stat(box, f"{conf}/{name}") == "644 femd-podman:femd-podman regular file"
    assert 'runtime = "runc"' in box.read(f"{conf}/containers.conf")
    assert "runroot" not in box.read(f"{conf}/storage.conf")
    # runroot follows XDG_RUNTIME_DIR: femd-podman.service's RuntimeDirectory=
    assert probe["podman_store"] == {
        "runRoot": "/run/femd-podman/containers",
        "graphRoot": "/var/lib/femd-podman/.local/share/containers/storage",
    }
    uid = box.exec(["id", "-u", "femd-podman"]).stdout.strip()
    gone = box.exec(["test", "-e", f"/run/user/{uid}"], check=False)
    assert gone.returncode != 0, "no logind-style runtime dir for a system user"


def test_podman_user_reaches_task_dirs_not_the_key(box: Container) -> None:
    box.exec(["install", "-d", "-o", "femd", "-g", "femd", "-m", "0750",
              "/var/lib/femd/work"])  # fmt: skip
    box.exec(["test", "-x", "/var/lib/femd/work"], user="femd-podman")
    box.write("/etc/femd/tls/node.key", "secret\n", mode=0o600)
    box.exec(["chown", "femd:femd", "/etc/femd/tls/node.key"])
    box.exec(["test", "-r", "/etc/femd/tls/node.key"], user="femd")
    leak = box.exec(["cat", "/etc/femd/tls/node.key"], user="femd-podman", check=False)
    assert leak.returncode != 0


NOTIFY = r"""
import signal, sys, time
import sdnotify
from femd import audit

notifier = sdnotify.SystemdNotifier()
hups = []
signal.signal(signal.SIGHUP, lambda *_: hups.append(1))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
audit.emit(audit.Event.AGENT_STARTED, "notify probe up", node="fdn-test")
notifier.notify("READY=1")
seen = 0
while True:
    notifier.notify("WATCHDOG=1")
    if len(hups) > seen:
        seen = len(hups)
        audit.emit(audit.Event.POLICY_RELOADED, "probe reloaded", node="fdn-test")
        notifier.notify("READY=1")
    time.sleep(0.2)
"""

NOTIFY_UNIT = """[Service]
ExecStart=
ExecStart=/opt/femd/bin/python /usr/local/lib/femd-notify.py
"""


def test_notify_watchdog_reload_stop(box: Container) -> None:
    """Type=notify, WatchdogSec, ExecReload and SIGTERM work under the hardening."""
    box.write("/usr/local/lib/femd-notify.py", NOTIFY)
    drop_in(box, "femd.service", NOTIFY_UNIT, name="notify")
    try:
        assert start(box, "femd.service", timeout_s=60) == "active"
        pid = box.unit_property("femd.service", "MainPID")
        box.systemctl("reload", "femd.service")
        wait_for(lambda: audit(box, MESSAGE_ID=Event.POLICY_RELOADED.value))
        time.sleep(35)  # longer than WatchdogSec=30: the pings keep it alive
        assert box.unit_property("femd.service", "MainPID") == pid
        assert box.unit_property("femd.service", "ActiveState") == "active"
        box.systemctl("stop", "femd.service")
        assert box.unit_property("femd.service", "Result") == "success"
    finally:
        box.systemctl("stop", "femd.service", check=False)
        drop_in(box, "femd.service", "", name="notify")


# --- upgrade, remove, purge -------------------------------------------------------


def test_reinstall_remove_purge(deb: Path) -> None:
    with femd_container(deb) as box:
        box.exec(["sh", "-c", "echo '# mine' >> /etc/femd/policy.yaml"])
        box.write("/etc/femd/tls/node.key", "not a real key\n", mode=0o640)
        box.exec(["touch", "/var/lib/femd/state.sqlite"])

        # same version again: the upgrade path (venv rebuilt, conffile kept)
        install_deb(box, deb)
        box.exec(["dpkg", "-i", "/root/" + deb.name])
        assert box.exec(["femd", "--help"]).returncode == 0
        assert "# mine" in box.read("/etc/femd/policy.yaml")
        assert box.exec(["test", "!", "-e", "/opt/femd.old"]).returncode == 0

        box.exec(["apt-get", "remove", "-y", "femd"])
        gone = box.exec(["test", "-e", "/opt/femd"], check=False)
        assert gone.returncode != 0, "remove keeps /opt/femd"
        for kept in ("/etc/femd/tls/node.key", "/var/lib/femd/state.sqlite"):
            box.exec(["test", "-e", kept])
        box.exec(["id", "femd"])

        box.exec(["apt-get", "purge", "-y", "femd"])
        for path in ("/etc/femd", "/var/lib/femd", "/var/lib/femd-podman",
                     "/opt/femd", "/usr/bin/femd"):  # fmt: skip
            left = box.exec(["test", "-e", path], check=False)
            assert left.returncode != 0, f"purge left {path}"
        for path in ("/etc/subuid", "/etc/subgid"):
            assert "femd-podman:" not in box.read(path)
        overrides = box.exec(["dpkg-statoverride", "--list"]).stdout
        assert "/etc/femd" not in overrides
        # system users stay (a reused uid would inherit their files)
        box.exec(["id", "femd-podman"])
        status = box.exec(["dpkg-query", "-W", "-f", "${Status}", "femd"], check=False)
        assert "not-installed" in status.stdout or status.returncode != 0
        listed = box.exec(["journalctl", "--list-catalog"]).stdout
        assert " femd: " not in listed


def test_package_metadata(deb: Path) -> None:
    info = subprocess.run(  # noqa: S603 - fixed tool, our own package
        ["/usr/bin/dpkg-deb", "--field", str(deb), "Package", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Package: femd" in info
    depends = info.split("Depends:", 1)[1]
    # What the launchers cannot run without is a dependency, not a
    # recommendation (apt may be told to skip those).
    for name in (
        "bubblewrap",
        "podman",
        "runc",
        "uidmap",
        "catatonit",
        "busybox-static",
    ):
        assert re.search(rf"(^|[ ,]){name}([ ,(]|$)", depends), name
    assert re.search(r"python3 \(<< 3\.\d+\)", info), "wheels are for one Python"


def test_lintian_finds_no_error_and_no_warning(deb: Path) -> None:
    done = subprocess.run(  # noqa: S603 - fixed tool, our own package
        ["/usr/bin/lintian", "--fail-on", "error,warning", "--no-tag-display-limit",
         str(deb)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )  # fmt: skip
    tags = [ln for ln in done.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert tags == [], "\n".join(tags)
    assert done.returncode == 0, done.stdout + done.stderr


def test_manual_page_lists_every_command(deb: Path, tmp_path: Path) -> None:
    subprocess.run(  # noqa: S603 - fixed tool, our own package
        ["/usr/bin/dpkg-deb", "-x", str(deb), str(tmp_path)], check=True
    )
    import gzip

    page = gzip.decompress(
        (tmp_path / "usr/share/man/man1/femd.1.gz").read_bytes()
    ).decode()
    for command in (
        "keygen",
        "sign",
        "check",
        "policy lint",
        "policy schema",
        "run",
        "submit",
        "watch",
        "doctor",
        "tasks",
        "import\\-fem",
    ):
        assert f".SS {command}\n" in page, command  # fmt: skip
    assert "\\-\\-podman\\-socket" in page
