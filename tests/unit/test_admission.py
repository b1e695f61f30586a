"""One admission path: ``femd check`` and the agent decide with ``admit_here``.

Over the whole decision table, ``femd check --capabilities`` reports exactly
what ``admit_here()`` (the agent's call) reports; the launch-spec checks that
used to run only at launch (reserved mount targets, unenforceable limits,
profile identity) now deny in ``check`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.unit.test_decision as table
from femd import cli, doctor
from femd.admission import Host, admit_here, decode_host, host_report
from femd.decision import Rule
from femd.errors import ConfigError
from femd.launchers import (
    Capabilities,
    PodmanSettings,
    ProcessSettings,
    new_profile,
)
from femd.launchers.slurm.settings import SlurmSettings
from femd.policy import load_policy
from tests.conftest import NODE, NOW
from tests.fakes import ENFORCES_ALL

world = table.world  # the decision table's fixture
PROFILE = new_profile(
    name="default",
    podman=PodmanSettings(),
    process=ProcessSettings(),
    slurm=SlurmSettings(stage_dir="/srv/femd-stage"),
)


def _host(**caps: bool) -> Host:
    return Host(
        {"default": PROFILE},
        {
            ("default", name): Capabilities(launcher=name, **(ENFORCES_ALL | caps))
            for name in ("podman", "process", "slurm")
        },
        Path("/var/lib/femd/work"),
    )


def _caps_file(tmp_path: Path, host: Host) -> Path:
    path = tmp_path / "doctor.json"
    path.write_bytes(doctor.to_json([], [], host_report(host.profiles, host.caps)))
    return path


def _check(capsys, *args: str) -> dict:
    code = cli.main(["check", *args, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if out["decision"] == "allow" else 1)
    return out


@pytest.fixture
def recorded(monkeypatch):
    """Run a decision-table case; keep what admit() was given."""
    seen: dict = {}
    real = table.admit

    def admit(data, policy, *, node, now):
        seen.update(data=data, policy=policy, node=node, now=now)
        return real(data, policy, node=node, now=now)

    monkeypatch.setattr(table, "admit", admit)
    return seen


@pytest.mark.parametrize("case", table.CASES.values(), ids=table.CASES.keys())
def test_check_and_agent_agree_over_the_decision_table(
    world, recorded, case, tmp_path, capsys
):
    world(case)
    data, policy = recorded["data"], recorded["policy"]
    host = _host()
    agent = admit_here(
        data, policy, node=recorded["node"], now=recorded["now"], host=host
    )
    envelope = tmp_path / "task.env"
    envelope.write_bytes(data)
    out = _check(
        capsys,
        str(envelope),
        "--policy", str(policy.source),
        "--node", recorded["node"],
        "--at", recorded["now"].isoformat(),
        "--capabilities", str(_caps_file(tmp_path, host)),
    )  # fmt: skip
    assert [r["rule"] for r in out["reasons"]] == [
        r.rule for r in agent.decision.reasons
    ]
    assert [r.rule for r in agent.decision.reasons] == case.rules
    assert out["launch_checked"] is True


# Tasks the policy allows that this host cannot run as asked.
HOST_CASES = {
    "podman-mounts-etc": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/etc/x"}]},
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "podman-output-in-run": (
        {"outputs": {"path": "/run/out"}},
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "process-mounts-over-usr": (
        {
            "launcher": "process",
            "inputs": [{"dataset": "hf-cohort-2024", "mount": "/usr/lib/x"}],
        },
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "process-mounts-proc": (
        {
            "launcher": "process",
            "inputs": [{"dataset": "hf-cohort-2024", "mount": "/proc"}],
        },
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "process-mounts-etc-is-fine": (
        {
            "launcher": "process",
            "inputs": [{"dataset": "hf-cohort-2024", "mount": "/etc/x"}],
        },
        {},
        [],
    ),
    "podman-input-over-the-code": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/src"}]},
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "slurm-mounts-over-usr": (
        {
            "launcher": "slurm",
            "inputs": [{"dataset": "hf-cohort-2024", "mount": "/usr/lib/x"}],
        },
        {},
        [Rule.MOUNT_RESERVED],
    ),
    "slurm-mounts-data": ({"launcher": "slurm"}, {}, []),
    "no-memory-limit": ({}, {"memory_limit": False}, [Rule.LAUNCHER_UNENFORCEABLE]),
    "launcher-unavailable": ({}, {"available": False}, [Rule.LAUNCHER_UNENFORCEABLE]),
    "profile-missing": ({"profile": "gpu"}, {}, [Rule.LAUNCHER_UNENFORCEABLE]),
}


@pytest.mark.parametrize(
    ("task", "caps", "rules"), HOST_CASES.values(), ids=HOST_CASES.keys()
)
def test_check_denies_what_the_host_cannot_run(
    tmp_path, keys, make_policy, task_dict, sign, capsys, task, caps, rules
):
    path = make_policy(
        tmp_path,
        keys,
        projects={table.PROJECT: {"launchers": ["podman", "process", "slurm"]}},
    )
    envelope = tmp_path / "task.env"
    data = sign(task_dict(**task), *keys.values())
    envelope.write_bytes(data)
    host = _host(**caps)
    args = [str(envelope), "--policy", str(path), "--at", NOW.isoformat()]
    # Without capabilities: today's trust-kernel verdict, and a note saying so.
    plain = _check(capsys, *args)
    assert plain["decision"] == "allow"
    assert plain["launch_checked"] is False
    assert cli.main(["check", *args]) == 0
    assert "launch-spec and capability checks not run" in capsys.readouterr().out
    out = _check(capsys, *args, "--capabilities", str(_caps_file(tmp_path, host)))
    assert [r["rule"] for r in out["reasons"]] == rules
    agent = admit_here(data, load_policy(path), node=NODE, now=NOW, host=host)
    assert [r.rule for r in agent.decision.reasons] == rules


def test_a_capabilities_file_that_is_not_one_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="capabilities"):
        decode_host(b'{"ok": true}')
    bad = tmp_path / "caps.json"
    bad.write_text("{}")
    env = tmp_path / "e"
    env.write_text("{}")
    pol = tmp_path / "p"
    pol.write_text("{}")
    code = cli.main(
        ["check", str(env), "--policy", str(pol), "--capabilities", str(bad)]
    )
    assert code != 0
    assert "Traceback" not in capsys.readouterr().err
