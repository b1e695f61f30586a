"""Tasks admitted but not started, decided again under a reloaded policy.

A policy reload (SIGHUP) may revoke a signer, drop a project, narrow images or
limits, or change the launcher profiles. A task that is queued has not run
anything yet: it must meet the policy and the host in force when it would
start, not only the ones it was admitted under. ``decide_again()`` decides a
recorded task afresh through admission's own decision (``decide_here``: every
policy rule, then the launch checks against the reloaded profiles and probed
capabilities), pure like it: the signatures were verified at admission, and
only the keys that counted then (the recorded ``signer_keyids``) may count
now, if the new policy still trusts them. The agent ends the denied ones
``rejected`` with the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from femd.admission import Host, decide_here
from femd.decision import Decision
from femd.envelope import SignatureCheck
from femd.manifest import Manifest
from femd.policy import LoadedPolicy

__all__ = ["decide_again"]


def decide_again(
    manifest: Manifest,
    signer_keyids: Sequence[str],
    policy: LoadedPolicy,
    *,
    node: str,
    now: datetime,
    skew_s: float,
    host: Host,
) -> Decision:
    """Return admission's decision, now and on *host*, on a task admitted earlier."""
    # SECURITY: a key the new policy does not know no longer counts at all;
    # one it revoked or let expire is reported by evaluate().
    valid = frozenset(k for k in signer_keyids if k in policy.keys)
    check = SignatureCheck(valid=valid)
    return decide_here(
        manifest, check, policy, node=node, now=now, skew_s=skew_s, host=host
    )
