"""The host side of the output stream: hostile tar streams change nothing.

What a sandbox sends is task output (a task can forge it): only regular files
and directories are made, below the output dir, within the byte cap.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest

from femd.launchers.capture import EMPTY, OutputCapture, tmpfs_bytes, wrap_argv


def stream(*members: tuple[tarfile.TarInfo, bytes], free: str = "12") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return f"{free}\n".encode() + buf.getvalue()


def entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    return info, data


def capture(tmp_path: Path, data: bytes, max_bytes: int = 1 << 20) -> OutputCapture:
    dest = tmp_path / "out"
    dest.mkdir()
    r, w = os.pipe()
    got = OutputCapture(r, dest, max_bytes)

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    assert got.join(10)
    writer.join()
    return got


def test_files_and_dirs_are_extracted_and_counted(tmp_path: Path):
    got = capture(
        tmp_path,
        stream(
            entry("./", kind=tarfile.DIRTYPE),
            entry("./d", kind=tarfile.DIRTYPE),
            entry("./d/model.txt", b"weights"),
            entry("./r", b"x"),
        ),
    )
    assert (got.complete, got.full, got.error, got.bytes) == (True, False, "", 8)
    assert (tmp_path / "out" / "d" / "model.txt").read_bytes() == b"weights"
    assert (tmp_path / "out" / "r").stat().st_mode & 0o777 == 0o600


def test_a_full_tmpfs_is_reported(tmp_path: Path):
    got = capture(tmp_path, stream(entry("./a", b"x"), free="0"))
    assert got.full


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("./link", tarfile.SYMTYPE, "is a symlink"),
        ("./hard", tarfile.LNKTYPE, "not a regular file"),
        ("./fifo", tarfile.FIFOTYPE, "not a regular file"),
        ("../escape", tarfile.REGTYPE, "unsafe name"),
        ("/etc/evil", tarfile.REGTYPE, "unsafe name"),
        ("./a/../../escape", tarfile.REGTYPE, "unsafe name"),
    ],
    ids=["symlink", "hardlink", "fifo", "dotdot", "absolute", "inner-dotdot"],
)
def test_hostile_members_make_nothing(tmp_path: Path, name: str, kind: bytes, why):
    got = capture(tmp_path, stream(entry(name, b"", kind), entry("./after", b"x")))
    assert why in got.error
    assert not got.complete
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_more_than_the_cap_is_cut_and_reported(tmp_path: Path):
    got = capture(tmp_path, stream(entry("./big", b"x" * 5000)), max_bytes=4096)
    assert got.full
    assert "exceed the cap of 4096" in got.error
    assert not (tmp_path / "out" / "big").exists()


def test_garbage_is_an_error_not_a_crash(tmp_path: Path):
    got = capture(tmp_path, b"7\n" + b"\xff" * 3000)
    assert not got.complete
    assert got.error


def test_nothing_sent_is_incomplete(tmp_path: Path):
    nothing = capture(tmp_path, b"")
    assert (nothing.complete, nothing.full, nothing.error) == (False, False, "")


def test_an_empty_mark_is_complete_with_nothing_made(tmp_path: Path):
    got = capture(tmp_path, EMPTY + b"\n")
    assert (got.complete, got.full, got.error, got.bytes) == (True, False, "", 0)
    assert list((tmp_path / "out").iterdir()) == []


def test_anything_after_the_empty_mark_is_an_error(tmp_path: Path):
    got = capture(tmp_path, EMPTY + b"\n" + stream(entry("./a", b"x")))
    assert not got.complete
    assert "after the empty mark" in got.error
    assert list((tmp_path / "out").iterdir()) == []


def test_tmpfs_size_is_whole_pages_never_zero():
    # tmpfs size=0 would mean "no limit".
    assert tmpfs_bytes(0) == 4096
    assert tmpfs_bytes(1) == 4096
    assert tmpfs_bytes(4097) == 8192


def test_wrapped_command_keeps_argv_intact():
    argv = wrap_argv(["python", "-c", "print('a b')"], "/out")
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["femd-output", "/out", "python", "-c", "print('a b')"]


# -- headers that would make femd hold what they declare ----------------------


def _header(name: str, kind: bytes, size: int, fmt: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=fmt)


def _peak_bytes(tmp_path: Path, data: bytes, max_bytes: int = 4096) -> tuple:
    """Capture *data*; return the capture and the peak of Python's allocations."""
    tracemalloc.start()
    try:
        got = capture(tmp_path, data, max_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return got, peak


@pytest.mark.parametrize(
    ("name", "kind", "fmt", "why"),
    [
        ("././@PaxHeader", tarfile.XHDTYPE, tarfile.USTAR_FORMAT, "a pax header of"),
        ("././@LongLink", tarfile.GNUTYPE_LONGNAME, tarfile.GNU_FORMAT, "long-name"),
    ],
    ids=["pax", "gnu-longname"],
)
def test_a_header_declaring_gigabytes_is_refused_unread(
    tmp_path: Path, name: str, kind: bytes, fmt: int, why: str
):
    # The task writes the stream: a header declaring 1 GiB, then 48 MiB of it.
    # tarfile would read all of it into memory before parsing the header.
    bomb = b"9\n" + _header(name, kind, 1 << 30, fmt) + b"a" * (48 << 20)
    got, peak = _peak_bytes(tmp_path, bomb)
    assert peak < 8 << 20, f"the agent held {peak} bytes"
    assert not got.complete
    assert why in got.error
    assert "1073741824 bytes" in got.error
    assert list((tmp_path / "out").iterdir()) == []


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path):
    # tarfile follows such a chain by recursion (a RecursionError at ~1000).
    one = _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 1, tarfile.GNU_FORMAT)
    chain = (one + b"x".ljust(512, b"\0")) * 2000
    after = stream(entry("./a", b"x")).partition(b"\n")[2]
    got = capture(tmp_path, b"9\n" + chain + after)
    assert not got.complete
    assert "more than 4 extended headers before one member" in got.error


def test_a_stream_longer_than_its_files_and_headers_is_refused(tmp_path: Path):
    # Each header is under the cap, but together they are far more than the
    # file bytes (none) plus the allowance for headers.
    members = []
    for i in range(40):
        info, data = entry(f"./f{i}")
        info.pax_headers = {"comment": "x" * 60_000}
        members.append((info, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, _ in members:
            tar.addfile(info)
    got = capture(tmp_path, b"9\n" + buf.getvalue(), max_bytes=4096)
    assert not got.complete
    assert "the stream is longer than" in got.error


@pytest.mark.parametrize(
    ("pax_headers", "member_headers", "why"),
    [
        ({"comment": "global"}, {}, "a global pax header"),
        (
            {},
            {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s"},
            "a sparse file",
        ),
    ],
    ids=["global-pax", "pax-sparse"],
)
def test_headers_the_output_step_never_writes_are_refused(
    tmp_path: Path, pax_headers: dict, member_headers: dict, why: str
):
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax_headers
    ) as tar:
        info, data = entry("./a", b"\n".join([b"1", b"0", b"1"]) + b"\n")
        info.pax_headers = member_headers
        tar.addfile(info, io.BytesIO(data))
    got = capture(tmp_path, b"9\n" + buf.getvalue())
    assert not got.complete
    assert why in got.error
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=str)
def test_many_long_names_fit_the_header_allowance(tmp_path: Path, fmt: int):
    # 300 files whose paths are near PATH_MAX: 1.7 MiB of headers, more than
    # the fixed allowance, within the allowance per member.
    deep = "/".join(["d" * 200] * 17)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(300):
            info, data = entry(f"./{deep}/{i:03d}".ljust(3500, "f"), b"x")
            tar.addfile(info, io.BytesIO(data))
    assert len(buf.getvalue()) > 1 << 20
    got = capture(tmp_path, b"9\n" + buf.getvalue())
    assert (got.complete, got.error, got.bytes) == (True, "", 300)
