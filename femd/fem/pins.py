"""Pins: a FEM image reference and source_code, as femd's digest and commit.

Owns ``pin_image()`` (``label``, ``url``, ``repository`` + ``name`` + ``tag``
and ``hash`` reconciled: refused only where they disagree; a tag is never a
pin) and ``pin_source()`` (``url`` with `` --branch X``, gen-1 ``commit_hash``
and ``--commit``: a branch is never a pin).
"""

from __future__ import annotations

import re
import shlex
from typing import Final

from femd.errors import cut
from femd.fem.documents import FemTemplate
from femd.fem.options import FemOptions, Refusal

__all__ = ["pin_image", "pin_source"]

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_COMMIT: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def pin_image(t: FemTemplate, o: FemOptions, notes: list[str]) -> str | None:
    """The template's image pinned by digest, or None for the process launcher.

    Raises:
        Refusal: no image, references that disagree, no digest.
    """
    img = t.image
    if o.launcher == "process":
        if o.image_digest is not None:
            raise Refusal("--image-digest: the process launcher runs no image")
        if img is not None and (img.label or img.name or img.url):
            notes.append(
                "image: not used by the process launcher (the code runs from "
                "source_code with the runtime the policy names)"
            )
        return None
    if img is None:
        raise Refusal("image: the FEM template has none", "--launcher process")
    refs: dict[str, str] = {}
    for what, ref in (
        ("image.label", img.label),
        ("image.url", img.url),
        (
            "image.repository+name",
            f"{img.repository.rstrip('/')}/{img.name}"
            if img.repository and img.name
            else img.name,
        ),
    ):
        if ref:
            refs[what] = ref
    if not refs:
        raise Refusal("image: neither `label`, `url` nor `name` is given")
    repos: dict[str, str] = {}
    tags: dict[str, str] = {"image.tag": img.tag} if img.tag else {}
    digests: dict[str, str] = {}
    for what, ref in refs.items():
        repo, _, digest = ref.partition("@")
        if digest:
            digests[what] = digest
        slash, colon = repo.rfind("/"), repo.rfind(":")
        if colon > slash:
            repo, tags[what] = repo[:colon], repo[colon + 1 :]
        repos[what] = repo
    fem_hash = (img.hash or "").strip().lower()
    if _HEX64.fullmatch(fem_hash):
        fem_hash = "sha256:" + fem_hash
    if _DIGEST.fullmatch(fem_hash):  # anything else is FEM's placeholder: unset
        digests["image.hash"] = fem_hash
    if o.image_digest is not None:
        digests["--image-digest"] = o.image_digest
    for field, found in (("repositories", repos), ("tags", tags), ("digests", digests)):
        if len(set(found.values())) > 1:
            shown = ", ".join(f"{k} {cut(v, 60)}" for k, v in found.items())
            raise Refusal(f"image: the {field} differ ({shown})")
    repo = next(iter(repos.values()))
    if not digests:
        tag = next(iter(tags.values()), None)
        what = f"{repo}:{tag} is a tag, not a pin" if tag else f"{repo} has no digest"
        raise Refusal(f"image: {cut(what)}", "--image-digest sha256:...")
    digest = next(iter(digests.values()))
    if not _DIGEST.fullmatch(digest):
        raise Refusal(f"image: {cut(digest)!r} is not a sha256:<64 hex> digest")
    return f"{repo}@{digest}"


def pin_source(t: FemTemplate, o: FemOptions) -> dict[str, str] | None:
    """The template's ``source_code`` as a femd ``source`` pinned to a commit.

    Raises:
        Refusal: a URL femd cannot fetch, a branch or no commit, commits that differ.
    """
    src = t.source_code
    url_text = (src.url or "").strip() if src else ""
    fem_commit = (src.commit_hash or "").strip().lower() if src else ""
    if not url_text:
        if o.commit is not None or fem_commit:
            raise Refusal("source_code: a commit without a url")
        return None
    try:
        words = shlex.split(url_text)
    except ValueError as e:
        raise Refusal(f"source_code.url: {str(e).lower()}") from e
    url, branch, rest = words[0], None, words[1:]
    while rest:
        opt = rest.pop(0)
        if opt in ("--branch", "-b") and rest:
            branch = rest.pop(0)
        elif opt.startswith("--branch="):
            branch = opt.partition("=")[2]
        else:
            raise Refusal(
                f"source_code.url: git option {cut(opt)!r} refused "
                "(only --branch is understood)"
            )
    if not re.match(r"(?:https|ssh|git|file)://", url):
        raise Refusal(
            f"source_code.url: {cut(url)!r} is not an https, ssh, git or file URL"
        )
    commits: dict[str, str] = {}
    if fem_commit:
        if not _COMMIT.fullmatch(fem_commit):
            raise Refusal(
                f"source_code.commit_hash {cut(fem_commit)!r} is not a full commit "
                "id (40 or 64 hex)",
                "--commit SHA",
            )
        commits["source_code.commit_hash"] = fem_commit
    if o.commit is not None:
        if not _COMMIT.fullmatch(o.commit):
            raise Refusal(
                f"--commit: {cut(o.commit)!r} is not a full commit id "
                "(40 or 64 lowercase hex)"
            )
        commits["--commit"] = o.commit
    if len(set(commits.values())) > 1:
        raise Refusal("source_code: --commit differs from source_code.commit_hash")
    if not commits:
        why = (
            f"`--branch {cut(branch, 40)}` is a moving ref, not a pin"
            if branch
            else "no commit_hash"
        )
        raise Refusal(f"source_code.url: {why}", "--commit SHA (a full commit id)")
    return {"git": url, "commit": next(iter(commits.values())), "path": "."}
