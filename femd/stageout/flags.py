"""How stage-out opens names: relative to opened directories, never via a link.

Owns the ``open(2)`` flags and the copy buffer size that packing, reassembly
and unpacking share; nothing else.
"""

import os
from typing import Final

__all__ = ["COPY_BYTES", "CREATE_FLAGS", "DIR_FLAGS", "READ_FLAGS"]

COPY_BYTES: Final = 1024 * 1024
DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)
