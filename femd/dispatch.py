"""The agent's tasks between admission and their end: queue, run, cancel, recover.

Owns ``Dispatch``, the part of the ``Agent`` that holds the queue of admitted
tasks and the worker threads: starts a ``Runner`` per task while slots are
free, frees a slot when its thread ends, applies cancels, decides queued
tasks again after a policy reload, and at start-up reconciles what a previous
run left (re-attach a running task, end the rest ``failed``). Does not admit
(``reception``) nor run the main loop (``agent``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Final

from femd import audit
from femd.admission import Host
from femd.config import AgentConfig
from femd.decision import EventRule
from femd.errors import FemdError, cut
from femd.events import TaskState
from femd.execution import Runner
from femd.launchers import Capabilities, Launcher, LauncherProfile
from femd.livelog import LogFollower
from femd.manifest import Cancel, Task, decode_manifest
from femd.messages import Link
from femd.model import utc_now as _now
from femd.policy import LoadedPolicy
from femd.readmission import decide_again
from femd.state import TERMINAL_STATES, State
from femd.statedir import StateDir

__all__ = ["RESTART_RULE", "Dispatch"]

logger = logging.getLogger(__name__)

RESTART_RULE: Final = EventRule.AGENT_RESTARTED


class Dispatch:
    """Admitted tasks until they end (the ``Agent`` sets every attribute)."""

    config: AgentConfig
    node: str
    state: State
    state_dir: Path
    dirs: StateDir
    link: Link
    policy: LoadedPolicy
    profiles: dict[str, LauncherProfile]
    launchers: dict[tuple[str, str], Launcher]
    caps: dict[tuple[str, str], Capabilities]
    queue: deque[str]
    runners: dict[str, Runner]
    threads: dict[str, threading.Thread]
    done: int
    _finished: SimpleQueue[str]
    _wake: Callable[[], None]

    def _decide_queued_again(self) -> None:
        """End ``rejected`` every queued task the current policy now denies.

        Runs after a reload and after recovery (the policy may have changed
        while the agent was down).
        """
        for tid in list(self.queue):
            try:
                row = self.state.get(tid)
            except FemdError as e:
                logger.error("task %s: cannot decide again, not run: %s", tid, e)
                self.queue.remove(tid)
                continue
            if row is None or row.state != TaskState.QUEUED or row.payload is None:
                continue
            m = decode_manifest(row.payload)
            decision = decide_again(
                m,
                row.signer_keyids,
                self.policy,
                node=self.node,
                now=_now(),
                skew_s=self.config.clock_skew_s,
                host=Host(self.profiles, self.caps, self.dirs.work),
            )
            if decision.allowed:
                continue
            # SECURITY: out of the queue first; if the state cannot record the
            # rejection, the task stays queued on disk and is decided again at
            # the next start, never run meanwhile.
            self.queue.remove(tid)
            reasons = [(r.rule.value, r.message) for r in decision.reasons]
            text = "; ".join(f"{r}: {t}" for r, t in reasons)
            try:
                self.state.transition(
                    tid,
                    TaskState.REJECTED,
                    node=self.node,
                    at=_now(),
                    reasons=reasons,
                    error=f"denied by the current policy: {cut(text, 200)}",
                )
            except FemdError as e:
                logger.error("task %s: denied, cannot record it: %s", tid, e)
            audit.emit(
                audit.Event.TASK_REJECTED,
                f"task {tid} denied by the current policy before it started: {text}",
                priority=5,
                task_id=tid,
                project=row.project,
                node=self.node,
                state=TaskState.REJECTED,
                decision="deny",
                rules=[r for r, _ in reasons],
                signer_keyids=list(row.signer_keyids),
                manifest_sha256=row.manifest_sha256,
                policy_sha256=self.policy.sha256,
            )
        self.link.wake()

    def _apply_cancel(self, c: Cancel) -> None:
        target = self.state.get(c.target)
        detail = ""
        if target is not None and target.project != c.project:
            detail = f"target {c.target} belongs to another project; nothing cancelled"
        elif c.target in self.runners:
            self.runners[c.target].cancel(f"cancelled by {c.id}")
            detail = f"cancelling running task {c.target}"
        elif target is not None and target.state not in TERMINAL_STATES:
            if c.target in self.queue:
                self.queue.remove(c.target)
            self.state.transition(
                c.target,
                TaskState.CANCELLED,
                node=self.node,
                at=_now(),
                error=f"cancelled by {c.id}",
            )
            detail = f"cancelled queued task {c.target}"
        else:
            detail = f"task {c.target} is not queued or running here; nothing cancelled"
        audit.emit(
            audit.Event.TASK_CANCELLED,
            f"cancel {c.id}: {detail}",
            task_id=c.target,
            project=c.project,
            node=self.node,
            state=TaskState.CANCELLED,
        )
        self.state.transition(
            c.id, TaskState.SUCCEEDED, node=self.node, at=_now(), error=detail
        )
        self.link.wake()

    # -- dispatch ------------------------------------------------------------------

    def _runner(self, task: Task) -> Runner:
        return Runner(
            task=task,
            state=self.state,
            node=self.node,
            policy=self.policy,
            profiles=self.profiles,
            launchers=self.launchers,
            state_dir=self.state_dir,
            chunk_bytes=self.config.result_chunk_bytes,
            log_max_bytes=self.config.log_max_bytes,
            wake=self.link.wake,
            live_log=functools.partial(
                LogFollower,
                node=self.node,
                publish=self.link.publish_soon,
                rate_bytes_s=self.config.live_log_bytes_s,
                burst_bytes=self.config.live_log_burst_bytes,
            ),
        )

    def _spawn(self, task_id: str, target: Callable[[], object]) -> None:
        def run() -> None:
            try:
                target()
            finally:
                self._finished.put(task_id)
                self._wake()

        t = threading.Thread(target=run, name=f"task-{task_id}", daemon=True)
        self.threads[task_id] = t
        t.start()

    def _reap(self) -> None:
        """Free the slots of tasks whose thread said it finished."""
        while True:
            try:
                tid = self._finished.get_nowait()
            except Empty:
                return
            self.threads.pop(tid, None)
            self.runners.pop(tid, None)
            self.done += 1

    def _dispatch(self) -> None:
        self._reap()
        while self.queue and len(self.runners) < self.config.max_concurrent_tasks:
            tid = self.queue.popleft()
            row = self.state.get(tid)
            if row is None or row.state != TaskState.QUEUED or row.payload is None:
                continue
            task = decode_manifest(row.payload)
            if not isinstance(task, Task):
                continue
            runner = self._runner(task)
            self.runners[tid] = runner
            self._spawn(tid, runner.run)

    # -- recovery --------------------------------------------------------------------

    def _prune_outgoing(self) -> None:
        """Remove archives no queued chunk needs (packing cut short by a crash)."""
        outgoing = self.dirs.outgoing
        if not outgoing.is_dir():
            return
        keep = {Path(p).resolve() for p in self.state.queued_archives()}
        for path in outgoing.iterdir():
            if path.resolve() not in keep:
                logger.info("outputs: removing unsent leftover %s", path.name)
                path.unlink(missing_ok=True)

    def recover(self) -> None:
        """Reconcile tasks a previous run left in non-terminal states."""
        self._prune_outgoing()
        for row in self.state.unfinished():
            if (
                row.state in (TaskState.RECEIVED, TaskState.QUEUED)
                and row.payload is not None
            ):
                if row.kind == "Cancel":
                    # Committed (and acked), then the agent died before applying
                    # it: apply it now, or its target would run after all.
                    cancel = decode_manifest(row.payload)
                    if isinstance(cancel, Cancel):
                        self._apply_cancel(cancel)
                        continue
                self.queue.append(row.task_id)
                continue
            task = decode_manifest(row.payload) if row.payload else None
            handle = None
            # A launch may have begun while the task was still "staging": the
            # launcher is asked too, so what it left is found (process: killed).
            if isinstance(task, Task) and row.state in (
                TaskState.STAGING,
                TaskState.RUNNING,
            ):
                launcher = self.launchers.get((task.profile, task.launcher))
                try:
                    handle = launcher.adopt(task.id) if launcher else None
                except FemdError as e:
                    logger.warning("task %s: cannot re-attach: %s", row.task_id, e)
                if handle is not None and row.state == TaskState.STAGING:
                    # Never reported running: end it rather than adopt it.
                    handle.cancel(0)
                    handle.wait(30)
                    handle = None
            if isinstance(task, Task) and handle is not None:
                logger.info("task %s: re-attached after restart", task.id)
                runner = self._runner(task)
                self.runners[task.id] = runner
                self._spawn(task.id, functools.partial(runner.attach, handle))
                continue
            # The orchestrator must learn why: `error` stays local, `reasons`
            # travel in the status event.
            self.state.transition(
                row.task_id,
                TaskState.FAILED,
                node=self.node,
                at=_now(),
                error="agent restarted",
                reasons=[(RESTART_RULE, f"agent restarted while task was {row.state}")],
            )
            audit.emit(
                audit.Event.TASK_FINISHED,
                f"task {row.task_id}: failed: agent restarted while it was {row.state}",
                priority=3,
                task_id=row.task_id,
                project=row.project,
                node=self.node,
                state=TaskState.FAILED,
            )
        self._decide_queued_again()
