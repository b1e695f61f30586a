"""The demo's story, step by step: one class, one method per step.

Read top to bottom, :meth:`Walkthrough.run` is the whole demo:

1. a throwaway CA and the orchestrator's Ed25519 signing key;
2. a private RabbitMQ (TLS only, client certificates, SASL EXTERNAL);
3. two data nodes, each with its own synthetic cohort, policy and femd agent;
4. the analysis code committed to git, and ONE task naming that commit, signed;
5. the task submitted to both nodes and followed live with ``femd watch``;
6. the two partial results pooled, beside the centralised answer;
7. a tampered task and a task the policy does not allow, both refused;
8. where the audit trail is.

Every ``femd`` command is run as a person would type it (shown with ``$``), from
the work directory, with the same interpreter as the demo.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from demo.agents import AgentError, AgentProcess
from demo.cohort import SITES, read_cohort
from demo.console import Console
from demo.federation import DATASET, PROJECT, Federation, unreachable_parent
from demo.node_analysis import FEATURES
from demo.pooling import Figures, centralise, compare, pool
from testbed import RabbitNodeError

__all__ = ["DemoError", "Walkthrough"]

STEPS: Final = 8
TOLERANCE: Final = 1e-9  # relative (absolute below 1)
START_WEIGHTS: Final = (0.0,) * len(FEATURES)
IMAGE_REPO: Final = "localhost/femd-demo/python"
TASK_USER: Final = "femd-task"  # launchers/default.yaml: process.run_as
UNVERIFIED: Final = "unverified"  # the id femd reports for an envelope it cannot trust


class DemoError(Exception):
    """The demo could not go on; str() is one line for the person watching."""


@dataclass
class Outcome:
    """What the demo proved, for the summary and the exit code."""

    pooled_agrees: bool | None = None
    max_relative: float = 0.0
    refusals: dict[str, set[str]] = field(default_factory=dict)  # node -> rules
    podman_refused: str | None = None
    problems: list[str] = field(default_factory=list)
    task_id: str | None = None
    figures: dict[str, dict[str, float]] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Save as JSON (``summary.json`` in the work directory, for tests)."""
        doc = {
            "ok": not self.problems and self.podman_refused is None,
            "pooled_agrees": self.pooled_agrees,
            "max_relative": self.max_relative,
            "refusals": {n: sorted(r) for n, r in sorted(self.refusals.items())},
            "podman_refused": self.podman_refused,
            "problems": self.problems,
            "task_id": self.task_id,
            "figures": self.figures,
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")


class Walkthrough:
    """Runs the demo in *root* (an empty directory) with *launcher*."""

    def __init__(self, root: Path, launcher: str, console: Console) -> None:
        """Prepare; nothing starts before :meth:`run`."""
        self.root = root
        self.launcher = launcher
        self.console = console
        self.fed = Federation(root, SITES, launcher)
        self.agents: dict[str, AgentProcess] = {}
        self.outcome = Outcome()
        self.podman: Any = None  # testbed.podman.PodmanService when --launcher podman
        self.image: str | None = None
        self._repo_id: tuple[str, str] | None = None

    # -- helpers ----------------------------------------------------------------

    def femd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``femd ARGS`` from the work directory, showing the command."""
        self.console.command(["femd", *args])
        done = subprocess.run(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "femd", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and done.returncode != 0:
            raise DemoError(
                f"femd {args[0]}: exit {done.returncode}: {done.stderr.strip()[-400:]}"
            )
        return done

    def watch(self, task_id: str, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Follow ``femd watch`` live until *task_id* ends on every node.

        Returns each node's terminal event.
        """
        args = [
            "watch",
            "--config",
            "orchestrator/orchestrator.yaml",
            "--task",
            task_id,
        ]
        for n in nodes:
            args += ["--node", n]
        args += ["--timeout", "60"]
        self.console.command(["femd", *args])
        final: dict[str, dict[str, Any]] = {}
        with subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "femd", *args],
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None  # noqa: S101 (stdout=PIPE)
            for line in proc.stdout:
                event = json.loads(line)
                self._show_event(event)
                if event["state"] in _TERMINAL:
                    final[event["node"]] = event
            err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise DemoError(f"femd watch: exit {proc.returncode}: {err.strip()[-400:]}")
        return final

    def _show_event(self, event: dict[str, Any]) -> None:
        state = event["state"]
        detail = _EXPLAIN.get(state, "")
        if state == "succeeded":
            out = event.get("outputs") or {}
            detail = (
                f"exit {event.get('exit_code')}; outputs {out.get('bytes')} bytes "
                f"(sha256 {str(out.get('sha256'))[:12]}...) sent back"
            )
        elif state in ("failed", "timed_out", "cancelled"):
            detail = f"exit {event.get('exit_code')}: {event.get('error') or ''}"
            detail += f" {event.get('log_tail') or ''}".rstrip()
        elif state == "rejected":
            detail = "; ".join(
                f"{r.get('rule')}: {r.get('message')}" for r in event.get("reasons", [])
            )
        paint = {"succeeded": "green", "rejected": "yellow", "failed": "red"}
        label = self.console.paint(f"{state:<10}", paint.get(state, "bold"))
        self.console.say(f"{event['node']}  {label} {detail}")

    def manifest(self, **overrides: object) -> dict[str, object]:
        """A fresh task manifest for this demo (new id, valid for an hour)."""
        now = datetime.now(UTC)
        task: dict[str, object] = {
            "apiVersion": "femd/v1",
            "kind": "Task",
            "id": str(uuid.uuid4()),
            "project": PROJECT,
            "issuer": "orchestrator.demo.invalid",
            "issued_at": _rfc3339(now - timedelta(seconds=5)),
            "expires_at": _rfc3339(now + timedelta(hours=1)),
            "nodes": list(self.fed.nodes),
            "launcher": self.launcher,
            "inputs": [{"dataset": DATASET, "mount": "/data/cohort"}],
            "outputs": {"path": "/out", "max_bytes": 65536},
            # pids is RLIMIT_NPROC of the sandbox user, shared by all its sandboxes
            "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60, "pids": 256},
            "network": {"mode": "none"},
        }
        if self.image is not None:
            task["image"] = self.image
        task.update(overrides)
        return task

    def write_task(self, name: str, manifest: dict[str, object]) -> Path:
        """Write *manifest* as ``orchestrator/tasks/NAME.json``; return its path."""
        path = self.root / "orchestrator" / "tasks" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path.relative_to(self.root)

    # -- the story ----------------------------------------------------------------

    def run(self) -> Outcome:
        """Run every step; always stop what was started.

        Raises:
            DemoError: a step could not be carried out.
        """
        self._check_workdir()
        try:
            self.step_keys()
            self.step_broker()
            self.step_nodes()
            url, commit = self.step_task_code()
            task_id = self.step_sign(url, commit)
            self.outcome.task_id = task_id
            finals = self.step_submit(task_id)
            self.step_pool(task_id, finals)
            self.step_refusals(url, commit)
            self.step_audit(task_id)
        finally:
            self.stop()
            self.outcome.write(self.root / "summary.json")
        return self.outcome

    def _check_workdir(self) -> None:
        if self.launcher != "process":
            return
        self.root.chmod(0o711)
        blocked = unreachable_parent(self.root, TASK_USER)
        if blocked is not None:
            raise DemoError(
                f"the sandbox user {TASK_USER} cannot reach the work directory: "
                f"{blocked} is mode {blocked.stat().st_mode & 0o777:o}; "
                "choose a --workdir every user may traverse, e.g. under /tmp"
            )

    def step_keys(self) -> None:
        """1: the PKI for TLS, and the key that signs tasks."""
        c = self.console
        c.step("Throwaway keys: a CA for TLS, and the orchestrator's signing key")
        broker = self.fed.make_broker_pki()
        c.say(f"CA and broker certificate: broker/pki/ (CA {broker.ca.name!r})")
        (self.root / "orchestrator").mkdir()
        done = self.femd("keygen", "orchestrator", "--dir", "orchestrator")
        c.say(f"Ed25519 signing key, keyid {done.stdout.strip()[:16]}...")
        c.say("orchestrator/orchestrator.key stays with the orchestrator;")
        c.say("orchestrator.pub is what each data steward trusts in the policy")

    def step_broker(self) -> None:
        """2: RabbitMQ, TLS only, with femd's topology."""
        c = self.console
        c.step("A private RabbitMQ: TLS only, client certificates (SASL EXTERNAL)")
        try:
            vhost = self.fed.start_broker()
        except RabbitNodeError as e:
            raise DemoError(f"rabbitmq: {e}") from e
        broker = self.fed.broker
        took = broker.last_start_s if broker and broker.last_start_s else 0.0
        c.say(f"{vhost.url} up in {took:.1f} s")
        c.say(
            "exchanges femd.tasks/femd.events/femd.results, queues "
            + ", ".join(f"femd.node.{n}" for n in self.fed.nodes)
        )
        c.say(
            "client certificates (CN = user): "
            + ", ".join([*self.fed.nodes, "orchestrator"])
        )
        c.say(
            "each node may read only its own queue; the broker is transport, not trust"
        )

    def step_nodes(self) -> None:
        """3: the two data nodes, and their agents."""
        c = self.console
        c.step("Two data nodes, each with its own data, policy and femd agent")
        if self.launcher == "podman":
            self._start_podman()
        url, _ = self._repo()
        socket = self.podman.url if self.podman is not None else None
        for site in SITES:
            rows = self.fed.make_node(
                site, git_url=url, image_repo=IMAGE_REPO, podman_socket=socket
            )
            c.say(
                f"{site.node}: {rows} synthetic patients in "
                f"{site.node}/data/cohort.csv; policy {site.node}/policy.yaml"
            )
        c.say(
            f"both policies: trust orchestrator.pub for project {PROJECT}, "
            f"dataset {DATASET}, launcher {self.launcher}, the analysis repository only"
        )
        for node, files in self.fed.nodes.items():
            agent = AgentProcess(node, files.config, files.log)
            self.agents[node] = agent
            c.command(["femd", "run", "--config", f"{node}/femd.yaml"])
            agent.start()
        for node, agent in self.agents.items():
            try:
                took = agent.wait_ready()
            except AgentError as e:
                raise DemoError(str(e)) from e
            c.good(f"{node}: agent pid {agent.pid} READY in {took:.1f} s (sd_notify)")

    def _repo(self) -> tuple[str, str]:
        from demo.federation import commit_analysis

        if self._repo_id is None:
            self._repo_id = commit_analysis(self.root / "orchestrator" / "analysis.git")
        return self._repo_id

    def _start_podman(self) -> None:
        from demo.image import build_python_image
        from testbed.podman import PodmanService, PodmanServiceError

        c = self.console
        try:
            self.podman = PodmanService().start()
            c.say(f"rootless podman service as femd-podman: {self.podman.url}")
            self.image = build_python_image(self.podman, IMAGE_REPO)
        except PodmanServiceError as e:
            raise DemoError(f"podman: {e}") from e
        c.say(f"task image (host python3, imported locally): {self.image}")

    def step_task_code(self) -> tuple[str, str]:
        """4a: the analysis code, in git, pinned."""
        c = self.console
        c.step("The analysis: code in a git repository, one task pinned to a commit")
        url, commit = self._repo()
        c.say(f"orchestrator/analysis.git: node_analysis.py at commit {commit[:12]}...")
        c.say("it reads /data/cohort/*.csv (read-only) and writes only sums to /out:")
        c.say("n, sum and sum of squares per variable, and the gradient and X'WX of a")
        c.say("logistic regression of the outcome: one federated Newton-Raphson round")
        return url, commit

    def step_sign(self, url: str, commit: str) -> str:
        """4b: one task, signed once, for both nodes."""
        weights = ",".join(str(w) for w in START_WEIGHTS)
        manifest = self.manifest(
            source={"git": url, "commit": commit, "path": "."},
            command=[
                "/usr/bin/python3",
                "-I",
                "-B",
                "node_analysis.py",
                "--data",
                "/data/cohort",
                "--out",
                "/out",
                "--weights",
                weights,
            ],
        )
        path = self.write_task("analysis", manifest)
        self.femd(
            "sign",
            "--key",
            "orchestrator/orchestrator.key",
            str(path),
            "-o",
            "orchestrator/tasks/analysis.env",
        )
        self.console.say(
            f"task {manifest['id']} for nodes {', '.join(self.fed.nodes)}, signed once"
        )
        return str(manifest["id"])

    def step_submit(self, task_id: str) -> dict[str, dict[str, Any]]:
        """5: submit to both nodes and follow the events live."""
        c = self.console
        c.step("Submit to both nodes; each verifies, decides, runs and reports")
        nodes = list(self.fed.nodes)
        args = ["submit", "--config", "orchestrator/orchestrator.yaml"]
        for n in nodes:
            args += ["--node", n]
        self.femd(*args, "orchestrator/tasks/analysis.env")
        finals = self.watch(task_id, nodes)
        for node in nodes:
            event = finals.get(node, {})
            if event.get("state") != "succeeded":
                reasons = event.get("reasons") or []
                unenforceable = [
                    r for r in reasons if r.get("rule") == "launcher.unenforceable"
                ]
                if self.launcher == "podman" and unenforceable:
                    self.outcome.podman_refused = str(unenforceable[0].get("message"))
                else:
                    self.outcome.problems.append(
                        f"{node}: the analysis task ended {event.get('state')}"
                    )
        return finals

    def step_pool(self, task_id: str, finals: dict[str, dict[str, Any]]) -> None:
        """6: pool the partial sums; compare with the centralised computation."""
        c = self.console
        c.step("Pool the partial results on the orchestrator; compare with centralised")
        if self.outcome.podman_refused is not None:
            c.warn("podman cannot enforce this task's limits on this host:")
            c.warn(self.outcome.podman_refused)
            c.warn("femd refused the task (rule launcher.unenforceable), as it must:")
            c.warn("it never runs a task with limits it cannot enforce (fail closed).")
            c.warn("Nothing to pool. Run the demo with --launcher process instead.")
            return
        if self.outcome.problems:
            c.bad("a node did not succeed; nothing to pool")
            return
        results = self.root / "orchestrator" / "results"
        partials = []
        for node in sorted(finals):
            path = results / node / task_id / "partial.json"
            partials.append(json.loads(path.read_text()))
            c.say(f"{path.relative_to(self.root)}: n = {partials[-1]['n']} (sums only)")
        pooled = pool(partials)
        rows = []
        for csv in (f.csv for f in self.fed.nodes.values()):
            rows += read_cohort(csv)
        c.say("centralised: the same analysis over both CSVs at once (possible here")
        c.say("only because the demo made both datasets; in real life it is not)")
        central = centralise(rows, START_WEIGHTS)
        self._show_comparison(pooled, central)

    def _show_comparison(self, pooled: Figures, central: Figures) -> None:
        c = self.console
        lines = compare(pooled, central)
        self.outcome.figures = {
            x.name: {"pooled": x.pooled, "central": x.central} for x in lines
        }
        c.table(
            ["figure", "pooled (federated)", "centralised", "rel. difference"],
            [
                [x.name, f"{x.pooled:.10g}", f"{x.central:.10g}", f"{x.relative:.1e}"]
                for x in lines
            ],
        )
        worst = max(x.relative for x in lines)
        self.outcome.max_relative = worst
        self.outcome.pooled_agrees = worst <= TOLERANCE
        if self.outcome.pooled_agrees:
            c.good(
                f"pooled = centralised for all {len(lines)} figures "
                f"(largest relative difference {worst:.1e} <= {TOLERANCE:g})"
            )
        else:
            c.bad(f"pooled and centralised differ by {worst:.1e} > {TOLERANCE:g}")
            self.outcome.problems.append("pooled result differs from centralised")

    def step_refusals(self, url: str, commit: str) -> None:
        """7: a tampered envelope and a task against policy, both refused."""
        c = self.console
        c.step("Tampered and out-of-policy tasks are refused, with the rule named")
        nodes = list(self.fed.nodes)
        # (a) Someone on the way changes the signed task to copy the raw data out.
        envelope = json.loads(
            (self.root / "orchestrator/tasks/analysis.env").read_text()
        )
        manifest = json.loads(base64.b64decode(envelope["payload"]))
        manifest["id"] = str(uuid.uuid4())
        manifest["command"] = [
            "/bin/sh",
            "-c",
            "cat /data/cohort/*.csv > /out/leak.csv",
        ]
        envelope["payload"] = base64.b64encode(json.dumps(manifest).encode()).decode()
        tampered = self.root / "orchestrator/tasks/tampered.env"
        tampered.write_text(json.dumps(envelope) + "\n")
        c.say("(a) the signed analysis task, its command changed on the way to")
        c.say("    `cat /data/cohort/*.csv > /out/leak.csv`; the signature is kept")
        c.say("    a steward can dry-run any envelope against the policy:")
        check = self.femd(
            "check",
            "--policy",
            "fdn-01/policy.yaml",
            "orchestrator/tasks/tampered.env",
            check=False,
        )
        for line in check.stdout.strip().splitlines():
            c.say("    " + line)
        self.femd(
            "submit",
            "--config",
            "orchestrator/orchestrator.yaml",
            *_each("--node", nodes),
            "orchestrator/tasks/tampered.env",
        )
        c.say(f"    an envelope no trusted key signed is reported as {UNVERIFIED!r}:")
        c.say("    femd does not trust anything in it, not even its task id")
        self._expect_refusal(self.watch(UNVERIFIED, nodes), "signature.threshold")
        # (b) Properly signed, but for a dataset the stewards never allowed.
        c.say("(b) a properly signed task that asks for another dataset, icu-2023")
        path = self.write_task(
            "other-dataset",
            self.manifest(
                command=["/bin/sh", "-c", "ls /data"],
                inputs=[{"dataset": "icu-2023", "mount": "/data/icu"}],
            ),
        )
        signed = "orchestrator/tasks/other-dataset.env"
        self.femd(
            "sign", "--key", "orchestrator/orchestrator.key", str(path), "-o", signed
        )
        task_id = json.loads((self.root / path).read_text())["id"]
        self.femd(
            "submit",
            "--config",
            "orchestrator/orchestrator.yaml",
            *_each("--node", nodes),
            signed,
        )
        self._expect_refusal(self.watch(task_id, nodes), "dataset.not_allowed")

    def _expect_refusal(self, finals: dict[str, dict[str, Any]], rule: str) -> None:
        for node in self.fed.nodes:
            event = finals.get(node, {})
            rules = {str(r.get("rule")) for r in event.get("reasons", [])}
            if event.get("state") == "rejected" and rule in rules:
                self.outcome.refusals.setdefault(node, set()).add(rule)
                self.console.good(f"{node} refused it: {rule}")
            else:
                self.console.bad(f"{node} did not refuse it with {rule}")
                self.outcome.problems.append(f"{node}: not refused with {rule}")

    def step_audit(self, task_id: str) -> None:
        """8: where the audit trail is."""
        c = self.console
        c.step("The audit trail: what ran on the data, who signed it, what left")
        for node, files in self.fed.nodes.items():
            records = list(_audit_records(files.log))
            c.say(
                f"{node}/agent.log: {len(records)} audit records (JSON lines on stderr,"
            )
            c.say("  as femd writes them outside systemd; under systemd: journald)")
        sample = next(
            (
                r
                for r in _audit_records(self.fed.nodes["fdn-01"].log)
                if r.get("FEMD_TASK_ID") == task_id and "FEMD_OUTPUT_SHA256" in r
            ),
            None,
        )
        if sample is not None:
            c.say("fdn-01, the analysis task's outputs leaving the node:")
            keep = (
                "MESSAGE",
                "FEMD_TASK_ID",
                "FEMD_PROJECT",
                "FEMD_STATE",
                "FEMD_EXIT_CODE",
                "FEMD_OUTPUT_SHA256",
                "FEMD_POLICY_SHA256",
            )
            for key in keep:
                if key in sample:
                    c.say(f"    {key}={sample[key]}")
        denial = next(
            (
                r
                for r in _audit_records(self.fed.nodes["fdn-01"].log)
                if r.get("FEMD_DECISION") == "deny"
            ),
            None,
        )
        if denial is not None:
            c.say("fdn-01, the first denial:")
            c.say(f"    MESSAGE={str(denial.get('MESSAGE'))[:110]}")
            c.say(f"    FEMD_RULES={denial.get('FEMD_RULES')}")
        c.say("each node's own task history, from its state database:")
        done = self.femd("tasks", "--state-dir", "fdn-01/state")
        for line in done.stdout.strip().splitlines():
            c.say("    " + line)
        c.say("(the tampered envelope is not in it: no trusted key signed it, so it")
        c.say("never became a task; its audit record above is its trace)")
        c.say(f"under systemd: journalctl -u femd FEMD_TASK_ID={task_id} -o json")

    # -- cleanup ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the agents (SIGTERM: drain, exit 0), podman and the broker."""
        c = self.console
        if self.agents:
            c.section("Clean up")
        for node, agent in self.agents.items():
            code = agent.stop()
            if code == 0:
                c.say(f"{node}: agent stopped (SIGTERM, exit 0)")
            else:
                c.bad(f"{node}: agent exit {code}")
                self.outcome.problems.append(f"{node}: agent exit {code} on SIGTERM")
        self.agents.clear()
        if self.podman is not None:
            self.podman.stop()
            self.podman = None
        with contextlib.suppress(RabbitNodeError):
            self.fed.stop()
        if self.fed.broker is not None:
            c.say("broker stopped")


_TERMINAL: Final = frozenset(
    {"rejected", "succeeded", "failed", "timed_out", "cancelled"}
)
_EXPLAIN: Final = {
    "received": "signatures verified, policy checked, decision committed",
    "staging": "code fetched at the pinned commit; dataset resolved",
    "running": "in the sandbox: no network, data read-only, only /out writable",
    "uploading": "outputs checked (size, paths) and checksummed",
}


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _each(flag: str, values: Sequence[str]) -> list[str]:
    return [x for v in values for x in (flag, v)]


def _audit_records(log: Path) -> Iterator[dict[str, Any]]:
    """The audit records in an agent's stderr log (JSON lines with a MESSAGE_ID)."""
    with contextlib.suppress(OSError), log.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "MESSAGE_ID" in record:
                        yield record


def remove(root: Path) -> None:
    """Remove the work directory."""
    shutil.rmtree(root, ignore_errors=True)
