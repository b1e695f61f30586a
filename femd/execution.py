"""One admitted task's life: stage in, launch, wait, stage out, report.

Owns running an admitted task to a terminal state in a worker thread (its
``LaunchSpec`` comes from ``launchspec``; its launcher is whatever the
registry names, execution never branches on one). Every step is a state
transition (outbox event) and an audit record. Deciding whether a task may
run is not its business (``decision``); talking to the broker is not either
(``broker`` drains the outbox).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from femd import audit
from femd.decision import EventRule, Rule
from femd.errors import (
    FemdError,
    LaunchError,
    OutputTooLargeError,
    StageInError,
    StageOutError,
    UnenforceableError,
    cut,
)
from femd.events import RunReport, TaskState
from femd.launchers import (
    Handle,
    Launcher,
    LauncherProfile,
    LaunchSpec,
    Outcome,
    registration,
    start,
)
from femd.launchspec import build_spec, effective_limits, output_cap, runtime_target
from femd.livelog import LogFollower
from femd.manifest import Task
from femd.model import utc_now as _now
from femd.policy import LoadedPolicy
from femd.stageout import is_empty, pack_outputs
from femd.state import Results, State
from femd.statedir import StateDir
from femd.tree import remove_tree

__all__ = ["Runner"]

logger = logging.getLogger(__name__)

GIT_MAX_BYTES: Final = 512 * 1024 * 1024
LOG_TAIL_BYTES: Final = 4096


class Runner:
    """Runs one admitted task to a terminal state (in a worker thread)."""

    def __init__(
        self,
        *,
        task: Task,
        state: State,
        node: str,
        policy: LoadedPolicy,
        profiles: Mapping[str, LauncherProfile],
        launchers: Mapping[tuple[str, str], Launcher],
        state_dir: Path,
        chunk_bytes: int,
        log_max_bytes: int,
        wake: Callable[[], None],
        stop_grace_s: float = 10.0,
        live_log: Callable[[Handle], LogFollower] | None = None,
    ) -> None:
        """Keep what the run needs; nothing happens before ``run()``."""
        self.task = task
        self.state = state
        self.node = node
        self.policy = policy
        self.profiles = profiles
        self.launchers = launchers
        dirs = StateDir(state_dir)
        self.work = dirs.work_of(task.id)
        # Outlives the work dir: chunks are read from it until confirmed.
        self.outgoing = dirs.outgoing
        self.git_cache = dirs.git
        self.chunk_bytes = chunk_bytes
        self.log_max_bytes = log_max_bytes
        self.wake = wake
        self.grace_s = stop_grace_s
        self.cancelled = threading.Event()
        self.cancel_reason = "cancelled"
        self.handle: Handle | None = None
        self.live_log = live_log

    def cancel(self, reason: str) -> None:
        """Ask the run to stop; the task ends ``cancelled``."""
        self.cancel_reason = reason
        self.cancelled.set()

    # -- steps ----------------------------------------------------------------

    def _transition(
        self,
        new: TaskState,
        *,
        exit_code: int | None = None,
        reasons: Sequence[tuple[str, str]] = (),
        error: str | None = None,
        report: RunReport | None = None,
        usage: Mapping[str, float] | None = None,
        passing: Sequence[TaskState] = (),
        results: Results | None = None,
    ) -> None:
        self.state.transition(
            self.task.id,
            new,
            node=self.node,
            at=_now(),
            exit_code=exit_code,
            reasons=reasons,
            error=error,
            report=report,
            usage=usage,
            passing=passing,
            results=results,
        )
        self.wake()

    def _audit(
        self,
        event: audit.Event,
        message: str,
        extra: Mapping[str, str] | None = None,
        **kw: object,
    ) -> None:
        t = self.task
        fields = dict(extra or {})
        if t.runtime:
            fields["RUNTIME"] = t.runtime
        audit.emit(
            event,
            message,
            task_id=t.id,
            project=t.project,
            node=self.node,
            image_digest=t.image.partition("@")[2] or None if t.image else None,
            git_commit=t.source.commit if t.source else None,
            datasets=[i.dataset for i in t.inputs],
            policy_sha256=self.policy.sha256,
            extra=fields or None,
            **kw,  # type: ignore[arg-type]
        )

    def _stage_in(self) -> LaunchSpec:
        # pygit2 (~8 MB) is loaded by the first stage-in, not by an idle agent.
        from femd.stagein import (
            resolve_dataset,
            resolve_runtime,
            source_subdir,
            stage_git,
        )

        t = self.task
        remove_tree(self.work)
        (self.work / "out").mkdir(parents=True)
        # The launcher opens the path to its sandbox's user (and nobody else).
        registration(t.launcher).prepare_work(self.work)
        code = None
        if t.source is not None:
            tree = stage_git(
                t.source.git,
                t.source.commit,
                cache_dir=self.git_cache,
                dest=self.work / "src",
                max_bytes=GIT_MAX_BYTES,
            )
            code = source_subdir(tree, ".")
            source_subdir(tree, t.source.path)  # refuses escapes before launch
        inputs = {}
        for i in t.inputs:
            root = self.policy.policy.datasets[i.dataset].path
            inputs[i.mount] = resolve_dataset(i.dataset, root)
        runtime = None
        if t.runtime is not None:
            runtime = resolve_runtime(t.runtime, runtime_target(t, self.policy))
        profile = self.profiles[t.profile]
        return build_spec(
            t,
            self.policy,
            profile,
            work_dir=self.work,
            code_dir=code,
            inputs=inputs,
            runtime_dir=runtime,
            log_max_bytes=self.log_max_bytes,
        )

    def _wait(self, handle: Handle, timeout_s: float) -> Outcome:
        # The launcher enforces the timeout; this backstop (timeout + a margin)
        # keeps a wedged back-end from holding a slot forever.
        started = datetime.now(UTC)
        backstop = time.monotonic() + timeout_s + 2 * self.grace_s + 60
        killed = False
        follower = self.live_log(handle) if self.live_log else None
        while True:
            outcome = handle.wait(0.5)
            if follower is not None:
                follower.poll(final=outcome is not None)
            if outcome is not None:
                return outcome
            if self.cancelled.is_set():
                handle.cancel(self.grace_s)
                self.cancelled.clear()
            if getattr(handle, "queued", False) and not killed:
                # A batch system's queue is not the task's time (slurm): the
                # backstop starts when the job does.
                backstop = time.monotonic() + timeout_s + 2 * self.grace_s + 60
            if time.monotonic() > backstop:
                if killed:
                    return Outcome(
                        state="failed",
                        exit_code=None,
                        started_at=started,
                        finished_at=datetime.now(UTC),
                        log_tail="",
                        reason="the launcher did not report an end; task abandoned",
                    )
                logger.error(
                    "task %s: launcher overran the timeout; cancelling", handle.task_id
                )
                handle.cancel(self.grace_s)
                killed = True
                backstop = time.monotonic() + self.grace_s + 30

    def _forward_logs(self, handle: Handle) -> None:
        try:
            data = b"".join(handle.logs())
        except FemdError as e:
            logger.warning("task %s: logs unavailable: %s", self.task.id, e)
            return
        if data:
            audit.task_log(self.task.id, self.task.project, data)

    @staticmethod
    def _usage(outcome: Outcome) -> dict[str, float]:
        """What the task used, for the status event, the state and the journal."""
        if outcome.usage is None:
            return {}
        used = msgspec.to_builtins(outcome.usage)
        return {k: v for k, v in used.items() if v is not None}

    @staticmethod
    def _usage_fields(usage: Mapping[str, float]) -> dict[str, str]:
        return {f"USAGE_{k.upper()}": f"{v:g}" for k, v in usage.items()}

    @staticmethod
    def _report(outcome: Outcome) -> RunReport:
        at = outcome.started_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return RunReport(
            log_tail=outcome.log_tail[-LOG_TAIL_BYTES:],
            started_at=at,
            # What the batch system measured (elapsed, CPU, MaxRSS, node...).
            accounting=outcome.accounting,
            # What femd forwarded for the task, per destination (docs/network.md).
            network=outcome.traffic,
        )

    def _stage_out(self, outcome: Outcome) -> None:
        t = self.task
        passing: tuple[TaskState, ...] = ()
        results = None
        if is_empty(self.work / "out"):
            # DESIGN "Status event": nothing to send, so no archive, no chunk
            # and no `outputs`; `uploading` is told in the terminal commit.
            passing = (TaskState.UPLOADING,)
            sent = "no outputs (the output directory is empty)"
        else:
            self._transition(TaskState.UPLOADING)
            self.outgoing.mkdir(mode=0o700, exist_ok=True)
            packed = pack_outputs(
                self.work / "out",
                self.outgoing / f"{t.id}.tar.gz",
                max_bytes=output_cap(t, self.policy),
            )
            # The chunks and the event announcing them: one commit.
            results = Results(packed.path, packed.sha256, self.chunk_bytes)
            sent = f"outputs sent ({packed.bytes} bytes)"
        usage = self._usage(outcome)
        self._transition(
            TaskState.SUCCEEDED,
            exit_code=outcome.exit_code,
            report=self._report(outcome),
            usage=usage or None,
            passing=passing,
            results=results,
        )
        self._audit(
            audit.Event.OUTPUTS_SENT,
            f"task {t.id}: {sent}",
            state=TaskState.SUCCEEDED,
            exit_code=outcome.exit_code,
            output_sha256=results.sha256 if results else None,
            extra=self._usage_fields(usage),
        )

    def run(self) -> None:
        """Run the task to a terminal state; never raises."""
        t = self.task
        try:
            self._run()
        except Exception as e:
            logger.exception("task %s: internal error", t.id)
            self._finish_failed(f"internal error: {type(e).__name__}: {cut(e)}")
        finally:
            self._clean_up()

    def _clean_up(self) -> None:
        """Remove the work dir, whatever the task left in it; never raises."""
        try:
            remove_tree(self.work)
        except FemdError as e:
            logger.error("task %s: work dir not removed: %s", self.task.id, e)

    def _finish_failed(
        self,
        why: str,
        state: TaskState = TaskState.FAILED,
        rule: str | None = None,
        usage: Mapping[str, float] | None = None,
    ) -> None:
        reasons = [(rule or EventRule.ended(state), why)]
        try:
            self._transition(state, error=why, reasons=reasons, usage=usage or None)
        except FemdError as e:
            logger.error("task %s: cannot record %s: %s", self.task.id, state, e)
        self._audit(
            audit.Event.TASK_FINISHED,
            f"task {self.task.id}: {state}: {why}",
            priority=3,
            state=state,
            rules=[rule] if rule else [],
            extra=self._usage_fields(usage or {}),
        )

    def _run(self) -> None:
        t = self.task
        if self.cancelled.is_set():
            self._finish_failed(self.cancel_reason, TaskState.CANCELLED)
            return
        self._transition(TaskState.STAGING)
        try:
            spec = self._stage_in()
        except StageInError as e:
            self._finish_failed(str(e))
            return
        self._audit(
            audit.Event.TASK_STAGED, f"task {t.id}: staged", state=TaskState.STAGING
        )
        if self.cancelled.is_set():
            self._finish_failed(self.cancel_reason, TaskState.CANCELLED)
            return
        try:
            handle = start(self.launchers[(t.profile, t.launcher)], spec)
        except UnenforceableError as e:
            # DESIGN "Launchers": fail closed, with the rule named.
            self._finish_failed(
                str(e), TaskState.REJECTED, Rule.LAUNCHER_UNENFORCEABLE.value
            )
            return
        except LaunchError as e:
            self._finish_failed(str(e))
            return
        self.handle = handle
        self._transition(TaskState.RUNNING)
        self._audit(
            audit.Event.TASK_STARTED, f"task {t.id}: running", state=TaskState.RUNNING
        )
        self.attach(handle)

    def attach(self, handle: Handle) -> None:
        """Wait for a launched (or adopted) task, then report and stage out."""
        t = self.task
        self.handle = handle
        outcome = self._wait(handle, effective_limits(t, self.policy).timeout_s)
        self._forward_logs(handle)
        if outcome.state == "cancelled" and self.cancel_reason != "cancelled":
            outcome = msgspec.structs.replace(outcome, reason=self.cancel_reason)
        usage = self._usage(outcome)
        self._audit(
            audit.Event.TASK_FINISHED,
            f"task {t.id}: {outcome.state} (exit {outcome.exit_code})",
            state=outcome.state,
            exit_code=outcome.exit_code,
            rules=[outcome.rule] if outcome.rule else [],
            extra=self._usage_fields(usage),
        )
        if outcome.state != "succeeded":
            # The orchestrator sees why (cancelled by whom, killed at timeout...).
            why = outcome.reason or (
                f"exit code {outcome.exit_code}"
                if outcome.exit_code is not None
                else ""
            )
            rule = outcome.rule or EventRule.ended(outcome.state)
            self._transition(
                TaskState(outcome.state),
                exit_code=outcome.exit_code,
                error=outcome.reason or None,
                reasons=[(rule, why)] if why else [],
                report=self._report(outcome),
                usage=usage or None,
            )
            return
        try:
            self._stage_out(outcome)
        except OutputTooLargeError as e:
            self._finish_failed(
                str(e), TaskState.FAILED, Rule.OUTPUTS_EXCEEDED.value, usage
            )
        except StageOutError as e:
            self._finish_failed(str(e), usage=usage)
