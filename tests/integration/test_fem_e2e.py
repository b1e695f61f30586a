"""FEM -> femd end to end: convert, sign, check, run the Flower client under bwrap.

FEM's own flcore client template (``../shared/fem``, as FEM serves it), with
its tool plan and per-node parameters, is converted by ``femd import-fem``
into one manifest per node,
signed by ``femd sign``, admitted by ``femd check`` against a policy written
for it, then run through the real process launcher (bubblewrap) from a local
``file://`` git repository made with pygit2. No broker: the launch spec is
built by ``femd.launchspec.build_spec`` as the agent builds it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pygit2
import pytest
import yaml
from pygit2.enums import FileMode

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd import cli  # noqa: E402
from femd.cli.orchestrator import _fem_line  # noqa: E402
from femd.decision import admit  # noqa: E402
from femd.launchers import start  # noqa: E402
from femd.launchspec import build_spec  # noqa: E402
from femd.manifest import Task  # noqa: E402
from femd.policy import load_policy  # noqa: E402
from femd.stagein import resolve_dataset, source_subdir, stage_git  # noqa: E402
from tests.integration.sandbox_support import Sandbox  # noqa: E402

pytestmark = pytest.mark.bwrap

SHARED = REPO.parent / "shared" / "fem"  # FEM's documents, beside the clone
PROJECT = "dt4h-flower"

# The client: what a Flower client would do with its arguments, minus Flower.
CLIENT_PY = b"""\
import json, os, pathlib, sys

rows = pathlib.Path("/data/cohort.csv").read_text().splitlines()[1:]
report = {
    "argv": sys.argv[1:],
    "rows": len(rows),
    "client": os.environ.get("NODE_NAME"),
    "cacert": os.environ.get("FLOWER_SSL_CACERT"),
    "cwd": os.getcwd(),
    "home_leak": os.environ.get("FEMD_E2E_HOST_SECRET"),
}
pathlib.Path("/sandbox/metrics.json").write_text(json.dumps(report))
print("flower client done", flush=True)
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox.open() as sandbox:
        yield sandbox


def make_origin(path: Path) -> tuple[str, str]:
    """A bare repository holding client_cmd.py on `main`; returns (url, commit)."""
    repo = pygit2.init_repository(str(path), bare=True)
    sig = pygit2.Signature("DT4H", "dev@dt4h.example", 1_700_000_000, 0)
    tb = repo.TreeBuilder()
    tb.insert("client_cmd.py", repo.create_blob(CLIENT_PY), FileMode.BLOB)
    oid = repo.create_commit("refs/heads/main", sig, sig, "client", tb.write(), [])
    return path.as_uri(), str(oid)


def write_policy(root: Path, git_url: str, dataset_dir: Path) -> Path:
    policy = {
        "apiVersion": "femd/v1",
        "kind": "Policy",
        "node": "fdn-bsc",
        "signers": {"orchestrator": {"public_key_file": "keys/orchestrator.pub"}},
        "datasets": {"hf-cohort": {"path": str(dataset_dir)}},
        "projects": {
            PROJECT: {
                "signers": ["orchestrator"],
                "threshold": 1,
                "launchers": ["process"],
                "git": [git_url],
                "datasets": ["hf-cohort"],
                "max_resources": {
                    "cpus": 1,
                    "memory_mb": 1024,
                    "timeout_s": 60,
                    "pids": 256,
                },
                "network": "none",
                "outputs": {"max_bytes": 1 << 20},
            }
        },
    }
    path = root / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def test_flower_client_template_converts_signs_passes_check_and_runs(
    box: Sandbox, capsys, monkeypatch
):
    root = box.root / "fem"
    root.mkdir()
    url, commit = make_origin(root / "flcore.git")
    cohort = box.input_dir({"cohort.csv": "age,ef\n71,35\n64,40\n58,30\n"})
    if not SHARED.is_dir():
        pytest.fail(f"FEM's documents are missing: {SHARED}")
    template = json.loads((SHARED / "flcore-client.task.json").read_text())
    # Our repository instead of GitHub's (no internet here), same shape; and no
    # server: this test runs one client alone (the FL act runs the session).
    template["source_code"] = {"url": f"{url} --branch main"}
    del template["var_envs"]["FLOWER_CENTRAL_SERVER_IP"]
    (root / "client.json").write_text(json.dumps(template))
    (root / "keys").mkdir()
    assert cli.main(["keygen", "orchestrator", "--dir", str(root / "keys")]) == 0
    policy_path = write_policy(root, url, cohort)
    capsys.readouterr()

    # 1. convert: per-node params -> one manifest per node
    assert cli.main([
        "import-fem", str(root / "client.json"),
        "--tool", str(SHARED / "flcore.tool.json"),
        "--params", str(SHARED / "flcore.params.json"),
        "--node", "BSC=fdn-bsc", "--node", "UB2=fdn-ub2",
        "--project", PROJECT, "--launcher", "process", "--commit", commit,
        "--dataset", "hf-cohort=/data", "--output-dir", "/sandbox",
        "--code", "/flcore", "--env", "NODE_NAME=%%node_name%%",
        "--env", "FLOWER_SSL_CACERT=/certs/ca.pem",
        "--expires-in", "1h", "-o", str(root / "client-{node}.json"),
    ]) == 0  # fmt: skip
    written = [line.split(" ") for line in capsys.readouterr().out.splitlines()]
    assert [w[2] for w in written] == ["fdn-bsc", "fdn-ub2"]

    # 2. sign each manifest
    for _, _, node in written:
        assert cli.main([
            "sign", "--key", str(root / "keys" / "orchestrator.key"),
            str(root / f"client-{node}.json"), "-o", str(root / f"env-{node}.json"),
        ]) == 0  # fmt: skip

    # 3. check: BSC's envelope is allowed on BSC; UB2's is not (audience)
    capsys.readouterr()
    argv = ["check", "--policy", str(policy_path), "--json"]
    assert cli.main([*argv, str(root / "env-fdn-bsc.json")]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert (verdict["decision"], verdict["reasons"]) == ("allow", [])
    assert verdict["signers"] == ["orchestrator"]
    assert cli.main([*argv, str(root / "env-fdn-ub2.json")]) == 1
    rules = [r["rule"] for r in json.loads(capsys.readouterr().out)["reasons"]]
    assert rules == ["node.audience"]

    # 4. run the admitted BSC task as the agent would
    policy = load_policy(policy_path)
    data = (root / "env-fdn-bsc.json").read_bytes()
    admitted = admit(data, policy, node="fdn-bsc", now=datetime.now(UTC))
    assert admitted.decision.allowed
    task = admitted.manifest
    assert isinstance(task, Task)
    assert task.id == written[0][1]
    assert task.source is not None
    work = box.root / "work" / task.id
    (work / "out").mkdir(parents=True)
    for d in (work.parent, work):
        d.chmod(0o711)
    tree = stage_git(
        task.source.git,
        task.source.commit,
        cache_dir=box.root / "git",
        dest=work / "src",
        max_bytes=1 << 20,
    )
    inputs = {
        i.mount: resolve_dataset(i.dataset, policy.policy.datasets[i.dataset].path)
        for i in task.inputs
    }
    spec = build_spec(
        task,
        policy,
        box.profile,
        work_dir=work,
        code_dir=source_subdir(tree, task.source.path),
        inputs=inputs,
    )
    assert spec.output_target == "/sandbox"
    monkeypatch.setenv("FEMD_E2E_HOST_SECRET", "must-not-leak")
    handle = start(box.launcher, spec)
    outcome = handle.wait(90)
    assert outcome is not None
    assert (outcome.state, outcome.exit_code) == ("succeeded", 0), outcome
    assert "flower client done" in outcome.log_tail

    report = json.loads((work / "out" / "metrics.json").read_text())
    assert report == {
        "argv": [
            "--num_rounds", "5", "--model", "random_forest",
            "--data_id", "/data/test_study/3362-2045-1944", "--node_name", "BSC",
            "--sandbox_path", "/sandbox/",
        ],
        "rows": 3,
        "client": "BSC",
        "cacert": "/certs/ca.pem",
        "cwd": "/src",
        "home_leak": None,
    }  # fmt: skip

    # 5. and the status event it makes, in FEM's shape (`femd watch --format fem`)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    event = {
        "node": "fdn-bsc",
        "task_id": task.id,
        "state": outcome.state,
        "at": outcome.finished_at.astimezone(UTC).strftime(fmt),
        "seq": 5,
        "exit_code": outcome.exit_code,
        "started_at": outcome.started_at.astimezone(UTC).strftime(fmt),
    }
    line = _fem_line(event)
    assert line["process_info"]["status"] == "finished"
    assert line["process_info"]["return_code"] == 0
    assert (line["task_id"], line["exit_code"], line["error"]) == (task.id, 0, None)
    assert 0 <= line["elapsed_time_sec"] < 90
    shutil.rmtree(work, ignore_errors=True)
