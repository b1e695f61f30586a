"""``femd doctor``: prove, by doing, that this node can work.

Owns the checks an operator runs before the first task (and after every
change): per launcher profile a trivial *real* task through the launcher's own
``launch()`` (so a missing container init, a broken subordinate id map or a
seccomp refusal shows up with its cause: ``trial``), the broker (a real TLS
handshake with the configured files, the certificate's CN against ``node``,
its expiry: ``broker``), the policy (lint), the state directory (writable,
free space) and the clock (``host``).

Each check is a ``Check`` (ok / warn / fail, one line, an optional fix and
details); ``render()`` prints them for people, ``to_json()`` for machines
(``report``). Does not change the node: the trivial tasks' work dirs are
removed, and the doctor's podman image is a local, content-addressed copy of
the catatonit binary the package depends on.
"""

from femd.doctor.broker import CertificateInfo, certificate_info, check_broker
from femd.doctor.host import check_clock, check_policy, check_state_dir
from femd.doctor.report import Check, exit_code, render, to_json
from femd.doctor.trial import check_launcher, enforces_all

__all__ = [
    "CertificateInfo",
    "Check",
    "certificate_info",
    "check_broker",
    "check_clock",
    "check_launcher",
    "check_policy",
    "check_state_dir",
    "enforces_all",
    "exit_code",
    "render",
    "to_json",
]
