import json
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from femd.errors import StageOutError, StateError
from femd.events import RunReport
from femd.stageout import Reassembler, pack_outputs
from femd.state import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    TERMINAL_STATES,
    State,
    TaskRow,
)

NODE = "fdn-01"
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
SHA = "ab" * 32
KEYID = "cd" * 32


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.sqlite"


@pytest.fixture
def state(db_path: Path):
    st = State(db_path)
    yield st
    st.close()


def record(st: State, task_id: str, *, deny: bool = False, at: datetime = T0) -> bool:
    return st.record(
        task_id=task_id,
        project="dt4h",
        kind="Task",
        manifest_sha256=SHA,
        payload=b'{"id": "%s"}' % task_id.encode(),
        signer_keyids=[KEYID],
        launcher="podman",
        decision="deny" if deny else "allow",
        reasons=[("image.not_pinned", "image is a tag"), ("node.audience", "not us")]
        if deny
        else [],
        node=NODE,
        at=at,
    )


def bodies(st: State) -> list[dict[str, object]]:
    return [json.loads(e.body) for e in st.pending_events(limit=1000)]


def test_record_allow_queues_and_emits_received(state: State) -> None:
    assert record(state, "t1") is True
    row = state.get("t1")
    assert isinstance(row, TaskRow)
    assert row.state == "queued"
    assert row.decision == "allow"
    assert row.payload == b'{"id": "t1"}'
    assert row.signer_keyids == (KEYID,)
    assert row.reasons == ()
    assert row.received_at == T0
    assert row.received_at.tzinfo is not None
    events = state.pending_events()
    assert [e.routing_key for e in events] == [f"{NODE}.t1.received"]
    assert json.loads(events[0].body) == {
        "node": NODE,
        "task_id": "t1",
        "state": "received",
        "at": "2026-11-22T10:00:00.000000Z",
        "seq": events[0].seq,
        "event_seq": 1,
    }
    assert [(s, d) for s, _, d in state.transitions("t1")] == [
        ("received", ""),
        ("queued", ""),
    ]


def test_record_deny_is_rejected_with_reasons(state: State) -> None:
    assert record(state, "t2", deny=True)
    row = state.get("t2")
    assert row is not None
    assert row.state == "rejected"
    assert row.decision == "deny"
    assert row.reasons == (
        ("image.not_pinned", "image is a tag"),
        ("node.audience", "not us"),
    )
    got = bodies(state)
    assert [b["state"] for b in got] == ["received", "rejected"]
    assert got[1]["reasons"] == [
        {"rule": "image.not_pinned", "message": "image is a tag"},
        {"rule": "node.audience", "message": "not us"},
    ]
    assert "reasons" not in got[0]
    assert state.transitions("t2")[-1][2] == "image.not_pinned,node.audience"
    assert state.unfinished() == []


def test_replay_returns_false_and_changes_nothing(state: State, db_path: Path) -> None:
    assert record(state, "t1")
    before_row = state.get("t1")
    before_events = state.pending_events()
    before_transitions = state.transitions("t1")
    # A replay with a different decision and time must not overwrite anything.
    assert record(state, "t1", deny=True, at=T0 + timedelta(hours=1)) is False
    assert state.get("t1") == before_row
    assert state.pending_events() == before_events
    assert state.transitions("t1") == before_transitions
    # Also after a reopen (the id outlives the process).
    state.close()
    again = State(db_path)
    try:
        assert record(again, "t1", at=T0 + timedelta(days=30)) is False
        assert again.get("t1") == before_row
    finally:
        again.close()


def test_outbox_seq_is_monotonic_across_reopen(db_path: Path) -> None:
    st = State(db_path)
    record(st, "a")
    record(st, "b", deny=True)
    seq = st.transition("a", "staging", node=NODE, at=T0)
    st.close()
    st = State(db_path)
    try:
        record(st, "c")
        seq2 = st.transition("a", "running", node=NODE, at=T0)
        assert seq2 > seq
        events = st.pending_events()
        seqs = [e.seq for e in events]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs) == 6
        # The body's seq is the row's seq, always.
        assert [json.loads(e.body)["seq"] for e in events] == seqs
        assert [e.routing_key for e in events] == [
            f"{NODE}.a.received",
            f"{NODE}.b.received",
            f"{NODE}.b.rejected",
            f"{NODE}.a.staging",
            f"{NODE}.c.received",
            f"{NODE}.a.running",
        ]
        st.mark_published(seqs[:4])
        assert [e.seq for e in st.pending_events()] == seqs[4:]
        assert [e.seq for e in st.pending_events(limit=1)] == seqs[4:5]
        st.mark_published([])
        st.mark_published(seqs)
        assert st.pending_events() == []
        # seq never goes back, even once every row is published.
        assert st.event_only(task_id="z", state="rejected", node=NODE, at=T0) > seqs[-1]
    finally:
        st.close()


def test_transition_event_fields(state: State) -> None:
    record(state, "t1")
    state.transition("t1", "staging", node=NODE, at=T0)
    state.transition("t1", "running", node=NODE, at=T0 + timedelta(seconds=1))
    state.transition("t1", "uploading", node=NODE, at=T0 + timedelta(seconds=2))
    seq = state.transition(
        "t1",
        "succeeded",
        node=NODE,
        at=datetime(2026, 11, 22, 12, 0, 3, 250, tzinfo=timezone(timedelta(hours=2))),
        exit_code=0,
        outputs=("ef" * 32, 1234, 1),
        report=RunReport(log_tail="done\n"),
    )
    last = bodies(state)[-1]
    assert last == {
        "node": NODE,
        "task_id": "t1",
        "state": "succeeded",
        "at": "2026-11-22T10:00:03.000250Z",
        "seq": seq,
        "event_seq": 5,
        "exit_code": 0,
        "outputs": {"sha256": "ef" * 32, "bytes": 1234, "chunks": 1},
        "log_tail": "done\n",
    }
    row = state.get("t1")
    assert row is not None
    assert (row.state, row.exit_code) == ("succeeded", 0)
    assert (row.output_sha256, row.output_bytes, row.output_chunks) == (
        "ef" * 32,
        1234,
        1,
    )
    assert row.updated_at == datetime(2026, 11, 22, 10, 0, 3, 250, tzinfo=UTC)
    assert row.received_at == T0
    assert [s for s, _, _ in state.transitions("t1")] == [
        "received",
        "queued",
        "staging",
        "running",
        "uploading",
        "succeeded",
    ]
    assert state.unfinished() == []


def test_failed_transition_keeps_error_and_reasons(state: State) -> None:
    record(state, "t1")
    state.transition(
        "t1",
        "failed",
        node=NODE,
        at=T0,
        reasons=[("launcher.unenforceable", "no cgroup v2")],
        error="launch: podman socket missing",
        exit_code=125,
    )
    row = state.get("t1")
    assert row is not None
    assert row.error == "launch: podman socket missing"
    assert row.reasons == (("launcher.unenforceable", "no cgroup v2"),)
    body = bodies(state)[-1]
    assert body["reasons"] == [
        {"rule": "launcher.unenforceable", "message": "no cgroup v2"}
    ]
    assert "error" not in body
    assert "outputs" not in body
    detail = state.transitions("t1")[-1][2]
    assert "exit_code=125" in detail
    assert "rules=launcher.unenforceable" in detail


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES - {"rejected"}))
def test_terminal_state_guard(state: State, terminal: str) -> None:
    record(state, "t1")
    state.transition("t1", terminal, node=NODE, at=T0)
    n_events = len(state.pending_events())
    for nxt in ("running", "succeeded", "queued"):
        with pytest.raises(StateError, match=f"already {terminal}") as info:
            state.transition("t1", nxt, node=NODE, at=T0)
        assert "\n" not in str(info.value)
    row = state.get("t1")
    assert row is not None
    assert row.state == terminal
    assert len(state.pending_events()) == n_events


def test_rejected_task_cannot_run(state: State) -> None:
    record(state, "t1", deny=True)
    with pytest.raises(StateError, match="already rejected"):
        state.transition("t1", "running", node=NODE, at=T0)


def test_unknown_task_and_bad_arguments(state: State) -> None:
    with pytest.raises(StateError, match="unknown task nope"):
        state.transition("nope", "running", node=NODE, at=T0)
    record(state, "t1")
    with pytest.raises(ValueError, match="unknown task state"):
        state.transition("t1", "exploded", node=NODE, at=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        state.transition("t1", "running", node=NODE, at=datetime(2026, 1, 1))  # noqa: DTZ001
    # None of the refused calls left a trace (the transaction rolled back).
    row = state.get("t1")
    assert row is not None
    assert row.state == "queued"
    assert len(state.pending_events()) == 1


def test_event_only_does_not_touch_tasks(state: State) -> None:
    record(state, "t1")
    seq = state.event_only(
        task_id="t1",
        state="rejected",
        node=NODE,
        at=T0,
        reasons=[("manifest.replayed", "id already seen")],
    )
    seq_unknown = state.event_only(
        task_id="unknown", state="rejected", node=NODE, at=T0
    )
    assert seq_unknown > seq
    row = state.get("t1")
    assert row is not None
    assert row.state == "queued"
    assert state.get("unknown") is None
    got = bodies(state)
    assert got[-2]["reasons"] == [
        {"rule": "manifest.replayed", "message": "id already seen"}
    ]
    assert got[-1] == {
        "node": NODE,
        "task_id": "unknown",
        "state": "rejected",
        "at": "2026-11-22T10:00:00.000000Z",
        "seq": seq_unknown,
        "event_seq": 3,
    }
    assert state.pending_events()[-1].routing_key == f"{NODE}.unknown.rejected"


def test_unfinished_history_counts(state: State) -> None:
    record(state, "late", at=T0 + timedelta(minutes=5))
    record(state, "early", at=T0)
    record(state, "denied", deny=True, at=T0 + timedelta(minutes=1))
    record(state, "mid", at=T0 + timedelta(minutes=2))
    state.transition("mid", "running", node=NODE, at=T0 + timedelta(minutes=3))
    assert [r.task_id for r in state.unfinished()] == ["early", "mid", "late"]
    assert [r.task_id for r in state.history()] == ["late", "mid", "denied", "early"]
    assert [r.task_id for r in state.history(limit=2)] == ["late", "mid"]
    assert state.history(limit=0) == []
    assert state.counts() == {"queued": 2, "rejected": 1, "running": 1}
    assert state.get("missing") is None
    assert state.transitions("missing") == []


def test_cancel_without_launcher_or_payload(state: State) -> None:
    assert state.record(
        task_id="c1",
        project="dt4h",
        kind="Cancel",
        manifest_sha256=SHA,
        payload=None,
        signer_keyids=(),
        launcher=None,
        decision="allow",
        reasons=(),
        node=NODE,
        at=T0,
    )
    row = state.get("c1")
    assert row is not None
    assert (row.kind, row.launcher, row.payload, row.signer_keyids) == (
        "Cancel",
        None,
        None,
        (),
    )


def test_wal_mode_and_private_file(db_path: Path, state: State) -> None:
    record(state, "t1")
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        raw.close()
    assert db_path.stat().st_mode & 0o077 == 0
    # synchronous is per connection: FULL (2) on the one the acks depend on.
    assert state._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_usage_is_stored_sent_and_a_schema_1_file_is_migrated(db_path: Path) -> None:
    st = State(db_path)
    record(st, "t1")
    st.close()
    # What a schema-1 agent left: no usage column, user_version 1.
    raw = sqlite3.connect(db_path)
    raw.execute("ALTER TABLE tasks DROP COLUMN usage")
    raw.execute("DROP TABLE counters")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    st = State(db_path)
    try:
        assert st.get("t1").usage is None
        used = {"cpu_s": 1.5, "memory_peak_bytes": 1024, "wall_s": 2.0}
        seq = st.transition("t1", "failed", node=NODE, at=T0, usage=used)
        assert st.get("t1").usage == used
        event = next(e for e in st.pending_events() if e.seq == seq)
        assert json.loads(event.body)["usage"] == used
    finally:
        st.close()


def test_a_schema_2_file_gets_its_event_count(db_path: Path) -> None:
    st = State(db_path)
    record(st, "t1")
    st.close()
    # What a schema-2 agent left: events numbered by the outbox alone.
    raw = sqlite3.connect(db_path)
    raw.execute("DROP TABLE counters")
    raw.execute("PRAGMA user_version = 2")
    raw.commit()
    raw.close()
    st = State(db_path)
    try:
        st.transition("t1", "staging", node=NODE, at=T0)
        last = json.loads(st.pending_events()[-1].body)
        assert last["state"] == "staging"
        assert last["event_seq"] == 1  # counted from the upgrade on
    finally:
        st.close()


def test_status_events_are_numbered_without_a_gap_between_chunks(
    tmp_path: Path, db_path: Path
) -> None:
    """A consumer of femd.events alone can tell a lost event (issue 13)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(bytes(range(256)) * 8)
    packed = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=1 << 20)
    st = State(db_path)
    try:
        for tid in ("t1", "t2"):
            record(st, tid)
            st.transition(tid, "uploading", node=NODE, at=T0)
            n = st.enqueue_results(
                task_id=tid,
                node=NODE,
                archive=packed.path,
                sha256=packed.sha256,
                chunk_bytes=100,
            )
            st.transition(
                tid, "succeeded", node=NODE, at=T0,
                outputs=(packed.sha256, packed.bytes, n),
            )  # fmt: skip
        st.event_only(task_id="unverified", state="rejected", node=NODE, at=T0)
        pending = st.pending_events(limit=1000)
        events = [e for e in pending if e.exchange == EVENTS_EXCHANGE]
        seqs = [json.loads(e.body)["seq"] for e in events]
        # `seq` keeps its meaning (the outbox's, shared with chunks: gaps) ...
        assert seqs == [e.seq for e in events]
        assert seqs[-1] - seqs[0] + 1 > len(seqs)
        # ... and `event_seq` counts the events alone, 1, 2, 3, ...
        numbers = [json.loads(e.body)["event_seq"] for e in events]
        assert numbers == list(range(1, len(events) + 1))
        st.mark_published(e.seq for e in pending)
    finally:
        st.close()
    # The count survives a restart and never reuses a number.
    st = State(db_path)
    try:
        st.event_only(task_id="unverified", state="rejected", node=NODE, at=T0)
        (event,) = st.pending_events()
        assert json.loads(event.body)["event_seq"] == len(events) + 1
    finally:
        st.close()


def test_committed_data_survives_a_crash(db_path: Path) -> None:
    # A writer process records and is killed without closing anything; the
    # record() call had returned, so the row must be there (the ack depends on it).
    code = (
        "import os, sys\n"
        "from datetime import UTC, datetime\n"
        "from pathlib import Path\n"
        "from femd.state import State\n"
        "st = State(Path(sys.argv[1]))\n"
        "st.record(task_id='crash', project='p', kind='Task', manifest_sha256='0'*64,"
        " payload=b'x', signer_keyids=[], launcher='process', decision='allow',"
        " reasons=[], node='n', at=datetime(2026, 1, 1, tzinfo=UTC))\n"
        "st.transition('crash', 'running', node='n',"
        " at=datetime(2026, 1, 1, tzinfo=UTC))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code, str(db_path)], check=False, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr
    st = State(db_path)
    try:
        row = st.get("crash")
        assert row is not None
        assert row.state == "running"
        assert [e.routing_key for e in st.pending_events()] == [
            "n.crash.received",
            "n.crash.running",
        ]
    finally:
        st.close()


def test_two_connections_see_each_others_commits(db_path: Path) -> None:
    writer = State(db_path)
    reader = State(db_path)
    try:
        record(writer, "t1")
        row = reader.get("t1")
        assert row is not None
        assert row.state == "queued"
        assert record(reader, "t1") is False
    finally:
        writer.close()
        reader.close()
    again = State(db_path)
    try:
        assert again.counts() == {"queued": 1}
    finally:
        again.close()


def test_concurrent_reader_while_writer_writes(db_path: Path) -> None:
    writer = State(db_path)
    reader = State(db_path)
    n = 150
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(n):
                record(writer, f"t{i}", at=T0 + timedelta(seconds=i))
                writer.transition(f"t{i}", "running", node=NODE, at=T0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(sum(reader.counts().values()))
                reader.history(limit=5)
                reader.pending_events(limit=10)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len(seen) > 1  # the reader really ran alongside the writer
        assert seen == sorted(seen)  # a reader never sees a count go back
        assert reader.counts() == {"running": n}
        assert len(reader.pending_events(limit=10 * n)) == 2 * n
    finally:
        writer.close()
        reader.close()


def test_corrupt_file_is_a_state_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite, just garbage\n" * 200)
    with pytest.raises(
        StateError, match=r"cannot open .*: file is not a database"
    ) as info:
        State(db_path)
    assert "\n" not in str(info.value)


def test_unsupported_schema_version(db_path: Path) -> None:
    State(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA user_version = 9")
    raw.close()
    with pytest.raises(StateError, match=r"got 9, expected 3"):
        State(db_path)


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot open"):
        State(blocker / "state.sqlite")


def test_closed_state_raises_state_error(db_path: Path) -> None:
    st = State(db_path)
    st.close()
    with pytest.raises(StateError, match="counts failed"):
        st.counts()


def test_malformed_row_is_a_state_error(db_path: Path, state: State) -> None:
    record(state, "t1")
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE tasks SET reasons = 'not json' WHERE task_id = 't1'")
    raw.commit()
    raw.close()
    with pytest.raises(StateError, match="malformed task row t1"):
        state.get("t1")


def test_results_go_through_the_outbox(tmp_path: Path, state: State) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes(bytes(range(256)) * 40)
    packed = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=1 << 20)
    record(state, "t1")
    state.transition("t1", "uploading", node=NODE, at=T0)
    n = state.enqueue_results(
        task_id="t1",
        node=NODE,
        archive=packed.path,
        sha256=packed.sha256,
        chunk_bytes=100,
    )
    assert n == -(-packed.bytes // 100)
    done = state.transition(
        "t1",
        "succeeded",
        node=NODE,
        at=T0,
        exit_code=0,
        outputs=(packed.sha256, packed.bytes, n),
    )
    pending = state.pending_events(limit=1000)
    events = [e for e in pending if e.exchange == EVENTS_EXCHANGE]
    chunks = [e for e in pending if e.exchange == RESULTS_EXCHANGE]
    assert all(e.headers is None for e in events)
    assert len(chunks) == n
    # Every chunk is queued before the event that announces the outputs.
    assert max(c.seq for c in chunks) < done == pending[-1].seq
    assert {c.routing_key for c in chunks} == {f"{NODE}.t1"}
    r = Reassembler(
        tmp_path / "recv.part",
        sha256=packed.sha256,
        size=packed.bytes,
        chunks=n,
        max_bytes=1 << 20,
    )
    for c in chunks:
        assert c.headers is not None
        assert c.headers["sha256"] == packed.sha256
        assert c.headers["size"] == packed.bytes
        assert not any(k.startswith("_") for k in c.headers)  # private keys stay
        r.feed(
            int(c.headers["index"]),
            int(c.headers["total"]),
            c.body,
            offset=int(c.headers["offset"]),
        )
    recv = r.write(tmp_path / "recv.tar.gz")
    assert recv.read_bytes() == packed.path.read_bytes()
    # Published chunks leave the state; published events stay, marked.
    state.mark_published(e.seq for e in pending)
    assert state.pending_events() == []
    raw = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    try:
        rows = raw.execute("SELECT exchange, published FROM outbox").fetchall()
    finally:
        raw.close()
    assert rows == [(EVENTS_EXCHANGE, 1)] * len(events)
    # The sent archive is removed once its last chunk is confirmed.
    assert not packed.path.exists()


def test_result_chunks_are_read_from_the_file_not_stored(
    tmp_path: Path, state: State
) -> None:
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(b"z" * 1000)
    record(state, "t1")
    state.enqueue_results(
        task_id="t1", node=NODE, archive=archive, sha256="0" * 64, chunk_bytes=300
    )
    raw = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    try:
        sizes = raw.execute(
            "SELECT length(body) FROM outbox WHERE exchange = ?", (RESULTS_EXCHANGE,)
        ).fetchall()
    finally:
        raw.close()
    assert sizes == [(0,)] * 4
    first = state.pending_events(limit=3)[1:]
    assert [len(c.body) for c in first] == [300, 300]
    state.mark_published([first[0].seq])
    assert archive.exists()  # three chunks still to send
    assert state.queued_archives() == {str(archive)}
    archive.unlink()  # lost (e.g. removed by hand): dropped, not a poison row
    assert all(e.exchange == EVENTS_EXCHANGE for e in state.pending_events())


def test_enqueue_results_of_missing_archive(tmp_path: Path, state: State) -> None:
    with pytest.raises(StageOutError, match="cannot read"):
        state.enqueue_results(
            task_id="t1", node=NODE, archive=tmp_path / "none", sha256="0" * 64
        )
    assert state.pending_events() == []


def test_marking_events_published_commits_without_its_own_fsync(
    tmp_path: Path, state: State
) -> None:
    """Issue 20: a lost mark costs a re-publish (deduped), so no fsync for it;
    a batch completing an archive stays durable, and FULL comes back after."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_bytes(b"x" * 100)
    packed = pack_outputs(out, tmp_path / "o.tar.gz", max_bytes=1 << 20)
    record(state, "t1")
    state.enqueue_results(
        task_id="t1", node=NODE, archive=packed.path, sha256=packed.sha256
    )
    pending = state.pending_events()
    events = [e.seq for e in pending if e.exchange == EVENTS_EXCHANGE]
    chunks = [e.seq for e in pending if e.exchange == RESULTS_EXCHANGE]
    seen: list[str] = []
    state._db.set_trace_callback(seen.append)
    try:
        state.mark_published(events)
        lazy, seen[:] = list(seen), []
        state.mark_published(chunks)
        durable = list(seen)
    finally:
        state._db.set_trace_callback(None)
    normal = "PRAGMA synchronous = NORMAL"
    assert lazy.index(normal) < lazy.index("BEGIN IMMEDIATE") < lazy.index("COMMIT")
    assert lazy[-1] == "PRAGMA synchronous = FULL"
    assert normal not in durable
    assert state._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert state.pending_events() == []
    assert not packed.path.exists()
