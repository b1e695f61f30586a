"""The launcher registry is the one place a launcher is named (issue 13).

A launcher's name, profile section, spec checks and work-dir hook come from
its registration alone; the agent's own modules never branch on a launcher's
name.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import MappingProxyType

import msgspec
import pytest

from femd.errors import ConfigError, ManifestError
from femd.launchers import LAUNCHERS, build, load_profile, registry
from femd.manifest import decode_manifest
from tests.fakes import REGISTRATION, FakeSettings, RegisteredFake

FEMD = Path(__file__).resolve().parents[3] / "femd"
PROFILE = (
    "apiVersion: femd/v1\nkind: LauncherProfile\nname: p\nfake: {outputs: {a: b}}\n"
)


def _manifest(launcher: str) -> bytes:
    return (
        '{"apiVersion": "femd/v1", "kind": "Task", "id": "t-1", "project": "x",'
        ' "issued_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",'
        f' "nodes": ["n"], "launcher": "{launcher}", "command": ["true"]}}'
    ).encode()


def test_a_registration_alone_adds_the_name_and_the_profile_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE)
    with pytest.raises(ConfigError, match="unknown field `fake`"):
        load_profile(path)
    with pytest.raises(ManifestError, match='"fake" is not allowed here'):
        decode_manifest(_manifest("fake"))
    lines = {**LAUNCHERS, "fake": REGISTRATION}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    profile = load_profile(path)
    assert profile.section("fake") == FakeSettings(outputs={"a": "b"})
    assert decode_manifest(_manifest("fake")).launcher == "fake"
    built = build({"p": profile}, state_dir=tmp_path / "state")
    assert list(built) == [("p", "fake")]
    fake = built[("p", "fake")]
    assert isinstance(fake, RegisteredFake)
    assert fake.env is not None
    assert fake.env.state_dir == tmp_path / "state" / "launchers" / "fake"
    assert fake.env.config is None


def test_the_doctor_s_trial_is_the_registration_s_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE)
    monkeypatch.setattr(
        registry, "LAUNCHERS", MappingProxyType({**LAUNCHERS, "fake": REGISTRATION})
    )
    profile = load_profile(path)
    env = registry.environment("fake", tmp_path / "state")
    # By default: `id` in a shell, with the launcher the agent would build.
    trial = REGISTRATION.trial_for(profile, env)
    assert isinstance(trial.launcher, RegisteredFake)
    assert (trial.argv, trial.image) == (("/bin/sh", "-c", "id"), None)
    # A launcher that needs more (podman: an image) says so in its line.
    own = msgspec.structs.replace(
        REGISTRATION,
        trial=lambda prof, e: registry.Trial(
            REGISTRATION.factory(prof, e), ("/x",), "img@sha256:" + "0" * 64
        ),
    )
    assert own.trial_for(profile, env).argv == ("/x",)
    assert LAUNCHERS["podman"].trial is not None


def test_whether_a_task_needs_an_image_is_the_registration_s_word(
    monkeypatch: pytest.MonkeyPatch,
):
    imaged = msgspec.structs.replace(REGISTRATION, image=True)
    lines = {**LAUNCHERS, "fake": imaged}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    with pytest.raises(
        ManifestError, match="`image` is required when `launcher` is `fake`"
    ):
        decode_manifest(_manifest("fake"))


def test_the_agent_never_branches_on_a_launcher_name():
    names = set(LAUNCHERS)
    found = []
    modules = ("execution.py", "launchspec.py", "admission.py", "agent.py",
               "dispatch.py", "reception.py", "readmission.py")  # fmt: skip
    # The doctor neither: a launcher's trial is its registration's.
    doctor = tuple(str(p.relative_to(FEMD)) for p in (FEMD / "doctor").glob("*.py"))
    for module in modules + doctor:
        path = FEMD / module
        assert path.exists(), module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    assert found == []
