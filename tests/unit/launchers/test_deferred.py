"""The podman launcher is built (and podman-py imported) only once a socket exists.

Each check runs in a fresh interpreter: what a module imports is only visible
before anything else has imported it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testbed.fresh import last_json  # noqa: E402

HEAVY = ("pygit2", "podman", "requests", "urllib3")


def _run(code: str) -> dict[str, object]:
    got: dict[str, object] = last_json(code, REPO)
    return got


_PROBE = """
import json, sys
from pathlib import Path
from femd.errors import LaunchError, LauncherUnavailableError
from femd.config import PodmanConfig
from femd.launchers import LAUNCHERS, LauncherProfile, environment
profile = LauncherProfile(api_version="femd/v1", kind="LauncherProfile",
                          name="default")
url = {url!r}
configs = {{"podman": PodmanConfig(socket=url)}} if url else {{}}
env = environment("podman", Path({state!r}), configs)
launcher = LAUNCHERS["podman"].factory(profile, env)
caps = launcher.probe()
try:
    adopted = repr(launcher.adopt("t-1"))
except LaunchError:
    adopted = "podman could not be asked"
try:
    launcher.launch(None)
    refused = ""
except LauncherUnavailableError as e:
    refused = str(e)
print(json.dumps({{
    "available": caps.available,
    "problems": list(caps.problems),
    "adopted": adopted,
    "refused": refused,
    "imported": [m for m in {heavy!r} if m in sys.modules],
}}))
"""


def test_no_socket_configured_imports_nothing(tmp_path: Path) -> None:
    got = _run(_PROBE.format(state=str(tmp_path), url=None, heavy=HEAVY))
    assert got == {
        "available": False,
        "problems": ["no podman socket configured"],
        "adopted": "None",
        "refused": "no podman socket configured",
        "imported": [],
    }


def test_missing_socket_is_unavailable_without_podman_py(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/podman.sock"
    got = _run(_PROBE.format(state=str(tmp_path), url=url, heavy=HEAVY))
    assert got["available"] is False
    assert got["problems"] == [
        f"podman service {url}: cannot connect: No such file or directory"
    ]
    assert got["refused"] == got["problems"][0]
    assert got["imported"] == []


def test_not_a_socket_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "podman.sock").write_text("")
    url = f"unix://{tmp_path}/podman.sock"
    got = _run(_PROBE.format(state=str(tmp_path), url=url, heavy=HEAVY))
    assert got["problems"] == [f"podman service {url}: not a socket"]
    assert got["imported"] == []


def test_a_socket_hands_over_to_the_real_launcher(tmp_path: Path) -> None:
    # A socket file nobody listens on: the real launcher probes it itself.
    path = tmp_path / "podman.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        code = _PROBE.replace("launcher.launch(None)", "pass").format(
            state=str(tmp_path), url=f"unix://{path}", heavy=HEAVY
        )
        got = _run(code)
    assert got["available"] is False
    assert got["problems"] == [
        f"podman service unix://{path}: cannot connect: Connection refused"
    ]
    assert got["adopted"] == "podman could not be asked"
    assert "podman" in got["imported"]


def test_an_idle_agent_imports_neither_pygit2_nor_podman_py() -> None:
    got = _run(
        "import json, sys\nimport femd.agent\n"
        f"print(json.dumps({{'imported': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert got == {"imported": []}
