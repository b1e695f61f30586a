"""The ``femd`` command line: argument parsing, output, exit codes.

Owns how commands are spelled and what they print; the work is done by the
modules they call. Every failure is one line on stderr, never a traceback:
one ``except FemdError`` and one last-resort ``except Exception``.
Exit codes (DESIGN "command line"): 0 ok/allow, 1 deny, 2 error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import msgspec

from femd import __version__
from femd.errors import FemdError, InputError, ManifestError, cut
from femd.events import TERMINAL_STATES

if TYPE_CHECKING:
    from femd.admission import Host
    from femd.client import Client
    from femd.config import OrchestratorConfig

__all__ = ["main"]

logger = logging.getLogger("femd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not usage + error (DESIGN: one clear line for any bad input).
        self.exit(2, f"femd: error: {message} (see `femd --help`)\n")


def _read_input(path: str, what: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror}") from e


def _write_output(path: str | None, data: bytes) -> None:
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise InputError(f"output {path}: {e.strerror}") from e


def _parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError as e:
        raise InputError(f"--at: not an RFC 3339 time (got {cut(text)!r})") from e
    if t.tzinfo is None:
        raise InputError(f"--at: the time needs a zone, e.g. Z (got {cut(text)!r})")
    try:
        return t.astimezone(UTC)
    except OverflowError as e:
        raise InputError(f"--at: out of range (got {cut(text)!r})") from e


def _skew(text: str) -> float:
    """Argparse type: a clock skew in seconds, 0 to 86400 (as `clock_skew_s`)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected 0 to 86400 seconds, got {text!r}")
    return value


# ---------------------------------------------------------------------------
# commands


def _cmd_keygen(args: argparse.Namespace) -> int:
    from femd.keys import write_keypair

    private, public, kid = write_keypair(args.name, Path(args.dir))
    print(kid)
    logger.info("wrote %s and %s", private, public)
    return 0


def _load_manifest_doc(path: str) -> bytes:
    """Read a JSON or YAML manifest, validate it, return canonical JSON bytes."""
    from femd.manifest import Manifest, decode_manifest, encode_manifest
    from femd.plain import one_line
    from femd.yamlfile import YamlError, load_yaml

    raw = _read_input(path, "manifest")
    if raw.lstrip()[:1] == b"{":
        manifest = decode_manifest(raw)
    else:
        try:
            data, _ = load_yaml(raw)
            # No builtin_types: YAML timestamps and quoted RFC 3339 strings both work.
            manifest = msgspec.convert(data, Manifest, strict=True)
        except YamlError as e:
            at = f" line {e.line}" if e.line else ""
            raise ManifestError(f"manifest {path}:{at} {e.message}") from e
        except msgspec.ValidationError as e:
            text = one_line(data, Manifest, str(e))
            raise ManifestError(f"manifest {path}: {text}") from e
    return encode_manifest(manifest)


def _cmd_sign(args: argparse.Namespace) -> int:
    from femd import envelope
    from femd.keys import load_private_key
    from femd.manifest import decode_manifest

    keys = [load_private_key(Path(k)) for k in args.key]
    if args.add:
        if args.manifest:
            raise InputError("sign: give either MANIFEST or --add ENVELOPE, not both")
        env, payload = envelope.decode_envelope(_read_input(args.add, "envelope"))
        decode_manifest(payload)  # never co-sign something that is not a manifest
        signed = envelope.add_signature(env, payload, keys)
    else:
        if not args.manifest:
            raise InputError("sign: a MANIFEST file is required (or --add ENVELOPE)")
        payload = _load_manifest_doc(args.manifest)
        signed = envelope.sign(payload, keys)
    _write_output(args.output, envelope.encode_envelope(signed) + b"\n")
    return 0


def _check_host(args: argparse.Namespace) -> tuple[Host | None, str | None]:
    """The launchers ``femd check`` admits against, and the node they are on.

    From ``--capabilities`` (a ``femd doctor --json`` output), or probed on
    this host from ``--config``'s launcher profiles (as ``femd doctor``
    does), or none: then only the trust kernel runs.
    """
    import shutil
    import tempfile

    from femd.admission import Host, decode_host
    from femd.config import load_config
    from femd.launchers import build_all, load_profiles

    if args.capabilities:
        return decode_host(_read_input(args.capabilities, "capabilities")), None
    if not args.config:
        return None, None
    config = load_config(Path(args.config), os.environ)
    profiles = load_profiles(Path(config.launchers))
    logging.getLogger("femd.launchers.podman").setLevel(logging.ERROR)
    scratch = Path(tempfile.mkdtemp(prefix="femd-check-"))
    try:
        _, caps = build_all(
            profiles, state_dir=scratch, podman_socket=config.podman.socket
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Host(profiles, caps, config.state_path / "work"), config.node


def _cmd_check(args: argparse.Namespace) -> int:
    from femd.admission import admit_here
    from femd.policy import load_policy

    policy = load_policy(Path(args.policy))
    data = _read_input(args.envelope, "envelope")
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    host, host_node = _check_host(args)
    node = args.node or host_node or policy.policy.node
    verdict = admit_here(data, policy, node=node, now=now, skew_s=args.skew, host=host)
    m = verdict.manifest
    allowed = verdict.decision.allowed
    if args.json:
        out = {
            "decision": "allow" if allowed else "deny",
            "task_id": m.id if m else None,
            "project": m.project if m else None,
            "signers": list(verdict.signers),
            "reasons": [
                {"rule": r.rule.value, "message": r.message}
                for r in verdict.decision.reasons
            ],
            "launch_checked": host is not None,
        }
        print(json.dumps(out))
        return 0 if allowed else 1
    what = f"task {m.id} (project {m.project}, {type(m).__name__})" if m else "envelope"
    print(f"{'ALLOW' if allowed else 'DENY'}: {what} on node {node}")
    for r in verdict.decision.reasons:
        print(f"  - {r.rule.value}: {r.message}")
    if verdict.signers:
        print(f"  signed by: {', '.join(verdict.signers)}")
    if host is None:
        print(
            "  note: launch-spec and capability checks not run"
            " (give --config or --capabilities)"
        )
    check = verdict.check
    for kid in sorted(check.unknown):
        print(f"  note: signature from an unknown key {cut(kid, 20) or '(no keyid)'}")
    for kid in sorted(check.invalid):
        name = policy.keys[kid].name
        print(f"  note: bad signature claiming signer {name!r} (ignored)")
    return 0 if allowed else 1


def _cmd_policy_lint(args: argparse.Namespace) -> int:
    from femd.policy import lint_file, lint_warnings, load_policy

    problems = lint_file(Path(args.policy))
    for p in problems:
        print(f"femd: error: {p}", file=sys.stderr)
    for w in lint_warnings(Path(args.policy)):
        print(f"femd: warning: {w}", file=sys.stderr)
    if problems:
        return 2
    policy = load_policy(Path(args.policy)).policy
    print(
        f"ok: {args.policy}: node {policy.node}, {len(policy.signers)} signer(s), "
        f"{len(policy.projects)} project(s), {len(policy.datasets)} dataset(s)"
    )
    return 0


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    from femd.policy import policy_schema

    print(json.dumps(policy_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from femd import audit
    from femd.agent import Agent
    from femd.config import load_config

    path = Path(args.config) if args.config else None
    config = load_config(path, os.environ)
    level = (
        logging.DEBUG if args.verbose else getattr(logging, config.log_level.upper())
    )
    logging.getLogger().setLevel(level)
    audit.configure(config.audit)
    if not audit.to_journal():
        from femd.logline import use_json_lines

        use_json_lines()
    return Agent(config, config_path=path).run()


def _orchestrator_config(args: argparse.Namespace) -> OrchestratorConfig:
    from femd.config import load_orchestrator_config

    return load_orchestrator_config(
        Path(args.config) if args.config else None, os.environ
    )


def _client(args: argparse.Namespace) -> Client:
    from femd.client import Client

    cfg = _orchestrator_config(args)
    inbox = getattr(args, "inbox", None)
    return Client(cfg, inbox=Path(inbox) if inbox else None)


def _cmd_submit(args: argparse.Namespace) -> int:
    data = _read_input(args.envelope, "envelope")
    with _client(args) as client:
        task_id = client.submit(data, args.node)
    print(f"submitted task {task_id} to {', '.join(args.node)}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from femd.keys import load_private_key

    keys = [load_private_key(Path(k)) for k in args.key]
    with _client(args) as client:
        cancel_id = client.cancel(
            args.task, args.node, keys, project=args.project, issuer=args.issuer
        )
    print(f"submitted cancel {cancel_id} of task {args.task} to {', '.join(args.node)}")
    return 0


def _fem_line(event: dict[str, object]) -> dict[str, object]:
    """FEM dashboards' per-node result shape (issue: FEM interoperability)."""
    started = event.get("started_at")
    stopped = event.get("at")
    elapsed = None
    if isinstance(started, str) and isinstance(stopped, str):
        try:
            elapsed = (
                datetime.fromisoformat(stopped) - datetime.fromisoformat(started)
            ).total_seconds()
        except (ValueError, TypeError):  # a node's malformed time must not stop watch
            elapsed = None
    error = None
    if event.get("state") != "succeeded":
        reasons = event.get("reasons")
        reasons = reasons if isinstance(reasons, list) else []
        code = event.get("exit_code")
        error = "; ".join(
            f"{r.get('rule')}: {r.get('message')}"
            for r in reasons
            if isinstance(r, dict)
        ) or str(event.get("error") or event.get("state")) + (
            f" (exit code {code})" if code is not None else ""
        )
    state = event.get("state")
    return {
        "node": event.get("node"),
        "task_id": event.get("task_id"),
        "exit_code": event.get("exit_code"),
        "start_time": started,
        "stop_time": stopped,
        "elapsed_time_sec": elapsed,
        "error": error,
        # FEM's per-node execution report, as its dashboard reads it.
        "process_info": {
            "status": _FEM_STATUS.get(str(state), str(state)),
            "return_code": event.get("exit_code"),
            "start_time": started,
            "finish_time": stopped,
        },
    }


# femd's terminal states as FEM's process_info.status words.
_FEM_STATUS: dict[str, str] = {
    "succeeded": "finished",
    "failed": "failed",
    "timed_out": "timeout",
    "cancelled": "cancelled",
    "rejected": "rejected",
}


def _cmd_watch(args: argparse.Namespace) -> int:
    from femd.inbox import LogBatch, OutputStatus

    with _client(args) as client:
        watch = client.watch(args.task, nodes=args.node or (), logs=args.logs)
        for item in watch.follow(timeout_s=args.timeout):
            if isinstance(item, LogBatch):
                # Task output, never a femd record: marked as such, per node.
                for line in item.text.splitlines():
                    out = {"node": item.node, "task_id": item.task_id, "log": line}
                    print(json.dumps(out), flush=True)
                if item.dropped:
                    note = {"node": item.node, "task_id": item.task_id}
                    print(
                        json.dumps({**note, "log_dropped_bytes": item.dropped}),
                        flush=True,
                    )
            elif isinstance(item, OutputStatus):
                if item.status == "complete":
                    print(
                        f"femd: outputs of {item.task_id} from {item.node}"
                        f" verified in {item.path}",
                        file=sys.stderr,
                    )
            elif args.format == "fem":
                if item.state in TERMINAL_STATES:
                    print(json.dumps(_fem_line(item.body)), flush=True)
            else:
                print(json.dumps(item.body, sort_keys=True), flush=True)
    for e in watch.errors:
        print(f"femd: error: {e}", file=sys.stderr)
    if args.task and not watch.done:
        print(
            f"femd: error: watch: timed out waiting for task {args.task}",
            file=sys.stderr,
        )
        return 2
    return 2 if watch.errors else 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.receive > 0:
            client.receive(args.receive)
        views = client.nodes()
    if args.json:
        out = [
            {"node": v.node, "age_s": round(v.age_s, 1), "down": v.down, **v.status}
            for v in views
        ]
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    for v in views:
        st = v.status
        print(
            f"{v.node:<24} {'DOWN' if v.down else 'up':<5} seen {v.age_s:7.1f} s ago"
            f"  femd {st.get('version', '?')}  running {st.get('running', '?')}"
            f"  queued {st.get('queued', '?')}"
            f"  disk free {_gib(st.get('disk_free_bytes'))}"
            f"  cert until {st.get('cert_not_after', '?')}"
        )
    return 0


def _gib(value: object) -> str:
    if not isinstance(value, int):
        return "?"
    return f"{value / 2**30:.1f} GiB"


def _cmd_orchestrator_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.receive > 0:
            client.receive(args.receive)
        rows = client.tasks()
        outputs = {(r.node, r.task_id): client.outputs(r.node, r.task_id) for r in rows}
    if args.limit is not None:
        rows = rows[: max(args.limit, 0)]
    if args.json:
        out = []
        for r in rows:
            o = outputs[(r.node, r.task_id)]
            out.append(
                {
                    "node": r.node,
                    "task_id": r.task_id,
                    "state": r.state,
                    "at": r.at,
                    "outputs": None
                    if o is None
                    else {"status": o.status, "path": o.path, "error": o.error},
                }
            )
        print(json.dumps(out, indent=1))
        return 0
    for r in rows:
        o = outputs[(r.node, r.task_id)]
        where = "" if o is None else f"outputs {o.status} {o.path or o.error or ''}"
        print(f"{r.at:<28} {r.node:<16} {r.task_id:<38} {r.state:<10} {where}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from femd.config import load_config
    from femd.state import State

    if args.orchestrator:
        return _cmd_orchestrator_tasks(args)

    if args.state_dir:
        state_dir = Path(args.state_dir)
    else:
        state_dir = load_config(
            Path(args.config) if args.config else None, os.environ
        ).state_path
    db = state_dir / "state.sqlite"
    if not db.exists():
        raise InputError(f"tasks: no state at {db}")
    state = State(db)
    try:
        rows = state.history(args.limit)
    finally:
        state.close()
    if args.json:
        out = [
            {
                "task_id": r.task_id,
                "project": r.project,
                "kind": r.kind,
                "state": r.state,
                "decision": r.decision,
                "reasons": [{"rule": a, "message": b} for a, b in r.reasons],
                "received_at": r.received_at.isoformat().replace("+00:00", "Z"),
                "updated_at": r.updated_at.isoformat().replace("+00:00", "Z"),
                "exit_code": r.exit_code,
                "output_sha256": r.output_sha256,
                "manifest_sha256": r.manifest_sha256,
                "signer_keyids": list(r.signer_keyids),
                "usage": r.usage,
            }
            for r in rows
        ]
        print(json.dumps(out, indent=1))
        return 0
    for r in rows:
        when = r.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        rules = ",".join(a for a, _ in r.reasons)
        line = f"{when}  {r.task_id:<38} {r.project:<24} {r.state:<10} {rules}"
        print(f"{line}  {_usage_text(r.usage)}".rstrip())
    return 0


def _usage_text(usage: Mapping[str, float] | None) -> str:
    """``cpu 1.2s mem 30.1MiB pids 4 out 0.0MiB wall 3.0s`` (what is known)."""
    if not usage:
        return ""
    mib = 1 << 20
    shown = [
        ("cpu", "cpu_s", 1, "s"),
        ("mem", "memory_peak_bytes", mib, "MiB"),
        ("pids", "pids_peak", 1, ""),
        ("out", "output_bytes", mib, "MiB"),
        ("wall", "wall_s", 1, "s"),
    ]
    return " ".join(
        f"{name} {usage[key] / div:.{0 if name == 'pids' else 1}f}{unit}"
        for name, key, div, unit in shown
        if key in usage
    )


def _cmd_import_fem(args: argparse.Namespace) -> int:
    from femd import fem

    tool = params = None
    template = fem.decode_template(_read_input(args.template, "fem template"))
    if args.tool:
        tool = fem.decode_tool_plan(_read_input(args.tool, "fem tool plan"))
    if args.params:
        params = fem.decode_params(_read_input(args.params, "fem params"))
    options = fem.FemOptions(
        nodes=tuple(fem.parse_node(n) for n in args.node),
        project=args.project,
        issued_at=datetime.now(UTC).replace(microsecond=0),
        expires_in_s=fem.parse_duration(args.expires_in),
        launcher=args.launcher,
        profile=args.profile,
        issuer=args.issuer,
        image_digest=args.image_digest,
        commit=args.commit,
        datasets=tuple(fem.parse_dataset(d) for d in args.dataset),
        output_dir=args.output_dir,
        code_dir=args.code,
        egress=tuple(args.egress),
        ingress=tuple(fem.parse_port(p) for p in args.ingress),
        env=tuple(fem.parse_env(e) for e in args.env),
        runtime=args.runtime,
        execution_id=args.execution_id,
        user_id=args.user_id,
    )
    try:
        conversion = fem.convert(template, options, tool=tool, params=params)
    except fem.FemImportError as e:
        # Like `policy lint`: every problem, one line each, with its fix.
        for problem in e.problems:
            print(f"femd: error: import-fem: {problem}", file=sys.stderr)
        return e.exit_code
    for note in conversion.notes:
        print(f"femd: note: import-fem: {note}", file=sys.stderr)
    results = conversion.manifests
    paths = fem.output_paths(args.output, results)
    for path, r in zip(paths, results, strict=True):
        _write_output(path, fem.manifest_json(r.task))
        if path is not None:
            print(f"{path} {r.task.id} {','.join(r.nodes)}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from femd import doctor
    from femd.admission import host_report
    from femd.config import load_config
    from femd.launchers import build_all, load_profiles

    config = None
    if args.launchers:
        profiles_dir, socket = Path(args.launchers), args.podman_socket
    else:
        config = load_config(Path(args.config) if args.config else None, os.environ)
        profiles_dir = Path(config.launchers)
        socket = args.podman_socket or config.podman.socket
    profiles = load_profiles(profiles_dir)
    if not args.verbose:  # the trial's own "unsafe mode" warning: doctor says it
        logging.getLogger("femd.launchers.podman").setLevel(logging.ERROR)
    # Trial work dirs: as root in a private scratch dir (open_work_dirs opens
    # its parents for the sandbox users), as femd in its own state dir.
    scratch = Path(tempfile.mkdtemp(prefix="femd-doctor-"))
    if os.geteuid() != 0 and config is not None:
        work_root = config.state_path / "doctor"
    else:
        work_root = scratch / "doctor"
    checks: list[doctor.Check] = []
    usable: list[str] = []
    try:
        work_root.mkdir(parents=True, exist_ok=True)
        _, caps = build_all(profiles, state_dir=scratch, podman_socket=socket)
        for (pname, lname), cap in caps.items():
            trial = doctor.trial_launcher(
                lname, profiles[pname], state_dir=scratch, podman_socket=socket
            )
            check = doctor.check_launcher(
                pname, lname, cap, trial, profiles[pname],
                work_root=work_root, podman_socket=socket,
            )  # fmt: skip
            checks.append(check)
            if check.status != "fail" and doctor.enforces_all(cap):
                usable.append(f"{lname} ({pname})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if work_root.parent != scratch:
            shutil.rmtree(work_root, ignore_errors=True)
    if config is not None:
        b = config.broker
        checks += doctor.check_broker(
            b.url, Path(b.ca), Path(b.cert), Path(b.key), config.node,
            timeout_s=b.connect_timeout_s,
        )  # fmt: skip
        checks.append(doctor.check_policy(Path(config.policy), config.node))
        checks.append(doctor.check_state_dir(config.state_path))
        checks.append(doctor.check_clock(config.clock_skew_s))
    if args.json:
        report = host_report(profiles, caps)
        sys.stdout.buffer.write(doctor.to_json(checks, usable, report) + b"\n")
    else:
        sys.stdout.write(doctor.render(checks, usable))
    return doctor.exit_code(checks, usable)


# ---------------------------------------------------------------------------
# parser


def _orchestrator_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="orchestrator config (default $FEMD_CONFIG)")
    s.add_argument(
        "--inbox",
        "--results",
        dest="inbox",
        help="the orchestrator inbox directory (default: results_dir)",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="femd", description="Federated Execution Manager daemon")
    p.add_argument("--version", action="version", version=f"femd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("keygen", help="write NAME.key and NAME.pub, print the keyid")
    s.add_argument("name")
    s.add_argument("--dir", default=".", help="where to write (default: .)")
    s.set_defaults(func=_cmd_keygen)

    s = sub.add_parser("sign", help="sign a manifest (JSON or YAML) into an envelope")
    s.add_argument("manifest", nargs="?", help="manifest file (- for stdin)")
    s.add_argument("--key", action="append", required=True, help="private key (repeat)")
    s.add_argument("--add", metavar="ENVELOPE", help="add signatures to this envelope")
    s.add_argument("-o", "--output", help="write the envelope here (default stdout)")
    s.set_defaults(func=_cmd_sign)

    s = sub.add_parser("check", help="dry run: verify and decide, nothing runs")
    s.add_argument("envelope", help="envelope file (- for stdin)")
    s.add_argument("--policy", required=True, help="policy file or directory")
    s.add_argument("--node", help="decide as this node (default: the policy's node)")
    s.add_argument("--at", help="decide at this RFC 3339 time (default: now)")
    s.add_argument("--skew", type=_skew, default=300, help="clock skew allowed, s")
    s.add_argument("--json", action="store_true", help="one JSON object")
    how = s.add_mutually_exclusive_group()
    how.add_argument(
        "--config", help="femd.yaml: also check against this host's probed launchers"
    )
    how.add_argument(
        "--capabilities",
        metavar="FILE",
        help="also check against these launchers (`femd doctor --json` output)",
    )
    s.set_defaults(func=_cmd_check)

    s = sub.add_parser("policy", help="policy tools")
    psub = s.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    t = psub.add_parser("lint", help="validate a policy file or directory")
    t.add_argument("policy")
    t.set_defaults(func=_cmd_policy_lint)
    t = psub.add_parser("schema", help="print the policy JSON Schema")
    t.set_defaults(func=_cmd_policy_schema)

    s = sub.add_parser("run", help="the agent, in the foreground (systemd runs this)")
    s.add_argument(
        "--config", help="femd.yaml (default $FEMD_CONFIG, /etc/femd/femd.yaml)"
    )
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("submit", help="orchestrator: publish an envelope to nodes")
    s.add_argument("envelope", help="envelope file (- for stdin)")
    s.add_argument("--node", action="append", required=True, help="node id (repeat)")
    _orchestrator_args(s)
    s.set_defaults(func=_cmd_submit)

    s = sub.add_parser(
        "watch", help="orchestrator: follow status events, collect outputs"
    )
    s.add_argument("--task", help="stop when this task is done on every --node")
    s.add_argument("--node", action="append", help="node expected to report (repeat)")
    _orchestrator_args(s)
    s.add_argument("--timeout", type=float, help="give up after this many seconds")
    s.add_argument("--format", choices=["json", "fem"], default="json")
    s.add_argument("--logs", action="store_true", help="also print live task output")
    s.set_defaults(func=_cmd_watch)

    s = sub.add_parser("cancel", help="orchestrator: sign and submit a Cancel")
    s.add_argument("task", help="the task id to cancel")
    s.add_argument("--node", action="append", required=True, help="node id (repeat)")
    s.add_argument("--key", action="append", required=True, help="private key (repeat)")
    s.add_argument("--project", help="the task's project (default: as submitted)")
    s.add_argument("--issuer", help="the manifest's issuer")
    _orchestrator_args(s)
    s.set_defaults(func=_cmd_cancel)

    s = sub.add_parser("nodes", help="orchestrator: every node, last seen, up/down")
    _orchestrator_args(s)
    s.add_argument("--receive", type=float, default=2.0, help="listen first, s")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_nodes)

    s = sub.add_parser("doctor", help="what this host can enforce, per launcher")
    s.add_argument("--config", help="femd.yaml (for launchers, state_dir, podman)")
    s.add_argument("--launchers", help="a profiles directory instead of --config")
    s.add_argument("--podman-socket", help="the rootless Podman API socket URL")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_doctor)

    s = sub.add_parser("tasks", help="the node's local task history")
    s.add_argument("--config", help="femd.yaml, or with --orchestrator its config")
    s.add_argument("--state-dir", help="read this state directory instead")
    s.add_argument(
        "--orchestrator", action="store_true", help="the orchestrator inbox's tasks"
    )
    s.add_argument("--inbox", "--results", dest="inbox", help="with --orchestrator")
    s.add_argument("--receive", type=float, default=0.0, help="listen first, s")
    s.add_argument("--limit", type=int, help="at most this many, newest first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_tasks)

    s = sub.add_parser(
        "import-fem", help="orchestrator: FEM task template -> femd manifests"
    )
    s.add_argument("template", help="FEM task template (JSON)")
    s.add_argument("--tool", metavar="TOOL_PLAN", help="FEM tool plan (JSON)")
    s.add_argument("--params", help="FEM parametric args (JSON), per-node sections")
    s.add_argument("--node", action="append", required=True, metavar="[FEM_NAME=]NODE")
    s.add_argument("--project", required=True, help="femd project of the task")
    s.add_argument("--image-digest", metavar="sha256:HEX", help="pins the image")
    s.add_argument("--commit", metavar="SHA", help="pins source_code (full id)")
    s.add_argument("--dataset", action="append", default=[], metavar="NAME=MOUNT")
    s.add_argument("--output-dir", default="/out", help="output dir (default /out)")
    s.add_argument("--code", metavar="MOUNT", help="the FEM volume that held the code")
    s.add_argument("--egress", action="append", default=[], metavar="HOST:PORT")
    s.add_argument("--ingress", action="append", default=[], metavar="PORT")
    s.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for $NAME"
    )
    s.add_argument("--runtime", help="a runtime the nodes' policies name")
    s.add_argument("--launcher", choices=["podman", "process"], default="podman")
    s.add_argument("--profile", default="default", help="launcher profile name")
    s.add_argument("--expires-in", default="24h", help="validity (default 24h)")
    s.add_argument("--execution-id", help="%%%%execution_id%%%% (default: task id)")
    s.add_argument("--user-id", help="value of %%%%user_id%%%%")
    s.add_argument("--issuer", help="the manifest's issuer")
    s.add_argument("-o", "--output", help="manifest file, or a {node} pattern")
    s.set_defaults(func=_cmd_import_fem)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok/allow, 1 deny, 2 error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="femd: %(levelname)s: %(message)s",
    )
    # pika logs every failed connection attempt with a traceback at ERROR;
    # femd's broker module says the same in one line.
    logging.getLogger("pika").setLevel(
        logging.DEBUG if args.verbose else logging.CRITICAL
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FemdError as e:
        print(f"femd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("femd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as e:
        logger.debug("internal error", exc_info=True)
        print(
            f"femd: internal error: {type(e).__name__}: {cut(e, 160)}", file=sys.stderr
        )
        return 2
