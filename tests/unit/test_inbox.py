"""The orchestrator inbox: durable, shared, verified (real sqlite, real files)."""

import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from femd.client import Client
from femd.config import BrokerConfig, OrchestratorConfig
from femd.inbox import Inbox
from femd.stageout import iter_chunks, pack_outputs

NODE = "fdn-01"
MiB = 1024 * 1024


def event(task: str, state: str, seq: int, node: str = NODE, **extra) -> bytes:
    body = {"node": node, "task_id": task, "state": state, "seq": seq, "at": "t"}
    return json.dumps({**body, **extra}).encode()


@pytest.fixture
def packed(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes(os.urandom(200_000))
    (out / "note.txt").write_text("hello\n")
    p = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=MiB)
    return p, list(iter_chunks(p.path, 4096))


def headers(p, chunks, i: int) -> dict:
    return {
        "index": i,
        "total": len(chunks),
        "offset": i * 4096,
        "size": p.bytes,
        "sha256": p.sha256,
    }


def done_event(p, chunks, task: str = "t1", seq: int = 9) -> bytes:
    outputs = {"sha256": p.sha256, "bytes": p.bytes, "chunks": len(chunks)}
    return event(task, "succeeded", seq, outputs=outputs)


def test_events_are_kept_once_and_only_under_their_own_node(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox")
    inbox.stage_event(f"{NODE}.t1.running", event("t1", "running", 3))
    inbox.stage_event(f"{NODE}.t1.running", event("t1", "running", 3))  # redelivery
    # SECURITY: fdn-02 may publish only under fdn-02.*; its body claims fdn-01.
    inbox.stage_event("fdn-02.t1.failed", event("t1", "failed", 4))
    inbox.stage_event(f"{NODE}.x.y", b"not json")
    inbox.commit()
    inbox.stage_event(f"{NODE}.t1.running", event("t1", "running", 3))  # after commit
    inbox.commit()
    assert [(e.node, e.state) for e in inbox.events("t1")] == [(NODE, "running")]
    lines = (tmp_path / "inbox" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 1


def test_uncommitted_is_not_there_and_comes_again(tmp_path: Path, packed):
    """A receiver killed before commit acked nothing: redelivery fills the gap."""
    p, chunks = packed
    first = Inbox(tmp_path / "inbox")
    first.stage_event(f"{NODE}.t1.running", event("t1", "running", 1))
    first.stage_chunk(f"{NODE}.t1", headers(p, chunks, 0), chunks[0])
    # no commit: the process dies here
    again = Inbox(tmp_path / "inbox")
    assert again.events() == []
    assert again.output(NODE, "t1").received == 0
    again.stage_event(f"{NODE}.t1.running", event("t1", "running", 1))
    for i, c in enumerate(chunks):
        again.stage_chunk(f"{NODE}.t1", headers(p, chunks, i), c)
    again.stage_event(f"{NODE}.t1.succeeded", done_event(p, chunks))
    again.commit()
    status = again.output(NODE, "t1")
    assert status.status == "complete"
    got = Path(status.path)
    assert (got / "note.txt").read_text() == "hello\n"
    assert (tmp_path / "inbox" / NODE / "t1.tar.gz").read_bytes() == (
        p.path.read_bytes()
    )


def test_two_receivers_fill_one_output_and_it_is_unpacked_once(tmp_path: Path, packed):
    p, chunks = packed
    a, b = Inbox(tmp_path / "inbox"), Inbox(tmp_path / "inbox")
    # The terminal event first (at b), chunks split between both, in any order.
    b.stage_event(f"{NODE}.t1.succeeded", done_event(p, chunks))
    b.commit()
    for i in reversed(range(len(chunks))):
        (a if i % 2 else b).stage_chunk(f"{NODE}.t1", headers(p, chunks, i), chunks[i])
    a.commit()
    assert a.output(NODE, "t1").status == "receiving"
    b.commit()  # brings the last chunks: b verifies and unpacks
    assert a.output(NODE, "t1").status == "complete"
    # Redeliveries after completion change nothing.
    a.stage_chunk(f"{NODE}.t1", headers(p, chunks, 0), chunks[0])
    a.commit()
    assert b.output(NODE, "t1").status == "complete"
    assert not (tmp_path / "inbox" / "parts" / NODE / "t1.part").exists()


def test_a_tampered_or_contradicting_output_is_refused(tmp_path: Path, packed):
    p, chunks = packed
    inbox = Inbox(tmp_path / "inbox")
    bad = bytearray(chunks[1])
    bad[0] ^= 1
    for i, c in enumerate(chunks):
        inbox.stage_chunk(
            f"{NODE}.t1", headers(p, chunks, i), bytes(bad) if i == 1 else c
        )
    inbox.commit()
    status = inbox.output(NODE, "t1")
    assert status.status == "failed"
    assert "digest mismatch" in status.error
    assert not (tmp_path / "inbox" / NODE / "t1").exists()
    # A terminal event announcing other outputs than the chunks did.
    inbox.stage_chunk(f"{NODE}.t2", headers(p, chunks, 0), chunks[0])
    inbox.commit()
    other = {"sha256": "0" * 64, "bytes": p.bytes, "chunks": len(chunks)}
    inbox.stage_event(
        f"{NODE}.t2.succeeded", event("t2", "succeeded", 5, outputs=other)
    )
    inbox.commit()
    assert inbox.output(NODE, "t2").status == "failed"


def test_outputs_over_the_cap_are_refused_before_a_byte_is_written(
    tmp_path: Path, packed
):
    p, chunks = packed
    inbox = Inbox(tmp_path / "inbox", max_output_bytes=1024)
    inbox.stage_chunk(f"{NODE}.t1", headers(p, chunks, 0), chunks[0])
    inbox.commit()
    status = inbox.output(NODE, "t1")
    assert status.status == "failed"
    assert "exceeds 1024 bytes" in status.error
    assert not (tmp_path / "inbox" / "parts" / NODE / "t1.part").exists()


def test_a_verification_left_by_a_dead_receiver_is_taken_over(tmp_path: Path, packed):
    p, chunks = packed
    first = Inbox(tmp_path / "inbox")
    for i, c in enumerate(chunks):
        first.stage_chunk(f"{NODE}.t1", headers(p, chunks, i), c)
    first.assembly.finish_if_complete = lambda node, task: None  # dies first
    first.commit()
    db = sqlite3.connect(tmp_path / "inbox" / "inbox.sqlite")
    db.execute("UPDATE outputs SET status = 'verifying', claimed_by = 999999999")
    db.commit()
    db.close()
    again = Inbox(tmp_path / "inbox")
    assert again.output(NODE, "t1").status == "receiving"
    again.stage_chunk(f"{NODE}.t1", headers(p, chunks, 0), chunks[0])
    again.commit()
    assert again.output(NODE, "t1").status == "complete"


def test_malformed_chunks_are_dropped(tmp_path: Path, packed):
    p, chunks = packed
    inbox = Inbox(tmp_path / "inbox")
    inbox.stage_chunk("../../etc.t1", headers(p, chunks, 0), chunks[0])
    inbox.stage_chunk(f"{NODE}.t1", {"index": "x"}, chunks[0])
    inbox.stage_chunk(f"{NODE}.t/1", headers(p, chunks, 0), chunks[0])
    inbox.commit()
    assert inbox.output(NODE, "t1") is None
    assert not (tmp_path / "inbox" / "parts").exists()


def test_node_status_and_logs(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox")
    inbox.stage_node(f"{NODE}.status", json.dumps({"node": NODE, "n": 1}).encode())
    inbox.stage_node(f"{NODE}.status", json.dumps({"node": NODE, "n": 2}).encode())
    inbox.stage_node("fdn-02.status", json.dumps({"node": NODE, "n": 3}).encode())
    inbox.stage_log(f"{NODE}.t1", {"seq": 1, "dropped": 0}, b"a\nb\n")
    inbox.stage_log(f"{NODE}.t1", {"seq": 1, "dropped": 0}, b"a\nb\n")  # again
    inbox.stage_log(f"{NODE}.t1", {"seq": 2, "dropped": 100}, b"")
    inbox.commit()
    assert [(n.node, n.body["n"]) for n in inbox.nodes()] == [(NODE, 2)]
    logs = inbox.logs("t1")
    assert [(b.seq, b.text, b.dropped) for b in logs] == [
        (1, "a\nb\n", 0),
        (2, "", 100),
    ]


def client(tmp_path: Path) -> Client:
    cfg = OrchestratorConfig(
        broker=BrokerConfig(url="amqps://localhost/", ca="ca", cert="c", key="k"),
        results_dir=str(tmp_path / "inbox"),
        node_down_after_s=60,
    )
    return Client(cfg)


def test_nodes_look_down_after_three_intervals_or_when_stopping(tmp_path: Path):
    c = client(tmp_path)
    for node, body in (
        ("a", {"interval_s": 5}),
        ("b", {"interval_s": 5, "state": "stopping"}),
        ("c", {}),
    ):
        c.inbox.stage_node(
            f"{node}.status", json.dumps({"node": node, **body}).encode()
        )
    c.inbox.commit()
    now = datetime.now(UTC)
    assert {v.node: v.down for v in c.nodes(now=now)} == {
        "a": False,
        "b": True,
        "c": False,
    }
    later = {v.node: v.down for v in c.nodes(now=now + timedelta(seconds=16))}
    assert later == {"a": True, "b": True, "c": False}  # c: node_down_after_s
    assert all(v.down for v in c.nodes(now=now + timedelta(seconds=61)))


def test_cancel_needs_a_project_it_knows_or_is_given(tmp_path: Path):
    from femd.errors import InputError
    from femd.keys import generate

    c = client(tmp_path)
    with pytest.raises(InputError, match="give --project"):
        c.cancel("t9", [NODE], [generate()])
    with pytest.raises(InputError, match="--key"):
        c.cancel("t9", [NODE], [])


def test_chunks_of_an_older_node_wait_for_the_terminal_event(tmp_path: Path, packed):
    """Before ``size``/``offset`` headers: placed once the event announced the size."""
    p, chunks = packed
    inbox = Inbox(tmp_path / "inbox")
    old = [{"index": i, "total": len(chunks), "sha256": p.sha256} for i in range(3)]
    assert inbox.stage_chunk(f"{NODE}.t1", old[0], chunks[0]) is False  # later
    inbox.stage_event(f"{NODE}.t1.succeeded", done_event(p, chunks))
    inbox.commit()
    for i, c in enumerate(chunks):
        h = {"index": i, "total": len(chunks), "sha256": p.sha256}
        assert inbox.stage_chunk(f"{NODE}.t1", h, c) is True
    inbox.commit()
    assert inbox.output(NODE, "t1").status == "complete"
