"""Launcher profiles: strict YAML, file:line errors, defaults (DESIGN "Launchers")."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from femd.errors import ConfigError
from femd.launchers import LauncherProfile, load_profile, load_profiles
from femd.launchers.profile import DEFAULT_RO_BINDS

REPO = Path(__file__).resolve().parents[3]

VALID = """\
apiVersion: femd/v1
kind: LauncherProfile
name: default
process:
  ro_binds: [/usr, /etc/ssl/certs]
  tmp_size_mb: 32
  fsize_mb: 512
podman:
  runtime: crun
  userns: keep-id
"""


def write(tmp_path: Path, text: str, name: str = "default") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_default_profile_loads():
    profiles = load_profiles(REPO / "launchers")
    assert "default" in profiles
    default = profiles["default"]
    assert default.name == "default"
    assert default.process is not None
    assert default.podman is not None
    assert default.network.enabled is True
    assert default.network.ingress_bind == ()
    assert default.process.run_as == "femd-task"
    assert "/usr" in default.process.ro_binds
    assert default.podman.read_only is True


def test_valid_profile_and_defaults(tmp_path):
    profile = load_profile(write(tmp_path, VALID))
    assert isinstance(profile, LauncherProfile)
    assert profile.process is not None
    assert profile.process.ro_binds == ("/usr", "/etc/ssl/certs")
    assert profile.process.tmp_size_mb == 32
    assert profile.process.fsize_mb == 512
    assert profile.process.seccomp is None
    assert profile.podman is not None
    assert profile.podman.runtime == "crun"
    assert profile.podman.userns == "keep-id"
    assert profile.podman.tmp_size_mb == 64


def test_sections_are_optional(tmp_path):
    text = "apiVersion: femd/v1\nkind: LauncherProfile\nname: bare\n"
    profile = load_profile(write(tmp_path, text, "bare"))
    assert profile.process is None
    assert profile.podman is None


def test_process_defaults_bind_the_system_read_only(tmp_path):
    text = "apiVersion: femd/v1\nkind: LauncherProfile\nname: p\nprocess: {}\n"
    profile = load_profile(write(tmp_path, text, "p"))
    assert profile.process is not None
    assert profile.process.ro_binds == DEFAULT_RO_BINDS
    assert profile.network.enabled is True
    assert profile.network.hosts == {}


INVALID = {
    "duplicate-key": (
        VALID.replace(
            "  tmp_size_mb: 32\n", "  tmp_size_mb: 32\n  tmp_size_mb: 9999\n"
        ),
        r"default\.yaml:7: duplicate key 'tmp_size_mb'",
    ),
    "unknown-field": (
        VALID.replace("  fsize_mb: 512\n", "  fsize_mb: 512\n  privileged: true\n"),
        r"default\.yaml:8: process\.privileged: unknown field `privileged` \(known: ",
    ),
    "wrong-type": (
        VALID.replace("tmp_size_mb: 32", "tmp_size_mb: '32'"),
        r"default\.yaml:6: "
        r"process\.tmp_size_mb: expected a whole number, got text \"32\" "
        r"\(write the number without quotes\)",
    ),
    "bool-as-string": (
        VALID + "network: {enabled: 'no'}\n",
        r"default\.yaml:11: network\.enabled: expected true or false, got text \"no\"",
    ),
    "relative-bind": (
        VALID.replace("[/usr, /etc/ssl/certs]", "[/usr, etc/ssl]"),
        r"default\.yaml:5: "
        r"process\.ro_binds\[1\]: expected absolute path without a `\.\.`",
    ),
    "dotdot-bind": (
        VALID.replace("[/usr, /etc/ssl/certs]", "[/usr/../etc]"),
        r"default\.yaml:5: "
        r"process\.ro_binds\[0\]: expected absolute path without a `\.\.`",
    ),
    "bad-run-as": (
        VALID.replace("  tmp_size_mb: 32\n", "  run_as: 'root;id'\n"),
        r"default\.yaml:6: "
        r"process\.run_as: expected a local user name .*got \"root;id\"",
    ),
    "tiny-nofile": (
        VALID.replace("  tmp_size_mb: 32\n", "  nofile: 3\n"),
        r"default\.yaml:6: process\.nofile: must be at least 16 \(got 3\)",
    ),
    "zero-tmp": (
        VALID.replace("tmp_size_mb: 32", "tmp_size_mb: 0"),
        r"default\.yaml:6: process\.tmp_size_mb: must be at least 1 \(got 0\)",
    ),
    "bad-userns": (
        VALID.replace("userns: keep-id", "userns: host"),
        r"default\.yaml:10: podman\.userns: \"host\" is not allowed here; "
        r"use one of: auto, keep-id, nomap",
    ),
    "missing-kind": (
        VALID.replace("kind: LauncherProfile\n", ""),
        r"default\.yaml:1: kind: the required field `kind` is missing",
    ),
    "wrong-kind": (
        VALID.replace("kind: LauncherProfile", "kind: Policy"),
        r"default\.yaml:2: "
        r"kind: \"Policy\" is not allowed here; use one of: LauncherProfile",
    ),
    "wrong-api-version": (
        VALID.replace("femd/v1", "femd/v2"),
        r"default\.yaml:1: "
        r"apiVersion: \"femd/v2\" is not allowed here; use one of: femd/v1",
    ),
    "name-differs-from-file": (
        VALID.replace("name: default", "name: other"),
        r"default\.yaml:3: name: must equal the file name "
        r"\(got 'other', expected 'default'\)",
    ),
    "not-a-mapping": (
        "- a\n- b\n",
        r"default\.yaml:1: a launcher profile must be a mapping",
    ),
    "bad-yaml": (VALID + "process: [\n", r"default\.yaml:\d+: "),
    "alias": (
        VALID.replace("process:\n", "process: &p\n") + "other: *p\n",
        r"default\.yaml:\d+: anchors and aliases are not allowed",
    ),
}


@pytest.mark.parametrize(("text", "match"), INVALID.values(), ids=INVALID.keys())
def test_invalid_profiles_are_refused_with_file_line_field(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_unreadable_profile(tmp_path):
    with pytest.raises(
        ConfigError, match=r"missing\.yaml: cannot read launcher profile"
    ):
        load_profile(tmp_path / "missing.yaml")


def test_load_profiles_keys_by_name_and_ignores_other_files(tmp_path):
    write(tmp_path, VALID)
    write(tmp_path, "apiVersion: femd/v1\nkind: LauncherProfile\nname: gpu\n", "gpu")
    (tmp_path / "README.md").write_text("not a profile")
    profiles = load_profiles(tmp_path)
    assert sorted(profiles) == ["default", "gpu"]


def test_one_invalid_profile_refuses_the_whole_set(tmp_path):
    write(tmp_path, VALID)
    write(
        tmp_path, "apiVersion: femd/v1\nkind: LauncherProfile\nname: x\nbogus: 1\n", "x"
    )
    with pytest.raises(ConfigError, match=r"x\.yaml:4: bogus: unknown field `bogus`"):
        load_profiles(tmp_path)


def test_missing_profile_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot list launcher profiles"):
        load_profiles(tmp_path / "nope")
