"""Stage-in: a task's git source at its pinned commit, and its datasets' host paths.

Owns the per-URL bare mirror cache (pygit2), the export of one commit's tree
into a task's work dir, and the resolution of a policy dataset path. Does not
decide which URLs or datasets are allowed (``decision`` does) nor pull images
(the podman launcher does). Every pygit2 and OS error is wrapped here into a
``StageInError``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pygit2
from pygit2.enums import FileMode, ObjectType, Option

from femd.errors import (
    DatasetMissingError,
    GitCommitMissingError,
    RuntimeMissingError,
    StageInError,
    cut,
)

__all__ = ["resolve_dataset", "resolve_runtime", "source_subdir", "stage_git"]

logger = logging.getLogger(__name__)

_COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_FETCH_REFSPECS: Final = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
_MAX_DEPTH: Final = 256
# libgit2 socket timeouts (ms): a stalled server fails the staging instead of
# hanging the task forever. They are process-wide libgit2 settings.
_CONNECT_TIMEOUT_MS: Final = 30_000
_READ_TIMEOUT_MS: Final = 120_000
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Kernel pseudo-filesystems a dataset must never resolve into.
_FORBIDDEN_ROOTS: Final = (Path("/proc"), Path("/sys"), Path("/dev"))


def stage_git(
    url: str,
    commit: str,
    *,
    cache_dir: Path,
    dest: Path,
    max_bytes: int,
    allow_submodules: bool = False,
) -> Path:
    """Export the tree of *commit* from *url* into *dest*, without a ``.git``.

    A bare mirror per URL is kept under *cache_dir* (named by the SHA-256 of the
    URL) and locked with ``flock`` while used, so tasks sharing a URL never
    corrupt it. The mirror is fetched only when the commit is not already in
    it: heads and tags first, then the commit id itself (a commit that only a
    ``refs/pull/*`` or similar ref reaches).

    Args:
        url: the repository URL the policy allowed.
        commit: the pinned full object id (40 or 64 lowercase hex).
        cache_dir: where mirrors live (``state_dir/git``).
        dest: an empty directory, or a missing one whose parent exists.
        max_bytes: cap on the total size of the exported blobs.
        allow_submodules: export a submodule as an empty directory instead of
            refusing the commit.

    Returns:
        *dest*.

    Raises:
        GitCommitMissingError: the commit cannot be fetched or is not a commit.
        StageInError: the fetch failed, the tree is unsafe (path with ``..``,
            ``.git``, ``/``), holds a submodule, exceeds *max_bytes*, or *dest*
            cannot be written. On error nothing staged is left: a *dest* we
            created is removed, a given empty one is emptied again.
    """
    # SECURITY: only a full object id pins content; a prefix or a name does not.
    if not _COMMIT_RE.fullmatch(commit):
        raise GitCommitMissingError(
            f"git: commit must be a full object id (got {cut(commit)})"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StageInError(
            f"git: cannot create cache {cut(cache_dir)}: {e.strerror}"
        ) from e
    name = hashlib.sha256(url.encode()).hexdigest()
    with _locked(cache_dir / f"{name}.lock"):
        repo = _open_mirror(cache_dir / name, url)
        target = _find_commit(repo, url, commit)
        try:
            tree = target.peel(pygit2.Tree)
        except (pygit2.GitError, KeyError) as e:
            raise StageInError(
                f"git: cannot read {commit} of {cut(url)}: {cut(e)}"
            ) from e
        created = _prepare_dest(dest)
        try:
            _export(
                repo, tree, dest, url=url, max_bytes=max_bytes, subs=allow_submodules
            )
        except BaseException:
            _discard(dest, created)
            raise
    logger.info("git: staged %s at %s into %s", url, commit, dest)
    return dest


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path* (created if needed)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StageInError(f"git: cannot lock {cut(path)}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _open_mirror(path: Path, url: str) -> pygit2.Repository:
    """Open the bare mirror at *path*, (re)creating it if missing or broken."""
    try:
        if path.exists():
            try:
                return pygit2.Repository(str(path))
            except pygit2.GitError:
                # Interrupted creation: nothing in it is needed, start over.
                logger.warning("git: recreating broken mirror %s of %s", path, url)
                shutil.rmtree(path)
        return pygit2.init_repository(str(path), bare=True)
    except (pygit2.GitError, OSError) as e:
        raise StageInError(f"git: cannot open mirror of {cut(url)}: {cut(e)}") from e


def _lookup(repo: pygit2.Repository, commit: str) -> pygit2.Object | None:
    try:
        obj: pygit2.Object | None = repo.get(commit)
    except (pygit2.GitError, ValueError):
        # e.g. a 64-hex id asked of a SHA-1 repository.
        return None
    return obj


def _find_commit(repo: pygit2.Repository, url: str, commit: str) -> pygit2.Object:
    """Return the commit object *commit*, fetching from *url* only if needed."""
    obj = _lookup(repo, commit)
    if obj is None:
        try:
            pygit2.option(Option.SET_SERVER_CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
            pygit2.option(Option.SET_SERVER_TIMEOUT, _READ_TIMEOUT_MS)
            remote = repo.remotes.create_anonymous(url)
            remote.fetch(_FETCH_REFSPECS)
        except pygit2.GitError as e:
            raise StageInError(f"git: cannot fetch {cut(url)}: {cut(e)}") from e
        obj = _lookup(repo, commit)
        if obj is None:
            try:
                # Keep it reachable in the mirror under a ref of our own.
                remote.fetch([f"+{commit}:refs/femd/pinned/{commit}"])
            except pygit2.GitError as e:
                logger.info("git: fetching %s by id from %s failed: %s", commit, url, e)
            obj = _lookup(repo, commit)
    if obj is None:
        raise GitCommitMissingError(f"git: commit {commit} not found in {cut(url)}")
    # SECURITY: compare the whole id, then the type: a tag or tree id is refused,
    # never peeled to something the signers did not name.
    if str(obj.id) != commit:
        raise GitCommitMissingError(
            f"git: object id mismatch in {cut(url)} (got {obj.id}, expected {commit})"
        )
    if obj.type != ObjectType.COMMIT:
        raise GitCommitMissingError(
            f"git: {commit} in {cut(url)} is a {obj.type_str}, not a commit"
        )
    return obj


def _prepare_dest(dest: Path) -> bool:
    """Make sure *dest* is an empty real directory; return True if we created it."""
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        try:
            st = os.lstat(dest)
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(dest) as entries:
                    empty = not any(entries)
            if not stat.S_ISDIR(st.st_mode) or not empty:
                raise StageInError(
                    f"git: destination {cut(dest)} is not an empty directory"
                )
        except OSError as e:
            raise StageInError(f"git: cannot use {cut(dest)}: {e.strerror}") from e
        return False
    except OSError as e:
        raise StageInError(f"git: cannot create {cut(dest)}: {e.strerror}") from e
    return True


def _discard(dest: Path, created: bool) -> None:
    """Remove what a failed export wrote (rmtree never follows symlinks)."""
    try:
        if created:
            shutil.rmtree(dest)
            return
        with os.scandir(dest) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
    except OSError as e:
        logger.warning("git: could not clean %s: %s", dest, e)


def _check_name(raw: bytes, where: str, url: str) -> None:
    """Refuse a tree entry name that could escape or plant git metadata."""
    # SECURITY: git trees are attacker-controlled bytes; a crafted tree can hold
    # "..", "a/b", ".git" or NUL names that git itself would never write.
    if (
        raw in (b"", b".", b"..")
        or b"/" in raw
        or b"\0" in raw
        or raw.lower() == b".git"
    ):
        raise StageInError(f"git: unsafe path {cut(where)} in {cut(url)}")


class _Export:
    """State of one tree export: the byte budget and the source of blobs."""

    def __init__(
        self, repo: pygit2.Repository, url: str, max_bytes: int, subs: bool
    ) -> None:
        self.repo = repo
        self.url = url
        self.left = max_bytes
        self.max_bytes = max_bytes
        self.subs = subs

    def blob(self, oid: pygit2.Oid, where: str) -> bytes:
        odb = self.repo.odb
        kind, size = odb.read_header(oid)
        if kind != ObjectType.BLOB:
            raise StageInError(f"git: {cut(where)} in {cut(self.url)} is not a blob")
        # Check the size from the header before inflating the content.
        self.left -= size
        if self.left < 0:
            raise StageInError(
                f"git: tree of {cut(self.url)} exceeds {self.max_bytes} bytes"
                f" (at {cut(where)})"
            )
        return odb.read(oid)[1]

    def tree(self, tree: pygit2.Tree, dir_fd: int, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise StageInError(f"git: tree of {cut(self.url)} nests too deeply")
        for entry in tree:
            raw = entry.raw_name or b""
            where = prefix + raw.decode("utf-8", "replace")
            _check_name(raw, where, self.url)
            mode = entry.filemode
            if mode == FileMode.TREE:
                sub = self.repo.get(entry.id)
                if not isinstance(sub, pygit2.Tree):
                    raise StageInError(f"git: {cut(where)} is not a tree")
                os.mkdir(raw, 0o755, dir_fd=dir_fd)
                fd = os.open(raw, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self.tree(sub, fd, where + "/", depth + 1)
                finally:
                    os.close(fd)
            elif mode == FileMode.LINK:
                target = self.blob(entry.id, where)
                if not target or b"\0" in target:
                    raise StageInError(
                        f"git: bad symlink {cut(where)} in {cut(self.url)}"
                    )
                # Written as a link, never followed (we never open through it).
                os.symlink(target, raw, dir_fd=dir_fd)
            elif mode == FileMode.COMMIT:
                if not self.subs:
                    raise StageInError(
                        f"git: submodule {cut(where)} in {cut(self.url)} not allowed"
                    )
                logger.info("git: submodule %s left empty (%s)", where, entry.id)
                os.mkdir(raw, 0o755, dir_fd=dir_fd)
            elif stat.S_ISREG(mode):
                self.file(raw, entry.id, where, mode, dir_fd)
            else:
                raise StageInError(
                    f"git: {cut(where)} in {cut(self.url)} has mode {mode:o}"
                )

    def file(
        self, raw: bytes, oid: pygit2.Oid, where: str, mode: int, dir_fd: int
    ) -> None:
        data = self.blob(oid, where)
        perm = 0o755 if mode & 0o111 else 0o644
        fd = os.open(raw, _FILE_FLAGS, perm, dir_fd=dir_fd)
        try:
            os.fchmod(fd, perm)  # independent of the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def _export(
    repo: pygit2.Repository,
    tree: pygit2.Tree,
    dest: Path,
    *,
    url: str,
    max_bytes: int,
    subs: bool,
) -> None:
    try:
        root = os.open(dest, _DIR_FLAGS)
        try:
            _Export(repo, url, max_bytes, subs).tree(tree, root, "", 0)
        finally:
            os.close(root)
    except FileExistsError as e:
        # A crafted tree can list the same name twice.
        raise StageInError(
            f"git: duplicate path {cut(os.fsdecode(e.filename or ''))} in {cut(url)}"
        ) from e
    except OSError as e:
        raise StageInError(f"git: cannot write {cut(dest)}: {cut(e)}") from e
    except (pygit2.GitError, KeyError) as e:
        raise StageInError(f"git: cannot read tree of {cut(url)}: {cut(e)}") from e


def source_subdir(dest: Path, path: str) -> Path:
    """Return the directory *path* (the manifest's ``source.path``) inside *dest*.

    Raises:
        StageInError: *path* is absolute, has a ``..`` segment, does not exist,
            is not a directory, or resolves (through a symlink) outside *dest*.
    """
    parts = Path(path).parts
    if not path or path.startswith("/") or ".." in parts or "\0" in path:
        raise StageInError(
            f"git: source path must be relative without '..' (got {cut(path)})"
        )
    try:
        root = dest.resolve(strict=True)
        resolved = (root / path).resolve(strict=True)
    except OSError as e:
        raise StageInError(
            f"git: source path {cut(path)} not found: {e.strerror}"
        ) from e
    # SECURITY: a committed symlink may point anywhere; the result must stay inside.
    if not resolved.is_relative_to(root):
        raise StageInError(f"git: source path {cut(path)} escapes the repository")
    if not resolved.is_dir():
        raise StageInError(f"git: source path {cut(path)} is not a directory")
    return resolved


def _resolve(
    what: str, name: str, root: str, error: type[StageInError], *, dir_only: bool
) -> Path:
    """Resolve a steward-named host path once; see ``resolve_dataset``."""
    if not os.path.isabs(root):
        raise error(f"{what} {cut(name)}: path must be absolute (got {cut(root)})")
    try:
        resolved = Path(os.path.realpath(root, strict=True))
        st = os.stat(resolved)
    except OSError as e:
        raise error(f"{what} {cut(name)}: {cut(root)} is missing ({e.strerror})") from e
    if not stat.S_ISDIR(st.st_mode) and (dir_only or not stat.S_ISREG(st.st_mode)):
        raise error(
            f"{what} {cut(name)}: {cut(root)} is not a directory or regular file"
        )
    # SECURITY: never mount the host root or a kernel pseudo-filesystem.
    if resolved == Path("/") or any(
        resolved.is_relative_to(p) for p in _FORBIDDEN_ROOTS
    ):
        raise error(
            f"{what} {cut(name)}: {cut(root)} resolves to {cut(resolved)}, not allowed"
        )
    if str(resolved) != root.rstrip("/"):
        logger.info("%s %s: %s resolves to %s", what, name, root, resolved)
    return resolved


def resolve_dataset(name: str, root: str) -> Path:
    """Return the real host path of dataset *name*, configured at *root*.

    *root* is the data steward's policy path. Every symlink in it is resolved
    once, here, and the launcher mounts the result, so what is mounted is what
    was checked. Symlinks the steward placed are trusted (the policy file is
    theirs); the only fences are that the path exists, is a directory or a
    regular file, and does not resolve to ``/`` or into the kernel's ``/proc``,
    ``/sys`` or ``/dev`` (a typo or a hostile link there would expose the host,
    not data).

    Raises:
        DatasetMissingError: *root* is relative, missing, of another file type,
            or resolves to a forbidden place.
    """
    return _resolve("dataset", name, root, DatasetMissingError, dir_only=False)


def resolve_runtime(name: str, root: str) -> Path:
    """Return the real host path of runtime *name*, a directory at *root*.

    Same fences as ``resolve_dataset``; a runtime is always a directory.

    Raises:
        RuntimeMissingError: *root* is relative, missing, not a directory, or
            resolves to a forbidden place.
    """
    return _resolve("runtime", name, root, RuntimeMissingError, dir_only=True)
