"""The `femd` command as a user runs it: a real process, real files, exit codes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

FEMD = Path(sys.executable).parent / "femd"
AT = "2026-11-22T12:00:00Z"


def femd(*args, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEMD_")}
    return subprocess.run(  # noqa: S603 (the femd under test)
        [str(FEMD), *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def assert_one_error_line(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 2, p
    assert p.stdout == b"", p
    err = p.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith("femd: error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_policy, task_dict):
    """A steward's directory made with the real commands: keys, policy, envelopes."""
    d = tmp_path_factory.mktemp("site")
    kids = {}
    for name in ("orchestrator", "pi-smith"):
        p = femd("keygen", name, "--dir", "keys", cwd=d)
        assert p.returncode == 0, p
        assert p.stderr == b""
        kids[name] = p.stdout.decode().strip()
    make_policy(d)  # references keys/orchestrator.pub and keys/pi-smith.pub
    (d / "task.json").write_text(json.dumps(task_dict(), indent=2))
    p = femd(
        "sign",
        "--key",
        "keys/orchestrator.key",
        "--key",
        "keys/pi-smith.key",
        "task.json",
        "-o",
        "good.json",
        cwd=d,
    )
    assert p.returncode == 0, p
    return d, kids


def test_keygen_files_mode_and_keyid(site):
    d, kids = site
    for name, kid in kids.items():
        private = d / "keys" / f"{name}.key"
        assert private.stat().st_mode & 0o777 == 0o600
        assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        pub = serialization.load_pem_public_key(
            (d / "keys" / f"{name}.pub").read_bytes()
        )
        raw = pub.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert kid == hashlib.sha256(raw).hexdigest()


def test_keygen_existing_is_refused(site):
    d, _ = site
    assert_one_error_line(femd("keygen", "orchestrator", "--dir", "keys", cwd=d))


def test_check_allow_exit_0(site):
    d, _ = site
    p = femd("check", "--policy", "policy.yaml", "--at", AT, "good.json", cwd=d)
    assert p.returncode == 0, p
    assert p.stdout.decode().startswith("ALLOW: task 7b0f6c1e")
    assert p.stderr == b""


def test_check_json_from_another_directory(site, tmp_path):
    d, _ = site
    p = femd(
        "check",
        "--policy",
        d / "policy.yaml",
        "--at",
        AT,
        "--json",
        d / "good.json",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p
    obj = json.loads(p.stdout)
    assert list(obj)[:5] == ["decision", "task_id", "project", "signers", "reasons"]
    assert obj["decision"] == "allow"


def test_cosign_yaml_manifest_then_check(site, tmp_path, task_dict):
    import yaml

    d, _ = site
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_dict(id="yaml-task-1")))
    keys = d / "keys"
    p = femd(
        "sign",
        "--key",
        keys / "orchestrator.key",
        "task.yaml",
        "-o",
        "e1.json",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p
    p = femd(
        "check", "--policy", d / "policy.yaml", "--at", AT, "e1.json", cwd=tmp_path
    )
    assert p.returncode == 1, p
    assert "signature.threshold" in p.stdout.decode()
    p = femd("sign", "--key", keys / "pi-smith.key", "--add", "e1.json", cwd=tmp_path)
    assert p.returncode == 0, p
    p = femd(
        "check",
        "--policy",
        d / "policy.yaml",
        "--at",
        AT,
        "--json",
        "-",
        cwd=tmp_path,
        stdin=p.stdout,
    )
    assert p.returncode == 0, p
    assert json.loads(p.stdout)["task_id"] == "yaml-task-1"


def test_check_deny_exit_1_names_every_rule(site, tmp_path, task_dict):
    d, _ = site
    (tmp_path / "t.json").write_text(
        json.dumps(
            task_dict(
                nodes=["fdn-02"],
                launcher="process",
                image="docker.io/library/python:3.12",
                inputs=[{"dataset": "secrets", "mount": "/s"}],
            )
        )
    )
    p = femd(
        "sign",
        "--key",
        d / "keys" / "orchestrator.key",
        "t.json",
        "-o",
        "e.json",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p
    p = femd("check", "--policy", d / "policy.yaml", "--at", AT, "e.json", cwd=tmp_path)
    assert p.returncode == 1, p
    out = p.stdout.decode()
    for rule in (
        "signature.threshold",
        "node.audience",
        "launcher.not_allowed",
        "image.not_pinned",
        "image.not_allowed",
        "dataset.not_allowed",
    ):
        assert f"  - {rule}: " in out, (rule, out)
    p = femd(
        "check",
        "--policy",
        d / "policy.yaml",
        "--at",
        AT,
        "--json",
        "e.json",
        cwd=tmp_path,
    )
    assert p.returncode == 1
    assert json.loads(p.stdout)["decision"] == "deny"


def _files(tmp: Path) -> None:
    (tmp / "garbage.bin").write_bytes(os.urandom(4096))
    (tmp / "empty.json").write_bytes(b"")
    (tmp / "huge.json").write_bytes(b'{"payload": "' + b"A" * (1024 * 1024 + 1) + b'"}')
    (tmp / "deep.json").write_bytes(b"[" * 200_000)
    (tmp / "dup.json").write_bytes(
        b'{"payloadType": "application/vnd.femd.task+json", "payload": "e30=", '
        b'"payload": "e30=", "signatures": []}'
    )
    (tmp / "nul.json").write_bytes(b"\x00" * 100)
    (tmp / "bad-policy.yaml").write_text(
        "apiVersion: femd/v1\nkind: Policy\nnode: fdn-01\nnode: x\n"
    )
    (tmp / "bin-policy.yaml").write_bytes(os.urandom(512))
    (tmp / "adir").mkdir()


ERRORS = {
    "missing-envelope": (
        ["--policy", "{site}/policy.yaml", "missing.json"],
        "No such file",
    ),
    "directory-envelope": (
        ["--policy", "{site}/policy.yaml", "adir"],
        "Is a directory",
    ),
    "garbage-envelope": (["--policy", "{site}/policy.yaml", "garbage.bin"], "envelope"),
    "empty-envelope": (["--policy", "{site}/policy.yaml", "empty.json"], "envelope"),
    "huge-envelope": (["--policy", "{site}/policy.yaml", "huge.json"], "too large"),
    "deep-envelope": (
        ["--policy", "{site}/policy.yaml", "deep.json"],
        "nests too deeply",
    ),
    "duplicate-key-envelope": (
        ["--policy", "{site}/policy.yaml", "dup.json"],
        "duplicate key",
    ),
    "nul-envelope": (["--policy", "{site}/policy.yaml", "nul.json"], "envelope"),
    "missing-policy": (["--policy", "nope.yaml", "{site}/good.json"], "No such file"),
    "directory-policy": (["--policy", "adir", "{site}/good.json"], "no *.yaml"),
    "duplicate-key-policy": (
        ["--policy", "bad-policy.yaml", "{site}/good.json"],
        ":4: duplicate key",
    ),
    "binary-policy": (
        ["--policy", "bin-policy.yaml", "{site}/good.json"],
        "bin-policy.yaml",
    ),
    "empty-policy": (
        ["--policy", "empty.json", "{site}/good.json"],
        "expected a mapping",
    ),
}


@pytest.mark.parametrize(("argv", "match"), ERRORS.values(), ids=ERRORS.keys())
def test_check_bad_input_exit_2_one_line(site, tmp_path, argv, match):
    d, _ = site
    _files(tmp_path)
    p = femd("check", "--at", AT, *(a.format(site=d) for a in argv), cwd=tmp_path)
    assert_one_error_line(p)
    assert match in p.stderr.decode()


def test_policy_lint_exit_codes(site, tmp_path):
    d, _ = site
    p = femd("policy", "lint", "policy.yaml", cwd=d)
    assert p.returncode == 0, p
    assert p.stdout.decode().startswith("ok: policy.yaml: node fdn-01")
    bad = tmp_path / "p.yaml"
    bad.write_text(
        (d / "policy.yaml")
        .read_text()
        .replace("keys/", str(d / "keys") + "/")
        .replace("threshold: 2", "threshold: 5")
        .replace("- hf-cohort-2024\n", "- nope\n")
    )
    p = femd("policy", "lint", bad, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stdout == b""
    lines = [
        ln for ln in p.stderr.decode().splitlines() if not ln.startswith("femd: warn")
    ]
    assert len(lines) == 2, lines
    assert all(ln.startswith(f"femd: error: {bad}:") for ln in lines)


def test_policy_schema_prints_the_shipped_schema(site):
    d, _ = site
    p = femd("policy", "schema", cwd=d)
    assert p.returncode == 0
    shipped = Path(__file__).parent.parent.parent / "policies" / "schema.json"
    assert p.stdout == shipped.read_bytes()


def test_usage_error_is_one_line(site):
    d, _ = site
    assert_one_error_line(femd("check", cwd=d))
    assert_one_error_line(femd("frobnicate", cwd=d))


def test_python_dash_m_femd(site):
    d, _ = site
    p = subprocess.run(
        [sys.executable, "-m", "femd", "policy", "lint", "policy.yaml"],
        cwd=d,
        capture_output=True,
        check=False,
    )
    assert p.returncode == 0, p


def test_run_parses_with_its_own_command_module_only(site, tmp_path):
    d, _ = site
    # `femd run` is the agent's start: no other command's module is imported.
    code = (
        "import sys; from femd.cli import _parser; "
        "a = _parser(['-v', 'run', '--config', 'x.yaml']).parse_args("
        "['-v', 'run', '--config', 'x.yaml']); "
        "print(a.command, a.config, a.verbose, "
        "sorted(m for m in sys.modules if m.startswith('femd.cli.')))"
    )
    p = subprocess.run(  # noqa: S603 (this interpreter, fixed code)
        [sys.executable, "-c", code], capture_output=True, check=True, text=True
    )
    assert p.stdout.split(" ", 3) == [
        "run",
        "x.yaml",
        "True",
        "['femd.cli.console', 'femd.cli.run']\n",
    ]
    # Every other command line still sees every command.
    listed = femd("--help", cwd=d).stdout.decode()
    for command in ("keygen", "check", "policy", "run", "submit", "doctor", "tasks"):
        assert command in listed
    assert_one_error_line(femd("-v", "run", "--config", tmp_path / "none.yaml", cwd=d))
