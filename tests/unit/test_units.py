"""units/: the hardened femd.service, femd-podman.service, sysusers, tmpfiles.

What needs a booted systemd (the units load, the agent starts, bwrap works
under the hardening) is in tests/system/test_package.py; here the files are
checked against DESIGN and against each other, and femd.service is scored by
``systemd-analyze security --offline=yes``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from femd.config import AgentConfig, load_config

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
DEB = REPO / "packaging" / "deb"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """A systemd unit file: section -> key -> every value assigned, in order."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"{path.name}: {line!r} before a section"
        assert not line.endswith("\\"), "no continuation lines, please"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def table(path: Path) -> list[list[str]]:
    """sysusers.d / tmpfiles.d lines, split like systemd does (quotes kept)."""
    rows = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rows.append(re.findall(r'"[^"]*"|\S+', line))
    return rows


@pytest.fixture(scope="module")
def femd() -> Unit:
    return parse_unit(UNITS / "femd.service")


@pytest.fixture(scope="module")
def podman() -> Unit:
    return parse_unit(UNITS / "femd-podman.service")


@pytest.fixture(scope="module")
def config() -> AgentConfig:
    """The repository's femd.yaml: the package ships it as /etc/femd/femd.yaml."""
    return load_config(REPO / "femd.yaml", {})


# --- the exposure score -------------------------------------------------------


def exposure(unit: Path) -> float:
    analyze = shutil.which("systemd-analyze")
    # scripts/install.sh installs systemd-container, which brings systemd-analyze.
    assert analyze is not None, "systemd-analyze is not installed"
    done = subprocess.run(  # noqa: S603 - a fixed tool and our own unit file
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(
        r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr
    )
    assert found, f"no exposure level in:\n{done.stdout}\n{done.stderr}"
    return float(found.group(1))


def test_femd_service_exposure_is_at_most_2() -> None:
    # DESIGN "systemd": exposure <= 2.0
    assert exposure(UNITS / "femd.service") <= 2.0


def test_exposure_parser_sees_a_weak_unit(tmp_path: Path) -> None:
    """The score above is real: an unhardened unit scores far worse."""
    weak = tmp_path / "weak.service"
    weak.write_text("[Service]\nExecStart=/bin/true\nUser=nobody\n")
    assert exposure(weak) > 5.0


# --- femd.service: DESIGN "systemd" -------------------------------------------


def test_femd_service_contract(femd: Unit) -> None:
    s = "Service"
    assert one(femd, s, "Type") == "notify"
    assert one(femd, s, "NotifyAccess") == "main"
    assert one(femd, s, "ExecStart") == (
        "/opt/femd/bin/femd run --config /etc/femd/femd.yaml"
    )
    assert one(femd, s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(femd, s, "WatchdogSec") == "30"
    assert one(femd, s, "Restart") == "on-failure"
    assert one(femd, s, "User") == one(femd, s, "Group") == "femd"
    assert one(femd, s, "StateDirectory") == "femd"
    assert one(femd, s, "ConfigurationDirectory") == "femd"
    assert one(femd, s, "RuntimeDirectory") == "femd"
    assert one(femd, s, "UMask") == "0077"
    # SIGTERM to the agent only: it drains, its sandboxes are not killed first.
    assert one(femd, s, "KillMode") == "mixed"
    assert "femd-podman.service" in one(femd, "Unit", "Wants").split()
    assert "femd-podman.service" in one(femd, "Unit", "After").split()
    assert one(femd, "Install", "WantedBy") == "multi-user.target"


def test_femd_service_never_runs_privileged(femd: Unit) -> None:
    s = femd["Service"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["NoNewPrivileges"] == ["yes"]
    assert "AmbientCapabilities" not in s or s["AmbientCapabilities"] == [""]
    assert "PermissionsStartOnly" not in s
    for key in ("ExecStart", "ExecReload"):
        assert not s[key][0].startswith(("+", "!")), "no privileged Exec prefixes"


def test_stop_timeout_leaves_room_for_the_drain(femd: Unit) -> None:
    """TimeoutStopSec must exceed femd.yaml's stop_grace_s (default 30 s)."""
    value = one(femd, "Service", "TimeoutStopSec")
    found = re.fullmatch(r"(\d+)(min|s)?", value)
    assert found, value
    seconds = int(found.group(1)) * (60 if found.group(2) == "min" else 1)
    assert seconds >= 120


def test_namespaces_allowed_are_the_ones_bwrap_needs(femd: Unit) -> None:
    allowed = set(one(femd, "Service", "RestrictNamespaces").split())
    assert allowed == {"user", "mnt", "pid", "net", "ipc"}
    # a private, unchangeable hostname namespace replaces bwrap --unshare-uts
    assert one(femd, "Service", "ProtectHostname") == "yes"


# --- femd-podman.service -----------------------------------------------------


def test_podman_service(podman: Unit) -> None:
    s = "Service"
    assert one(podman, s, "User") == "femd-podman"
    assert one(podman, s, "Delegate") == "yes"
    assert one(podman, s, "KillMode") == "mixed"
    # the socket comes from femd-podman.socket (socket activation)
    assert one(podman, s, "ExecStart") == "/usr/bin/podman system service --time=0"
    assert "femd-podman.socket" in one(podman, "Unit", "Requires").split()
    runtime = one(podman, s, "RuntimeDirectory")
    assert f"XDG_RUNTIME_DIR=/run/{runtime}" in podman[s]["Environment"]
    assert "NoNewPrivileges" not in podman[s], "newuidmap is setuid"
    # not PartOf/BindsTo femd: containers outlive an agent restart
    unit = podman.get("Unit", {})
    assert "PartOf" not in unit
    assert "BindsTo" not in unit


def test_podman_socket_is_for_the_agent_only(config: AgentConfig) -> None:
    sock = parse_unit(UNITS / "femd-podman.socket")
    path = config.podman.socket.removeprefix("unix://")
    assert one(sock, "Socket", "ListenStream") == path
    assert one(sock, "Socket", "SocketUser") == "femd-podman"
    assert one(sock, "Socket", "SocketGroup") == "femd"
    assert one(sock, "Socket", "SocketMode") == "0660"


# --- sysusers, tmpfiles: the directories and who may enter them ----------------


def test_sysusers_declares_both_users() -> None:
    rows = table(UNITS / "femd.sysusers")
    users = {r[1]: r for r in rows if r[0] == "u"}
    assert set(users) == {"femd", "femd-podman"}
    assert users["femd"][4] == "/var/lib/femd"
    assert users["femd-podman"][4] == "/var/lib/femd-podman"
    # podman reaches the agent's task directories by group; not the reverse
    assert [r for r in rows if r[0] == "m"] == [["m", "femd-podman", "femd"]]


def test_tmpfiles_match_units_and_config(
    femd: Unit, podman: Unit, config: AgentConfig
) -> None:
    dirs = {r[1]: r for r in table(UNITS / "femd.tmpfiles") if r[0] == "d"}
    s = "Service"
    state = dirs[config.state_dir]
    assert state[2:5] == [one(femd, s, "StateDirectoryMode"), "femd", "femd"]
    run = dirs["/run/" + one(femd, s, "RuntimeDirectory")]
    assert run[2:5] == [one(femd, s, "RuntimeDirectoryMode"), "femd", "femd"]
    assert one(femd, s, "RuntimeDirectoryPreserve") == "yes"
    sock_dir = str(Path(config.podman.socket.removeprefix("unix://")).parent)
    assert dirs[sock_dir][2:5] == ["0750", "femd-podman", "femd"]
    assert "/var/lib/" + one(podman, s, "StateDirectory") in dirs
    assert run[2] == "0750"


# --- packaging ----------------------------------------------------------------


@pytest.mark.parametrize("script", ["build.sh", "postinst", "prerm", "postrm"])
def test_package_scripts_are_valid_sh(script: str) -> None:
    path = DEB / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert path.read_text().startswith("#!/bin/sh\n")
    done = subprocess.run(  # noqa: S603 - a fixed shell and our own script
        ["/bin/sh", "-n", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_shipped_config_names_the_package_paths(config: AgentConfig) -> None:
    assert config.policy == "/etc/femd/policy.yaml"
    assert config.launchers == "/usr/share/femd/launchers"
    assert config.state_dir == "/var/lib/femd"
    assert config.broker.key.startswith("/etc/femd/")


def test_package_ships_what_the_units_name(femd: Unit) -> None:
    postinst = (DEB / "postinst").read_text()
    venv = one(femd, "Service", "ExecStart").split()[0].removesuffix("/bin/femd")
    assert f"VENV={venv}\n" in postinst
    conffiles = (DEB / "conffiles").read_text().split()
    assert one(femd, "Service", "ExecStart").split()[-1] in conffiles
    assert "/etc/femd/policy.yaml" in conffiles
