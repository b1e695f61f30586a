"""One admission path: the trust kernel, then what this host can run. Pure.

Owns ``Host`` (the launcher profiles and probed capabilities admission needs)
and ``admit_here()``, which ``femd check`` and the agent both call, so the
dry run and the node cannot disagree; ``decide_here()`` is its decision on a
verified manifest, which a policy reload applies again to queued tasks
(``readmission``). The trust kernel (signatures, policy rules) is
``decision.admit()``; this adds the launch-spec checks that used to run only
in the agent or only at launch: the profile exists and has the launcher's
section, the launcher is configured here, every limit is enforceable
(``launcher.unenforceable``) and no mount target is one the sandbox keeps
(``mount.reserved``). No I/O: the capabilities are probed by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec

from femd.decision import Decision, Reason, Rule, Verdict, admit, evaluate
from femd.envelope import MAX_ENVELOPE_BYTES, SignatureCheck
from femd.errors import ConfigError, cut
from femd.launchers import (
    Capabilities,
    LauncherProfile,
    profile_type,
    registration,
    unenforceable,
)
from femd.launchspec import build_spec
from femd.manifest import Manifest, Task
from femd.policy import LoadedPolicy

__all__ = [
    "DEFAULT_WORK_ROOT",
    "Host",
    "HostReport",
    "ProbedLauncher",
    "admit_here",
    "decide_here",
    "decode_host",
    "host_report",
    "launch_reasons",
]


# Where the packaged unit keeps work dirs; only the spec's paths use it.
DEFAULT_WORK_ROOT: Final = Path("/var/lib/femd/work")


@dataclass(frozen=True)
class Host:
    """What admission knows of this host's launchers.

    ``caps`` maps (profile, launcher) to what the launcher's probe found;
    ``work_root`` is where tasks' work dirs go (only used to build the spec).
    """

    profiles: Mapping[str, LauncherProfile]
    caps: Mapping[tuple[str, str], Capabilities]
    work_root: Path = DEFAULT_WORK_ROOT


class ProbedLauncher(msgspec.Struct, frozen=True, kw_only=True):
    """What one launcher of one profile can enforce on the host that probed it."""

    profile: str
    capabilities: Capabilities


class HostReport(msgspec.Struct, frozen=True, kw_only=True):
    """The part of ``femd doctor --json`` that ``femd check --capabilities`` reads.

    ``profiles``: the node's launcher profiles by name, as loaded;
    ``capabilities``: one entry per (profile, launcher) the profiles define.
    Other keys of the doctor's output are ignored.
    """

    profiles: dict[str, LauncherProfile]
    capabilities: list[ProbedLauncher]


class _RawReport(msgspec.Struct, frozen=True, kw_only=True):
    profiles: dict[str, msgspec.Raw]
    capabilities: list[ProbedLauncher]


def host_report(
    profiles: Mapping[str, LauncherProfile],
    caps: Mapping[tuple[str, str], Capabilities],
) -> HostReport:
    """What the doctor prints of a host's launchers (``decode_host`` reads it)."""
    return HostReport(
        profiles=dict(sorted(profiles.items())),
        capabilities=[
            ProbedLauncher(profile=p, capabilities=c)
            for (p, _), c in sorted(caps.items())
        ],
    )


def decode_host(data: bytes, work_root: Path = DEFAULT_WORK_ROOT) -> Host:
    """Read a ``HostReport`` (e.g. ``femd doctor --json``'s output).

    Raises:
        ConfigError: not such a document.
    """
    # The profiles hold every registered launcher's section: each is decoded
    # with the registry's profile type, not the bare one HostReport names.
    try:
        raw = msgspec.json.decode(data, type=_RawReport)
        kind = profile_type()
        profiles = {
            n: msgspec.json.decode(p, type=kind) for n, p in raw.profiles.items()
        }
    except msgspec.DecodeError as e:
        raise ConfigError(f"capabilities: {cut(e, 200)}") from e
    report = HostReport(profiles=profiles, capabilities=raw.capabilities)
    caps = {
        (e.profile, e.capabilities.launcher): e.capabilities
        for e in report.capabilities
    }
    return Host(report.profiles, caps, work_root)


def _unenforceable(text: str) -> list[Reason]:
    return [Reason(Rule.LAUNCHER_UNENFORCEABLE, text)]


def launch_reasons(task: Task, policy: LoadedPolicy, host: Host) -> list[Reason]:
    """Reasons this host cannot run *task* as the policy demands (fail closed).

    Checked with the launchers' probed capabilities before anything is
    staged. Inputs, code and runtime get placeholder host paths: only their
    in-sandbox targets matter here.
    """
    if task.project not in policy.policy.projects:
        return []
    profile = host.profiles.get(task.profile)
    if profile is None:
        return _unenforceable(
            f"launcher profile {task.profile!r} does not exist on this node"
        )
    if profile.section(task.launcher) is None:
        return _unenforceable(
            f"profile {profile.name!r} has no {task.launcher} section"
        )
    cap = host.caps.get((task.profile, task.launcher))
    if cap is None:
        return _unenforceable(
            f"launcher {task.launcher} is not configured on this node"
        )
    work = host.work_root / task.id
    spec = build_spec(
        task,
        policy,
        profile,
        work_dir=work,
        code_dir=work / "src" if task.source is not None else None,
        inputs={i.mount: work / "inputs" / i.dataset for i in task.inputs},
        runtime_dir=work / "runtime" if task.runtime is not None else None,
    )
    # The launcher's own checks of the spec (reserved targets...), as at launch.
    return unenforceable(spec, cap) + registration(task.launcher).spec_reasons(spec)


def decide_here(
    manifest: Manifest,
    check: SignatureCheck,
    policy: LoadedPolicy,
    *,
    node: str,
    now: datetime,
    skew_s: float = 300,
    host: Host | None,
) -> Decision:
    """Decide on a verified manifest as admission does.

    Every policy rule, then (given *host*) the launch checks, once the
    policy allows it.

    ``admit_here()`` calls it after verifying the envelope; a reload decides
    queued tasks again with it (``readmission``), so both decide alike.
    """
    decision = evaluate(manifest, check, policy, node=node, now=now, skew_s=skew_s)
    return _launch_checked(decision, manifest, policy, host)


def _launch_checked(
    decision: Decision, manifest: Manifest, policy: LoadedPolicy, host: Host | None
) -> Decision:
    """*decision* with the launch checks' reasons, once the policy allows."""
    if host is None or not isinstance(manifest, Task) or not decision.allowed:
        return decision
    return Decision(decision.reasons + tuple(launch_reasons(manifest, policy, host)))


def admit_here(
    data: bytes,
    policy: LoadedPolicy,
    *,
    node: str,
    now: datetime,
    skew_s: float = 300,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    host: Host | None,
) -> Verdict:
    """Verify, decide, and (given *host*) check that this host can run the task.

    The verdict's decision holds every reason. With *host* None only the
    trust kernel runs (``femd check`` without capabilities says so). The
    launch checks run once the policy allows the task, as the node does.

    Raises:
        EnvelopeError: the envelope is malformed.
        ManifestError: a trusted key signed a malformed manifest.
    """
    verdict = admit(
        data, policy, node=node, now=now, skew_s=skew_s, max_bytes=max_bytes
    )
    if verdict.manifest is None:
        return verdict
    decision = _launch_checked(verdict.decision, verdict.manifest, policy, host)
    return msgspec.structs.replace(verdict, decision=decision)
