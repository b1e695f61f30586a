"""Stage-out: a task's output directory as one bounded, checksummed archive.

Owns packing (node side, ``pack``), chunking and reassembly (``chunks``) and
safe unpacking (``femd watch`` side, ``unpack``). The output directory was
writable by an untrusted task, so packing never follows a link: every name is
opened relative to an already opened directory with ``O_NOFOLLOW`` and checked
with ``lstat``/``fstat``, and anything but plain directories and single-link
regular files is refused (DESIGN "Launchers": one writable output dir). Sizes
are checked from metadata before a byte is read. The archive is a
deterministic tar.gz, so the same outputs always have the same SHA-256. Does
not publish chunks (the broker module does) nor decide the limits (the policy
does).
"""

from femd.stageout.chunks import (
    CHUNK_BYTES,
    Reassembler,
    chunk_count,
    iter_chunks,
    verify_file,
)
from femd.stageout.pack import ARCHIVE_SLACK_BYTES, Packed, is_empty, pack_outputs
from femd.stageout.unpack import unpack_outputs

__all__ = [
    "ARCHIVE_SLACK_BYTES",
    "CHUNK_BYTES",
    "Packed",
    "Reassembler",
    "chunk_count",
    "is_empty",
    "iter_chunks",
    "pack_outputs",
    "unpack_outputs",
    "verify_file",
]
