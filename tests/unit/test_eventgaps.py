"""A lost status event is seen on femd.events alone (issue 13): node to inbox."""

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from femd import cli
from femd.events import EVENTS_EXCHANGE
from femd.inbox import Inbox
from femd.stageout import pack_outputs
from femd.state import State

NODE = "fdn-01"
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def record(st: State, tid: str) -> None:
    st.record(task_id=tid, project="p", kind="Task", manifest_sha256="ab" * 32,
              payload=b"{}", signer_keyids=[], launcher="process",
              decision="allow", reasons=[], node=NODE, at=T0)  # fmt: skip


def event(task: str, state: str, seq: int, event_seq: int, at: str = "t") -> bytes:
    return json.dumps({"node": NODE, "task_id": task, "state": state, "seq": seq,
                       "event_seq": event_seq, "at": at}).encode()  # fmt: skip


def gaps(inbox: Inbox) -> list[tuple[str, int, int]]:
    return [(g.node, g.first, g.last) for g in inbox.gaps()]


def test_an_event_lost_between_node_and_inbox_is_named(tmp_path: Path):
    # The node: two tasks, their outputs' chunks queued between their events.
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(bytes(range(256)) * 8)
    packed = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=1 << 20)
    st = State(tmp_path / "state" / "state.sqlite")
    for tid in ("t1", "t2"):
        record(st, tid)
        st.transition(tid, "uploading", node=NODE, at=T0)
        n = st.enqueue_results(task_id=tid, node=NODE, archive=packed.path,
                               sha256=packed.sha256, chunk_bytes=100)  # fmt: skip
        st.transition(tid, "succeeded", node=NODE, at=T0,
                      outputs=(packed.sha256, packed.bytes, n))  # fmt: skip
    events = [e for e in st.pending_events(1000) if e.exchange == EVENTS_EXCHANGE]
    st.close()
    # femd.events loses t1's `succeeded`; the inbox receives only the events.
    lost = next(e for e in events if e.routing_key == f"{NODE}.t1.succeeded")
    inbox = Inbox(tmp_path / "inbox")
    for e in events:
        if e is not lost:
            inbox.stage_event(e.routing_key, e.body)
    inbox.commit()
    number = json.loads(lost.body)["event_seq"]
    assert gaps(inbox) == [(NODE, number, number)]
    # It comes after all (a redelivery): the hole closes.
    inbox.stage_event(lost.routing_key, lost.body)
    inbox.commit()
    assert gaps(inbox) == []


def test_late_events_shrink_and_split_holes_duplicates_change_nothing(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox")
    for n in (1, 2, 5, 9):
        inbox.stage_event(f"{NODE}.t{n}.received", event(f"t{n}", "received", n, n))
    inbox.commit()
    assert gaps(inbox) == [(NODE, 3, 4), (NODE, 6, 8)]
    inbox.stage_event(f"{NODE}.t7.received", event("t7", "received", 7, 7))
    inbox.stage_event(f"{NODE}.t2.received", event("t2", "received", 2, 2))
    inbox.commit()
    assert gaps(inbox) == [(NODE, 3, 4), (NODE, 6, 6), (NODE, 8, 8)]
    for n in (3, 4, 8):
        inbox.stage_event(f"{NODE}.t{n}.received", event(f"t{n}", "received", n, n))
    # Another node's numbering is its own; an old node sends no event_seq.
    inbox.stage_event("fdn-02.u.received", event("u", "received", 7, 7).replace(
        NODE.encode(), b"fdn-02"))  # fmt: skip
    old = {"node": NODE, "task_id": "o", "state": "received", "seq": 99, "at": "t"}
    inbox.stage_event(f"{NODE}.o.received", json.dumps(old).encode())
    inbox.commit()
    assert gaps(inbox) == [(NODE, 6, 6)]
    inbox.close()
    assert gaps(Inbox(tmp_path / "inbox")) == [(NODE, 6, 6)]  # durable


def test_watch_warns_of_a_hole_that_stays_open(tmp_path: Path, capsys):
    config = tmp_path / "orchestrator.yaml"
    config.write_text(
        "broker: {url: 'amqps://127.0.0.1:1/', ca: ca.pem, cert: c.pem, key: c.key}\n"
        "results_dir: inbox\n"
    )
    inbox = Inbox(tmp_path / "inbox")
    for n, state in ((1, "received"), (2, "running"), (4, "failed")):
        inbox.stage_event(f"{NODE}.t1.{state}", event("t1", state, n, n))
    inbox.commit()
    inbox.close()
    code = cli.main(["watch", "--config", str(config), "--task", "t1",
                     "--node", NODE, "--timeout", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "missing" not in err  # within the grace: it may still come
    # The hole opened long ago (the grace is 15 s): now it is a lost event.
    db = sqlite3.connect(tmp_path / "inbox" / "inbox.sqlite")
    db.execute("UPDATE event_gaps SET opened_at = '2026-01-01T00:00:00.000000Z'")
    db.commit()
    db.close()
    code = cli.main(["watch", "--config", str(config), "--task", "t1",
                     "--node", NODE, "--timeout", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"femd: warning: node {NODE}: status event 3 missing" in err


def test_an_inbox_of_schema_1_is_migrated(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox")
    inbox.close()
    db = sqlite3.connect(tmp_path / "inbox" / "inbox.sqlite")
    db.execute("DROP TABLE event_marks")
    db.execute("DROP TABLE event_gaps")
    db.execute("ALTER TABLE events DROP COLUMN event_seq")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    inbox = Inbox(tmp_path / "inbox")
    for n in (1, 3):
        inbox.stage_event(f"{NODE}.t{n}.received", event(f"t{n}", "received", n, n))
    inbox.commit()
    assert gaps(inbox) == [(NODE, 2, 2)]


def test_a_node_numbering_again_from_one_is_heard(tmp_path: Path):
    # The node's state database is new (a reinstall): seq and event_seq start
    # at 1 again. Its events are new events, not duplicates of the old ones;
    # a redelivery of either life's event is still one.
    inbox = Inbox(tmp_path / "inbox")
    before, after = "2026-12-01T10:00:00.000001Z", "2026-12-04T09:00:00.000002Z"
    for n in (1, 2, 3):
        inbox.stage_event(f"{NODE}.a{n}.received",
                          event(f"a{n}", "received", n, n, before))  # fmt: skip
    inbox.commit()
    for n in (1, 2):
        inbox.stage_event(f"{NODE}.b{n}.received",
                          event(f"b{n}", "received", n, n, after))  # fmt: skip
        inbox.stage_event(f"{NODE}.b{n}.received",
                          event(f"b{n}", "received", n, n, after))  # fmt: skip
    inbox.stage_event(f"{NODE}.a3.received", event("a3", "received", 3, 3, before))
    inbox.commit()
    assert [e.task_id for e in inbox.events()] == ["a1", "a2", "a3", "b1", "b2"]
    assert gaps(inbox) == []


def test_an_inbox_of_schema_2_is_migrated(tmp_path: Path):
    inbox = Inbox(tmp_path / "inbox")
    inbox.close()
    db = sqlite3.connect(tmp_path / "inbox" / "inbox.sqlite")
    db.executescript("""
        DROP TABLE events;
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL,
            seq INTEGER NOT NULL, task_id TEXT NOT NULL, state TEXT NOT NULL,
            body TEXT NOT NULL, received_at TEXT NOT NULL, event_seq INTEGER,
            UNIQUE (node, seq));
        CREATE INDEX events_task ON events (task_id, id);
        PRAGMA user_version = 2;
    """)
    body = event("t1", "received", 1, 1, "2026-12-01T10:00:00.000001Z").decode()
    db.execute("INSERT INTO events (node, seq, task_id, state, body, received_at,"
               " event_seq) VALUES (?, 1, 't1', 'received', ?, 'r', 1)",
               (NODE, body))  # fmt: skip
    db.commit()
    db.close()
    inbox = Inbox(tmp_path / "inbox")
    # The old event kept its place and time: its redelivery is still a duplicate.
    inbox.stage_event(f"{NODE}.t1.received", body.encode())
    inbox.stage_event(f"{NODE}.t2.received", event("t2", "received", 1, 1, "later"))
    inbox.commit()
    assert [e.task_id for e in inbox.events()] == ["t1", "t2"]
    db = sqlite3.connect(tmp_path / "inbox" / "inbox.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    indexes = {r[1] for r in db.execute("PRAGMA index_list(events)")}
    assert "events_task" in indexes
    db.close()
