"""A new launcher is one module plus one registry line (issues 13 and 19).

``tests/fakes.py`` declares the ``fake`` launcher (its class, its profile
section, its spec check) and this test adds the one registry line
(``"fake": REGISTRATION``) and nothing else: no femd file names it. Before
that line, the site's files that use it are refused; after it, the real agent
on a real broker admits a ``launcher: fake`` task, builds its spec from the
``fake:`` profile section, runs it with the fake and ships its outputs. The
same agent rejects a task whose output target the fake keeps for itself, with
the same rule ``femd check --config`` reports for it.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import cli  # noqa: E402
from femd.errors import ConfigError, PolicyError  # noqa: E402
from femd.launchers import load_profile, registry  # noqa: E402
from femd.policy import load_policy  # noqa: E402
from tests.fakes import REGISTRATION, RegisteredFake  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    PROJECT,
    NodeEnv,
    agent_in_process,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
)

pytestmark = [pytest.mark.rabbitmq]


def _use_the_fake(env: NodeEnv) -> None:
    """The site's side: a `fake:` profile section, a policy that allows it."""
    profile = env.root / "launchers" / "default.yaml"
    data = yaml.safe_load(profile.read_text())
    data["fake"] = {"outputs": {"result.txt": "42\n"}}
    profile.write_text(yaml.safe_dump(data))
    policy = env.root / "policy.yaml"
    data = yaml.safe_load(policy.read_text())
    data["projects"][PROJECT]["launchers"] = ["fake"]
    policy.write_text(yaml.safe_dump(data))


def test_a_fake_launcher_runs_a_task_through_the_agent(
    node_env: NodeEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    env = node_env
    _use_the_fake(env)
    # Without its registration femd knows no `fake`: not as a section...
    with pytest.raises(ConfigError, match="unknown field `fake`"):
        load_profile(env.root / "launchers" / "default.yaml")
    # ...nor as a launcher name.
    with pytest.raises(PolicyError, match='"fake" is not allowed here'):
        load_policy(env.root / "policy.yaml")
    RegisteredFake.built.clear()
    # The one registry line:
    lines = {**registry.LAUNCHERS, "fake": REGISTRATION}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    events = env.collect()
    with agent_in_process(env, monkeypatch):
        reserved = env.task("fake-2", launcher="fake", outputs={"path": "/fake"})
        env.publish(env.task("fake-1", launcher="fake"), reserved)
        ends = events.await_terminal(["fake-1", "fake-2"], 60)
    assert ends["fake-1"]["state"] == "succeeded", ends["fake-1"]
    assert events.states("fake-1")[-3:] == ["running", "uploading", "succeeded"]
    built = RegisteredFake.built
    launched = [s for f in built for s in f.launched]
    assert [s.task_id for s in launched] == ["fake-1"]
    assert launched[0].launcher == "fake"
    assert launched[0].argv == tuple(env.counted("fake-1"))
    # Its environment: its own state subdirectory, the agent's scope.
    assert {f.env.state_dir for f in built if f.env} == {
        env.state_dir.resolve() / "launchers" / "fake"
    }
    with tarfile.open(fileobj=io.BytesIO(events.outputs("fake-1"))) as tar:
        assert tar.extractfile("result.txt").read() == b"42\n"  # type: ignore[union-attr]
    # Refused at admission, by the fake's own spec check, before staging:
    # the same rules as `femd check`.
    assert ends["fake-2"]["state"] == "rejected", ends["fake-2"]
    agent_rules = [r["rule"] for r in ends["fake-2"]["reasons"]]
    assert agent_rules == ["mount.reserved"]
    assert "reserved by the fake" in ends["fake-2"]["reasons"][0]["message"]
    envelope = tmp_path / "fake-2.env"
    envelope.write_bytes(reserved)
    policy = str(env.root / "policy.yaml")
    code = cli.main(
        [
            "check",
            str(envelope),
            "--policy",
            policy,
            "--config",
            str(env.config),
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [r["rule"] for r in out["reasons"]] == agent_rules
    assert out["launch_checked"] is True
