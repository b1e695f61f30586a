"""The orchestrator commands on an inbox, without a broker (real files, sqlite)."""

import json
from pathlib import Path

import pytest

from femd import cli
from femd.inbox import Inbox
from femd.keys import write_keypair
from femd.stageout import iter_chunks, pack_outputs

NODE = "fdn-01"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "orchestrator.yaml"
    path.write_text(
        "broker: {url: 'amqps://127.0.0.1:1/', ca: ca.pem, cert: c.pem, key: c.key}\n"
        "results_dir: inbox\n"
    )
    return path


def fill(inbox_dir: Path, tmp_path: Path) -> str:
    """One task that succeeded on fdn-01 with verified outputs, one node status."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("42\n")
    p = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=1 << 20)
    chunks = list(iter_chunks(p.path, 1024))
    inbox = Inbox(inbox_dir)
    for seq, state in enumerate(("received", "running", "succeeded"), 1):
        body = {"node": NODE, "task_id": "t1", "state": state, "seq": seq, "at": "x"}
        if state == "succeeded":
            body["outputs"] = {"sha256": p.sha256, "bytes": p.bytes, "chunks": 1}
        inbox.stage_event(f"{NODE}.t1.{state}", json.dumps(body).encode())
    head = {"index": 0, "total": len(chunks), "sha256": p.sha256, "size": p.bytes}
    inbox.stage_chunk(f"{NODE}.t1", head, chunks[0])
    status = {"node": NODE, "interval_s": 30, "version": "0.1.0", "running": 0}
    inbox.stage_node(f"{NODE}.status", json.dumps(status).encode())
    inbox.commit()
    inbox.close()
    return p.sha256


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_late_watch_reads_the_inbox_without_a_broker(tmp_path, config, capsys):
    fill(tmp_path / "inbox", tmp_path)
    code, out, err = run(capsys, "watch", "--config", config, "--task", "t1",
                         "--node", NODE, "--timeout", "5")  # fmt: skip
    assert code == 0, err
    assert [json.loads(x)["state"] for x in out.splitlines()] == [
        "received",
        "running",
        "succeeded",
    ]
    assert f"verified in {tmp_path / 'inbox' / NODE / 't1'}" in err
    assert (tmp_path / "inbox" / NODE / "t1" / "result.txt").read_text() == "42\n"


def test_a_watch_that_must_connect_with_unusable_tls_files_says_so(
    tmp_path, config, capsys
):
    fill(tmp_path / "inbox", tmp_path)
    code, out, err = run(capsys, "watch", "--config", config, "--task", "t2",
                         "--timeout", "0.5")  # fmt: skip
    assert code == 2
    assert out == ""
    (line,) = err.strip().splitlines()
    # Each TLS file problem names that file (issue 17).
    assert line.startswith("femd: error: broker ca "), line
    assert "ca.pem: cannot read: No such file" in line, line


def test_tasks_and_nodes_from_the_inbox(tmp_path, config, capsys):
    fill(tmp_path / "inbox", tmp_path)
    code, out, err = run(capsys, "tasks", "--orchestrator", "--config", config,
                         "--json")  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(out)
    assert (row["node"], row["task_id"], row["state"]) == (NODE, "t1", "succeeded")
    assert row["outputs"]["status"] == "complete"
    code, out, err = run(capsys, "nodes", "--config", config, "--receive", "0",
                         "--json")  # fmt: skip
    assert code == 0, err
    (node,) = json.loads(out)
    assert (node["node"], node["down"], node["version"]) == (NODE, False, "0.1.0")
    code, out, _ = run(capsys, "nodes", "--config", config, "--receive", "0")
    assert out.split()[:2] == [NODE, "up"]


def test_cancel_of_a_task_not_submitted_from_here_needs_its_project(
    tmp_path, config, capsys
):
    key, _, _ = write_keypair("orch", tmp_path / "keys")
    code, out, err = run(capsys, "cancel", "t9", "--config", config, "--node", NODE,
                         "--key", key)  # fmt: skip
    assert code == 2
    assert out == ""
    assert err.strip() == (
        "femd: error: cancel: task t9 was not submitted from this inbox; give --project"
    )
