"""Task network on the ``podman`` launcher: rootless Podman, real sockets.

The same checks as the process launcher's (test_network_process.py): the
container keeps ``--network=none``; femd joins its namespace from outside
before the command starts and forwards the allowed destinations and ports
only. Limits this host cannot enforce (rootless cgroup v1) run in the tests'
test-only unenforced launcher, as the other podman tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.errors import LaunchError, UnenforceableError  # noqa: E402
from femd.launchers import LauncherProfile, Mount  # noqa: E402
from femd.launchers.profile import NetworkSettings  # noqa: E402
from tests.integration import network_support, podman_support  # noqa: E402
from tests.integration.network_support import (  # noqa: E402
    LISTENER,
    PINNED,
    PROBE,
    Bench,
    check_egress,
    free_port,
    serve_ingress,
)
from tests.integration.podman_support import PodmanBox  # noqa: E402

# The fixtures (as in test_podman_launcher.py).
podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box
net = network_support.net

pytestmark = pytest.mark.podman

# The busybox image has no Python: the host's, read-only, for the probe.
PYTHON_MOUNTS = (
    Mount(source="/usr", target="/usr"),
    Mount(source="/usr/lib", target="/lib"),
    Mount(source="/usr/lib64", target="/lib64"),
)
PYTHON = "/usr/bin/python3"


def pinned(box: PodmanBox) -> LauncherProfile:
    return msgspec.structs.replace(box.profile, network=PINNED)


def test_egress_reaches_the_listed_destination_only(podman_box: PodmanBox, net: Bench):
    caps = podman_box.launcher.probe()
    assert (caps.egress, caps.ingress) == (True, True), caps.problems
    outcome, _, _ = podman_box.run(
        "",
        argv=(PYTHON, "-c", PROBE, net.probe_config("/trust/ca.pem")),
        mounts=(*PYTHON_MOUNTS, Mount(source=str(net.ca_dir), target="/trust")),
        egress=(f"{network_support.SERVER_NAME}:{net.tls_port}",),
        launcher_profile=pinned(podman_box),
        timeout_s=60,
    )
    check_egress(outcome, net)


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

    def second_task() -> None:
        # A second task cannot take the port while the first holds it.
        second = podman_box.spec("touch /out/ran", listen=(port,))
        with pytest.raises(LaunchError, match=f"cannot listen on .* port {port}"):
            podman_box.launcher.launch(second)
        assert podman_box.containers(second.task_id) == []

    serve_ingress(handle, port, second_task)


def test_a_profile_without_network_refuses_such_tasks(podman_box: PodmanBox):
    off = msgspec.structs.replace(
        podman_box.profile, network=NetworkSettings(enabled=False)
    )
    launcher = podman_box.make_launcher(unenforced=True, settings=off)
    assert not launcher.probe().egress
    spec = podman_box.spec("touch /out/ran", egress=("db.example:5432",))
    spec = msgspec.structs.replace(spec, profile=off)
    with pytest.raises(UnenforceableError, match="egress"):
        launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []
