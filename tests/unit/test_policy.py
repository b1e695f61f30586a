"""Policy loading, merging, lint: errors name the file, line and field."""

from datetime import date
from pathlib import Path

import msgspec
import pytest
import yaml

from femd.errors import PolicyError
from femd.keys import public_pem
from femd.policy import (
    MaxResources,
    Policy,
    lint,
    lint_file,
    lint_warnings,
    load_policy,
)
from tests.conftest import keypair, make_policy

DATA = Path(__file__).parent.parent / "data" / "policies"
VALID = sorted((DATA / "valid").glob("*.yaml"))
INVALID = sorted((DATA / "invalid").glob("*.yaml"))


def test_there_is_test_data():
    assert len(VALID) >= 3
    assert len(INVALID) >= 30
    for p in INVALID:
        assert p.with_suffix(".error").is_file(), p


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_policy_loads_and_lints_clean(path):
    loaded = load_policy(path)
    assert loaded.policy.kind == "Policy"
    assert lint(loaded.policy) == []
    assert lint_file(path) == []
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_is_refused_with_file_line_field(path):
    expected = path.with_suffix(".error").read_text().strip()
    expected = str(path) + expected.replace("{dir}", str(path.parent))
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value) == expected
    assert e.value.exit_code == 2
    assert e.value.file == str(path)
    assert lint_file(path) == [expected]


def test_design_example_keys_and_fields():
    loaded = load_policy(DATA / "valid" / "design-example.yaml")
    assert {k.name for k in loaded.keys.values()} == {"orchestrator", "pi-smith"}
    orch = next(k for k in loaded.keys.values() if k.name == "orchestrator")
    assert orch.expires == date(2027, 6, 30)
    project = loaded.policy.projects["dt4h-heart-failure"]
    assert project.threshold == 2
    assert project.network == "none"
    assert loaded.limits(project) == MaxResources(
        cpus=4, memory_mb=8192, timeout_s=7200, pids=512
    )
    assert loaded.max_output_bytes(project) == 52428800


def test_revoked_listed_signer_is_legal():
    loaded = load_policy(DATA / "valid" / "revoked-signer-still-listed.yaml")
    pi = next(k for k in loaded.keys.values() if k.name == "pi-smith")
    assert pi.keyid in loaded.revoked
    assert pi.expires == date(2026, 12, 31)  # a quoted date is a date too


def test_defaults_fill_what_a_project_leaves_out(tmp_path, keys, make_policy):
    path = make_policy(
        tmp_path,
        keys,
        projects={
            "dt4h-heart-failure": {
                "max_resources": {"memory_mb": None, "pids": None, "cpus": 3},
                "outputs": None,
            }
        },
        defaults={"max_resources": {"memory_mb": 2000}},
    )
    loaded = load_policy(path)
    project = loaded.policy.projects["dt4h-heart-failure"]
    # memory from the node defaults, pids from the built-in safe default
    assert loaded.limits(project) == MaxResources(
        cpus=3, memory_mb=2000, timeout_s=7200, pids=128
    )
    assert loaded.max_output_bytes(project) == 2 * 1024**3


def test_builtin_defaults_are_small():
    p = msgspec.convert(
        {"apiVersion": "femd/v1", "kind": "Policy", "node": "n"}, Policy, strict=True
    )
    assert p.defaults.max_resources == MaxResources(
        cpus=1, memory_mb=1024, timeout_s=600, pids=128
    )
    assert p.defaults.outputs.max_bytes == 2 * 1024**3  # a model checkpoint fits
    assert p.projects == {}


def test_key_files_are_relative_to_the_policy_file(
    tmp_path, keys, make_policy, monkeypatch
):
    path = make_policy(tmp_path / "etc" / "femd", keys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_policy(path)
    assert {k.keyid for k in keys.values()} == set(loaded.keys)
    # and through a relative path to the policy too
    monkeypatch.chdir(tmp_path)
    assert set(load_policy(Path("etc/femd/policy.yaml")).keys) == set(loaded.keys)


def test_absolute_key_file(tmp_path, keys, make_policy):
    absolute = tmp_path / "abs.pub"
    absolute.write_bytes(public_pem(keys["orchestrator"].public))
    path = make_policy(
        tmp_path / "p",
        {"pi-smith": keys["pi-smith"]},
        signers={"orchestrator": {"public_key_file": str(absolute)}},
    )
    assert keys["orchestrator"].keyid in load_policy(path).keys


def test_policy_digest_covers_key_files(tmp_path, keys, keypair, make_policy):
    path = make_policy(tmp_path, keys)
    before = load_policy(path).sha256
    assert load_policy(path).sha256 == before
    (tmp_path / "keys" / "pi-smith.pub").write_bytes(public_pem(keypair().public))
    assert load_policy(path).sha256 != before


def test_yaml_date_and_quoted_date_are_both_dates(tmp_path, keys, make_policy):
    path = make_policy(tmp_path, keys)
    text = (
        path.read_text()
        .replace(
            "public_key_file: keys/orchestrator.pub",
            "public_key_file: keys/orchestrator.pub\n    expires: 2027-06-30",
        )
        .replace(
            "public_key_file: keys/pi-smith.pub",
            "public_key_file: keys/pi-smith.pub\n    expires: '2027-07-01'",
        )
    )
    path.write_text(text)
    expires = {k.name: k.expires for k in load_policy(path).keys.values()}
    assert expires == {"orchestrator": date(2027, 6, 30), "pi-smith": date(2027, 7, 1)}


def test_lint_reports_every_problem(tmp_path, keys, make_policy):
    path = make_policy(
        tmp_path,
        keys,
        projects={
            "dt4h-heart-failure": {
                "signers": ["orchestrator", "nobody", "orchestrator"],
                "threshold": 4,
                "datasets": ["hf-cohort-2024", "genomes"],
                "images": ["registry.example.org/x@sha256:" + "0" * 64],
            }
        },
    )
    problems = lint_file(path)
    assert [p.split(": ", 2)[1] for p in problems] == [
        "projects.dt4h-heart-failure.signers[1]",
        "projects.dt4h-heart-failure.signers",
        "projects.dt4h-heart-failure.threshold",
        "projects.dt4h-heart-failure.datasets[1]",
        "projects.dt4h-heart-failure.images[0]",
    ]
    assert all(p.startswith(f"{path}:") for p in problems)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value) == problems[0]


def test_lint_problem_lines_point_at_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: femd/v1\n"
        "kind: Policy\n"
        "node: fdn-01\n"
        "projects:\n"
        "  a:\n"
        "    signers:\n"
        "      - ghost\n"
        "  b:\n"
        "    signers: [ghost2]\n"
        "    datasets: [d]\n"
    )
    assert lint_file(path) == [
        f"{path}:7: projects.a.signers[0]: unknown signer 'ghost'",
        f"{path}:9: projects.b.signers[0]: unknown signer 'ghost2'",
        f"{path}:10: projects.b.datasets[0]: unknown dataset 'd'",
    ]


def test_policy_error_attributes(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: femd/v1\nkind: Policy\nnode: Bad\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 3, "node")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PolicyError, match="No such file or directory"):
        load_policy(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError, match=r"directory holds no \*\.yaml policy file"):
        load_policy(tmp_path)


def test_huge_policy_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"apiVersion: femd/v1\n#" + b"x" * (1024 * 1024) + b"\n")
    with pytest.raises(PolicyError, match="too large"):
        load_policy(path)


def test_alias_bomb_is_refused_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)
    ]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError, match=":2: anchors and aliases are not allowed"):
        load_policy(path)


def test_deep_nesting_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("node: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(PolicyError):
        load_policy(path)


# ---------------------------------------------------------------------------
# a directory of *.yaml, merged in name order


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _split_policy(tmp_path, keys, policy_dict, make_policy) -> Path:
    """The default policy split over three files in a policy.d directory."""
    make_policy(tmp_path, keys)  # writes keys/*.pub
    full = policy_dict()
    d = tmp_path / "policy.d"
    for k in full["signers"].values():
        k["public_key_file"] = "../" + k["public_key_file"]
    _write(
        d / "00-node.yaml",
        {k: full[k] for k in ("apiVersion", "kind", "node", "revoked_keyids")},
    )
    _write(
        d / "10-signers.yaml",
        {"signers": full["signers"], "datasets": full["datasets"]},
    )
    _write(d / "20-heart.yaml", {"projects": full["projects"]})
    (d / "README.txt").write_text("not a policy")
    (d / "30-disabled.yaml.off").write_text("garbage: [")
    return d


def test_directory_is_merged(tmp_path, keys, policy_dict, make_policy):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    merged = load_policy(d)
    single = load_policy(tmp_path / "policy.yaml")
    assert merged.policy.projects == single.policy.projects
    assert set(merged.keys) == set(single.keys)
    assert merged.source == str(d)
    assert lint_file(d) == []


def test_directory_merges_lists_and_more_entries(
    tmp_path, keys, keypair, policy_dict, make_policy
):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    revoked = keypair().keyid
    _write(
        d / "40-more.yaml",
        {
            "revoked_keyids": [revoked],
            "projects": {"second": {"signers": ["orchestrator"]}},
            "node": "fdn-01",  # the same value again is fine
        },
    )
    loaded = load_policy(d)
    assert set(loaded.policy.projects) == {"dt4h-heart-failure", "second"}
    assert revoked in loaded.revoked


def test_directory_conflict_names_the_earlier_file(
    tmp_path, keys, policy_dict, make_policy
):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    late = _write(
        d / "50-override.yaml",
        {
            "projects": {
                "dt4h-heart-failure": {"signers": ["orchestrator"], "threshold": 1}
            }
        },
    )
    with pytest.raises(PolicyError) as e:
        load_policy(d)
    assert str(e.value) == (
        f"{late}:2: projects.dt4h-heart-failure: already defined in 20-heart.yaml"
    )


def test_directory_scalar_conflict(tmp_path, keys, policy_dict, make_policy):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    late = _write(d / "50-node.yaml", {"node": "fdn-02"})
    with pytest.raises(PolicyError) as e:
        load_policy(d)
    assert str(e.value) == f"{late}:1: node: differs from an earlier file"


def test_directory_error_points_at_the_right_file(
    tmp_path, keys, policy_dict, make_policy
):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    bad = d / "20-heart.yaml"
    bad.write_text(bad.read_text().replace("threshold: 2", "threshold: two"))
    with pytest.raises(PolicyError) as e:
        load_policy(d)
    assert str(e.value).startswith(f"{bad}:")
    assert (
        'projects.dt4h-heart-failure.threshold: expected a whole number, got text "two"'
        in str(e.value)
    )


def test_directory_duplicate_inside_one_file(tmp_path, keys, policy_dict, make_policy):
    d = _split_policy(tmp_path, keys, policy_dict, make_policy)
    f = d / "00-node.yaml"
    f.write_text(f.read_text() + "node: fdn-02\n")
    with pytest.raises(PolicyError, match=r"00-node\.yaml:\d+: duplicate key 'node'"):
        load_policy(d)


def test_lint_problem_field_names_the_path():
    p = msgspec.convert(
        {
            "apiVersion": "femd/v1",
            "kind": "Policy",
            "node": "n",
            "projects": {"a": {"signers": ["ghost"]}},
        },
        Policy,
        strict=True,
    )
    (problem,) = lint(p)
    assert problem.field == "projects.a.signers[0]"
    assert problem.message == "unknown signer 'ghost'"


def test_mapping_key_must_be_a_scalar(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: femd/v1\nkind: Policy\n? [a, b]\n: x\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value) == f"{path}:3: a mapping key must be a scalar"


def test_yaml_error_paths_helpers():
    from femd.yamlfile import ANY_KEY, KEY, field_of, line_of, split_error

    assert split_error("Expected `int`, got `str` - at `$.a[...].b[2]`") == (
        "Expected `int`, got `str`",
        ["a", ANY_KEY, "b", 2],
    )
    assert split_error("Expected `str` - at `key` in `$.projects`") == (
        "Expected `str`",
        ["projects", KEY],
    )
    assert split_error("Object missing required field `kind`") == (
        "Object missing required field `kind`",
        [],
    )
    assert field_of(["a", ANY_KEY, "b", 2]) == "a[...].b[2]"
    assert field_of(["projects", KEY]) == "projects[key]"
    assert line_of(None, ["a"]) == (None, 0)
    node = yaml.compose("a:\n  - x\n  - y: 1\n")
    assert line_of(node, ["a", 1, "y"]) == (3, 3)
    assert line_of(node, ["a", 5]) == (1, 1)


def test_lint_reports_every_type_problem_in_one_pass(tmp_path):
    path = make_policy(
        tmp_path,
        {"orchestrator": keypair(), "pi-smith": keypair()},
        signers={"orchestrator": {"expires": "June 2027"}},
        projects={
            "dt4h-heart-failure": {
                "treshold": 2,
                "launchers": ["any"],
                "max_resources": {"timeout_s": "7200"},
            }
        },
    )
    problems = lint_file(path)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert '"June 2027" is not a date; write it as YYYY-MM-DD' in text
    assert "unknown field `treshold`; did you mean `threshold`?" in text
    assert '"any" is not allowed here; use one of: podman, process' in text
    assert 'expected a whole number (or leave it out), got text "7200"' in text
    assert all(p.startswith(f"{path}:") for p in problems)
    # load_policy names the first, in the same words
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value) == problems[0]


def test_lint_warnings_name_missing_dataset_paths(tmp_path):
    ds = "hf-cohort-2024"
    path = make_policy(tmp_path, datasets={ds: {"path": "/nonexistent/a"}})
    assert lint_warnings(path) == [
        f"{path}:12: datasets.{ds}.path: /nonexistent/a does not exist on this "
        f"host; tasks using dataset '{ds}' will fail at stage-in (create it or fix "
        "the path)"
    ]
    ok = make_policy(tmp_path / "ok", datasets={ds: {"path": str(tmp_path)}})
    assert lint_warnings(ok) == []
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [\n")
    assert lint_warnings(broken) == []
