"""femd.earlylink: a link started before its agent; what it says is held, in order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.config import load_config  # noqa: E402
from femd.earlylink import EarlyLink  # noqa: E402
from femd.errors import BrokerError  # noqa: E402
from testbed.fresh import last_json  # noqa: E402
from testbed.pki import make_ca  # noqa: E402
from tests.conftest import make_policy  # noqa: E402
from tests.fakes import FakeLink  # noqa: E402


@pytest.fixture(name="config")
def config_fixture(tmp_path: Path) -> Any:
    ca = make_ca(tmp_path / "ca")
    mine = ca.issue("fdn-01", tmp_path / "node", sans=())
    (tmp_path / "femd.yaml").write_text(
        yaml.safe_dump(
            {
                "node": "fdn-01",
                "broker": {
                    "url": "amqps://broker.invalid:5671/femd",
                    "ca": str(ca.cert),
                    "cert": str(mine.cert),
                    "key": str(mine.key),
                },
                "policy": str(tmp_path / "policy.yaml"),
                "launchers": str(tmp_path / "launchers"),
                "state_dir": str(tmp_path / "state"),
                "audit": "stderr",
            }
        )
    )
    return load_config(tmp_path / "femd.yaml")


def test_what_the_link_says_before_bind_is_handed_over_in_order(config: Any) -> None:
    early = EarlyLink(config, link=FakeLink)
    link = early.link
    assert isinstance(link, FakeLink)
    assert link.connected.is_set()  # started, and connected, before any agent
    assert not link.intake_open  # but taking no delivery before its agent
    link._on_state(False, "connection reset")
    link._on_state(True, "")
    link._on_delivery()  # none can come while held; a wake is still relayed
    heard: list[tuple[bool, str]] = []
    wakes: list[None] = []
    early.bind(lambda up, why: heard.append((up, why)), lambda: wakes.append(None))
    assert heard == [(True, ""), (False, "connection reset"), (True, "")]
    assert wakes == [None]  # held until the agent listens
    assert link.intake_open
    link.deliver(b"x")
    assert link.inbox.qsize() == 1
    assert wakes == [None, None]
    link._on_state(False, "closed")
    assert heard[-1] == (False, "closed")


def test_a_bad_tls_file_stops_before_any_link(config: Any, tmp_path: Path) -> None:
    import msgspec

    broken = msgspec.structs.replace(
        config,
        broker=msgspec.structs.replace(config.broker, cert=str(tmp_path / "none.pem")),
    )
    started: list[object] = []

    def link(*args: object, **kwargs: object) -> FakeLink:
        started.append(args)
        return FakeLink(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(BrokerError, match=r"none\.pem"):
        EarlyLink(broken, link=link)  # type: ignore[arg-type]
    assert started == []


def test_close_stops_the_link_and_closes_the_state(config: Any) -> None:
    early = EarlyLink(config, link=FakeLink)
    early.close()
    link = early.link
    assert isinstance(link, FakeLink)
    assert link.stopped
    with pytest.raises(Exception, match="closed"):
        early.state.pending_events(1)


def test_close_of_a_link_never_started_stops_nothing(config: Any) -> None:
    early = EarlyLink(config, link=FakeLink, start=False)
    early.close()
    link = early.link
    assert isinstance(link, FakeLink)
    assert not link.stopped


def test_the_config_and_the_link_load_without_the_signature_code() -> None:
    """femd run starts its link before it imports cryptography (~15 ms here)."""
    code = (
        "import json, sys\n"
        "import femd.config, femd.earlylink\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.startswith(('cryptography', 'femd.envelope', 'femd.keys')))))\n"
    )
    assert last_json(code) == []


# femd run with the fake launcher registered, whose probe takes a while and
# then leaves a mark; a SIGTERM while it probes, before the agent exists.
_STOPPED_WHILE_PROBING = """
import json, os, signal, time
from pathlib import Path
from types import MappingProxyType
from femd import earlyprobe
from femd.cli import main
from femd.launchers import registry
from tests.fakes import REGISTRATION, RegisteredFake

registry.LAUNCHERS = MappingProxyType({{**registry.LAUNCHERS, "fake": REGISTRATION}})

def probe(self):
    time.sleep(0.3)
    Path({mark!r}).touch()
    return self.capabilities

RegisteredFake.probe = probe
start = earlyprobe.EarlyProbe.__init__

def init(self, *args, **kwargs):
    start(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

earlyprobe.EarlyProbe.__init__ = init
code = main(["run", "--config", {config!r}])
print(json.dumps([code, Path({mark!r}).exists()]))
"""


def test_a_stop_during_start_up_is_kept_for_the_agent(
    config: Any, tmp_path: Path, keys: dict[str, Any]
) -> None:
    """femd run: a SIGTERM while the launchers are probed, before the agent
    exists, is not a death by signal half-way through a probe (its cgroup
    left behind): the probe ends, the agent closes without taking a task or
    saying READY, and femd run exits 0."""
    del config  # the fixture wrote femd.yaml
    make_policy(tmp_path, keys)
    (tmp_path / "launchers").mkdir()
    (tmp_path / "launchers" / "default.yaml").write_text(
        yaml.safe_dump(
            {"apiVersion": "femd/v1", "kind": "LauncherProfile", "name": "default",
             "fake": {}, "network": {"enabled": False}}
        )
    )  # fmt: skip
    code = _STOPPED_WHILE_PROBING.format(
        config=str(tmp_path / "femd.yaml"), mark=str(tmp_path / "probed")
    )
    done = subprocess.run(  # noqa: S603 (this interpreter, fixed code)
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # femd run returned 0, and only after the probe had ended.
    assert json.loads(done.stdout.splitlines()[-1]) == [0, True]
    said = [json.loads(line).get("MESSAGE", "") for line in done.stderr.splitlines()]
    assert "stopped while starting: no task taken" in said
    assert not [m for m in said if m.startswith(("policy loaded", "ready"))], said
