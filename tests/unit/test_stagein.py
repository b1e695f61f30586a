import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import pygit2
import pytest
from pygit2.enums import FileMode, ObjectType

from femd.errors import (
    DatasetMissingError,
    GitCommitMissingError,
    RuntimeMissingError,
    StageInError,
)
from femd.stagein import resolve_dataset, resolve_runtime, source_subdir, stage_git

SIG = pygit2.Signature("Test", "test@example.org", 1_700_000_000, 0)
MiB = 1024 * 1024

# A tree spec: name -> bytes (0644 file) | ("exec", bytes) | ("link", target)
# | ("gitlink", oid) | dict (subtree).
Spec = dict[str, object]


def build_tree(repo: pygit2.Repository, spec: Spec) -> pygit2.Oid:
    tb = repo.TreeBuilder()
    for name, value in spec.items():
        if isinstance(value, bytes):
            tb.insert(name, repo.create_blob(value), FileMode.BLOB)
        elif isinstance(value, dict):
            tb.insert(name, build_tree(repo, value), FileMode.TREE)
        else:
            assert isinstance(value, tuple)
            kind, data = value
            if kind == "exec":
                tb.insert(name, repo.create_blob(data), FileMode.BLOB_EXECUTABLE)
            elif kind == "link":
                tb.insert(name, repo.create_blob(data), FileMode.LINK)
            else:
                assert kind == "gitlink"
                tb.insert(name, data, FileMode.COMMIT)
    return tb.write()


def raw_tree(repo: pygit2.Repository, entries: list[tuple[bytes, bytes, pygit2.Oid]]):
    """Write a tree object byte by byte, as a hostile server could."""
    body = b"".join(
        mode + b" " + name + b"\0" + bytes.fromhex(str(oid))
        for mode, name, oid in entries
    )
    return repo.odb.write(ObjectType.TREE, body)


def commit(repo, tree, parents=(), ref="refs/heads/main") -> str:
    oid = repo.create_commit(ref, SIG, SIG, "msg", tree, list(parents))
    return str(oid)


class Origin:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.repo = pygit2.init_repository(str(path), bare=True)
        self.url = path.as_uri()

    def commit(
        self, spec: Spec, parents=(), ref: str | None = "refs/heads/main"
    ) -> str:
        return commit(self.repo, build_tree(self.repo, spec), parents, ref)

    def commit_tree(self, tree: pygit2.Oid, ref: str = "refs/heads/main") -> str:
        return commit(self.repo, tree, (), ref)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path / "origin.git")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def stage(origin: Origin, sha: str, cache: Path, dest: Path, **kw) -> Path:
    kw.setdefault("max_bytes", MiB)
    return stage_git(origin.url, sha, cache_dir=cache, dest=dest, **kw)


def listing(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", p.stat().st_mode & 0o777)
            else:
                out[rel] = (p.read_bytes(), p.stat().st_mode & 0o777)
    return out


def test_pinned_commit_not_branch_head(origin: Origin, cache: Path, tmp_path: Path):
    old = origin.commit(
        {
            "train.py": b"print('v1')\n",
            "run.sh": ("exec", b"#!/bin/sh\necho hi\n"),
            "pkg": {"mod.py": b"X = 1\n", "deep": {"d.txt": b"deep\n"}},
        }
    )
    head = origin.commit({"train.py": b"print('v2')\n"}, parents=[old])
    (tmp_path / "work").mkdir()
    assert str(origin.repo.references["refs/heads/main"].target) == head != old
    dest = stage(origin, old, cache, tmp_path / "work" / "src")
    assert dest == tmp_path / "work" / "src"
    assert listing(dest) == {
        "train.py": (b"print('v1')\n", 0o644),
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "pkg": ("dir", 0o755),
        "pkg/mod.py": (b"X = 1\n", 0o644),
        "pkg/deep": ("dir", 0o755),
        "pkg/deep/d.txt": (b"deep\n", 0o644),
    }
    assert not (dest / ".git").exists()
    # The head is staged too when pinned, from the same mirror.
    dest2 = stage(origin, head, cache, tmp_path / "head")
    assert listing(dest2) == {"train.py": (b"print('v2')\n", 0o644)}


def test_existing_empty_dest_is_used_and_nonempty_refused(
    origin: Origin, cache: Path, tmp_path: Path
):
    sha = origin.commit({"a": b"a"})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert listing(stage(origin, sha, cache, empty)) == {"a": (b"a", 0o644)}
    with pytest.raises(StageInError, match="not an empty directory"):
        stage(origin, sha, cache, empty)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StageInError, match="not an empty directory"):
        stage(origin, sha, cache, afile)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("short", id="abbreviated"),
        pytest.param("upper", id="uppercase"),
        pytest.param("branch", id="branch-name"),
        pytest.param("newline", id="trailing-newline"),
    ],
)
def test_only_full_lowercase_ids(origin: Origin, cache: Path, tmp_path: Path, bad: str):
    sha = origin.commit({"a": b"a"})
    value = {
        "short": sha[:12],
        "upper": sha.upper(),
        "branch": "main",
        "newline": sha + "\n",
    }[bad]
    with pytest.raises(GitCommitMissingError, match="full object id"):
        stage(origin, value, cache, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_missing_commit_names_url_and_commit(
    origin: Origin, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    origin.commit({"a": b"a"})
    missing = "0123456789abcdef" * 2 + "01234567"
    with (
        caplog.at_level(logging.INFO, logger="femd.stagein"),
        pytest.raises(GitCommitMissingError) as info,
    ):
        stage(origin, missing, cache, tmp_path / "d")
    # After heads and tags, the id itself was asked for.
    assert f"fetching {missing} by id" in caplog.text
    msg = str(info.value)
    assert missing in msg
    assert origin.url in msg
    assert "\n" not in msg
    # A SHA-256 id asked of a SHA-1 repository is just as missing.
    with pytest.raises(GitCommitMissingError, match="not found"):
        stage(origin, "ab" * 32, cache, tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("kind", ["tree", "blob", "tag"])
def test_id_of_a_non_commit_is_refused(
    origin: Origin, cache: Path, tmp_path: Path, kind
):
    sha = origin.commit({"a": b"content"})
    repo = origin.repo
    c = repo.get(sha)
    if kind == "tree":
        target = str(c.tree_id)
    elif kind == "blob":
        target = str(c.tree["a"].id)
    else:
        target = str(repo.create_tag("v1", c.id, ObjectType.COMMIT, SIG, "release"))
    with pytest.raises(GitCommitMissingError, match=f"is a {kind}, not a commit"):
        stage(origin, target, cache, tmp_path / "d")


def test_commit_reachable_only_by_id_is_fetched(
    origin: Origin, cache: Path, tmp_path: Path
):
    origin.commit({"a": b"main"})
    # Like GitHub's refs/pull/N/head: not a head, not a tag.
    pr = origin.commit({"a": b"pull request"}, ref="refs/pull/1/head")
    dest = stage(origin, pr, cache, tmp_path / "d")
    assert (dest / "a").read_bytes() == b"pull request"
    # NOTE: libgit2's local transport sends every advertised ref's objects, so
    # here the heads/tags fetch already brings it; over https the by-id refspec
    # does (see the missing-commit test for that fallback being attempted).


def test_unreachable_url_is_a_stagein_error(tmp_path: Path, cache: Path):
    url = (tmp_path / "nowhere.git").as_uri()
    with pytest.raises(StageInError, match="cannot fetch") as info:
        stage_git(url, "a" * 40, cache_dir=cache, dest=tmp_path / "d", max_bytes=MiB)
    assert not isinstance(info.value, GitCommitMissingError)


def test_submodule_refused_unless_allowed(origin: Origin, cache: Path, tmp_path: Path):
    other = origin.commit({"lib.py": b"x"}, ref="refs/heads/lib")
    sha = origin.commit(
        {"main.py": b"m", "vendor": {"lib": ("gitlink", pygit2.Oid(hex=other))}}
    )
    with pytest.raises(StageInError, match="submodule vendor/lib"):
        stage(origin, sha, cache, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    dest = stage(origin, sha, cache, tmp_path / "d2", allow_submodules=True)
    assert listing(dest) == {
        "main.py": (b"m", 0o644),
        "vendor": ("dir", 0o755),
        "vendor/lib": ("dir", 0o755),
    }


def test_symlinks_written_not_followed(origin: Origin, cache: Path, tmp_path: Path):
    sha = origin.commit(
        {
            "passwd": ("link", b"/etc/passwd"),
            "up": ("link", b"../../outside"),
            "data": {"x": b"x"},
            "alias": ("link", b"data"),
        }
    )
    dest = stage(origin, sha, cache, tmp_path / "d")
    assert os.readlink(dest / "passwd") == "/etc/passwd"
    assert os.readlink(dest / "up") == "../../outside"
    assert os.readlink(dest / "alias") == "data"
    assert not (tmp_path / "outside").exists()


def test_symlink_then_dir_of_same_name_is_refused(
    origin: Origin, cache: Path, tmp_path: Path
):
    # A hostile tree: "evil" -> /tmp/target as a link, then "evil" as a tree
    # holding a file. Writing the file must never go through the link.
    target = tmp_path / "target"
    target.mkdir()
    repo = origin.repo
    link = repo.create_blob(str(target).encode())
    inner = build_tree(repo, {"planted": b"gotcha"})
    tree = raw_tree(repo, [(b"120000", b"evil", link), (b"40000", b"evil", inner)])
    sha = origin.commit_tree(tree)
    with pytest.raises(StageInError, match="duplicate path evil"):
        stage(origin, sha, cache, tmp_path / "d")
    assert list(target.iterdir()) == []
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (b"..", "unsafe path sub/"),
        (b".", "unsafe path sub/"),
        (b".git", "unsafe path sub/"),
        (b".GIT", "unsafe path sub/"),
        (b"a/b", "unsafe path sub/"),
        (b"/abs", "unsafe path sub/"),
        # libgit2's indexer already refuses this one while fetching.
        (b"", "cannot fetch .*can't parse filename"),
    ],
    ids=["dotdot", "dot", "dotgit", "dotgit-upper", "slash", "absolute", "empty"],
)
def test_unsafe_names_refused(
    origin: Origin, cache: Path, tmp_path: Path, name: bytes, match: str
):
    repo = origin.repo
    blob = repo.create_blob(b"payload")
    sub = raw_tree(repo, [(b"100644", name, blob)])
    tree = build_tree(repo, {"ok.txt": b"fine"})
    top = raw_tree(repo, [(b"100644", b"ok.txt", blob), (b"40000", b"sub", sub)])
    assert tree != top
    sha = origin.commit_tree(top)
    with pytest.raises(StageInError, match=match):
        stage(origin, sha, cache, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "payload").exists()


def test_size_cap(origin: Origin, cache: Path, tmp_path: Path):
    sha = origin.commit({"a": b"x" * 600, "b": {"c": b"y" * 600}})
    with pytest.raises(StageInError, match="exceeds 1000 bytes"):
        stage(origin, sha, cache, tmp_path / "d", max_bytes=1000)
    assert not (tmp_path / "d").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    with pytest.raises(StageInError, match="exceeds"):
        stage(origin, sha, cache, keep, max_bytes=1000)
    assert list(keep.iterdir()) == []  # cleaned, not removed: it was the caller's
    assert listing(stage(origin, sha, cache, tmp_path / "ok", max_bytes=1200))["a"] == (
        b"x" * 600,
        0o644,
    )


def test_cache_reused_across_stagings(origin: Origin, cache: Path, tmp_path: Path):
    sha = origin.commit({"a": b"cached"})
    stage(origin, sha, cache, tmp_path / "one")
    mirror = hashlib.sha256(origin.url.encode()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == [mirror, mirror + ".lock"]
    # The origin is gone: only the cache can serve the second staging.
    shutil.rmtree(origin.path)
    dest = stage(origin, sha, cache, tmp_path / "two")
    assert (dest / "a").read_bytes() == b"cached"
    assert sorted(p.name for p in cache.iterdir()) == [mirror, mirror + ".lock"]


def test_broken_mirror_is_recreated(origin: Origin, cache: Path, tmp_path: Path):
    sha = origin.commit({"a": b"a"})
    mirror = cache / hashlib.sha256(origin.url.encode()).hexdigest()
    mirror.mkdir(parents=True)
    (mirror / "junk").write_text("half-created")
    dest = stage(origin, sha, cache, tmp_path / "d")
    assert (dest / "a").read_bytes() == b"a"


def test_concurrent_stagings_of_one_url(origin: Origin, cache: Path, tmp_path: Path):
    shas = []
    parent: list[str] = []
    for i in range(4):
        sha = origin.commit(
            {"n": str(i).encode(), "big": b"z" * 50_000}, parents=parent
        )
        parent = [sha]
        shas.append(sha)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stage(origin, shas[i % 4], cache, tmp_path / f"d{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    for i in range(8):
        assert (tmp_path / f"d{i}" / "n").read_bytes() == str(i % 4).encode()


class TestSourceSubdir:
    @pytest.fixture
    def tree(self, tmp_path: Path) -> Path:
        root = tmp_path / "src"
        (root / "sub" / "inner").mkdir(parents=True)
        (root / "file").write_text("x")
        (root / "escape").symlink_to("/")
        (root / "up").symlink_to("../")
        (root / "alias").symlink_to("sub")
        return root

    @pytest.mark.parametrize(
        ("path", "expected"),
        [(".", ""), ("sub", "sub"), ("sub/inner", "sub/inner"), ("alias", "sub")],
    )
    def test_ok(self, tree: Path, path: str, expected: str):
        assert source_subdir(tree, path) == (tree / expected).resolve()

    @pytest.mark.parametrize(
        ("path", "match"),
        [
            ("../src", "without '..'"),
            ("sub/../../x", "without '..'"),
            ("/etc", "without '..'"),
            ("", "without '..'"),
            ("escape", "escapes"),
            ("up", "escapes"),
            ("escape/etc", "escapes"),
            ("file", "not a directory"),
            ("missing", "not found"),
        ],
    )
    def test_refused(self, tree: Path, path: str, match: str):
        with pytest.raises(StageInError, match=match):
            source_subdir(tree, path)


class TestResolveDataset:
    def test_directory_and_file(self, tmp_path: Path):
        d = tmp_path / "cohort"
        d.mkdir()
        f = tmp_path / "table.parquet"
        f.write_bytes(b"PAR1")
        assert resolve_dataset("cohort", str(d)) == d
        assert resolve_dataset("cohort", str(d) + "/") == d
        assert resolve_dataset("table", str(f)) == f

    def test_missing(self, tmp_path: Path):
        with pytest.raises(DatasetMissingError, match=r"dataset hf: .* is missing"):
            resolve_dataset("hf", str(tmp_path / "nope"))
        dangling = tmp_path / "dangling"
        dangling.symlink_to(tmp_path / "gone")
        with pytest.raises(DatasetMissingError, match="is missing"):
            resolve_dataset("hf", str(dangling))

    def test_symlinked_resolves_to_target(self, tmp_path: Path):
        real = tmp_path / "storage" / "hf-2024"
        real.mkdir(parents=True)
        (tmp_path / "link-parent").symlink_to(tmp_path / "storage")
        (tmp_path / "current").symlink_to(real)
        assert resolve_dataset("hf", str(tmp_path / "current")) == real
        assert resolve_dataset("hf", str(tmp_path / "link-parent" / "hf-2024")) == real

    @pytest.mark.parametrize("target", ["/proc/self", "/sys", "/dev/null", "/"])
    def test_forbidden_targets(self, tmp_path: Path, target: str):
        link = tmp_path / "ds"
        link.symlink_to(target)
        with pytest.raises(DatasetMissingError, match=r"not allowed|not a directory"):
            resolve_dataset("hf", str(link))

    def test_fifo_and_relative_refused(self, tmp_path: Path):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(
            DatasetMissingError, match="not a directory or regular file"
        ):
            resolve_dataset("hf", str(fifo))
        with pytest.raises(DatasetMissingError, match="must be absolute"):
            resolve_dataset("hf", "relative/path")


class TestResolveRuntime:
    def test_directory_only(self, tmp_path: Path):
        venv = tmp_path / "flower"
        venv.mkdir()
        assert resolve_runtime("flower", str(venv)) == venv
        (tmp_path / "file").write_bytes(b"x")
        with pytest.raises(RuntimeMissingError, match=r"runtime f: .* not a directory"):
            resolve_runtime("f", str(tmp_path / "file"))

    def test_missing_relative_and_forbidden(self, tmp_path: Path):
        with pytest.raises(RuntimeMissingError, match=r"runtime flower: .* missing"):
            resolve_runtime("flower", str(tmp_path / "nope"))
        with pytest.raises(RuntimeMissingError, match="must be absolute"):
            resolve_runtime("flower", "opt/flower")
        (tmp_path / "root").symlink_to("/")
        with pytest.raises(RuntimeMissingError, match="not allowed"):
            resolve_runtime("flower", str(tmp_path / "root"))
