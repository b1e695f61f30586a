"""The agent: ``femd run``'s main loop.

Owns the process's life: load config, policy and launcher profiles; recover
what a previous run left; start the broker link; admit deliveries (verify,
decide, commit, then ack); dispatch admitted tasks to worker threads; apply
cancels; sd_notify READY/WATCHDOG/STATUS/STOPPING; SIGHUP reloads the policy
and profiles atomically; SIGTERM drains and exits 0. The main loop never runs
task work and never blocks on the broker (DESIGN "systemd", "broker").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import sdnotify

from femd import audit
from femd.admission import Host, admit_here
from femd.broker import NodeLink
from femd.config import AgentConfig
from femd.decision import Decision, EventRule, Verdict
from femd.errors import EnvelopeError, FemdError, ManifestError, cut
from femd.execution import Runner
from femd.flood import Tally
from femd.intake import Retry
from femd.launchers import (
    Capabilities,
    Launcher,
    LauncherProfile,
    build,
    load_profiles,
    probe,
)
from femd.livelog import LogFollower
from femd.manifest import Cancel, Task, decode_manifest
from femd.messages import Delivery
from femd.model import utc_now as _now
from femd.nodestatus import cert_not_after, status_message
from femd.policy import LoadedPolicy, load_policy
from femd.readmission import decide_again
from femd.reprobe import Reprobe
from femd.retention import Retention
from femd.state import TERMINAL_STATES, State
from femd.tlsfiles import check_tls_files

__all__ = ["REPLAY_RULE", "RESTART_RULE", "Agent"]

logger = logging.getLogger(__name__)

REPLAY_RULE: Final = EventRule.TASK_REPLAYED
RESTART_RULE: Final = EventRule.AGENT_RESTARTED
_STATUS_EVERY_S: Final = 5.0


def _watchdog_interval() -> float | None:
    """WatchdogSec for this process in seconds, or None (like sd_watchdog_enabled)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def _release_startup_memory() -> None:
    """Give the heap that start-up used (YAML, probes, imports) back to the OS.

    An idle agent keeps what it holds for days: collect the garbage once, then
    glibc's ``malloc_trim`` returns the free pages (~1.5 MB). A libc without
    it (musl) keeps them; nothing else changes.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Agent:
    """One femd agent process."""

    def __init__(self, config: AgentConfig, *, config_path: Path | None = None) -> None:
        """Load policy and profiles, open state, probe launchers; connect nothing yet.

        Raises:
            PolicyError: the policy is invalid.
            ConfigError: a launcher profile is invalid.
            StateError: the state database cannot be opened.
            BrokerError: a TLS file is unusable, or not this node's identity.
        """
        self.config = config
        self.config_path = config_path
        self.node = config.node
        b = config.broker
        check_tls_files(b.ca, b.cert, b.key, expected_cn=self.node)
        self.policy: LoadedPolicy = self._load_policy()
        self.profiles: dict[str, LauncherProfile] = load_profiles(
            Path(config.launchers)
        )
        self.state_dir = config.state_path
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.state = State(self.state_dir / "state.sqlite")
        for f in self.state_dir.glob("state.sqlite*"):
            f.chmod(0o600)  # SECURITY: history, payloads and outbox are femd's alone
        self.launchers: dict[tuple[str, str], Launcher] = {}
        self.caps: dict[tuple[str, str], Capabilities] = {}
        self.reprobe = Reprobe()
        self._build_launchers()
        self.link = NodeLink(
            config.broker,
            self.node,
            self.state,
            prefetch=max(1, config.max_concurrent_tasks),
            on_state=self._on_broker_state,
            on_delivery=self._wake,
        )
        self.queue: deque[str] = deque()
        self.retry = Retry()
        self.flood = Tally()
        self.retention = Retention(config.retention_days)
        self.runners: dict[str, Runner] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.done = 0
        # The main loop sleeps until something happens: a delivery, a finished
        # task (its id in ``_finished``), a connect, a signal, a stop request.
        # SimpleQueue.put is reentrant, so signal handlers may wake it too.
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            # A notify reader that stops reading must never block the main loop.
            self._notifier.socket.setblocking(False)
        self._watchdog_s = _watchdog_interval()
        self._last_ping = 0.0
        self._ready = False
        self._last_status = 0.0
        self._last_node_status = 0.0
        self._cert_not_after = cert_not_after(config.broker.cert)

    # -- loading ---------------------------------------------------------------

    def _load_policy(self) -> LoadedPolicy:
        policy = load_policy(self.config.policy_path)
        if policy.policy.node != self.node:
            from femd.errors import PolicyError

            raise PolicyError(
                policy.source,
                f"is for node {policy.policy.node!r}, but this agent is {self.node!r}",
                field="node",
            )
        return policy

    def _build_launchers(self) -> None:
        """One launcher per (profile, back-end): a profile is construction input."""
        launchers = build(
            self.profiles,
            state_dir=self.state_dir,
            configs=self.config.launcher_configs(),
        )
        caps = {key: self._probe(key, launcher) for key, launcher in launchers.items()}
        self.launchers, self.caps = launchers, caps
        self.reprobe.reset(
            time.monotonic(), unavailable=not all(c.available for c in caps.values())
        )

    def _probe(self, key: tuple[str, str], launcher: Launcher) -> Capabilities:
        """Probe one launcher; log it, and audit a change of availability."""
        cap = probe(launcher)
        before = self.caps.get(key)
        what = "/".join(key)
        if cap.available:
            logger.info("launcher %s: available", what)
            if before is not None and not before.available:
                audit.emit(
                    audit.Event.LAUNCHER_AVAILABLE,
                    f"launcher {what}: available again",
                    node=self.node,
                    extra={"LAUNCHER": what},
                )
            return cap
        why = "; ".join(cap.problems)
        logger.warning("launcher %s: unavailable: %s", what, why)
        if before is None or before.available:
            audit.emit(
                audit.Event.LAUNCHER_UNAVAILABLE,
                f"launcher {what}: unavailable: {why}",
                priority=4,
                node=self.node,
                extra={"LAUNCHER": what},
            )
        return cap

    def _probe_unavailable(self) -> None:
        """Probe again the launchers that failed; back off while some still fail."""
        for key, cap in list(self.caps.items()):
            if not cap.available:
                self.caps[key] = self._probe(key, self.launchers[key])
        self.reprobe.probed(
            time.monotonic(),
            unavailable=not all(c.available for c in self.caps.values()),
        )

    def reload(self) -> None:
        """SIGHUP: build a whole new policy and profile set, then swap; else keep."""
        try:
            policy = self._load_policy()
            profiles = load_profiles(Path(self.config.launchers))
        except FemdError as e:
            logger.error("reload refused, keeping the previous policy: %s", e)
            audit.emit(
                audit.Event.POLICY_RELOAD_FAILED,
                f"policy reload refused: {cut(e, 200)}",
                priority=3,
                node=self.node,
                policy_sha256=self.policy.sha256,
            )
            return
        self.policy, self.profiles = policy, profiles
        self._build_launchers()
        self.publish_node_status()
        audit.emit(
            audit.Event.POLICY_RELOADED,
            f"policy reloaded from {policy.source}",
            node=self.node,
            policy_sha256=policy.sha256,
        )
        self._decide_queued_again()

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
            if row is None or row.state != "queued" or row.payload is None:
                continue
            m = decode_manifest(row.payload)
            decision = decide_again(
                m,
                row.signer_keyids,
                self.policy,
                node=self.node,
                now=_now(),
                skew_s=self.config.clock_skew_s,
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
                    "rejected",
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
                state="rejected",
                decision="deny",
                rules=[r for r, _ in reasons],
                signer_keyids=list(row.signer_keyids),
                manifest_sha256=row.manifest_sha256,
                policy_sha256=self.policy.sha256,
            )
        self.link.wake()

    # -- node status -------------------------------------------------------------

    def publish_node_status(self, state: Literal["up", "stopping"] = "up") -> None:
        """Queue this node's status for the orchestrator (``femd nodes``)."""
        self._last_node_status = time.monotonic()
        self.link.publish_soon(
            status_message(
                node=self.node,
                state=state,
                policy_sha256=self.policy.sha256,
                caps=self.caps,
                running=len(self.runners),
                queued=len(self.queue),
                state_dir=self.state_dir,
                cert_not_after=self._cert_not_after,
                interval_s=self.config.node_status_interval_s,
            )
        )

    # -- notify ----------------------------------------------------------------

    def _notify(self, text: str) -> None:
        self._notifier.notify(text)

    def _ping(self) -> None:
        """WATCHDOG=1 at half of systemd's WatchdogSec, only when it asked for it."""
        if self._watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_s / 2:
            self._last_ping = now
            self._notify("WATCHDOG=1")

    def _status(self) -> str:
        counts = self.state.counts()
        done = sum(v for k, v in counts.items() if k in TERMINAL_STATES)
        broker = (
            "broker connected"
            if self.link.connected.is_set()
            else (f"broker disconnected ({self.link.last_error or 'connecting'})")
        )
        return (
            f"running {len(self.runners)} tasks, {len(self.queue)} queued, "
            f"{done} done, {broker}"
        )

    def _wake(self) -> None:
        self._wakeups.put(None)

    def _on_broker_state(self, up: bool, why: str) -> None:
        self._wake()  # READY at once on the first connect, not at the next turn
        if up:
            audit.emit(audit.Event.BROKER_CONNECTED, "broker connected", node=self.node)
        else:
            audit.emit(
                audit.Event.BROKER_DISCONNECTED,
                f"broker disconnected: {why or 'closed'}",
                priority=4,
                node=self.node,
            )

    # -- admission ---------------------------------------------------------------

    def _reject_unverified(
        self,
        d: Delivery,
        why: str,
        reasons: list[tuple[str, str]],
        *,
        dead_letter: bool = False,
    ) -> None:
        settle = self.link.reject if dead_letter else self.link.ack
        kind = tuple(r for r, _ in reasons)
        if not self.flood.first(kind, time.monotonic()):
            # A repeat within the window: refused, counted, summarised later.
            settle(d)
            return
        audit.emit(
            audit.Event.TASK_REJECTED,
            f"envelope rejected: {cut(why, 200)}",
            priority=5,
            node=self.node,
            state="rejected",
            decision="deny",
            rules=[r for r, _ in reasons],
            policy_sha256=self.policy.sha256,
        )
        self.state.event_only(
            task_id="unverified",
            state="rejected",
            node=self.node,
            at=_now(),
            reasons=reasons,
        )
        settle(d)
        self.link.wake()

    def _summarise_floods(self) -> None:
        """One audit entry and one status event for each kind of repeats."""
        repeats = self.flood.flush(time.monotonic())
        if not repeats:
            return
        for kind, count in repeats.items():
            text = (
                f"{count} more unverifiable messages rejected in"
                f" {self.flood.window_s:.0f} s ({', '.join(kind)})"
            )
            audit.emit(
                audit.Event.TASK_REJECTED,
                text,
                priority=5,
                node=self.node,
                state="rejected",
                decision="deny",
                rules=list(kind),
                policy_sha256=self.policy.sha256,
                extra={"COUNT": str(count)},
            )
            try:
                self.state.event_only(
                    task_id="unverified",
                    state="rejected",
                    node=self.node,
                    at=_now(),
                    reasons=[(rule, text) for rule in kind],
                )
            except FemdError as e:
                logger.error("cannot record rejected messages: %s", e)
        self.link.wake()

    def handle(self, d: Delivery) -> None:
        """Admit one delivery: verify, decide, commit, then ack; raises nothing."""
        if d.problem is not None:
            # Not even its AMQP properties decode: dead-letter it, alone.
            self._reject_unverified(
                d, d.problem, [(EventRule.INPUT_AMQP, d.problem)], dead_letter=True
            )
            return
        host = Host(self.profiles, self.caps, self.state_dir / "work")
        try:
            verdict = admit_here(
                d.body,
                self.policy,
                node=self.node,
                now=_now(),
                skew_s=self.config.clock_skew_s,
                max_bytes=self.config.max_envelope_bytes,
                host=host,
            )
        except EnvelopeError as e:
            self._reject_unverified(d, str(e), [(EventRule.INPUT_ENVELOPE, str(e))])
            return
        except ManifestError as e:
            self._reject_unverified(d, str(e), [(EventRule.INPUT_MANIFEST, str(e))])
            return
        m = verdict.manifest
        if m is None:
            reasons = [(r.rule.value, r.message) for r in verdict.decision.reasons]
            self._reject_unverified(d, "no trusted signature", reasons)
            return
        decision = verdict.decision
        self._commit(d, verdict, decision)

    def _commit(self, d: Delivery, verdict: Verdict, decision: Decision) -> None:
        m = verdict.manifest
        assert m is not None  # noqa: S101 (checked by the caller)
        reasons = [(r.rule.value, r.message) for r in decision.reasons]
        allowed = decision.allowed
        fresh = self.state.record(
            task_id=m.id,
            project=m.project,
            kind=type(m).__name__,
            manifest_sha256=verdict.manifest_sha256,
            payload=verdict.payload,
            signer_keyids=list(verdict.keyids),
            launcher=m.launcher if isinstance(m, Task) else None,
            decision="allow" if allowed else "deny",
            reasons=reasons,
            node=self.node,
            at=_now(),
        )
        if not fresh:
            self._seen_again(d, m.id, verdict.manifest_sha256)
            return
        # SECURITY: the ack comes only after the task and its decision are on disk.
        self.link.ack(d)
        self.link.wake()
        common: dict[str, Any] = {
            "task_id": m.id,
            "project": m.project,
            "node": self.node,
            "signer_keyids": list(verdict.keyids),
            "manifest_sha256": verdict.manifest_sha256,
            "policy_sha256": self.policy.sha256,
        }
        audit.emit(
            audit.Event.TASK_RECEIVED,
            f"task {m.id} received",
            state="received",
            **common,
        )
        if not allowed:
            audit.emit(
                audit.Event.TASK_REJECTED,
                f"task {m.id} denied: " + "; ".join(f"{r}: {t}" for r, t in reasons),
                priority=5,
                state="rejected",
                decision="deny",
                rules=[r for r, _ in reasons],
                **common,
            )
            return
        task_fields: dict[str, object] = {}
        if isinstance(m, Task):
            task_fields = {
                "image_digest": m.image.partition("@")[2] or None if m.image else None,
                "git_commit": m.source.commit if m.source else None,
                "datasets": [i.dataset for i in m.inputs],
            }
        audit.emit(
            audit.Event.TASK_ADMITTED,
            f"task {m.id} admitted, signed by {', '.join(verdict.signers)}",
            state="queued",
            decision="allow",
            **common,
            **task_fields,  # type: ignore[arg-type]
        )
        if isinstance(m, Cancel):
            self._apply_cancel(m)
        else:
            self.queue.append(m.id)

    def _seen_again(self, d: Delivery, task_id: str, sha: str) -> None:
        row = self.state.get(task_id)
        if d.redelivered and row is not None and row.manifest_sha256 == sha:
            # A redelivery of what we committed before a crash: ack, never rerun.
            logger.info(
                "task %s: redelivered, already recorded (%s)", task_id, row.state
            )
        else:
            msg = f"task id {task_id} was already received on this node; not run again"
            self.state.event_only(
                task_id=task_id,
                state="rejected",
                node=self.node,
                at=_now(),
                reasons=[(REPLAY_RULE, msg)],
            )
            audit.emit(
                audit.Event.TASK_REJECTED,
                msg,
                priority=5,
                task_id=task_id,
                node=self.node,
                state="rejected",
                decision="deny",
                rules=[REPLAY_RULE],
                manifest_sha256=sha,
            )
        self.link.ack(d)
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
                "cancelled",
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
            state="cancelled",
        )
        self.state.transition(
            c.id, "succeeded", node=self.node, at=_now(), error=detail
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
            except queue.Empty:
                return
            self.threads.pop(tid, None)
            self.runners.pop(tid, None)
            self.done += 1

    def _dispatch(self) -> None:
        self._reap()
        while self.queue and len(self.runners) < self.config.max_concurrent_tasks:
            tid = self.queue.popleft()
            row = self.state.get(tid)
            if row is None or row.state != "queued" or row.payload is None:
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
        outgoing = self.state_dir / "outgoing"
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
            if row.state in ("received", "queued") and row.payload is not None:
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
            if isinstance(task, Task) and row.state in ("staging", "running"):
                launcher = self.launchers.get((task.profile, task.launcher))
                try:
                    handle = launcher.adopt(task.id) if launcher else None
                except FemdError as e:
                    logger.warning("task %s: cannot re-attach: %s", row.task_id, e)
                if handle is not None and row.state == "staging":
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
                "failed",
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
                state="failed",
            )
        self._decide_queued_again()

    # -- main loop --------------------------------------------------------------------

    def _signals(self) -> None:
        def stop(_sig: int, _frame: FrameType | None) -> None:
            self._stop.set()
            self._wake()

        def reload(_sig: int, _frame: FrameType | None) -> None:
            self._reload.set()
            self._wake()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def request_stop(self) -> None:
        """Ask the main loop to drain and exit (as SIGTERM does)."""
        self._stop.set()
        self._wake()

    def run(self) -> int:
        """Serve until SIGTERM; return the exit code (0 on a clean stop)."""
        if threading.current_thread() is threading.main_thread():
            self._signals()
        audit.emit(
            audit.Event.POLICY_LOADED,
            f"policy loaded from {self.policy.source}",
            node=self.node,
            policy_sha256=self.policy.sha256,
        )
        self.recover()
        self.link.start()
        self.publish_node_status()
        while not self._stop.is_set():
            self._tick()
        return self._shutdown()

    def _admit(self, d: Delivery) -> None:
        """Handle *d*; if the state cannot take it, keep it for another try."""
        try:
            self.handle(d)
        except FemdError as e:
            # State unavailable: not acked; tried again after a backoff.
            self.retry.failed(d, e, time.monotonic())
        else:
            self.retry.succeeded(time.monotonic())

    def _tick(self) -> None:
        if not self._ready and self.link.ever_connected.is_set():
            self._ready = True
            self._notify("READY=1")
            logger.info("ready: node %s, policy %s", self.node, self.policy.sha256[:12])
            # docs/auditor.md: AGENT_STARTED means "up and ready", so after READY.
            audit.emit(
                audit.Event.AGENT_STARTED,
                f"femd agent ready for node {self.node}",
                node=self.node,
                policy_sha256=self.policy.sha256,
            )
            _release_startup_memory()
        if self._reload.is_set():
            self._reload.clear()
            self._notify("RELOADING=1")
            self.reload()
            self._notify("READY=1")
        self._sleep()
        now = time.monotonic()
        if self.reprobe.due(now):
            self._probe_unavailable()
        self._summarise_floods()
        if self.retention.due(now):
            self.retention.run(self.state, _now(), now)
        for late in self.retry.due(time.monotonic(), self.link.generation):
            self._admit(late)
            self._dispatch()
        while not self._stop.is_set():
            try:
                d = self.link.inbox.get_nowait()
            except queue.Empty:
                break
            self._admit(d)
            self._dispatch()  # a free slot takes the task before the next delivery
        self._dispatch()
        now = time.monotonic()
        self._ping()
        if now - self._last_node_status >= self.config.node_status_interval_s:
            self.publish_node_status()
        if now - self._last_status > _STATUS_EVERY_S:
            self._last_status = now
            self._notify(f"STATUS={self._status()}")

    def _sleep(self) -> None:
        """Wait for a wake-up, or until something on a timer is due."""
        now = time.monotonic()
        due = min(
            self._last_status + _STATUS_EVERY_S,
            self._last_node_status + self.config.node_status_interval_s,
        )
        if self._watchdog_s is not None:
            due = min(due, self._last_ping + self._watchdog_s / 2)
        # issue 17's timers: commits to retry, launchers to probe again, a
        # flood summary, the state's retention.
        for at in (
            self.retry.next_at(),
            self.reprobe.next_at(),
            self.flood.next_at(),
            self.retention.next_at(),
        ):
            if at is not None:
                due = min(due, at)
        try:
            self._wakeups.get(timeout=min(max(0.0, due - now), _STATUS_EVERY_S))
        except queue.Empty:
            return
        while True:  # one turn serves every wake-up that came meanwhile
            try:
                self._wakeups.get_nowait()
            except queue.Empty:
                return

    def _shutdown(self) -> int:
        self._notify("STOPPING=1")
        audit.emit(audit.Event.AGENT_STOPPING, "femd agent stopping", node=self.node)
        self.link.pause_consuming()
        self.publish_node_status("stopping")
        deadline = time.monotonic() + self.config.stop_grace_s
        while self.threads and time.monotonic() < deadline:
            self._ping()
            self._notify(f"STATUS=stopping: waiting for {len(self.threads)} tasks")
            with contextlib.suppress(queue.Empty):
                self._wakeups.get(timeout=0.2)
            self._reap()
        for runner in list(self.runners.values()):
            runner.cancel("agent stopping")
        for thread in list(self.threads.values()):
            thread.join(timeout=30)
        self.link.stop(flush_s=5.0)
        self.state.close()
        if self._notifier.socket is not None:
            self._notifier.socket.close()
        return 0
