"""A launcher is one module plus one registry line (issue 13).

``tests/fakes.FakeLauncher`` is put into ``femd.launchers.LAUNCHERS`` (for the
``process`` name) and nothing else changes: the real agent, on a real broker,
admits a task, builds its spec, runs it with the fake and ships its outputs.
The same agent rejects a task whose output target the sandbox keeps for
itself, with the same rules ``femd check --config`` reports for it.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import tarfile
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import femd.launchers  # noqa: E402
from femd import cli  # noqa: E402
from femd.agent import Agent  # noqa: E402
from femd.config import load_config  # noqa: E402
from tests.fakes import FakeLauncher  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    NodeEnv,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)

pytestmark = [pytest.mark.rabbitmq]


def test_a_fake_launcher_runs_a_task_through_the_agent(
    node_env: NodeEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    env = node_env
    FakeLauncher.built.clear()
    # The one registry line:
    registry = {**femd.launchers.LAUNCHERS, "process": FakeLauncher.factory}
    monkeypatch.setattr(femd.launchers, "LAUNCHERS", MappingProxyType(registry))
    events = env.collect()
    # The agent in this process, as systemd would see it: a notify socket.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(env.root / "fake-notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(env.root / "fake-notify.sock"))
    agent = Agent(load_config(env.config))
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(agent.run()))
    runner.start()
    try:
        wait_for("READY", lambda: agent._ready, 30)
        reserved = env.task("fake-2", outputs={"path": "/proc/out"})
        env.publish(env.task("fake-1"), reserved)
        ends = events.await_terminal(["fake-1", "fake-2"], 60)
    finally:
        agent.request_stop()
        runner.join(30)
        notify.close()
    assert exit_codes == [0]
    assert ends["fake-1"]["state"] == "succeeded", ends["fake-1"]
    assert events.states("fake-1")[-3:] == ["running", "uploading", "succeeded"]
    launched = [s for f in FakeLauncher.built for s in f.launched]
    assert [s.task_id for s in launched] == ["fake-1"]
    assert launched[0].launcher == "process"
    assert launched[0].argv == tuple(env.counted("fake-1"))
    with tarfile.open(fileobj=io.BytesIO(events.outputs("fake-1"))) as tar:
        assert tar.extractfile("result.txt").read() == b"42\n"  # type: ignore[union-attr]
    # Refused at admission, before staging: the same rules as `femd check`.
    assert ends["fake-2"]["state"] == "rejected", ends["fake-2"]
    agent_rules = [r["rule"] for r in ends["fake-2"]["reasons"]]
    assert agent_rules == ["mount.reserved"]
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
