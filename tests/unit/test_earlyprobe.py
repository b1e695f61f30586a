"""femd.earlyprobe: the launchers probed in a thread while the agent loads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import earlyprobe  # noqa: E402
from femd.config import load_config  # noqa: E402
from femd.earlyprobe import EarlyProbe  # noqa: E402
from femd.errors import ConfigError  # noqa: E402
from femd.launchers import Capabilities, netns, registry  # noqa: E402
from tests.fakes import REGISTRATION, RegisteredFake  # noqa: E402


@pytest.fixture(name="warmed")
def warmed_fixture(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(netns, "warm", lambda: calls.append("warm"))
    monkeypatch.setattr(earlyprobe, "detect", lambda: calls.append("detect"))
    lines = {**registry.LAUNCHERS, "fake": REGISTRATION}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    RegisteredFake.built.clear()
    return calls


def _config(tmp_path: Path, profile: dict[str, Any] | None) -> Any:
    launchers = tmp_path / "launchers"
    launchers.mkdir()
    if profile is not None:
        doc = {"apiVersion": "femd/v1", "kind": "LauncherProfile", **profile}
        (launchers / f"{profile['name']}.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "femd.yaml").write_text(
        yaml.safe_dump(
            {
                "node": "fdn-01",
                "broker": {
                    "url": "amqps://broker.invalid:5671/femd",
                    "ca": str(tmp_path / "ca.pem"),
                    "cert": str(tmp_path / "node.pem"),
                    "key": str(tmp_path / "node.key"),
                },
                "policy": str(tmp_path / "policy.yaml"),
                "launchers": str(launchers),
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    return load_config(tmp_path / "femd.yaml")


def _uses_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake as a launcher whose tasks use the network helper."""
    fake = msgspec.structs.replace(REGISTRATION, network_helper=True)
    lines = {**registry.LAUNCHERS, "fake": fake}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))


def test_launchers_are_built_and_probed_in_a_thread(
    tmp_path: Path, warmed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []

    def probe(self: RegisteredFake) -> Capabilities:
        threads.append(threading.current_thread().name)
        warmed.append("probe")
        return self.capabilities

    monkeypatch.setattr(RegisteredFake, "probe", probe)
    _uses_helper(monkeypatch)
    config = _config(tmp_path, {"name": "default", "fake": {}})
    probes = EarlyProbe(config, tmp_path / "state")
    assert list(probes.profiles()) == ["default"]
    launchers, caps = probes.result()
    (built,) = RegisteredFake.built
    assert launchers == {("default", "fake"): built}
    assert caps[("default", "fake")].available
    assert threads == ["femd-probe"]
    # A launcher whose tasks get network through the helper: its zygote starts
    # first, after femd has left its unit's cgroup root (cgroup v2).
    assert warmed == ["detect", "warm", "probe"]


def test_a_profile_without_network_starts_no_zygote(
    tmp_path: Path, warmed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _uses_helper(monkeypatch)
    profile = {"name": "default", "fake": {}, "network": {"enabled": False}}
    EarlyProbe(_config(tmp_path, profile), tmp_path / "state").result()
    assert warmed == []


def test_launchers_without_the_helper_start_no_zygote(
    tmp_path: Path, warmed: list[str]
) -> None:
    EarlyProbe(_config(tmp_path, {"name": "default", "fake": {}}), tmp_path).result()
    assert warmed == []


def test_a_bad_profile_is_raised_by_profiles_and_nothing_is_probed(
    tmp_path: Path, warmed: list[str]
) -> None:
    profile = {"name": "default", "fake": {"nonsense": 1}}
    probes = EarlyProbe(_config(tmp_path, profile), tmp_path / "state")
    with pytest.raises(ConfigError, match="nonsense"):
        probes.profiles()
    with pytest.raises(ConfigError, match="nonsense"):
        probes.result()
    probes.close()
    assert RegisteredFake.built == []
    assert warmed == []


def test_what_building_raises_is_raised_to_the_agent(
    tmp_path: Path, warmed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise ConfigError("no launcher today")

    monkeypatch.setattr(earlyprobe, "build_all", broken)
    probes = EarlyProbe(_config(tmp_path, {"name": "default", "fake": {}}), tmp_path)
    with pytest.raises(ConfigError, match="no launcher today"):
        probes.result()
    # The profiles loaded: what the thread raised is the launchers' error only.
    assert list(probes.profiles()) == ["default"]
