"""The task image for ``--launcher podman``: the host's Python, and nothing else.

Nothing can be pulled from the internet here, so the demo builds its image
locally: it runs the node analysis once on a tiny sample with the host's
``/usr/bin/python3``, collects exactly the files that run loaded (the standard
library modules, their C extensions and the shared libraries ``ldd`` names),
packs them as a root filesystem and ``podman import``s it as the rootless
podman user. femd then runs it by digest, like any pinned image.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from demo.cohort import COLUMNS

if TYPE_CHECKING:
    from testbed.podman import PodmanService

__all__ = ["build_python_image", "python_rootfs"]

PYTHON: Final = Path("/usr/bin/python3")
ANALYSIS: Final = Path(__file__).resolve().parent / "node_analysis.py"
# Run the analysis on a sample, then list every file the interpreter loaded.
_PROBE: Final = """
import runpy, sys
sys.argv = ["node_analysis.py", *sys.argv[2:]]
try:
    runpy.run_path(sys.argv_script, run_name="__main__")
except SystemExit:
    pass
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f:
        print(f, file=sys.stderr)
"""
_MERGED_USR: Final = (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"))


def _loaded_files(tmp: Path) -> set[Path]:
    """Files the host Python loads to run the analysis on a two-row sample."""
    data = tmp / "data"
    data.mkdir()
    with (data / "sample.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        out.writerows([(70, 1, 35, 900.0, 1), (60, 0, 50, 300.0, 0)])
    probe = _PROBE.replace("sys.argv_script", repr(str(ANALYSIS)))
    done = subprocess.run(  # noqa: S603 (the host's python, our own probe)
        [str(PYTHON), "-I", "-B", "-c", probe, "x", "--data", str(data), "--out",
         str(tmp), "--weights", "0,0,0,0,0"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    files = {Path(line) for line in done.stderr.splitlines() if line.startswith("/")}
    stdlib = Path(os.path.realpath(PYTHON)).parent.parent / "lib"
    keep = {f for f in files if f.is_relative_to(stdlib) and "-packages" not in str(f)}
    encodings = next(f.parent for f in keep if f.parent.name == "encodings")
    keep |= {p for p in encodings.iterdir() if p.suffix == ".py"}
    return keep


def _shared_libraries(binaries: set[Path]) -> set[Path]:
    """The shared libraries (and the loader) the binaries need, per ``ldd``."""
    libs: set[Path] = set()
    for binary in sorted(binaries):
        done = subprocess.run(  # noqa: S603 (fixed tool)
            ["/usr/bin/ldd", str(binary)],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in done.stdout.splitlines():
            words = [w for w in line.split() if w.startswith("/")]
            libs |= {Path(w) for w in words}
    return libs


def python_rootfs() -> bytes:
    """A deterministic tar of a minimal root filesystem that runs the analysis."""
    with tempfile.TemporaryDirectory() as tmp:
        modules = _loaded_files(Path(tmp))
    python = Path(os.path.realpath(PYTHON))
    extensions = {m for m in modules if m.suffix == ".so"}
    files = modules | {python} | _shared_libraries({python, *extensions})
    files.add(Path("/etc/ld.so.cache"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str, kind: bytes, mode: int, data: bytes = b"", link: str = ""
        ) -> None:
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 0
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        dirs: set[str] = {"usr/bin", "usr/lib", "usr/lib64", "tmp", "etc", "out"}
        placed = {Path(os.path.realpath(f.parent)) / f.name: f for f in files}
        for path in placed:
            parts = path.parent.relative_to("/").parts
            dirs |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
        for d in sorted(dirs):
            add(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
        for link, target in _MERGED_USR:
            add(link, tarfile.SYMTYPE, 0o777, link=target)
        for path, source in sorted(placed.items()):
            add(
                str(path),
                tarfile.REGTYPE,
                0o755,
                Path(os.path.realpath(source)).read_bytes(),
            )
        add("usr/bin/python3", tarfile.SYMTYPE, 0o777, link=python.name)
    return buf.getvalue()


def build_python_image(service: PodmanService, repo: str) -> str:
    """Import the image as the podman user; return ``repo@sha256:<digest>``.

    Raises:
        PodmanServiceError: the import failed.
    """
    tag = f"{repo}:demo"
    service.podman(
        ["import", "--change", 'CMD ["/usr/bin/python3"]', "-", tag],
        stdin=python_rootfs(),
    )
    out = service.podman(["image", "inspect", "--format", "{{.Digest}}", tag])
    return f"{repo}@{out.stdout.decode().strip()}"
