import gzip
import hashlib
import io
import os
import socket
import stat
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femd.errors import OutputTooLargeError, StageOutError, UnsafeOutputPathError
from femd.stageout import (
    ARCHIVE_SLACK_BYTES,
    Packed,
    Reassembler,
    chunk_count,
    iter_chunks,
    pack_outputs,
    unpack_outputs,
)

MiB = 1024 * 1024


def make_tree(root: Path) -> None:
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(5000))
    (root / "metrics.json").write_text('{"auc": 0.91}\n')
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    (root / "empty-dir").mkdir()
    (root / "deep" / "er" / "est").mkdir(parents=True)
    (root / "deep" / "er" / "est" / "x").write_bytes(b"")
    (root / "line\nbreak.txt").write_text("newline in the name is fine\n")
    (root / "résumé ü.txt").write_text("unicode\n")
    (root / ("long" * 40)).write_text("a name over 100 bytes needs a pax header\n")


def listing(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st_ = p.lstat()
            assert stat.S_ISDIR(st_.st_mode) or stat.S_ISREG(st_.st_mode)
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = (p.read_bytes(), bool(st_.st_mode & 0o111))
    return out


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_pack_is_deterministic_and_normalized(tmp_path: Path, outdir: Path):
    make_tree(outdir)
    a = pack_outputs(outdir, tmp_path / "a.tar.gz", max_bytes=MiB)
    # Different mtimes, permissions and owner: same bytes.
    for p in outdir.rglob("*"):
        os.utime(p, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    (outdir / "metrics.json").chmod(0o600)
    (outdir / "run.sh").chmod(0o711)
    os.chown(outdir / "metrics.json", 1234, 5678)
    b = pack_outputs(outdir, tmp_path / "b.tar.gz", max_bytes=MiB)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    assert a.sha256 == hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest()
    assert a.bytes == (tmp_path / "a.tar.gz").stat().st_size
    assert a.files == 7
    assert a.content_bytes == sum(
        p.stat().st_size for p in outdir.rglob("*") if p.is_file()
    )
    assert isinstance(a, Packed)
    assert a.path == tmp_path / "a.tar.gz"
    # Content changes do change the digest.
    (outdir / "metrics.json").write_text('{"auc": 0.92}\n')
    assert pack_outputs(outdir, tmp_path / "c.tar.gz", max_bytes=MiB).sha256 != a.sha256


def test_archive_headers(tmp_path: Path, outdir: Path):
    make_tree(outdir)
    packed = pack_outputs(outdir, tmp_path / "a.tar.gz", max_bytes=MiB)
    raw = packed.path.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08"
    assert raw[3] & 0x08 == 0  # no FNAME
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    with tarfile.open(packed.path, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: tuple(p.encode() for p in n.split("/")))
    assert "line\nbreak.txt" in names
    assert "empty-dir" in names
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.isdir() or m.isreg()
        if m.isdir():
            assert m.mode == 0o755
    modes = {m.name: m.mode for m in members if m.isreg()}
    assert modes["run.sh"] == 0o755
    assert modes["metrics.json"] == 0o644


def test_empty_output_dir_gives_valid_empty_archive(tmp_path: Path, outdir: Path):
    packed = pack_outputs(outdir, tmp_path / "e.tar.gz", max_bytes=0)
    assert (packed.files, packed.content_bytes) == (0, 0)
    with tarfile.open(packed.path, "r:gz") as tar:
        assert tar.getmembers() == []
    assert unpack_outputs(packed.path, tmp_path / "x", max_bytes=0) == []
    assert list((tmp_path / "x").iterdir()) == []


def _symlink(d: Path) -> str:
    (d / "sub").mkdir()
    (d / "sub" / "passwd").symlink_to("/etc/passwd")
    return "sub/passwd"


def _dir_symlink(d: Path) -> str:
    (d / "etc").symlink_to("/etc")
    return "etc"


def _hardlink(d: Path) -> str:
    (d / "a").write_text("x")
    os.link(d / "a", d / "b")
    return "a"


def _hardlink_outside(d: Path) -> str:
    secret = d.parent / "secret"
    secret.write_text("not for export")
    os.link(secret, d / "copy")
    return "copy"


def _fifo(d: Path) -> str:
    os.mkfifo(d / "pipe")
    return "pipe"


def _device(d: Path) -> str:
    try:
        os.mknod(d / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:  # the suite runs as root (scripts/test)
        pytest.fail("mknod needs CAP_MKNOD: run the suite as root", pytrace=False)
    return "null"


def _socket(d: Path) -> str:
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(d)  # keep the socket path short
    try:
        s.bind("sock")
    finally:
        os.chdir(cwd)
        s.close()
    return "sock"


def _newline_link(d: Path) -> str:
    (d / "evil\nname").symlink_to("/etc/shadow")
    return "evil\\nname"


@pytest.mark.parametrize(
    ("plant", "kind"),
    [
        (_symlink, "symlink"),
        (_dir_symlink, "symlink"),
        (_hardlink, "hard link"),
        (_hardlink_outside, "hard link"),
        (_fifo, "fifo"),
        (_device, "device"),
        (_socket, "socket"),
        (_newline_link, "symlink"),
    ],
    ids=lambda v: getattr(v, "__name__", v).strip("_"),
)
def test_refused_kinds(tmp_path: Path, outdir: Path, plant, kind: str):
    (outdir / "ok.txt").write_text("fine")
    rel = plant(outdir)
    dest = tmp_path / "o.tar.gz"
    with pytest.raises(UnsafeOutputPathError) as info:
        pack_outputs(outdir, dest, max_bytes=MiB)
    msg = str(info.value)
    assert msg == f"outputs: {rel} is a {kind}"
    assert not dest.exists()


def test_non_utf8_name_refused(tmp_path: Path, outdir: Path):
    (outdir / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    with pytest.raises(UnsafeOutputPathError, match="not UTF-8"):
        pack_outputs(outdir, tmp_path / "o.tar.gz", max_bytes=MiB)


def test_output_dir_symlink_refused(tmp_path: Path, outdir: Path):
    link = tmp_path / "link"
    link.symlink_to(outdir)
    with pytest.raises(StageOutError, match="cannot open"):
        pack_outputs(link, tmp_path / "o.tar.gz", max_bytes=MiB)
    with pytest.raises(StageOutError, match="cannot open"):
        pack_outputs(tmp_path / "missing", tmp_path / "o.tar.gz", max_bytes=MiB)


def test_archive_inside_output_dir_refused(outdir: Path):
    with pytest.raises(StageOutError, match="inside the output dir"):
        pack_outputs(outdir, outdir / "o.tar.gz", max_bytes=MiB)


def test_sparse_huge_file_refused_without_reading(tmp_path: Path, outdir: Path):
    (outdir / "small").write_bytes(b"x" * 10)
    with open(outdir / "huge", "wb") as f:
        f.truncate(10 * 1024**3)
    dest = tmp_path / "o.tar.gz"
    start = time.monotonic()
    with pytest.raises(OutputTooLargeError, match="more than 1048576 bytes") as info:
        pack_outputs(outdir, dest, max_bytes=MiB)
    assert time.monotonic() - start < 2
    assert "huge" in str(info.value)
    assert not dest.exists()


def test_cap_is_on_the_sum_of_sizes(tmp_path: Path, outdir: Path):
    (outdir / "a").write_bytes(b"a" * 600)
    (outdir / "d").mkdir()
    (outdir / "d" / "b").write_bytes(b"b" * 400)
    assert (
        pack_outputs(outdir, tmp_path / "ok.tar.gz", max_bytes=1000).content_bytes
        == 1000
    )
    with pytest.raises(OutputTooLargeError):
        pack_outputs(outdir, tmp_path / "no.tar.gz", max_bytes=999)
    assert not (tmp_path / "no.tar.gz").exists()


def test_archive_size_is_capped_too(tmp_path: Path, outdir: Path):
    # Zero content bytes, but very many incompressible names: the archive
    # cannot grow beyond max_bytes + ARCHIVE_SLACK_BYTES.
    # (About 168 archive bytes per empty file with a 254-char random name.)
    for i in range(6600):
        seed = str(i).encode()
        name = hashlib.sha512(seed).hexdigest() + hashlib.sha512(seed * 2).hexdigest()
        (outdir / name[:254]).touch()
    dest = tmp_path / "o.tar.gz"
    with pytest.raises(
        OutputTooLargeError, match=f"archive exceeds {ARCHIVE_SLACK_BYTES} bytes"
    ):
        pack_outputs(outdir, dest, max_bytes=0)
    assert not dest.exists()


def test_chunk_count_and_iter_chunks(tmp_path: Path):
    assert chunk_count(0) == 1
    assert chunk_count(1, 10) == 1
    assert chunk_count(10, 10) == 1
    assert chunk_count(11, 10) == 2
    assert chunk_count(256 * 1024 * 3 + 1) == 4
    with pytest.raises(ValueError, match="chunk size"):
        chunk_count(10, 0)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert list(iter_chunks(empty)) == [b""]
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * 20)
    assert list(iter_chunks(exact, 10)) == [b"x" * 10, b"x" * 10]
    assert len(list(iter_chunks(exact, 10))) == chunk_count(20, 10)
    with pytest.raises(StageOutError, match="cannot read"):
        list(iter_chunks(tmp_path / "missing"))


def roundtrip(tmp_path: Path, outdir: Path, chunk_bytes: int, seed: int = 1) -> Path:
    packed = pack_outputs(outdir, tmp_path / "p.tar.gz", max_bytes=MiB)
    chunks = list(iter_chunks(packed.path, chunk_bytes))
    assert len(chunks) == chunk_count(packed.bytes, chunk_bytes)
    r = Reassembler(
        tmp_path / "recv.part",
        sha256=packed.sha256,
        size=packed.bytes,
        chunks=len(chunks),
        max_bytes=MiB,
    )
    # A fixed, scrambled arrival order.
    order = sorted(
        range(len(chunks)), key=lambda i: hashlib.sha256(b"%d-%d" % (seed, i)).digest()
    )
    for n, i in enumerate(order):
        assert r.feed(i, len(chunks), chunks[i]) is (n == len(chunks) - 1)
    assert r.feed(order[0], len(chunks), chunks[order[0]]) is True  # redelivery
    archive = r.write(tmp_path / "recv.tar.gz")
    assert archive.read_bytes() == packed.path.read_bytes()
    dest = tmp_path / "unpacked"
    files = unpack_outputs(archive, dest, max_bytes=MiB)
    assert len(files) == packed.files
    return dest


def test_roundtrip_pack_chunk_reassemble_unpack(tmp_path: Path, outdir: Path):
    make_tree(outdir)
    dest = roundtrip(tmp_path, outdir, chunk_bytes=1000)
    assert listing(dest) == listing(outdir)


@settings(max_examples=25, deadline=None)
@given(
    files=st.dictionaries(
        st.lists(
            st.text(
                alphabet=st.characters(
                    codec="utf-8", exclude_characters="/\0", exclude_categories=["Cs"]
                ),
                min_size=1,
                max_size=12,
            ).filter(lambda s: s not in (".", "..")),
            min_size=1,
            max_size=3,
        ).map(tuple),
        st.tuples(st.binary(max_size=3000), st.booleans()),
        max_size=8,
    ),
    chunk_bytes=st.integers(min_value=1, max_value=4096),
)
def test_roundtrip_property(files, chunk_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        outdir = tmp_path / "out"
        outdir.mkdir()
        for parts, (data, executable) in files.items():
            target = outdir.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                continue  # one generated path is a prefix of another
            if executable:
                target.chmod(0o755)
        dest = roundtrip(tmp_path, outdir, chunk_bytes)
        assert listing(dest) == listing(outdir)
        again = pack_outputs(outdir, tmp_path / "again.tar.gz", max_bytes=MiB)
        assert again.path.read_bytes() == (tmp_path / "p.tar.gz").read_bytes()


@pytest.fixture
def packed(tmp_path: Path, outdir: Path) -> tuple[Packed, list[bytes]]:
    make_tree(outdir)
    p = pack_outputs(outdir, tmp_path / "p.tar.gz", max_bytes=MiB)
    return p, list(iter_chunks(p.path, 1024))


def reassembler(tmp_path: Path, p: Packed, n: int) -> Reassembler:
    return Reassembler(
        tmp_path / "recv.part", sha256=p.sha256, size=p.bytes, chunks=n, max_bytes=MiB
    )


def test_tampered_chunk_is_refused(tmp_path: Path, packed):
    p, chunks = packed
    r = reassembler(tmp_path, p, len(chunks))
    bad = bytearray(chunks[1])
    bad[10] ^= 0x01
    for i, c in enumerate(chunks):
        r.feed(i, len(chunks), bytes(bad) if i == 1 else c)
    dest = tmp_path / "recv.tar.gz"
    with pytest.raises(StageOutError, match="digest mismatch"):
        r.write(dest)
    assert not dest.exists()


def test_reassembler_refuses_inconsistent_chunks(tmp_path: Path, packed):
    p, chunks = packed
    n = len(chunks)
    r = reassembler(tmp_path, p, n)
    with pytest.raises(StageOutError, match="total mismatch"):
        r.feed(0, n + 1, chunks[0])
    with pytest.raises(StageOutError, match="out of range"):
        r.feed(n, n, chunks[0])
    with pytest.raises(StageOutError, match="out of range"):
        r.feed(-1, n, chunks[0])
    r.feed(0, n, chunks[0])
    with pytest.raises(StageOutError, match="differs from an earlier copy"):
        r.feed(0, n, chunks[0][:-1] + b"?")
    with pytest.raises(StageOutError, match="more bytes than announced"):
        r.feed(1, n, b"x" * p.bytes)
    assert r.complete is False
    with pytest.raises(StageOutError, match=f"{n - 1} of {n} chunks missing"):
        r.write(tmp_path / "recv.tar.gz")


def test_reassembler_refuses_bad_announcements(tmp_path: Path, packed):
    p, chunks = packed
    with pytest.raises(OutputTooLargeError):
        Reassembler(
            tmp_path / "x",
            sha256=p.sha256,
            size=p.bytes,
            chunks=len(chunks),
            max_bytes=10,
        )
    with pytest.raises(StageOutError, match="bad sha256"):
        Reassembler(
            tmp_path / "x",
            sha256="XY" * 32,
            size=p.bytes,
            chunks=len(chunks),
            max_bytes=MiB,
        )
    with pytest.raises(StageOutError, match="bad announcement"):
        Reassembler(
            tmp_path / "x", sha256=p.sha256, size=p.bytes, chunks=0, max_bytes=MiB
        )
    with pytest.raises(StageOutError, match="bad announcement"):
        Reassembler(tmp_path / "x", sha256=p.sha256, size=3, chunks=4, max_bytes=MiB)


def test_reassembler_write_never_replaces(tmp_path: Path, packed):
    p, chunks = packed
    r = reassembler(tmp_path, p, len(chunks))
    for i, c in enumerate(chunks):
        r.feed(i, len(chunks), c)
    existing = tmp_path / "exists"
    existing.write_text("keep")
    with pytest.raises(StageOutError, match="cannot write"):
        r.write(existing)
    assert existing.read_text() == "keep"


def evil_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o644
    return ti


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([(info("../escape"), b"x")], "unsafe name ../escape"),
        ([(info("a/../../escape"), b"x")], "unsafe name"),
        ([(info("/femd-test-abs"), b"x")], "unsafe name /femd-test-abs"),
        ([(info("./dot"), b"x")], "unsafe name"),
        ([(info("a//b"), b"x")], "unsafe name"),
        (
            [(info("link", tarfile.SYMTYPE, "/etc/passwd"), None)],
            "link in archive is not",
        ),
        (
            [(info("hard", tarfile.LNKTYPE, "/etc/passwd"), None)],
            "hard in archive is not",
        ),
        ([(info("dev", tarfile.CHRTYPE), None)], "dev in archive is not"),
        ([(info("fifo", tarfile.FIFOTYPE), None)], "fifo in archive is not"),
        (
            [(info("d", tarfile.SYMTYPE, "/etc"), None), (info("d/x"), b"x")],
            "d in archive is not",
        ),
        ([(info("twice"), b"1"), (info("twice"), b"2")], "twice extracted twice"),
    ],
    ids=[
        "dotdot",
        "dotdot-inner",
        "absolute",
        "dot",
        "empty-segment",
        "symlink",
        "hardlink",
        "device",
        "fifo",
        "symlink-then-file",
        "duplicate",
    ],
)
def test_unpack_refuses_malicious_tar(tmp_path: Path, members, match: str):
    archive = evil_tar(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeOutputPathError, match=match):
        unpack_outputs(archive, dest, max_bytes=MiB)
    assert not (tmp_path / "escape").exists()
    assert not Path("/femd-test-abs").exists()
    for p in dest.rglob("*"):
        assert not p.is_symlink()


def test_unpack_never_writes_through_existing_symlink(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a").symlink_to(outside)
    archive = evil_tar(tmp_path / "t.tar.gz", [(info("a/b"), b"planted")])
    with pytest.raises(StageOutError, match="cannot unpack"):
        unpack_outputs(archive, dest, max_bytes=MiB)
    assert list(outside.iterdir()) == []


def test_unpack_size_cap_and_corrupt(tmp_path: Path):
    archive = evil_tar(
        tmp_path / "big.tar.gz", [(info("a"), b"x" * 600), (info("b"), b"y" * 600)]
    )
    with pytest.raises(OutputTooLargeError, match="exceeds 1000 bytes"):
        unpack_outputs(archive, tmp_path / "d1", max_bytes=1000)
    assert not (tmp_path / "d1" / "b").exists()
    assert unpack_outputs(archive, tmp_path / "d2", max_bytes=1200) == ["a", "b"]
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(gzip.compress(b"not a tar at all" * 100)[:-20])
    with pytest.raises(StageOutError, match="corrupt archive"):
        unpack_outputs(corrupt, tmp_path / "d3", max_bytes=MiB)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(StageOutError, match="corrupt archive"):
        unpack_outputs(garbage, tmp_path / "d4", max_bytes=MiB)


def test_reassembler_resumes_across_instances(tmp_path: Path, packed):
    """Two receivers (or a restarted one) fill one file; chunk offsets agree."""
    p, chunks = packed
    n = len(chunks)
    part = tmp_path / "shared.part"
    first = Reassembler(part, sha256=p.sha256, size=p.bytes, chunks=n, max_bytes=MiB)
    for i in range(0, n, 2):
        first.feed(i, n, chunks[i], offset=i * 1024)
    first.sync()
    first.close()
    second = Reassembler(
        part,
        sha256=p.sha256,
        size=p.bytes,
        chunks=n,
        max_bytes=MiB,
        received=range(0, n, 2),
    )
    with pytest.raises(StageOutError, match="offset"):
        second.feed(1, n, chunks[1], offset=7)
    for i in range(1, n, 2):
        second.feed(i, n, chunks[i])
    assert second.complete
    dest = second.write(tmp_path / "recv.tar.gz")
    second.close()
    assert dest.read_bytes() == p.path.read_bytes()
    assert not part.exists()


def test_large_outputs_are_stored_unless_they_compress(tmp_path: Path):
    """Weights-like content is stored (fast); text is deflated; both deterministic."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.bin").write_bytes(os.urandom(17 * MiB))
    text = tmp_path / "text"
    text.mkdir()
    (text / "table.csv").write_bytes(b"id,value\n" + b"1,0.5\n" * (3 * MiB))
    for src, expect in ((weights, "stored"), (text, "deflated")):
        a = pack_outputs(src, tmp_path / f"{src.name}-1.tar.gz", max_bytes=64 * MiB)
        b = pack_outputs(src, tmp_path / f"{src.name}-2.tar.gz", max_bytes=64 * MiB)
        assert a.sha256 == b.sha256
        ratio = a.bytes / a.content_bytes
        assert (ratio > 1.0) if expect == "stored" else (ratio < 0.1), (src, ratio)
        unpacked = unpack_outputs(
            a.path, tmp_path / f"{src.name}-u", max_bytes=64 * MiB
        )
        assert len(unpacked) == 1
