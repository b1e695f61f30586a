r"""The audit trail: one structured journald entry per decision and transition.

Owns the ``Event`` enum (one fixed 128-bit ``MESSAGE_ID`` per kind of event,
explained for auditors in ``units/femd.catalog``), ``emit()``, ``task_log()``
and the choice of transport. Does not decide anything and does not format
diagnostics: those are ordinary ``logging`` records.

Fields (DESIGN "journald audit"): every entry has ``MESSAGE_ID``, ``MESSAGE``,
``PRIORITY`` and ``SYSLOG_IDENTIFIER=femd``, plus those ``FEMD_*`` fields whose
argument was given (a field is absent, never empty, when its value is None or
an empty list). A list is written as a repeated field, one value each (rule
ids, keyids, dataset names), so that ``journalctl FEMD_DATASETS=x`` matches
every entry naming ``x``; the JSON form makes it a list. Every value is cut to
``FIELD_MAX_BYTES`` (an auditor sees ``...`` at the end), so an entry always
fits one datagram.

Transports, chosen by ``configure()`` (default ``auto``):

- ``journal``: ``systemd.journal.sendv`` when python3-systemd is importable,
  else journald's native protocol written here to
  ``/run/systemd/journal/socket`` (an ``AF_UNIX`` datagram of ``KEY=value``
  lines, or ``KEY\n<le64 length><bytes>\n`` for values with a newline).
- ``stderr``: one JSON object per line with the same fields as the journal
  entry (all values strings, as ``journalctl -o json`` prints them) and
  ``__REALTIME_TIMESTAMP`` in microseconds.
- ``auto``: ``journal`` when ``$JOURNAL_STREAM`` names our stderr (systemd
  started us with stderr connected to the journal), else ``stderr``.

Writing an audit entry never raises for I/O: if the journal cannot be written
the entry goes to stderr as JSON and one warning is logged.

SECURITY: audit entries carry hashes, ids and keyids; never private keys,
payloads, credentials or the values of a task's environment.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import IO, Final, Literal

from femd.errors import printable

__all__ = [
    "FIELD_MAX_BYTES",
    "JOURNAL_SOCKET",
    "TASK_LOG_MAX_BYTES",
    "Event",
    "configure",
    "emit",
    "task_log",
    "to_journal",
]

logger = logging.getLogger(__name__)

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
FIELD_MAX_BYTES: Final = 4096
"""Longest value of one field, in UTF-8 bytes; longer values are cut."""
TASK_LOG_MAX_BYTES: Final = 1 << 20
"""Most bytes of one task's output forwarded to the journal; the rest is dropped."""
_TASK_LOG_TASKS: Final = 256  # task budgets remembered at once
_SEND_TIMEOUT_S: Final = 5.0  # a stuck journald must not stall the agent
_EXTRA_KEY = re.compile(r"[A-Z][A-Z0-9_]{0,58}")

Sink = Literal["auto", "journal", "stderr"]


class Event(StrEnum):
    """Kinds of audit entries; each value is the entry's fixed ``MESSAGE_ID``.

    Never change a value: auditors' saved queries and the catalog use them.
    """

    TASK_RECEIVED = "f4597408514c4796bbfa686df965891e"
    TASK_REJECTED = "f3bead9109b94633ba3f03e63abe0ad1"
    TASK_ADMITTED = "fc251ce4d5a042068ef0a0efcd706a62"
    TASK_STAGED = "6c5b1f64f5634f7bac2f4bd414c5cdc8"
    TASK_STARTED = "609908a0e27c406f9fbac79a909037c3"
    TASK_FINISHED = "bad5691d080b4080a8e7446c0fdcd809"
    TASK_CANCELLED = "825970659e444b2292754322d8862545"
    OUTPUTS_SENT = "0af2713c12b443a4833ea7a56501080e"
    POLICY_LOADED = "9af7d0af412d4d5db7f8b941d6f12a4e"
    POLICY_RELOADED = "2dd04e7ab7b544b5a9e1863479a4d9b7"
    POLICY_RELOAD_FAILED = "6c8cb4fe62bb4a5984f481a36a302d70"
    AGENT_STARTED = "bdb97885015748558b11706e00fdee46"
    AGENT_STOPPING = "75b4f56879a249f7a9d6c4506d3dff9d"
    BROKER_CONNECTED = "1bc00422adaa48aaaa26bedaf12cff81"
    BROKER_DISCONNECTED = "2c93de84c59f492ba1fd16032b74559b"
    LAUNCHER_UNAVAILABLE = "1b65eb543cd24d30a2ad5ef15f0796b1"
    LAUNCHER_AVAILABLE = "4a83b3a2d19b44cb9c08010fef3ea295"
    NETWORK_CONNECTION = "0271cf92ffb14a82b66fce2cbd73350b"


Fields = list[tuple[str, str]]


def _cut(value: str) -> str:
    data = value.encode("utf-8", "surrogateescape")
    if len(data) <= FIELD_MAX_BYTES:
        return value
    # "ignore" only drops a multi-byte character split by the cut.
    head = data[: FIELD_MAX_BYTES - 3].decode("utf-8", "ignore")
    return head + "..."


class _NativeJournal:
    """journald's native protocol, written by hand (no python3-systemd)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    @staticmethod
    def encode(fields: Fields) -> bytes:
        """One datagram of ``KEY=value`` lines, or the length-prefixed form."""
        out = bytearray()
        for key, value in fields:
            data = value.encode("utf-8", "surrogateescape")
            if b"\n" in data:
                out += key.encode() + b"\n" + struct.pack("<Q", len(data))
                out += data + b"\n"
            else:
                out += key.encode() + b"=" + data + b"\n"
        return bytes(out)

    def send(self, fields: Fields) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        try:
            self._sock.sendto(self.encode(fields), self.path)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _LibJournal:
    """``systemd.journal.sendv`` from python3-systemd (Debian's, or a wheel).

    ``sendv`` takes the fields as they are; ``send`` would add ``CODE_FILE``
    and friends pointing into this module, which tell an auditor nothing.
    """

    def __init__(self, sendv: Callable[..., None]) -> None:
        self._sendv = sendv

    def send(self, fields: Fields) -> None:
        self._sendv(*(f"{key}={value}" for key, value in fields))

    def close(self) -> None:
        pass


def _library_sendv() -> Callable[..., None] | None:
    try:
        module = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    sendv = getattr(module, "sendv", None)
    return sendv if callable(sendv) else None


def _stream_is_journal(stream: IO[str]) -> bool:
    """True when ``$JOURNAL_STREAM`` (``dev:ino``) is *stream*'s file."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _Sink:
    """The configured transport; guarded by ``_lock``."""

    def __init__(
        self,
        sink: Sink,
        stream: IO[str] | None,
        journal_socket: str | None,
    ) -> None:
        self.stream = stream
        self.journal: _NativeJournal | _LibJournal | None = None
        self.warned = False
        out = stream if stream is not None else sys.stderr
        if sink == "stderr":
            return
        path = journal_socket or JOURNAL_SOCKET
        if sink == "auto" and not (_stream_is_journal(out) and os.path.exists(path)):
            return
        library = None if journal_socket else _library_sendv()
        self.journal = _LibJournal(library) if library else _NativeJournal(path)

    def write(self, fields: Fields) -> None:
        if self.journal is not None:
            try:
                self.journal.send(fields)
            except (OSError, ValueError) as e:
                if not self.warned:
                    self.warned = True
                    logger.warning(
                        "cannot write to the journal, audit goes to stderr: %s", e
                    )
            else:
                return
        self._write_json(fields)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def _write_json(self, fields: Fields) -> None:
        # As `journalctl -o json` prints them: a repeated field is a list.
        record: dict[str, str | list[str]] = {}
        for key, value in fields:
            have = record.get(key)
            if have is None:
                record[key] = value
            elif isinstance(have, list):
                have.append(value)
            else:
                record[key] = [have, value]
        record["__REALTIME_TIMESTAMP"] = str(time.time_ns() // 1000)
        stream = self.stream if self.stream is not None else sys.stderr
        # Losing stderr too leaves nothing to report to; the agent goes on.
        with contextlib.suppress(OSError, ValueError):
            stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            stream.flush()


_lock = threading.Lock()
_sink: _Sink | None = None
_task_bytes: collections.OrderedDict[str, int] = collections.OrderedDict()


def configure(
    sink: Sink = "auto",
    stream: IO[str] | None = None,
    *,
    journal_socket: str | None = None,
) -> None:
    """Choose where audit entries go; the agent calls this once at start.

    Args:
        sink: ``journal``, ``stderr`` or ``auto`` (see the module docstring).
        stream: where JSON lines go (and, for ``auto``, the stream compared
            with ``$JOURNAL_STREAM``); default: ``sys.stderr`` at write time.
        journal_socket: write the native protocol to this socket instead of
            journald's (tests); python3-systemd is not used then.
    """
    global _sink  # one process-wide audit transport
    new = _Sink(sink, stream, journal_socket)
    with _lock:
        if _sink is not None:
            _sink.close()
        _sink = new
        _task_bytes.clear()


def to_journal() -> bool:
    """True when audit entries (and so diagnostics) go to the journal."""
    with _lock:
        return _sink is not None and _sink.journal is not None


def _add(fields: Fields, key: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        # One field per value, repeated: `journalctl FEMD_DATASETS=x` then
        # matches every entry that names x (journald keeps repeated fields).
        fields.extend((key, _cut(printable(v))) for v in value)
        return
    fields.append((key, _cut(printable(value))))


def emit(
    event: Event,
    message: str,
    *,
    priority: int = 6,
    task_id: str | None = None,
    project: str | None = None,
    node: str | None = None,
    state: str | None = None,
    decision: str | None = None,
    rules: Sequence[str] = (),
    signer_keyids: Sequence[str] = (),
    manifest_sha256: str | None = None,
    policy_sha256: str | None = None,
    image_digest: str | None = None,
    git_commit: str | None = None,
    datasets: Sequence[str] = (),
    exit_code: int | None = None,
    output_sha256: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write one audit entry for *event*.

    Args:
        event: the kind of entry; its value becomes ``MESSAGE_ID``.
        message: one line for a human (``MESSAGE``); no secrets.
        priority: syslog priority 0-7; 6 (info) for transitions, 5 (notice)
            for a denial (STYLE 2.7), 4 (warning) for a failed reload.
        task_id: ``FEMD_TASK_ID``; the other keywords map the same way to
            ``FEMD_<NAME>`` (``signer_keyids`` → ``FEMD_SIGNER_KEYIDS``).
        project: ``FEMD_PROJECT``.
        node: ``FEMD_NODE``.
        state: ``FEMD_STATE``, a DESIGN status-event state.
        decision: ``FEMD_DECISION``, ``allow`` or ``deny``.
        rules: ``FEMD_RULES``, violated rule ids, one field each (repeated).
        signer_keyids: ``FEMD_SIGNER_KEYIDS``, keyids that counted, one field
            each.
        manifest_sha256: ``FEMD_MANIFEST_SHA256`` of the signed payload bytes.
        policy_sha256: ``FEMD_POLICY_SHA256`` of the policy in force.
        image_digest: ``FEMD_IMAGE_DIGEST``.
        git_commit: ``FEMD_GIT_COMMIT``.
        datasets: ``FEMD_DATASETS``, dataset names, one field each.
        exit_code: ``FEMD_EXIT_CODE``.
        output_sha256: ``FEMD_OUTPUT_SHA256`` of what left the node.
        extra: more fields; each key is upper case (``[A-Z][A-Z0-9_]*``) and is
            prefixed with ``FEMD_`` unless it already starts with it.

    Raises:
        ValueError: a programming error: *priority* out of range or a bad or
            clashing *extra* key. I/O problems never raise.
    """
    if not 0 <= priority <= 7:  # syslog's range
        raise ValueError(f"priority must be 0-7 (got {priority})")
    fields: Fields = [
        ("MESSAGE_ID", Event(event).value),
        ("MESSAGE", _cut(printable(message))),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", "femd"),
    ]
    _add(fields, "FEMD_TASK_ID", task_id)
    _add(fields, "FEMD_PROJECT", project)
    _add(fields, "FEMD_NODE", node)
    _add(fields, "FEMD_STATE", state)
    _add(fields, "FEMD_DECISION", decision)
    _add(fields, "FEMD_RULES", tuple(rules))
    _add(fields, "FEMD_SIGNER_KEYIDS", tuple(signer_keyids))
    _add(fields, "FEMD_MANIFEST_SHA256", manifest_sha256)
    _add(fields, "FEMD_POLICY_SHA256", policy_sha256)
    _add(fields, "FEMD_IMAGE_DIGEST", image_digest)
    _add(fields, "FEMD_GIT_COMMIT", git_commit)
    _add(fields, "FEMD_DATASETS", tuple(datasets))
    _add(fields, "FEMD_EXIT_CODE", exit_code)
    _add(fields, "FEMD_OUTPUT_SHA256", output_sha256)
    for key, value in (extra or {}).items():
        if not _EXTRA_KEY.fullmatch(key):
            raise ValueError(f"audit field must match [A-Z][A-Z0-9_]* (got {key!r})")
        name = key if key.startswith("FEMD_") else "FEMD_" + key
        if any(name == k for k, _ in fields):
            raise ValueError(f"audit field {name} is set twice")
        _add(fields, name, value)
    _write(fields)


def _write(fields: Fields) -> None:
    global _sink  # configured lazily on first use
    with _lock:
        if _sink is None:
            _sink = _Sink("auto", None, None)
        _sink.write(fields)


def task_log(task_id: str, project: str | None, data: bytes) -> None:
    """Forward a chunk of a task's stdout/stderr to the journal, line by line.

    Each line becomes an entry with ``SYSLOG_IDENTIFIER=femd-task``,
    ``PRIORITY=6``, ``FEMD_TASK_ID`` and ``FEMD_PROJECT``; it is decoded as
    UTF-8 (bad bytes replaced) and cut to ``FIELD_MAX_BYTES``. A line split
    across two chunks becomes two entries. At most ``TASK_LOG_MAX_BYTES`` of
    one task's output are forwarded; when that budget runs out, one warning
    entry says so and the rest is dropped (the task itself is unaffected).
    """
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    base: Fields = [("PRIORITY", "6"), ("SYSLOG_IDENTIFIER", "femd-task")]
    _add(base, "FEMD_TASK_ID", task_id)
    _add(base, "FEMD_PROJECT", project)
    for raw in lines:
        line = raw.removesuffix(b"\r")
        cost = len(line) + 1
        with _lock:
            used = _task_bytes.pop(task_id, 0)
            _task_bytes[task_id] = used + cost
            while len(_task_bytes) > _TASK_LOG_TASKS:
                _task_bytes.popitem(last=False)
        if used > TASK_LOG_MAX_BYTES:  # the budget ran out before: already said
            return
        if used + cost > TASK_LOG_MAX_BYTES:
            note = f"task output beyond {TASK_LOG_MAX_BYTES} bytes is not journaled"
            _write([("MESSAGE", note), ("PRIORITY", "4"), *base[1:]])
            return
        _write([("MESSAGE", _cut(line.decode("utf-8", "replace"))), *base])
