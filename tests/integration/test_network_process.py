"""Task network on the ``process`` launcher, real bwrap and real sockets.

A task's namespace is empty; femd forwards the listed egress destinations and
the listed ingress ports only (docs/network.md). Every negative is paired
with a positive in the same task, and what reached the host is checked on the
host side.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import audit  # noqa: E402
from femd.errors import LaunchError, UnenforceableError  # noqa: E402
from femd.launchers import Mount, start  # noqa: E402
from femd.launchers.profile import NetworkSettings  # noqa: E402
from tests.integration import network_support  # noqa: E402
from tests.integration.network_support import (  # noqa: E402
    LISTENER,
    PINNED,
    PROBE,
    SERVER_NAME,
    Bench,
    assert_only_the_listed_destination,
    check_egress,
    connect_from,
    free_port,
    probe_results,
    serve_ingress,
    wait_answer,
)
from tests.integration.sandbox_support import Sandbox, profile  # noqa: E402

pytestmark = pytest.mark.bwrap

PYTHON = "/usr/bin/python3"
net = network_support.net


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox.open(profile(PINNED)) as sandbox:
        yield sandbox


def _trust(net: Bench) -> Mount:
    return Mount(source=str(net.ca_dir), target="/trust")


def test_probe_offers_egress_and_ingress(box: Sandbox):
    caps = box.caps()
    assert (caps.egress, caps.egress_filtered, caps.ingress) == (True, True, True)


def test_egress_reaches_the_listed_destination_only(box: Sandbox, net: Bench):
    events = io.StringIO()
    audit.configure("stderr", events)
    try:
        outcome, _ = box.run(
            "",
            argv=(PYTHON, "-c", PROBE, net.probe_config("/trust/ca.pem")),
            mounts=(_trust(net),),
            egress=(f"{SERVER_NAME}:{net.tls_port}",),
            timeout_s=60,
            task_id="egress-tls",
        )
    finally:
        audit.configure("auto")
    traffic = check_egress(outcome, net)
    records = [json.loads(line) for line in events.getvalue().splitlines()]
    kind = audit.Event.NETWORK_CONNECTION
    (record,) = [r for r in records if r["MESSAGE_ID"] == kind]
    assert record["FEMD_TASK_ID"] == "egress-tls"
    assert record["FEMD_DESTINATION"] == traffic.destination
    assert record["FEMD_PEER"] == f"127.0.0.1:{net.tls_port}"
    assert int(record["FEMD_BYTES_IN"]) == traffic.bytes_in
    assert int(record["FEMD_BYTES_OUT"]) == traffic.bytes_out


def test_a_task_cannot_take_over_its_forwarders(box: Sandbox, net: Bench):
    # Nothing of femd's is visible in the sandbox to kill or replace, and the
    # in-sandbox listener cannot be taken: the task still reaches only its
    # destination afterwards.
    takeover = (
        "import os, signal, socket, sys\n"
        "me = os.getpid()\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print('PIDS', [p for p in pids if p not in (me, os.getppid())])\n"
        "for p in pids:\n"
        "    if p not in (me, os.getppid(), 1):\n"
        "        try: os.kill(p, signal.SIGKILL)\n"
        "        except OSError: pass\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.bind(('127.0.1.1', int(sys.argv[1]))); print('TAKEN')\n"
        "except OSError as e:\n"
        "    print('BIND', e.errno)\n"
    )
    script = f"""
        {PYTHON} -c "$TAKEOVER" {net.tls_port}
        exec {PYTHON} -c "$PROBE" '{net.probe_config("/trust/ca.pem")}'
    """
    outcome, _ = box.run(
        script,
        env=(("TAKEOVER", takeover), ("PROBE", PROBE)),
        mounts=(_trust(net),),
        egress=(f"{SERVER_NAME}:{net.tls_port}",),
        timeout_s=60,
    )
    assert outcome.state == "succeeded", outcome
    lines = outcome.log_tail.splitlines()
    visible = json.loads(next(x for x in lines if x.startswith("PIDS"))[5:])
    assert visible == [1], visible  # bwrap's init in the sandbox, nothing else
    assert "BIND 98" in lines, lines  # EADDRINUSE: femd holds it
    assert_only_the_listed_destination(probe_results(outcome.log_tail), net)


def test_ingress_reaches_the_task_from_allowed_peers_only(box: Sandbox):
    port = free_port()
    spec = box.spec(
        "",
        argv=(PYTHON, "-c", LISTENER, str(port)),
        listen=(port,),
        ingress_peers=("127.0.0.2/32",),
        timeout_s=60,
    )
    serve_ingress(start(box.launcher, spec), port)


def test_two_tasks_cannot_take_each_others_ports(box: Sandbox):
    port = free_port()
    first = start(
        box.launcher,
        box.spec(
            "",
            argv=(PYTHON, "-c", LISTENER, str(port)),
            listen=(port,),
            ingress_peers=("127.0.0.0/8",),
            timeout_s=60,
        ),
    )
    try:
        assert wait_answer("127.0.0.2", port, b"one") == b"pong one 127.0.0.1"
        second = box.spec("touch /out/ran", listen=(port,), ingress_peers=("::/0",))
        with pytest.raises(LaunchError, match=f"cannot listen on .* port {port}"):
            start(box.launcher, second)
        assert list(Path(second.output_dir).iterdir()) == []  # nothing ran
        assert connect_from("127.0.0.2", port, b"bye") == b"pong bye 127.0.0.1"
        outcome = first.wait(30)
    finally:
        first.cancel(0)
    assert outcome is not None
    assert outcome.state == "succeeded", outcome


def test_connections_are_cut_when_the_task_ends(box: Sandbox, net: Bench):
    # A task killed mid-connection leaves no forwarder behind.
    hold = (
        "import socket, sys\n"
        "s = socket.create_connection(('fl-server.test', int(sys.argv[1])), 5)\n"
        "print('connected', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    spec = box.spec(
        "",
        argv=(PYTHON, "-c", hold, str(net.tls_port)),
        egress=(f"{SERVER_NAME}:{net.tls_port}",),
        timeout_s=3,
    )
    outcome = start(box.launcher, spec).wait(60)
    assert outcome is not None
    assert outcome.state == "timed_out", outcome
    assert "connected" in outcome.log_tail
    assert outcome.traffic[0].connections == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("femd-net-")]


def test_a_profile_without_network_refuses_such_tasks(net: Bench):
    off = profile(NetworkSettings(enabled=False))
    with Sandbox.open(off) as sandbox:
        caps = sandbox.caps()
        assert caps.available
        assert not caps.egress
        assert not caps.ingress
        for kw in (
            {"egress": (f"{SERVER_NAME}:{net.tls_port}",)},
            {"listen": (free_port(),), "ingress_peers": ("::/0",)},
        ):
            spec = sandbox.spec("touch /out/ran", **kw)  # type: ignore[arg-type]
            with pytest.raises(UnenforceableError, match="gives tasks no network"):
                start(sandbox.launcher, spec)
            assert list(Path(spec.output_dir).iterdir()) == []  # nothing ran


UNPRIVILEGED = """\
import json, sys
from pathlib import Path
from femd.launchers import (
    LaunchSpec, Limits, LauncherProfile, Mount, ProcessSettings, environment, start,
)
from femd.errors import UnenforceableError
from femd.launchers.process import BubblewrapLauncher
from femd.launchers.profile import NetworkSettings
root, port, probe, trust = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5]
prof = LauncherProfile(
    api_version="femd/v1", kind="LauncherProfile", name="default",
    process=ProcessSettings(run_as="nobody-is-used"),
    network=NetworkSettings(hosts={"fl-server.test": ("127.0.0.1",)}),
)
launcher = BubblewrapLauncher(prof, environment("process", root / "state"))
spec = LaunchSpec(task_id="unpriv-net", launcher="process", profile=prof,
                  argv=("/usr/bin/python3", "-c", probe, sys.argv[4]),
                  mounts=(Mount(source=trust, target="/trust"),),
                  output_dir=str(root / "out"),
                  egress=(f"fl-server.test:{port}",),
                  limits=Limits(cpus=1, memory_mb=512, timeout_s=60, pids=256))
caps = launcher.probe()
try:
    outcome = start(launcher, spec).wait(90)
    state, log = outcome.state, outcome.log_tail
except UnenforceableError as e:
    state, log = f"unenforceable: {e}", ""
print(json.dumps({"egress": caps.egress, "state": state, "log": log,
                  "memory": dict(caps.enforcement)["memory"]}))
"""


def test_an_unprivileged_agent_forwards_too(box: Sandbox, net: Bench):
    # Under femd.service femd is not root: the helper joins the sandbox's
    # namespace through its user namespace, which femd's uid owns.
    config = net.probe_config("/trust/ca.pem")
    _, result = box.run_unprivileged(
        "unprivileged-net", UNPRIVILEGED, str(net.tls_port), PROBE, config,
        str(net.ca_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["egress"] is True
    if report["memory"] == "none":
        # This CI host (cgroup v1): an unprivileged femd can make no task
        # cgroup, so the task is refused before any forwarding (fail closed).
        assert report["state"].startswith("unenforceable: "), report
        assert "memory limit of 512 MB cannot be enforced" in report["state"]
        return
    assert report["state"] == "succeeded", report
    assert_only_the_listed_destination(probe_results(report["log"]), net)


COUNT = 20


def test_what_a_task_sent_before_it_ended_still_arrives(box: Sandbox):
    # The task connects, writes and exits at once: femd accepts and forwards
    # what is already queued before it closes the task's network.
    got: list[bytes] = []
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(COUNT)
        port = sink.getsockname()[1]

        def collect() -> None:
            for _ in range(COUNT):
                conn, _ = sink.accept()
                with conn:
                    got.append(b"".join(iter(lambda c=conn: c.recv(100), b"")))

        thread = threading.Thread(target=collect, daemon=True)
        thread.start()
        # bash: connect, write and exit take a millisecond, less than femd
        # needs to accept and connect out.
        burst = " & ".join(
            f"echo hello {i} >/dev/tcp/127.0.0.1/{port}" for i in range(COUNT)
        )
        outcome, _ = box.run(
            "",
            argv=("/bin/bash", "-c", f"{burst}; wait"),
            egress=(f"127.0.0.1:{port}",),
        )
        thread.join(20)
    assert outcome.state == "succeeded", outcome
    assert sorted(got) == sorted(b"hello %d\n" % i for i in range(COUNT)), outcome
    assert outcome.traffic[0].connections == COUNT
