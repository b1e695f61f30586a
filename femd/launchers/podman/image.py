"""Podman images pinned by digest: stage-in (local or pulled) and verification.

Owns ``ensure_image`` (present locally, else pulled with the profile's
credentials, only under the profile's signature policy) and
``verify_image_digest``. Does not run containers.
"""

from __future__ import annotations

import base64
import json
import logging
import pwd
import re
from pathlib import Path
from typing import Any, Final

from podman import PodmanClient
from podman.errors import ImageNotFound

from femd.errors import ImageDigestMismatchError, StageInError, cut
from femd.launchers.podman.client import FOREIGN, connect
from femd.launchers.profile import PodmanSettings

__all__ = ["ensure_image", "parse_ref", "verify_image_digest"]

logger = logging.getLogger(__name__)

_REF: Final = re.compile(r"(?P<repo>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})")


def parse_ref(ref: str) -> tuple[str, str]:
    """(repository, digest) of a digest-pinned reference.

    Raises:
        ImageDigestMismatchError: *ref* is not pinned by digest.
    """
    m = _REF.fullmatch(ref)
    if m is None:
        raise ImageDigestMismatchError(
            f"image {cut(ref)}: not pinned by digest (expected <repo>@sha256:<64 hex>)"
        )
    return m["repo"], m["digest"]


def verify_image_digest(attrs: dict[str, Any], ref: str) -> None:
    """Check that an image (its inspect data) has the digest *ref* pins.

    Raises:
        ImageDigestMismatchError: *ref* is unpinned or the digest differs.
    """
    _, digest = parse_ref(ref)
    have = {str(attrs.get("Digest") or "")}
    have |= {str(d).partition("@")[2] for d in attrs.get("RepoDigests") or ()}
    have.discard("")
    # SECURITY: the pinned digest is the task's identity of the code that runs.
    if digest not in have:
        got = ", ".join(sorted(have)) or "none"
        raise ImageDigestMismatchError(
            f"image {cut(ref)}: digest mismatch (got {cut(got)}, expected {digest})"
        )


def _registry(repo: str) -> str:
    first = repo.split("/", 1)[0]
    has_host = "/" in repo and ("." in first or ":" in first or first == "localhost")
    return first if has_host else "docker.io"


def _auth_config(auth_file: str | None, repo: str) -> dict[str, str] | None:
    """Credentials for *repo*'s registry from a containers-auth.json file.

    Raises:
        StageInError: the file cannot be read or is not valid auth JSON.
    """
    if auth_file is None:
        return None
    try:
        auths = json.loads(Path(auth_file).read_text(encoding="utf-8"))["auths"]
        entry = auths.get(_registry(repo)) or auths.get(f"https://{_registry(repo)}")
        if not entry:
            return None
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # binascii.Error (bad base64) is a ValueError.
        raise StageInError(f"auth file {cut(auth_file)}: unusable: {cut(e)}") from e
    return {"username": user, "password": password}


def ensure_image(url: str, ref: str, settings: PodmanSettings) -> str:
    """Make the image pinned by *ref* present locally; return its image id.

    Uses the local image if podman has one with that digest, else pulls
    ``repo@digest`` (credentials from the ``auth_file`` of *settings*, the
    task's profile), then checks the digest of what podman stored.

    Raises:
        ImageDigestMismatchError: *ref* is unpinned or the digest differs.
        StageInError: the pull failed or the signature policy cannot be
            verified.
    """
    repo, _ = parse_ref(ref)
    try:
        with connect(url) as client:
            try:
                image = client.images.get(ref)
            except ImageNotFound:
                _check_signature_policy(client, settings)
                logger.info("pulling %s", ref)
                auth = _auth_config(settings.auth_file, repo)
                client.images.pull(ref, auth_config=auth, policy="always")
                image = client.images.get(ref)
            attrs = dict(image.attrs)
    except FOREIGN as e:
        raise StageInError(f"image {cut(ref)}: cannot stage in: {cut(e, 160)}") from e
    verify_image_digest(attrs, ref)
    return str(attrs["Id"])


def _check_signature_policy(client: PodmanClient, settings: PodmanSettings) -> None:
    """Refuse to pull unless the service applies the profile's policy.json.

    The libpod pull endpoint takes no policy path: the service applies its
    user's ``~/.config/containers/policy.json``, else
    ``/etc/containers/policy.json``. So the profile's file must have the
    same bytes as that one.

    Raises:
        StageInError: the files differ or cannot be read.
    """
    if settings.signature_policy is None:
        return
    try:
        want = Path(settings.signature_policy).read_bytes()
        info = client.info()  # type: ignore[no-untyped-call]
        uid = int(info["host"]["idMappings"]["uidmap"][0]["host_id"])
        own = Path(pwd.getpwuid(uid).pw_dir) / ".config/containers/policy.json"
        used = own if own.exists() else Path("/etc/containers/policy.json")
        same = used.read_bytes() == want
    except FOREIGN as e:
        raise StageInError(f"signature policy: cannot verify: {cut(e)}") from e
    if not same:
        raise StageInError(
            f"signature policy: the podman service uses {used}, not "
            f"{settings.signature_policy}; install it there before pulling"
        )
