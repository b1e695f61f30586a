"""femd.audit: event ids and catalog, JSON lines, journald's native protocol."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from femd import audit
from femd.audit import Event

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "units" / "femd.catalog"
TASK = "7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11"
KEYIDS = ["a" * 64, "b" * 64]


@pytest.fixture(autouse=True)
def _reset_audit() -> Iterator[None]:
    yield
    audit.configure("stderr")


@pytest.fixture
def lines() -> io.StringIO:
    out = io.StringIO()
    audit.configure("stderr", out)
    return out


def records(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def parse_native_all(data: bytes) -> list[tuple[str, str]]:
    """Decode one datagram of journald's native protocol (as journald does)."""
    fields: list[tuple[str, str]] = []
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", key), key
        fields.append((key.decode(), value.decode()))
    return fields


def parse_native(data: bytes) -> dict[str, str]:
    """The same, for entries whose fields are all single-valued."""
    fields = parse_native_all(data)
    keys = [k for k, _ in fields]
    assert len(set(keys)) == len(keys), f"sent twice: {keys}"
    return dict(fields)


def test_lists_are_repeated_fields_in_the_native_protocol(
    journal: socket.socket,
) -> None:
    audit.emit(
        Event.TASK_ADMITTED,
        "admitted",
        task_id=TASK,
        rules=(),
        signer_keyids=KEYIDS,
        datasets=["hf-cohort-2024", "hf-extra"],
    )
    fields = parse_native_all(journal.recv(1 << 20))
    assert [v for k, v in fields if k == "FEMD_DATASETS"] == [
        "hf-cohort-2024",
        "hf-extra",
    ]
    assert [v for k, v in fields if k == "FEMD_SIGNER_KEYIDS"] == KEYIDS
    assert "FEMD_RULES" not in dict(fields)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    """A real AF_UNIX datagram socket standing where journald's would."""
    path = tmp_path / "socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    audit.configure("journal", journal_socket=str(path))
    yield sock
    sock.close()


# --- event ids and the catalog -------------------------------------------------


def test_event_ids_are_distinct_128_bit_ids() -> None:
    ids = [e.value for e in Event]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids) == 18


def catalog_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in CATALOG.read_text().splitlines():
        if line.startswith("-- "):
            head = line[3:].split()
            assert len(head) == 1, f"unexpected language tag or junk: {line!r}"
            assert head[0] not in sections, f"duplicate section {head[0]}"
            current = sections.setdefault(head[0], [])
        elif current is not None:
            current.append(line)
    return sections


@pytest.mark.parametrize("event", list(Event), ids=[e.name for e in Event])
def test_every_event_has_a_catalog_entry_for_auditors(event: Event) -> None:
    body = catalog_sections().get(event.value)
    assert body is not None, f"{event.name} missing from units/femd.catalog"
    blank = body.index("")
    headers = dict(h.split(": ", 1) for h in body[:blank])
    assert headers["Defined-By"] == "femd"
    assert headers["Subject"].startswith("femd ")
    text = " ".join(body[blank + 1 :]).split()
    assert len(text) >= 25, f"{event.name}: the auditor text is too short"
    for var in re.findall(r"@([A-Z_]+)@", headers["Subject"] + " ".join(text)):
        assert var.startswith("FEMD_"), var


def test_catalog_has_no_section_without_an_event() -> None:
    assert set(catalog_sections()) == {e.value for e in Event}


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl")
def test_journalctl_indexes_the_catalog(tmp_path: Path) -> None:
    """journalctl's own catalog parser accepts the file (as postinst runs it)."""
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / "femd.catalog")

    def journalctl(*args: str) -> str:
        cmd = ["journalctl", "--root", str(tmp_path), *args]
        env = {**os.environ, "SYSTEMD_PAGER": "cat"}
        done = subprocess.run(  # noqa: S603 - a fixed tool, arguments built here
            cmd, check=True, capture_output=True, text=True, env=env
        )
        return done.stdout

    journalctl("--update-catalog")
    listed = journalctl("--list-catalog")
    ids = {line.split()[0] for line in listed.splitlines() if " femd: " in line}
    assert ids == {e.value for e in Event}
    shown = journalctl("--dump-catalog", Event.TASK_REJECTED.value)
    assert "Subject: femd rejected task @FEMD_TASK_ID@\n" in shown


# --- records ---------------------------------------------------------------------


def test_json_line_has_the_journal_fields(lines: io.StringIO) -> None:
    audit.emit(
        Event.TASK_ADMITTED,
        "task admitted",
        task_id=TASK,
        project="dt4h-heart-failure",
        node="fdn-01",
        state="received",
        decision="allow",
        signer_keyids=KEYIDS,
        manifest_sha256="c" * 64,
        policy_sha256="d" * 64,
        image_digest="sha256:" + "e" * 64,
        git_commit="f" * 40,
        datasets=["hf-cohort-2024", "hf-extra"],
        exit_code=0,
        output_sha256="0" * 64,
        extra={"LAUNCHER": "podman"},
    )
    [rec] = records(lines)
    stamp = rec.pop("__REALTIME_TIMESTAMP")
    assert stamp.isdigit()
    assert rec == {
        "MESSAGE_ID": Event.TASK_ADMITTED.value,
        "MESSAGE": "task admitted",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "femd",
        "FEMD_TASK_ID": TASK,
        "FEMD_PROJECT": "dt4h-heart-failure",
        "FEMD_NODE": "fdn-01",
        "FEMD_STATE": "received",
        "FEMD_DECISION": "allow",
        "FEMD_SIGNER_KEYIDS": KEYIDS,
        "FEMD_MANIFEST_SHA256": "c" * 64,
        "FEMD_POLICY_SHA256": "d" * 64,
        "FEMD_IMAGE_DIGEST": "sha256:" + "e" * 64,
        "FEMD_GIT_COMMIT": "f" * 40,
        "FEMD_DATASETS": ["hf-cohort-2024", "hf-extra"],
        "FEMD_EXIT_CODE": "0",
        "FEMD_OUTPUT_SHA256": "0" * 64,
        "FEMD_LAUNCHER": "podman",
    }


def test_absent_fields_are_left_out(lines: io.StringIO) -> None:
    audit.emit(
        Event.TASK_REJECTED,
        "denied",
        priority=5,
        task_id=TASK,
        decision="deny",
        rules=("signature.threshold", "image.not_allowed"),
        signer_keyids=[],
        datasets=(),
        exit_code=None,
    )
    [rec] = records(lines)
    femd = {k: v for k, v in rec.items() if k.startswith("FEMD_")}
    assert femd == {
        "FEMD_TASK_ID": TASK,
        "FEMD_DECISION": "deny",
        "FEMD_RULES": ["signature.threshold", "image.not_allowed"],
    }
    assert rec["PRIORITY"] == "5"


def test_one_line_per_entry_even_with_newlines(lines: io.StringIO) -> None:
    audit.emit(Event.POLICY_RELOAD_FAILED, "policy.yaml:3: bad\nsecond line")
    audit.emit(Event.AGENT_STOPPING, "bye")
    recs = records(lines)
    assert [r["MESSAGE"] for r in recs] == ["policy.yaml:3: bad\nsecond line", "bye"]


def test_long_values_are_cut_on_a_character_boundary(lines: io.StringIO) -> None:
    audit.emit(Event.TASK_REJECTED, "é" * 5000, extra={"NOTE": "x" * 10_000})
    [rec] = records(lines)
    for key in ("MESSAGE", "FEMD_NOTE"):
        data = rec[key].encode()
        assert len(data) <= audit.FIELD_MAX_BYTES
        assert len(data) > audit.FIELD_MAX_BYTES - 8
        assert rec[key].endswith("...")
    assert set(rec["MESSAGE"][:-3]) == {"é"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": 8}, "priority must be 0-7"),
        ({"priority": -1}, "priority must be 0-7"),
        ({"extra": {"lower": "x"}}, "must match"),
        ({"extra": {"_TRUSTED": "x"}}, "must match"),
        ({"extra": {"A=B": "x"}}, "must match"),
        ({"task_id": TASK, "extra": {"TASK_ID": "other"}}, "set twice"),
    ],
    ids=["priority-high", "priority-low", "lowercase", "underscore", "equals", "clash"],
)
def test_programming_errors_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        audit.emit(Event.AGENT_STARTED, "x", **kwargs)  # type: ignore[arg-type]


# --- journald's native protocol ------------------------------------------------


def test_native_protocol_datagram(journal: socket.socket) -> None:
    audit.emit(
        Event.TASK_FINISHED,
        "task failed:\nexit 3",
        task_id=TASK,
        state="failed",
        exit_code=3,
        rules=["x.y"],
    )
    data = journal.recv(1 << 20)
    # The message holds a newline: it must use the length-prefixed form.
    assert b"MESSAGE\n" + struct.pack("<Q", 19) + b"task failed:\nexit 3\n" in data
    assert parse_native(data) == {
        "MESSAGE_ID": Event.TASK_FINISHED.value,
        "MESSAGE": "task failed:\nexit 3",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "femd",
        "FEMD_TASK_ID": TASK,
        "FEMD_STATE": "failed",
        "FEMD_RULES": "x.y",
        "FEMD_EXIT_CODE": "3",
    }


def test_native_protocol_one_datagram_per_entry(journal: socket.socket) -> None:
    got = []
    for event in Event:  # a datagram queue is short (net.unix.max_dgram_qlen)
        audit.emit(event, event.name.lower(), node="fdn-01")
        got.append(parse_native(journal.recv(1 << 20)))
    assert [g["MESSAGE_ID"] for g in got] == [e.value for e in Event]
    assert all(g["FEMD_NODE"] == "fdn-01" for g in got)


def test_native_protocol_big_entry_fits_one_datagram(journal: socket.socket) -> None:
    big = "z" * 100_000
    audit.emit(Event.OUTPUTS_SENT, big, extra={f"K{i}": big for i in range(20)})
    fields = parse_native(journal.recv(1 << 20))
    assert len(fields) == 4 + 20
    assert all(len(v) <= audit.FIELD_MAX_BYTES for v in fields.values())


def test_journal_failure_falls_back_to_stderr_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = io.StringIO()
    audit.configure("journal", out, journal_socket=str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="femd.audit"):
        audit.emit(Event.BROKER_DISCONNECTED, "one", node="fdn-01")
        audit.emit(Event.BROKER_CONNECTED, "two", node="fdn-01")
    assert [r["MESSAGE"] for r in records(out)] == ["one", "two"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot write to the journal" in warnings[0].getMessage()


def test_journal_comes_back_after_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "socket"
    out = io.StringIO()
    audit.configure("journal", out, journal_socket=str(path))
    audit.emit(Event.POLICY_LOADED, "before journald")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        audit.emit(Event.POLICY_LOADED, "after journald")
        assert parse_native(sock.recv(1 << 20))["MESSAGE"] == "after journald"
    assert [r["MESSAGE"] for r in records(out)] == ["before journald"]


def test_stderr_failure_never_raises() -> None:
    out = io.StringIO()
    out.close()
    audit.configure("stderr", out)
    audit.emit(Event.AGENT_STOPPING, "nowhere to go")


# --- auto: $JOURNAL_STREAM ---------------------------------------------------------


def _auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream_value: str | None
) -> tuple[socket.socket, io.TextIOWrapper]:
    path = tmp_path / "socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    out = (tmp_path / "stderr").open("w")
    st = os.fstat(out.fileno())
    if stream_value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv(
            "JOURNAL_STREAM", stream_value.format(dev=st.st_dev, ino=st.st_ino)
        )
    audit.configure("auto", out, journal_socket=str(path))
    audit.emit(Event.AGENT_STARTED, "hello", node="fdn-01")
    out.flush()
    return sock, out


def test_auto_uses_the_journal_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, out = _auto(tmp_path, monkeypatch, "{dev}:{ino}")
    with sock, out:
        assert parse_native(sock.recv(1 << 20))["MESSAGE"] == "hello"
        assert (tmp_path / "stderr").read_text() == ""


@pytest.mark.parametrize(
    "value",
    [None, "", "1:2", "{dev}:0", "junk"],
    ids=["unset", "empty", "other", "ino", "junk"],
)
def test_auto_writes_json_lines_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    sock, out = _auto(tmp_path, monkeypatch, value)
    with sock, out:
        with pytest.raises(BlockingIOError):
            sock.recv(1 << 20)
        [line] = (tmp_path / "stderr").read_text().splitlines()
        assert json.loads(line)["MESSAGE"] == "hello"


# --- task output -------------------------------------------------------------------


def test_task_log_one_entry_per_line(lines: io.StringIO) -> None:
    audit.task_log(TASK, "proj", b"epoch 1 loss 0.5\r\nepoch 2 \xff loss 0.4\n\nend")
    recs = records(lines)
    assert [r["MESSAGE"] for r in recs] == [
        "epoch 1 loss 0.5",
        "epoch 2 \ufffd loss 0.4",
        "",
        "end",
    ]
    for rec in recs:
        assert rec["SYSLOG_IDENTIFIER"] == "femd-task"
        assert rec["PRIORITY"] == "6"
        assert rec["FEMD_TASK_ID"] == TASK
        assert rec["FEMD_PROJECT"] == "proj"
        assert "MESSAGE_ID" not in rec


def test_task_log_is_bounded_per_task(
    lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "TASK_LOG_MAX_BYTES", 100)
    audit.task_log(TASK, None, b"0123456789\n" * 8)  # 88 bytes: all of it
    audit.task_log("other-task", None, b"fine\n")
    audit.task_log(TASK, None, b"0123456789\n" * 3)  # 99 fits, 110 crosses
    audit.task_log(TASK, None, b"more\n")  # silently dropped
    recs = records(lines)
    mine = [r for r in recs if r["FEMD_TASK_ID"] == TASK]
    assert [r["MESSAGE"] for r in mine[:-1]] == ["0123456789"] * 9
    note = mine[-1]
    assert note["PRIORITY"] == "4"
    assert "beyond 100 bytes" in note["MESSAGE"]
    assert [r["MESSAGE"] for r in recs if r["FEMD_TASK_ID"] == "other-task"] == ["fine"]


def test_task_log_through_the_native_protocol(journal: socket.socket) -> None:
    audit.task_log(TASK, "proj", b"hello from the task\n")
    fields = parse_native(journal.recv(1 << 20))
    assert fields == {
        "MESSAGE": "hello from the task",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "femd-task",
        "FEMD_TASK_ID": TASK,
        "FEMD_PROJECT": "proj",
    }
