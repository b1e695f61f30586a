"""``femd doctor``: prove, by doing, that this node can work.

Owns the checks an operator runs before the first task (and after every
change): per launcher profile a trivial *real* task through the launcher's own
``launch()`` (so a missing container init, a broken subordinate id map or a
seccomp refusal shows up with its cause), the broker (a real TLS handshake with
the configured files, the certificate's CN against ``node``, its expiry), the
policy (lint), the state directory (writable, free space) and the clock.

Each check is a ``Check`` (ok / warn / fail, one line, an optional fix and
details); ``render()`` prints them for people, ``to_json()`` for machines.
Does not change the node: the trivial tasks' work dirs are removed, and the
doctor's podman image is a local, content-addressed copy of the catatonit
binary the package depends on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import secrets
import shutil
import socket
import ssl
import tarfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from femd.admission import HostReport
from femd.errors import FemdError, cut
from femd.launchers import Capabilities, Launcher, LaunchSpec, Limits
from femd.launchers.profile import LauncherProfile

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
    "trial_launcher",
]

Status = Literal["ok", "warn", "fail"]

CERT_WARN_DAYS: Final = 30
FREE_WARN_BYTES: Final = 1 << 30
FREE_FAIL_BYTES: Final = 100 << 20
TRIAL_TIMEOUT_S: Final = 60
DOCTOR_IMAGE_REPO: Final = "localhost/femd-doctor/catatonit"
CATATONIT: Final = Path("/usr/bin/catatonit")
# What a failed trivial task's error means, and what fixes it (first match).
_HINTS: Final = (
    (
        ("container-init", "catatonit"),
        "Podman's container init is missing: apt-get install catatonit",
    ),
    (
        ("subuid", "subgid", "newuidmap", "newgidmap", "uid_map", "gid_map"),
        "the podman user's subordinate ids are broken: check its lines in "
        "/etc/subuid and /etc/subgid (run /usr/share/femd/setup-podman-user.sh)",
    ),
    (
        ("session key", "keyctl"),
        "the kernel keyring is refused here (a container or seccomp filter "
        "blocks keyctl): allow keyctl, or set `keyring = false` under "
        "[containers] in femd-podman's containers.conf",
    ),
    (
        ("seccomp", "operation not permitted"),
        "a seccomp or security filter refused a system call the sandbox needs: "
        "check the profile's seccomp setting and the unit's SystemCallFilter",
    ),
    (
        ("no such file or directory", "not installed"),
        "a program the launcher needs is missing: run scripts/install.sh, or "
        "reinstall the femd package",
    ),
)


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one check: a status, one line, how to fix it, details."""

    name: str
    status: Status
    summary: str
    fix: str | None = None
    details: tuple[str, ...] = ()


def _hint(text: str) -> str | None:
    low = text.lower()
    for needles, fix in _HINTS:
        if any(n in low for n in needles):
            return fix
    return None


# ---------------------------------------------------------------------------
# launchers


def _capability_lines(c: Capabilities) -> tuple[str, ...]:
    def yes(flag: bool) -> str:
        return "yes" if flag else "NO"

    lines = [
        f"enforces: memory {yes(c.memory_limit)}, cpus {yes(c.cpu_limit)}"
        f" (min {c.min_cpus:g}), pids {yes(c.pids_limit)},"
        f" egress {yes(c.egress)}, ingress {yes(c.ingress)}"
    ]
    lines += [f"{limit} limit: {how}" for limit, how in c.enforcement]
    lines += [f"problem: {p}" for p in c.problems]
    lines += [f"note: {n}" for n in c.notes]
    return tuple(lines)


def enforces_all(c: Capabilities) -> bool:
    """True when tasks can run: available, and memory, cpu and pids enforced."""
    return c.available and c.memory_limit and c.cpu_limit and c.pids_limit


def _doctor_image(launcher_socket: str) -> str:
    """Import the doctor's one-file image (catatonit) once; return repo@digest.

    Raises:
        FemdError: catatonit is missing or podman refused the import.
    """
    from podman import PodmanClient

    from femd.errors import LaunchError

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
    url = launcher_socket if "://" in launcher_socket else f"unix://{launcher_socket}"
    try:
        with PodmanClient(base_url=url, timeout=120) as client:
            if not client.images.exists(tag):
                reply = client.api.post(
                    "/images/import",
                    params={"reference": tag},
                    data=buf.getvalue(),
                    headers={"content-type": "application/x-tar"},
                )
                if reply.status_code >= 300:
                    raise LaunchError(f"import: {cut(reply.text.strip(), 160)}")
            digest = str(client.images.get(tag).attrs.get("Digest") or "")
    except FemdError:
        raise
    except Exception as e:
        raise LaunchError(f"podman: cannot import the doctor image: {cut(e)}") from e
    return f"{DOCTOR_IMAGE_REPO}@{digest}"


def _trial_spec(
    launcher: str, profile: LauncherProfile, out: Path, image: str | None
) -> LaunchSpec:
    argv = ("/catatonit", "-V") if launcher == "podman" else ("/bin/sh", "-c", "id")
    kind: Literal["podman", "process", "slurm"] = "process"
    if launcher in ("podman", "slurm"):
        kind = "podman" if launcher == "podman" else "slurm"
    return LaunchSpec(
        task_id=f"doctor-{secrets.token_hex(6)}",
        launcher=kind,
        profile=profile,
        argv=argv,
        image=image,
        output_dir=str(out),
        limits=Limits(cpus=1, memory_mb=256, timeout_s=TRIAL_TIMEOUT_S, pids=256),
    )


def _trial(
    name: str,
    launcher: Launcher,
    profile: LauncherProfile,
    work_root: Path,
    podman_socket: str | None,
) -> tuple[bool, str]:
    """Run one trivial task with *launcher*; (succeeded, what happened)."""
    from femd.launchers import registration

    work = work_root / f"doctor-{secrets.token_hex(4)}"
    began = time.monotonic()
    try:
        (work / "out").mkdir(parents=True)
        registration(name).prepare_work(work)
        image = _doctor_image(podman_socket or "") if name == "podman" else None
        spec = _trial_spec(name, profile, work / "out", image)
        # Not start(): for podman on a host without cgroup delegation the
        # trial runs in the launcher's unsafe mode (see trial_launcher()).
        handle = launcher.launch(spec)
        outcome = handle.wait(TRIAL_TIMEOUT_S + 30)
        if outcome is None:
            handle.cancel(1)
            return False, f"the trivial task did not end in {TRIAL_TIMEOUT_S} s"
        log = b"".join(handle.logs()).decode(errors="replace").strip()
    except FemdError as e:
        return False, f"the trivial task could not start: {e}"
    except Exception as e:  # noqa: BLE001 (a back-end's foreign error, reported)
        return False, f"the trivial task could not start: {type(e).__name__}: {cut(e)}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - began
    if outcome.state != "succeeded":
        why = outcome.reason or (log.splitlines() or [""])[-1]
        return False, (
            f"the trivial task {outcome.state} (exit code {outcome.exit_code}): "
            f"{cut(why, 200)}"
        )
    return True, f"a trivial task ran in {took:.1f} s"


def check_launcher(
    profile_name: str,
    name: str,
    caps: Capabilities,
    launcher: Launcher,
    profile: LauncherProfile,
    *,
    work_root: Path,
    podman_socket: str | None,
) -> Check:
    """Probe result plus a trivial real task through *launcher*.

    A launcher that runs the task but cannot enforce every limit is a
    warning: femd refuses its tasks (``launcher.unenforceable``), it does not
    run them weaker.
    """
    title = f"{name} (profile {profile_name})"
    details = _capability_lines(caps)
    if not caps.available:
        problems = "; ".join(caps.problems) or "unknown reason"
        return Check(
            name=title,
            status="fail",
            summary=f"UNAVAILABLE: {cut(problems, 200)}",
            fix=_hint(problems),
            details=details,
        )
    ok, what = _trial(name, launcher, profile, work_root, podman_socket)
    if not ok:
        return Check(
            name=title, status="fail", summary=what, fix=_hint(what), details=details
        )
    if not enforces_all(caps):
        return Check(
            name=title,
            status="warn",
            summary=f"{what}, but not every limit can be enforced here: "
            "its tasks are refused (launcher.unenforceable)",
            details=details,
        )
    return Check(name=title, status="ok", summary=what, details=details)


def trial_launcher(
    name: str, profile: LauncherProfile, *, state_dir: Path, podman_socket: str | None
) -> Launcher:
    """The launcher the doctor's trivial task runs with.

    For podman on a host that cannot enforce memory/cpu limits (rootless
    cgroup v1), the trivial task (``catatonit -V``) runs without them: it
    proves the runtime works; the probe still says the limits are missing and
    every real task is refused.
    """
    from femd.launchers import environment, registration

    if name != "podman":
        return registration(name).factory(profile, environment(name, state_dir))
    from femd.launchers.podman import PodmanLauncher

    return PodmanLauncher(
        profile,
        state_dir=state_dir,
        podman_socket=podman_socket,
        unsafe_unenforced_limits=("memory", "cpu"),
    )


# ---------------------------------------------------------------------------
# broker


class CertificateInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator needs to know of a PEM certificate."""

    subject_cn: str | None
    issuer_cn: str | None
    not_before: datetime
    not_after: datetime


def certificate_info(path: Path) -> CertificateInfo:
    """Read the first certificate of the PEM file *path*.

    Raises:
        FemdError: the file cannot be read or holds no PEM certificate.
    """
    from femd.errors import InputError

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise InputError(f"certificate {path}: {e.strerror}") from e
    except ValueError as e:
        raise InputError(f"certificate {path}: not a PEM certificate") from e

    def cn(name: x509.Name) -> str | None:
        found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(found[0].value) if found else None

    return CertificateInfo(
        subject_cn=cn(cert.subject),
        issuer_cn=cn(cert.issuer),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str:
    """A real TLS handshake; the protocol version agreed."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return str(tls.version())


def check_broker(
    url: str, ca: Path, cert: Path, key: Path, node: str, *, timeout_s: float = 10.0
) -> list[Check]:
    """The node's certificate (CN, expiry) and a TLS handshake with the broker."""
    from femd.amqpconn import connection_parameters, describe
    from femd.config import BrokerConfig

    out: list[Check] = []
    try:
        info = certificate_info(cert)
    except FemdError as e:
        out.append(Check(name="certificate", status="fail", summary=str(e)))
    else:
        now = datetime.now(UTC)
        left = (info.not_after - now).days
        if info.subject_cn != node:
            out.append(
                Check(
                    name="certificate",
                    status="fail",
                    summary=f"{cert}: CN is {info.subject_cn!r}, but node is {node!r}",
                    fix="the broker knows a node by its certificate's CN: "
                    "get a certificate for this node id, or fix `node` in femd.yaml",
                )
            )
        elif info.not_after <= now or info.not_before > now:
            out.append(
                Check(
                    name="certificate",
                    status="fail",
                    summary=f"{cert}: not valid now (valid "
                    f"{info.not_before:%Y-%m-%d} to {info.not_after:%Y-%m-%d})",
                    fix="renew the node certificate",
                )
            )
        else:
            status: Status = "warn" if left < CERT_WARN_DAYS else "ok"
            out.append(
                Check(
                    name="certificate",
                    status=status,
                    summary=f"{cert}: CN {node}, expires "
                    f"{info.not_after:%Y-%m-%d} (in {left} days)",
                    fix="renew the node certificate soon" if status == "warn" else None,
                )
            )
    try:
        params = connection_parameters(
            BrokerConfig(url=url, ca=str(ca), cert=str(cert), key=str(key))
        )
        ssl_options = params.ssl_options
        if ssl_options is None:  # pragma: no cover (connection_parameters sets it)
            raise RuntimeError("no TLS options")
        version = _handshake(
            str(params.host), int(params.port), ssl_options.context, timeout_s
        )
    except FemdError as e:
        out.append(Check(name="broker", status="fail", summary=str(e)))
    except (OSError, ssl.SSLError) as e:
        out.append(
            Check(
                name="broker",
                status="fail",
                summary=f"{url}: {describe(e)}",
                fix="is the broker running and reachable from here (host, port, "
                "firewall)? does its CA match broker.ca?",
            )
        )
    else:
        out.append(
            Check(
                name="broker", status="ok", summary=f"{url}: TLS handshake ({version})"
            )
        )
    return out


# ---------------------------------------------------------------------------
# policy, state dir, clock


def check_policy(path: Path, node: str) -> Check:
    """Lint the policy; its ``node`` must be this node."""
    from femd.policy import lint_file, lint_warnings, load_policy

    problems = lint_file(path)
    if problems:
        return Check(
            name="policy",
            status="fail",
            summary=f"{len(problems)} problem(s) in {path}",
            fix=f"femd policy lint {path}",
            details=tuple(problems),
        )
    policy = load_policy(path).policy
    warnings = tuple(lint_warnings(path))
    if policy.node != node:
        return Check(
            name="policy",
            status="fail",
            summary=f"{path}: written for node {policy.node!r}, this is {node!r}",
            fix="the steward's policy must name this node (`node:`)",
        )
    return Check(
        name="policy",
        status="warn" if warnings else "ok",
        summary=f"{path}: node {policy.node}, {len(policy.signers)} signer(s), "
        f"{len(policy.projects)} project(s)",
        details=warnings,
    )


def check_state_dir(path: Path) -> Check:
    """The state directory exists, is writable, and has room."""
    probe = path / f".doctor-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"femd doctor\n")
        probe.unlink()
        usage = shutil.disk_usage(path)
    except OSError as e:
        return Check(
            name="state dir",
            status="fail",
            summary=f"{path}: not writable ({e.strerror})",
            fix="it must exist and belong to the user femd runs as "
            "(the package's tmpfiles.d makes /var/lib/femd femd:femd 0750)",
        )
    free = usage.free
    status: Status = (
        "fail" if free < FREE_FAIL_BYTES else "warn" if free < FREE_WARN_BYTES else "ok"
    )
    return Check(
        name="state dir",
        status=status,
        summary=f"{path}: writable, {free / (1 << 30):.1f} GiB free",
        fix=None
        if status == "ok"
        else "free some space: work dirs and outputs of tasks are written here",
    )


_TIME_ERROR: Final = 5  # adjtimex(2): the clock is not synchronised


def _clock_state() -> int | None:
    """adjtimex(2) read-only; its return value, or None where it cannot be had."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0 (read)
    state = int(libc.adjtimex(buf))
    return None if state < 0 else state


def check_clock(skew_s: int) -> Check:
    """Is the system clock synchronised (NTP)? Task windows are judged by it."""
    state = _clock_state()
    now = datetime.now(UTC)
    when = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if state is None:
        return Check(
            name="clock", status="warn", summary=f"{when}; synchronisation unknown"
        )
    if state == _TIME_ERROR:
        return Check(
            name="clock",
            status="warn",
            summary=f"{when}; the kernel says the clock is not synchronised",
            fix=f"run an NTP client (systemd-timesyncd, chrony): task validity "
            f"windows are checked against this clock (clock_skew_s {skew_s})",
        )
    return Check(name="clock", status="ok", summary=f"{when}; synchronised")


# ---------------------------------------------------------------------------
# output

_MARK: Final = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def render(checks: Sequence[Check], usable: Sequence[str]) -> str:
    """The human report: one line per check, indented details, a verdict."""
    lines: list[str] = []
    for c in checks:
        lines.append(f"{_MARK[c.status]}  {c.name}: {c.summary}")
        lines += [f"        {d}" for d in c.details]
        if c.fix:
            lines.append(f"        fix: {c.fix}")
    if usable:
        lines.append("tasks can run with: " + ", ".join(usable))
    else:
        lines.append(
            "no launcher can enforce every limit here: every task would be refused"
        )
    return "\n".join(lines) + "\n"


def to_json(
    checks: Sequence[Check], usable: Sequence[str], host: HostReport | None = None
) -> bytes:
    """The same, for machines: ``{"checks": [...], "usable": [...], "ok": bool}``.

    With *host*, also its ``profiles`` and ``capabilities`` (what ``femd check
    --capabilities`` reads).
    """
    out: dict[str, object] = {
        "ok": exit_code(checks, usable) == 0,
        "usable": list(usable),
        "checks": [msgspec.to_builtins(c) for c in checks],
    }
    if host is not None:
        out |= msgspec.to_builtins(host)
    return msgspec.json.encode(out)


def exit_code(checks: Sequence[Check], usable: Sequence[str]) -> int:
    """0 when nothing failed and some launcher can run tasks, else 1."""
    return 0 if usable and all(c.status != "fail" for c in checks) else 1
