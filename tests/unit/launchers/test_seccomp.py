"""The process launcher's syscall table, checked against libseccomp's.

libseccomp (Debian's python3-seccomp; scripts/install.sh lets the venv see
it) knows every syscall number of every architecture: a typo in femd's table
would deny the wrong call and leave the intended one open.
"""

from __future__ import annotations

import seccomp

from femd.launchers.process.seccomp import _DENY, seccomp_filter

ARCHES = (seccomp.Arch.X86_64, seccomp.Arch.AARCH64)


def test_every_denied_number_is_libseccomps() -> None:
    for name, numbers in _DENY.items():
        for arch, nr in zip(ARCHES, numbers, strict=True):
            known = seccomp.resolve_syscall(arch, name)
            # libseccomp gives a negative pseudo-number where the arch has none.
            assert (known if known >= 0 else None) == nr, (name, arch, known, nr)


def test_io_uring_and_podmans_unconditional_denials_are_denied() -> None:
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert name in _DENY
    # containers-common's seccomp.json: refused to every container.
    podman = {"kexec_file_load", "kexec_load", "migrate_pages", "move_pages",
              "nfsservctl", "swapoff", "swapon", "sysfs", "uselib", "userfaultfd",
              "ustat", "vmsplice", "io_pgetevents"}  # fmt: skip
    assert podman <= set(_DENY)


def test_filter_exists_for_both_arches() -> None:
    for machine in ("x86_64", "aarch64"):
        program = seccomp_filter(machine)
        assert program is not None
        assert len(program) % 8 == 0
    assert seccomp_filter("sparc") is None
