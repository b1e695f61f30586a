"""``femd doctor``'s trial of the podman launcher: a one-file image, catatonit.

Owns the doctor's image (Podman's own container init, ``catatonit``, imported
once as a local, content-addressed image: nothing is pulled) and the launcher
the trivial task runs with (``TrialPodmanLauncher``: on a host where podman
cannot enforce memory or cpu, the trivial task runs without them and says so;
every real task is still refused). Registered as the podman launcher's
``trial`` in ``femd.launchers.registry``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Final

from femd.errors import LaunchError, cut
from femd.launchers import LauncherEnv, LauncherProfile, Trial
from femd.launchers.podman.client import call, connect, service_url
from femd.launchers.podman.launcher import TrialPodmanLauncher

__all__ = ["CATATONIT", "DOCTOR_IMAGE_REPO", "doctor_image", "doctor_trial"]

DOCTOR_IMAGE_REPO: Final = "localhost/femd-doctor/catatonit"
CATATONIT: Final = Path("/usr/bin/catatonit")


def doctor_trial(profile: LauncherProfile, env: LauncherEnv) -> Trial:
    """``catatonit -V`` in the doctor's image, with the trial launcher.

    Raises:
        FemdError: catatonit is missing or podman refused the import.
    """
    image = doctor_image(service_url(str(getattr(env.config, "socket", None) or "")))
    return Trial(TrialPodmanLauncher(profile, env), ("/catatonit", "-V"), image)


def doctor_image(url: str) -> str:
    """Import the doctor's one-file image (catatonit) once; return repo@digest.

    *url*: the podman service (``client.service_url``).

    Raises:
        FemdError: catatonit is missing or podman refused the import.
    """
    try:
        data = CATATONIT.read_bytes()
    except OSError as e:
        raise LaunchError(
            f"{CATATONIT}: {e.strerror} (Podman's container init is missing)"
        ) from e
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("catatonit")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    tag = f"{DOCTOR_IMAGE_REPO}:{hashlib.sha256(buf.getvalue()).hexdigest()[:32]}"

    def imported() -> str:
        with connect(url) as client:
            if not client.images.exists(tag):
                reply = client.api.post(
                    "/images/import",
                    params={"reference": tag},
                    data=buf.getvalue(),
                    headers={"content-type": "application/x-tar"},
                )
                if reply.status_code >= 300:
                    raise LaunchError(f"import: {cut(reply.text.strip(), 160)}")
            return str(client.images.get(tag).attrs.get("Digest") or "")

    digest = call("cannot import the doctor image", imported)
    return f"{DOCTOR_IMAGE_REPO}@{digest}"
