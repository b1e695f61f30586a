"""The CLI in-process: cli.main([...]) + capsys; exit codes 0/1/2, one-line errors."""

import json
from datetime import timedelta
from pathlib import Path

import pytest

from femd import cli
from femd.envelope import decode_envelope
from femd.keys import keyid, load_private_key

POLICIES = Path(__file__).parent.parent.parent / "policies"


@pytest.fixture
def site(tmp_path, keys, make_policy, task_dict, sign):
    """A policy, both signers' private keys on disk, and a good envelope."""
    from cryptography.hazmat.primitives import serialization

    policy = make_policy(tmp_path / "policy", keys)
    for name, kp in keys.items():
        (tmp_path / f"{name}.key").write_bytes(
            kp.private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    good = tmp_path / "good.json"
    good.write_bytes(sign(task_dict(), *keys.values()))
    manifest = tmp_path / "task.json"
    manifest.write_text(json.dumps(task_dict()))
    return tmp_path, policy, good, manifest


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


AT = "2026-11-22T12:00:00Z"


def _one_error_line(err: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("femd: error: ")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------
# keygen


def test_keygen_writes_keys_and_prints_keyid(tmp_path, capsys):
    code, out, err = run(capsys, "keygen", "alice", "--dir", tmp_path / "k")
    assert code == 0
    assert err == ""
    private = load_private_key(tmp_path / "k" / "alice.key")
    assert out == keyid(private.public_key()) + "\n"
    assert (tmp_path / "k" / "alice.key").stat().st_mode & 0o777 == 0o600
    assert (
        (tmp_path / "k" / "alice.pub")
        .read_bytes()
        .startswith(b"-----BEGIN PUBLIC KEY-----")
    )


def test_keygen_never_overwrites(tmp_path, capsys):
    assert run(capsys, "keygen", "alice", "--dir", tmp_path)[0] == 0
    before = (tmp_path / "alice.key").read_bytes()
    code, out, err = run(capsys, "keygen", "alice", "--dir", tmp_path)
    assert code == 2
    assert out == ""
    _one_error_line(err)
    assert "already exists" in err
    assert (tmp_path / "alice.key").read_bytes() == before


@pytest.mark.parametrize(
    "name", ["../evil", ".hidden", "a/b", ""], ids=["dotdot", "dot", "slash", "empty"]
)
def test_keygen_refuses_bad_names(tmp_path, capsys, name):
    code, out, err = run(capsys, "keygen", name, "--dir", tmp_path)
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_keygen_unwritable_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, out, err = run(capsys, "keygen", "alice", "--dir", tmp_path / "file" / "sub")
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert "keygen: cannot write keys" in err


# ---------------------------------------------------------------------------
# sign


def test_sign_json_manifest_to_stdout(site, capsys, keys):
    tmp, _, _, manifest = site
    code, out, err = run(capsys, "sign", "--key", tmp / "orchestrator.key", manifest)
    assert (code, err) == (0, "")
    env, payload = decode_envelope(out.encode())
    assert [s.keyid for s in env.signatures] == [keys["orchestrator"].keyid]
    assert json.loads(payload)["id"] == "7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11"


def test_sign_yaml_manifest_and_cosign_then_check(site, capsys, keys, task_dict):
    tmp, policy, _, _ = site
    import yaml

    d = task_dict()
    d["issued_at"] = "2026-11-22T10:00:00Z"  # stays a quoted string in YAML
    text = yaml.safe_dump(d, sort_keys=False)
    text = text.replace(
        "'2026-11-22T10:00:00Z'", "2026-11-22T10:00:00Z"
    )  # a YAML timestamp
    text = text.replace(
        "expires_at: '2026-11-23T10:00:00Z'", 'expires_at: "2026-11-23T10:00:00Z"'
    )
    (tmp / "task.yaml").write_text("# a task\n" + text)
    env1 = tmp / "env1.json"
    code, out, err = run(
        capsys, "sign", "--key", tmp / "orchestrator.key", tmp / "task.yaml", "-o", env1
    )
    assert (code, out, err) == (0, "", "")
    assert run(capsys, "check", "--policy", policy, "--at", AT, env1)[0] == 1
    env2 = tmp / "env2.json"
    code, out, err = run(
        capsys, "sign", "--key", tmp / "pi-smith.key", "--add", env1, "-o", env2
    )
    assert (code, err) == (0, "")
    code, out, _ = run(capsys, "check", "--policy", policy, "--at", AT, "--json", env2)
    assert code == 0
    assert json.loads(out)["signers"] == sorted(
        ["orchestrator", "pi-smith"], key=lambda n: keys[n].keyid
    )
    # the payload was not touched by co-signing
    assert (
        decode_envelope(env1.read_bytes())[1] == decode_envelope(env2.read_bytes())[1]
    )


def test_sign_with_two_keys_at_once(site, capsys):
    tmp, policy, _, manifest = site
    code, _, _ = run(
        capsys,
        "sign",
        "--key",
        tmp / "orchestrator.key",
        "--key",
        tmp / "pi-smith.key",
        manifest,
        "-o",
        tmp / "e.json",
    )
    assert code == 0
    assert run(capsys, "check", "--policy", policy, "--at", AT, tmp / "e.json")[0] == 0


@pytest.mark.parametrize(
    ("manifest_text", "match"),
    [
        ('{"kind": "Task"}', "manifest: "),
        ('{"kind": "Task", "kind": "Task"}', "duplicate key 'kind'"),
        ("kind: Task\nkind: Cancel\n", "line 2 duplicate key 'kind'"),
        ("kind: Task\nid: [\n", "manifest "),
        ("- a\n", "expected a mapping (`key: value` lines), got a list"),
        ("apiVersion: femd/v1\nkind: Task\nid: x\n", "the required field `project`"),
    ],
    ids=[
        "json-incomplete",
        "json-duplicate",
        "yaml-duplicate",
        "yaml-syntax",
        "yaml-list",
        "yaml-incomplete",
    ],
)
def test_sign_refuses_bad_manifests(site, capsys, manifest_text, match):
    tmp, *_ = site
    (tmp / "m").write_text(manifest_text)
    code, out, err = run(capsys, "sign", "--key", tmp / "orchestrator.key", tmp / "m")
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert match in err


def test_sign_argument_errors(site, capsys):
    tmp, _, good, manifest = site
    key = tmp / "orchestrator.key"
    for argv in (
        ["sign", "--key", key],
        ["sign", "--key", key, "--add", good, manifest],
        ["sign", manifest],
        ["sign", "--key", tmp / "nokey", manifest],
        ["sign", "--key", manifest, manifest],
        ["sign", "--key", key, "--add", manifest],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.count("\n") == 1, argv
        assert err.startswith("femd: error: "), argv


def test_cosign_refuses_a_non_manifest_payload(site, capsys, keys):
    tmp, *_ = site
    from femd.envelope import encode_envelope, sign

    (tmp / "e.json").write_bytes(
        encode_envelope(sign(b"not a manifest", [keys["orchestrator"].private]))
    )
    code, out, err = run(
        capsys, "sign", "--key", tmp / "pi-smith.key", "--add", tmp / "e.json"
    )
    assert (code, out) == (2, "")
    _one_error_line(err)


# ---------------------------------------------------------------------------
# check


def test_check_allow_human(site, capsys):
    _, policy, good, _ = site
    code, out, err = run(capsys, "check", "--policy", policy, "--at", AT, good)
    assert (code, err) == (0, "")
    assert out.startswith(
        "ALLOW: task 7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11"
        " (project dt4h-heart-failure, Task) on node fdn-01\n"
    )
    assert "signed by: " in out


def test_check_deny_human_names_every_rule(
    site, capsys, keys, sign, task_dict, keypair
):
    tmp, policy, _, _ = site
    bad = tmp / "bad.json"
    stranger = keypair()
    bad.write_bytes(
        sign(
            task_dict(
                image="registry.example.org/dt4h/flcore:latest",
                resources={"cpus": 64},
                network={"mode": "egress", "allow": ["evil.io:443"], "listen": [22]},
            ),
            keys["orchestrator"],
            stranger,
        )
    )
    code, out, err = run(capsys, "check", "--policy", policy, "--at", AT, bad)
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0].startswith("DENY: task 7b0f6c1e")
    rules = [ln.split(":")[0].strip(" -") for ln in lines if ln.startswith("  - ")]
    assert rules == [
        "signature.threshold",
        "image.not_pinned",
        "resources.exceeded",
        "network.not_allowed",
        "network.not_allowed",
    ]
    assert any("unknown key" in ln for ln in lines)
    assert "  - network.not_allowed: listening on port 22 is not allowed" in lines


def test_check_json_exact_keys(site, capsys):
    _, policy, good, _ = site
    code, out, err = run(
        capsys, "check", "--policy", policy, "--at", AT, "--json", good
    )
    assert (code, err) == (0, "")
    obj = json.loads(out)
    assert list(obj) == [
        "decision", "task_id", "project", "signers", "reasons", "launch_checked"
    ]  # fmt: skip
    assert obj["launch_checked"] is False
    assert obj["decision"] == "allow"
    assert obj["task_id"] == "7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11"
    assert obj["project"] == "dt4h-heart-failure"
    assert sorted(obj["signers"]) == ["orchestrator", "pi-smith"]
    assert obj["reasons"] == []
    assert out.count("\n") == 1


def test_check_json_deny_unsigned(site, capsys, task_dict, sign):
    tmp, policy, _, _ = site
    (tmp / "unsigned.json").write_bytes(sign(task_dict()))
    code, out, _ = run(
        capsys, "check", "--policy", policy, "--json", tmp / "unsigned.json"
    )
    assert code == 1
    obj = json.loads(out)
    assert obj["decision"] == "deny"
    assert obj["task_id"] is None  # never decoded: nobody trusted signed it
    assert obj["signers"] == []
    assert [r["rule"] for r in obj["reasons"]] == ["signature.threshold"]
    assert set(obj["reasons"][0]) == {"rule", "message"}


def test_check_at_and_node(site, capsys):
    _, policy, good, _ = site
    late = "2026-11-24T12:00:00+02:00"
    code, out, _ = run(
        capsys, "check", "--policy", policy, "--at", late, "--json", good
    )
    assert code == 1
    assert [r["rule"] for r in json.loads(out)["reasons"]] == ["manifest.expired"]
    code, out, _ = run(
        capsys,
        "check",
        "--policy",
        policy,
        "--at",
        AT,
        "--node",
        "fdn-02",
        "--json",
        good,
    )
    assert code == 1
    assert [r["rule"] for r in json.loads(out)["reasons"]] == ["node.audience"]


def test_check_without_at_uses_the_clock(site, capsys, now):
    # The fixture task is valid around NOW (2026-11-22); the real clock is elsewhere.
    from datetime import UTC, datetime

    _, policy, good, _ = site
    code, _, _ = run(capsys, "check", "--policy", policy, "--json", good)
    real = datetime.now(UTC)
    inside = (
        now - timedelta(hours=2, minutes=5)
        <= real
        <= now + timedelta(hours=22, minutes=5)
    )
    assert code == (0 if inside else 1)


def test_check_reads_stdin(site, capsys, monkeypatch):
    import io
    import sys

    _, policy, good, _ = site
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(good.read_bytes())))
    assert run(capsys, "check", "--policy", policy, "--at", AT, "-")[0] == 0


CHECK_ERRORS = {
    "missing-envelope": (["{tmp}/missing.json"], "No such file or directory"),
    "directory-envelope": (["{tmp}"], "Is a directory"),
    "garbage-envelope": (["{tmp}/garbage.bin"], "envelope: "),
    "empty-envelope": (["{tmp}/empty.json"], "envelope: "),
    "deep-envelope": (["{tmp}/deep.json"], "nests too deeply"),
    "bad-at": (["--at", "noon", "{good}"], "--at: not an RFC 3339 time"),
    "at-out-of-range": (
        ["--at", "9999-12-31T23:59:59-23:59", "{good}"],
        "--at: out of range",
    ),
    "skew-nan": (["--skew", "nan", "{good}"], "argument --skew: expected 0 to 86400"),
    "skew-inf": (["--skew", "inf", "{good}"], "argument --skew: expected 0 to 86400"),
    "skew-negative": (["--skew=-1", "{good}"], "argument --skew: expected 0 to 86400"),
    "naive-at": (
        ["--at", "2026-11-22T12:00:00", "{good}"],
        "--at: the time needs a zone",
    ),
}


@pytest.mark.parametrize(
    ("argv_tail", "match"), CHECK_ERRORS.values(), ids=CHECK_ERRORS.keys()
)
def test_check_errors_exit_2_nothing_on_stdout(site, capsys, argv_tail, match):
    tmp, policy, good, _ = site
    (tmp / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "empty.json").write_bytes(b"")
    (tmp / "deep.json").write_bytes(b"[" * 100_000)
    tail = [a.format(tmp=tmp, good=good) for a in argv_tail]
    code, out, err = run(capsys, "check", "--policy", policy, *tail)
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert match in err


@pytest.mark.parametrize(
    ("policy_text", "match"),
    [
        (None, "No such file or directory"),
        ("", ":1: expected a mapping at the top level"),
        ("apiVersion: femd/v1\nnode: fdn-01\n", ":1: kind: the required field `kind`"),
        ("\x00\x01garbage", "policy.yaml"),
    ],
    ids=["missing", "empty", "no-kind", "binary"],
)
def test_check_policy_errors_exit_2(site, capsys, policy_text, match):
    tmp, _, good, _ = site
    policy = tmp / "other" / "policy.yaml"
    if policy_text is not None:
        policy.parent.mkdir()
        policy.write_text(policy_text)
    code, out, err = run(capsys, "check", "--policy", policy, good)
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert match in err


def test_check_manifest_error_exit_2(site, capsys, keys, sign, task_dict):
    tmp, policy, _, _ = site
    (tmp / "m.json").write_bytes(
        sign(task_dict(outputs={"path": "/out/../etc"}), *keys.values())
    )
    code, out, err = run(
        capsys, "check", "--policy", policy, "--at", AT, tmp / "m.json"
    )
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert "outputs.path" in err


# ---------------------------------------------------------------------------
# policy lint / schema, argparse


def test_policy_lint_ok_and_problems(site, capsys):
    _, policy, _, _ = site
    code, out, err = run(capsys, "policy", "lint", policy)
    # The example dataset path does not exist here: a warning, not an error.
    assert code == 0
    assert err.startswith(f"femd: warning: {policy}:12: datasets.hf-cohort-2024.path:")
    assert "does not exist on this host" in err
    assert (
        out == f"ok: {policy}: node fdn-01, 2 signer(s), 1 project(s), 1 dataset(s)\n"
    )
    policy.write_text(policy.read_text().replace("/srv/data/hf-cohort-2024", "/"))
    code, out, err = run(capsys, "policy", "lint", policy)
    assert (code, err) == (0, "")
    text = (
        policy.read_text()
        .replace("threshold: 2", "threshold: 3")
        .replace("- hf-cohort-2024\n", "- nope\n")
    )
    policy.write_text(text)
    code, out, err = run(capsys, "policy", "lint", policy)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 2
    assert all(ln.startswith(f"femd: error: {policy}:") for ln in lines)
    assert "projects.dt4h-heart-failure.threshold: needs 3 signatures" in lines[0]
    assert "projects.dt4h-heart-failure.datasets[0]: unknown dataset 'nope'" in lines[1]


def test_policy_lint_directory_and_missing(tmp_path, capsys):
    code, out, err = run(capsys, "policy", "lint", tmp_path)
    assert (code, out) == (2, "")
    _one_error_line(err)
    code, out, err = run(capsys, "policy", "lint", tmp_path / "nope.yaml")
    assert (code, out) == (2, "")
    _one_error_line(err)


def test_policy_schema_is_the_shipped_file(capsys):
    code, out, err = run(capsys, "policy", "schema")
    assert (code, err) == (0, "")
    assert out == (POLICIES / "schema.json").read_text()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["check"],
        ["check", "x"],
        ["policy"],
        ["keygen"],
        ["sign", "--key"],
    ],
    ids=[
        "nothing",
        "unknown-command",
        "check-no-args",
        "check-no-policy",
        "policy-no-sub",
        "keygen-no-name",
        "sign-key-no-value",
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    _one_error_line(err)


def test_version(capsys):
    from femd import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out == f"femd {__version__}\n"


def test_sign_refuses_a_key_that_is_not_ed25519(site, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    tmp, _, _, manifest = site
    k = ec.generate_private_key(ec.SECP256R1())
    (tmp / "ec.key").write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    code, out, err = run(capsys, "sign", "--key", tmp / "ec.key", manifest)
    assert (code, out) == (2, "")
    _one_error_line(err)
    assert "not an Ed25519 key" in err
