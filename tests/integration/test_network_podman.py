"""Task network on the ``podman`` launcher: rootless Podman, real sockets.

The same checks as the process launcher's (test_network_process.py): the
container keeps ``--network=none``; femd joins its namespace from outside
before the command starts and forwards the allowed destinations and ports
only. Limits this host cannot enforce (rootless cgroup v1) run in the tests'
explicit unsafe mode, as the other podman tests do.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.errors import LaunchError, UnenforceableError  # noqa: E402
from femd.launchers import LauncherProfile, Mount  # noqa: E402
from femd.launchers.profile import NetworkSettings  # noqa: E402
from tests.integration import podman_support  # noqa: E402
from tests.integration.network_support import (  # noqa: E402
    LISTENER,
    PROBE,
    SERVER_NAME,
    Bench,
    assert_only_the_listed_destination,
    assert_port_closed,
    bench,
    connect_from,
    free_port,
    probe_results,
    refused,
    wait_answer,
)
from tests.integration.podman_support import PodmanBox  # noqa: E402

# The fixtures (as in test_podman_launcher.py).
podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box

pytestmark = pytest.mark.podman

# The busybox image has no Python: the host's, read-only, for the probe.
PYTHON_MOUNTS = (
    Mount(source="/usr", target="/usr"),
    Mount(source="/usr/lib", target="/lib"),
    Mount(source="/usr/lib64", target="/lib64"),
)
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def net() -> Iterator[Bench]:
    with bench() as b:
        yield b


def pinned(box: PodmanBox) -> LauncherProfile:
    settings = NetworkSettings(hosts={SERVER_NAME: ("127.0.0.1",)})
    return msgspec.structs.replace(box.profile, network=settings)


def test_egress_reaches_the_listed_destination_only(podman_box: PodmanBox, net: Bench):
    caps = podman_box.launcher.probe()
    assert (caps.egress, caps.ingress) == (True, True), caps.problems
    outcome, _, _ = podman_box.run(
        "",
        argv=(PYTHON, "-c", PROBE, net.probe_config("/trust/ca.pem")),
        mounts=(*PYTHON_MOUNTS, Mount(source=str(net.ca_dir), target="/trust")),
        egress=(f"{SERVER_NAME}:{net.tls_port}",),
        launcher_profile=pinned(podman_box),
        timeout_s=60,
    )
    assert outcome.state == "succeeded", outcome
    assert_only_the_listed_destination(probe_results(outcome.log_tail), net)
    (traffic,) = outcome.traffic
    assert (traffic.direction, traffic.connections) == ("egress", 1)
    assert traffic.bytes_in > 0
    assert traffic.bytes_out > 0


def test_ingress_from_allowed_peers_only_and_ports_not_shared(podman_box: PodmanBox):
    port = free_port()
    handle, _ = podman_box.launch(
        "",
        argv=(PYTHON, "-c", LISTENER, str(port)),
        mounts=PYTHON_MOUNTS,
        listen=(port,),
        ingress_peers=("127.0.0.2/32",),
        timeout_s=60,
    )
    try:
        assert wait_answer("127.0.0.2", port, b"ping") == b"pong ping 127.0.0.1"
        assert refused("127.0.0.3", port)
        # A second task cannot take the port while the first holds it.
        second = podman_box.spec("touch /out/ran", listen=(port,))
        with pytest.raises(LaunchError, match=f"cannot listen on .* port {port}"):
            podman_box.launcher.launch(second)
        assert podman_box.containers(second.task_id) == []
        assert connect_from("127.0.0.2", port, b"bye") == b"pong bye 127.0.0.1"
        outcome = handle.wait(60)
    finally:
        handle.cancel(0)
    assert outcome is not None
    assert outcome.state == "succeeded", outcome
    assert "sneak" not in outcome.log_tail
    assert_port_closed(port)
    (traffic,) = outcome.traffic
    assert (traffic.direction, traffic.connections) == ("ingress", 2)


def test_a_profile_without_network_refuses_such_tasks(podman_box: PodmanBox):
    off = msgspec.structs.replace(
        podman_box.profile, network=NetworkSettings(enabled=False)
    )
    launcher = podman_box.make_launcher(unsafe=("memory", "cpu"), settings=off)
    assert not launcher.probe().egress
    spec = podman_box.spec("touch /out/ran", egress=("db.example:5432",))
    spec = msgspec.structs.replace(spec, profile=off)
    with pytest.raises(UnenforceableError, match="egress"):
        launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []
