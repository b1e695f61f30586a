"""The built-in seccomp filter of the ``process`` sandbox (classic BPF).

Owns the list of refused syscalls, the filter program built from it, and the
memfd that hands the program to bwrap (``--add-seccomp-fd``). Does not build
the sandbox's command line (``sandbox`` does).
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from typing import Final

__all__ = ["seccomp_filter", "seccomp_memfd"]

# Syscalls the built-in filter refuses with EPERM, numbered (x86_64, aarch64) as
# in the kernel's unistd headers: kernel interfaces a task never needs (keyrings
# are not namespaced, ptrace and process_vm_* reach other processes, mount APIs,
# modules, kexec...), io_uring (its requests bypass this filter), and what
# containers-common's default seccomp.json denies to a container without
# capabilities (clock setting, vmsplice, page migration, obsolete calls...).
_DENY: Final[dict[str, tuple[int | None, int | None]]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116),
    "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "open_tree": (428, 428), "move_mount": (429, 429),
    "mount_setattr": (442, 442), "iopl": (172, None), "ioperm": (173, None),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "io_pgetevents": (333, 292),
    "vmsplice": (278, 75), "migrate_pages": (256, 238), "move_pages": (279, 239),
    "kcmp": (312, 272), "process_madvise": (440, 440), "lookup_dcookie": (212, 18),
    "fanotify_init": (300, 262), "clock_settime": (227, 112),
    "settimeofday": (164, 170), "sethostname": (170, 161),
    "setdomainname": (171, 162), "vhangup": (153, 58), "nfsservctl": (180, 42),
    "uselib": (134, None), "ustat": (136, None), "sysfs": (139, None),
    "_sysctl": (156, None), "create_module": (174, None),
    "get_kernel_syms": (177, None), "query_module": (178, None),
}  # fmt: skip
_ARCHES: Final = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The built-in seccomp program (classic BPF) for *machine*, or None.

    Any other ABI than the native one (i386 via ``int 0x80``, x32) is refused
    entirely, so the denied numbers cannot be reached under another numbering.
    """
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    column, audit_arch = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    nrs = sorted({nr for n in _DENY.values() if (nr := n[column]) is not None})
    # SECURITY: a foreign AUDIT_ARCH or the x32 bit would renumber the calls.
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    prog.append((jge, len(nrs) + 1, 0, 0x40000000))  # x32 ABI bit
    prog += [(jeq, len(nrs) - i, 0, nr) for i, nr in enumerate(nrs)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def seccomp_memfd() -> int | None:
    """A memfd (close-on-exec, at offset 0) holding the built-in filter, or None."""
    program = seccomp_filter()
    if program is None:
        return None
    fd = os.memfd_create("femd-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
