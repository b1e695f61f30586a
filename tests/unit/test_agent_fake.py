"""The Agent without a broker: tests/fakes.FakeLink and the registered fake launcher.

Real state database (tmp dir), real policy, real signed envelopes, real
admission; the broker link is ``FakeLink`` (it implements
``femd.messages.Link``) and tasks run on the ``fake`` launcher (one registry
line, as in tests/integration/test_fake_launcher.py). The agent's own loop
runs in a thread; the test waits on the fake link's conditions, never sleeps.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import audit  # noqa: E402
from femd.agent import Agent  # noqa: E402
from femd.config import load_config  # noqa: E402
from femd.decision import EventRule, Rule  # noqa: E402
from femd.earlylink import EarlyLink  # noqa: E402
from femd.earlyprobe import EarlyProbe  # noqa: E402
from femd.events import RESULTS_EXCHANGE  # noqa: E402
from femd.launchers import Capabilities, netns, registry  # noqa: E402
from testbed.pki import make_ca  # noqa: E402
from tests.conftest import NODE, PROJECT, make_policy, sign, task_dict  # noqa: E402
from tests.fakes import REGISTRATION, FakeLink, RegisteredFake  # noqa: E402

WAIT_S = 10.0  # a bound on a loaded machine, never a sleep
TERMINAL = {"rejected", "succeeded", "failed", "timed_out", "cancelled"}


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root / "ca")
    mine = ca.issue(NODE, root / "node", sans=())
    return {"ca": str(ca.cert), "cert": str(mine.cert), "key": str(mine.key)}


class Node:
    """One agent on a FakeLink, its audit lines, and envelopes for it."""

    def __init__(self, root: Path, pki: dict[str, str], keys: dict[str, Any]) -> None:
        self.root = root
        self.keys = keys
        self.audit = io.StringIO()
        make_policy(
            root,
            keys,
            projects={PROJECT: {"launchers": ["fake"], "max_resources": {"cpus": 4}}},
        )
        (root / "launchers").mkdir()
        self.profile({})
        self.settings: dict[str, Any] = {
            "node": NODE,
            "broker": {"url": "amqps://broker.invalid:5671/femd", **pki},
            "policy": str(root / "policy.yaml"),
            "launchers": str(root / "launchers"),
            "state_dir": str(root / "state"),
            "audit": "stderr",
            # A held task is cancelled at once when the test ends.
            "stop_grace_s": 0,
        }
        self.configure()
        self.agent: Agent | None = None
        self._thread: threading.Thread | None = None
        self.exit_codes: list[int] = []

    def configure(self, **overrides: Any) -> None:
        self.settings.update(overrides)
        (self.root / "femd.yaml").write_text(yaml.safe_dump(self.settings))
        self.config = load_config(self.root / "femd.yaml")

    def profile(self, fake: dict[str, Any]) -> None:
        (self.root / "launchers" / "default.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "femd/v1",
                    "kind": "LauncherProfile",
                    "name": "default",
                    "fake": {"outputs": {"result.txt": "42\n"}, **fake},
                }
            )
        )

    @property
    def link(self) -> FakeLink:
        assert self.agent is not None
        link = self.agent.link
        assert isinstance(link, FakeLink)
        return link

    def start(self, *, early: bool = False) -> None:
        """Build and run the agent; *early*: as ``femd run`` does (the link
        started and the launchers probing before the agent is built)."""
        audit.configure("stderr", self.audit)
        if early:
            link = EarlyLink(self.config, link=FakeLink)
            probes = EarlyProbe(self.config, link.dirs.root)
            self.agent = Agent(self.config, early=link, probes=probes)
        else:
            self.agent = Agent(self.config, link=FakeLink)
        agent = self.agent
        self._thread = threading.Thread(
            target=lambda: self.exit_codes.append(agent.run()), daemon=True
        )
        self._thread.start()
        self.link.wait_for("the node status", lambda: self.link.side, WAIT_S)

    def stop(self) -> None:
        if self.agent is None or self._thread is None:
            return
        self.agent.request_stop()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()
        assert self.exit_codes == [0]

    # -- envelopes ----------------------------------------------------------------

    def window(self) -> dict[str, str]:
        now = datetime.now(UTC)
        return {
            "issued_at": _iso(now - timedelta(minutes=5)),
            "expires_at": _iso(now + timedelta(hours=1)),
        }

    def task(self, task_id: str, **overrides: Any) -> bytes:
        fields = {
            "id": task_id,
            "launcher": "fake",
            "image": None,
            "source": None,
            "inputs": [],
            "command": ["analyse"],
            **self.window(),
        }
        manifest = task_dict(**(fields | overrides))
        return sign(manifest, *(k.private for k in self.keys.values()))

    def cancel(self, cancel_id: str, target: str) -> bytes:
        manifest = {
            "apiVersion": "femd/v1",
            "kind": "Cancel",
            "id": cancel_id,
            "project": PROJECT,
            "target": target,
            "nodes": [NODE],
            **self.window(),
        }
        return sign(manifest, *(k.private for k in self.keys.values()))

    def await_state(self, task_id: str, *states: str) -> None:
        """Wait until a status event of *task_id* says one of *states* (an end)."""
        wanted = set(states) or TERMINAL
        self.link.wait_for(
            f"{task_id}: {' or '.join(sorted(wanted))}",
            lambda: any(e["state"] in wanted for e in self.link.events(task_id)),
            WAIT_S,
        )

    def audit_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]

    def task_rows(self) -> list[tuple[str, str]]:
        """(task_id, state) as another reader of the state database sees them."""
        path = self.root / "state" / "state.sqlite"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute("SELECT task_id, state FROM tasks").fetchall()


@pytest.fixture
def node(
    tmp_path: Path,
    pki: dict[str, str],
    keys: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Node]:
    # sd_notify datagrams go to a socket of the test's (none: a library leak).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.getsockname())
    lines = {**registry.LAUNCHERS, "fake": REGISTRATION}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    RegisteredFake.built.clear()
    # The fake needs no network helper: no zygote process in this test run.
    monkeypatch.setattr(netns, "warm", lambda: None)
    n = Node(tmp_path, pki, keys)
    try:
        yield n
        n.stop()
    finally:
        audit.configure("stderr")
        notify.close()


def _launched() -> list[str]:
    return [s.task_id for f in RegisteredFake.built for s in f.launched]


def test_a_signed_task_is_acked_once_durable_runs_and_reports_in_order(node: Node):
    node.start()
    rows_at_ack: list[list[tuple[str, str]]] = []
    node.link.on_settle = lambda d, what: rows_at_ack.append(node.task_rows())
    d = node.link.deliver(node.task("t-1"))
    node.await_state("t-1")
    # Acked once, and only after the task and its decision were committed.
    assert node.link.settled == [(d, "ack")]
    assert rows_at_ack == [[("t-1", "queued")]]
    assert _launched() == ["t-1"]
    (spec,) = [s for f in RegisteredFake.built for s in f.launched]
    assert spec.argv == ("analyse",)
    events = node.link.events("t-1")
    assert [e["state"] for e in events] == [
        "received", "staging", "running", "uploading", "succeeded"
    ]  # fmt: skip
    # The node's event sequence has no gap and no repeat, in publish order.
    assert [e["event_seq"] for e in node.link.events()] == list(
        range(1, len(node.link.events()) + 1)
    )
    seqs = [m.seq for m in node.link.published]
    assert seqs == sorted(set(seqs))
    # Its outputs went out as a result chunk.
    assert [m.exchange for m in node.link.published].count(RESULTS_EXCHANGE) == 1
    # The audit trail says the same, once each.
    node.stop()
    states = [
        a["FEMD_STATE"]
        for a in node.audit_entries()
        if a.get("FEMD_TASK_ID") == "t-1" and a["SYSLOG_IDENTIFIER"] == "femd"
    ]
    assert states[:5] == ["received", "queued", "staging", "running", "succeeded"]


def test_an_early_link_serves_the_agent_and_the_audit_reads_as_before(node: Node):
    """femd run starts the link before the agent exists (femd.earlylink).

    FakeLink connects as soon as it starts, i.e. before the agent is built:
    the agent still says "policy loaded" first, then "broker connected",
    then "ready", and runs a task on that link like any other.
    """
    node.start(early=True)
    d = node.link.deliver(node.task("t-1"))
    node.await_state("t-1")
    assert node.link.settled == [(d, "ack")]
    assert [e["state"] for e in node.link.events("t-1")][-1] == "succeeded"
    ids = [e.get("MESSAGE_ID") for e in node.audit_entries()]
    order = [
        audit.Event.POLICY_LOADED.value,
        audit.Event.BROKER_CONNECTED.value,
        audit.Event.AGENT_STARTED.value,
    ]
    assert [i for i in ids if i in order] == order


def test_early_probes_are_the_agents_launchers_reported_after_the_policy(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """femd run probes the launchers in a thread while the agent loads.

    The agent uses what that thread built and probed (it builds no launcher
    of its own) and reports the result when its loop begins: a launcher
    found unavailable is audited after "policy loaded", as before.
    """
    probed_in: list[str] = []

    def unavailable(self: RegisteredFake) -> Capabilities:
        probed_in.append(threading.current_thread().name)
        return Capabilities(launcher="fake", available=False, problems=("no fake",))

    monkeypatch.setattr(RegisteredFake, "probe", unavailable)
    node.start(early=True)
    assert probed_in == ["femd-probe"]
    (built,) = RegisteredFake.built
    assert node.agent is not None
    assert node.agent.launchers == {("default", "fake"): built}
    assert node.agent.caps[("default", "fake")].problems == ("no fake",)
    ids = [e.get("MESSAGE_ID") for e in node.audit_entries()]
    order = [audit.Event.POLICY_LOADED.value, audit.Event.LAUNCHER_UNAVAILABLE.value]
    assert [i for i in ids if i in order] == order


def test_a_sigterm_held_while_starting_closes_without_taking_a_task(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """femd run kept a SIGTERM: the probes end, nothing is taken or adopted."""
    probed = threading.Event()

    def slow(self: RegisteredFake) -> Capabilities:
        time.sleep(0.2)  # still probing when the agent runs
        probed.set()
        return self.capabilities

    monkeypatch.setattr(RegisteredFake, "probe", slow)
    audit.configure("stderr", node.audit)
    early = EarlyLink(node.config, link=FakeLink)
    agent = Agent(
        node.config, early=early, probes=EarlyProbe(node.config, early.dirs.root)
    )
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(agent.run(held=[signal.SIGTERM])), daemon=True
    )
    thread.start()
    thread.join(WAIT_S)
    assert codes == [0]
    assert probed.is_set()  # the probe ended before the agent closed
    link = agent.link
    assert isinstance(link, FakeLink)
    assert link.stopped
    assert not link.intake_open  # never bound: nothing taken to hand back
    assert node.audit_entries() == []  # no "policy loaded", no "ready"


def test_a_sighup_held_while_starting_reloads_once_started(node: Node) -> None:
    audit.configure("stderr", node.audit)
    early = EarlyLink(node.config, link=FakeLink)
    probes = EarlyProbe(node.config, early.dirs.root)
    node.agent = agent = Agent(node.config, early=early, probes=probes)
    thread = threading.Thread(
        target=lambda: node.exit_codes.append(agent.run(held=[signal.SIGHUP])),
        daemon=True,
    )
    node._thread = thread
    thread.start()
    reloaded = audit.Event.POLICY_RELOADED.value

    def ids() -> list[str]:
        return [e.get("MESSAGE_ID", "") for e in node.audit_entries()]

    # The reload builds the launchers again and publishes the node's status
    # again, then audits; the link hears the status.
    node.link.wait_for("a second status", lambda: len(node.link.side) >= 2, WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while reloaded not in ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(RegisteredFake.built) == 2  # the early probe's, the reload's
    assert ids().index(audit.Event.POLICY_LOADED.value) < ids().index(reloaded)


def test_garbage_and_unsigned_deliveries_are_refused_without_a_task(node: Node):
    node.start()
    unsigned = json.dumps(task_dict(id="u-1", **node.window())).encode()
    garbage = node.link.deliver(b"\x00not an envelope")
    plain = node.link.deliver(unsigned)
    node.link.wait_for("both settled", lambda: len(node.link.settled) == 2, WAIT_S)
    assert node.link.settled == [(garbage, "ack"), (plain, "ack")]
    assert node.task_rows() == []
    assert _launched() == []
    # One rejection on the wire and in the audit: the second of the same
    # kind is counted for the flood summary, not reported one by one.
    node.link.wait_for("the rejection", node.link.events, WAIT_S)
    (event,) = node.link.events()
    assert event["state"] == "rejected"
    assert event["task_id"] == "unverified"
    assert [r["rule"] for r in event["reasons"]] == [EventRule.INPUT_ENVELOPE]
    rejected = [a for a in node.audit_entries() if "envelope rejected" in a["MESSAGE"]]
    assert len(rejected) == 1


def test_an_undecodable_delivery_is_dead_lettered(node: Node):
    node.start()
    d = node.link.deliver(b"{}", problem="headers: not a table")
    node.link.wait_for("settled", lambda: node.link.settled, WAIT_S)
    assert node.link.settled == [(d, "reject")]
    node.link.wait_for("the rejection", node.link.events, WAIT_S)
    (event,) = node.link.events()
    assert [r["rule"] for r in event["reasons"]] == [EventRule.INPUT_AMQP]


def test_a_task_the_policy_denies_ends_rejected_with_its_rule(node: Node):
    node.start()
    d = node.link.deliver(node.task("t-big", resources={"cpus": 8}))
    node.await_state("t-big")
    assert node.link.settled == [(d, "ack")]
    events = node.link.events("t-big")
    assert [e["state"] for e in events] == ["received", "rejected"]
    assert [r["rule"] for r in events[-1]["reasons"]] == [Rule.RESOURCES_EXCEEDED]
    assert node.task_rows() == [("t-big", "rejected")]
    assert _launched() == []


def test_a_replayed_task_id_is_refused_and_not_run_again(node: Node):
    node.start()
    node.link.deliver(node.task("t-1"))
    node.await_state("t-1")
    again = node.link.deliver(node.task("t-1", command=["other"]))
    node.link.wait_for(
        "the replay refused",
        lambda: (
            len(node.link.settled) == 2
            and node.link.events("t-1")[-1]["state"] == "rejected"
        ),
        WAIT_S,
    )
    assert node.link.settled[-1] == (again, "ack")
    last = node.link.events("t-1")[-1]
    assert last["state"] == "rejected"
    assert [r["rule"] for r in last["reasons"]] == [EventRule.TASK_REPLAYED]
    assert _launched() == ["t-1"]


def test_a_cancel_stops_a_running_task(node: Node):
    node.profile({"hold": True})
    node.start()
    node.link.deliver(node.task("t-long"))
    node.await_state("t-long", "running")
    node.link.deliver(node.cancel("c-1", "t-long"))
    node.await_state("t-long")
    assert node.link.events("t-long")[-1]["state"] == "cancelled"
    assert node.link.events("c-1")[-1]["state"] == "succeeded"
    assert [what for _, what in node.link.settled] == ["ack", "ack"]
    assert dict(node.task_rows()) == {"t-long": "cancelled", "c-1": "succeeded"}


def test_a_cancel_of_a_queued_task_means_it_never_runs(node: Node):
    node.profile({"hold": True})
    node.configure(max_concurrent_tasks=1)
    node.start()
    node.link.deliver(node.task("t-a"))
    node.await_state("t-a", "running")
    node.link.deliver(node.task("t-b"))
    node.link.deliver(node.cancel("c-b", "t-b"))
    node.await_state("t-b")
    assert [e["state"] for e in node.link.events("t-b")] == [
        "received", "cancelled"
    ]  # fmt: skip
    assert _launched() == ["t-a"]
