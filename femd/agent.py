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
import gc
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path
from types import FrameType
from typing import Final, Literal

from femd import audit
from femd.broker import NodeLink
from femd.config import AgentConfig
from femd.dispatch import RESTART_RULE
from femd.earlylink import EarlyLink
from femd.earlyprobe import EarlyProbe
from femd.errors import FemdError, cut
from femd.execution import Runner
from femd.flood import Tally
from femd.intake import Retry
from femd.launchers import (
    Capabilities,
    Launcher,
    LauncherProfile,
    build_all,
    load_profiles,
    probe,
)
from femd.messages import Delivery, LinkFactory
from femd.model import utc_now as _now
from femd.nodestatus import cert_not_after, status_message
from femd.notifier import Notifier
from femd.policy import LoadedPolicy, load_policy
from femd.reception import REPLAY_RULE, Reception
from femd.reprobe import Reprobe
from femd.retention import Retention
from femd.state import TERMINAL_STATES

__all__ = ["REPLAY_RULE", "RESTART_RULE", "Agent"]

logger = logging.getLogger(__name__)

_STATUS_EVERY_S: Final = 5.0


def _release_startup_memory() -> None:
    """Give the heap that start-up used (YAML, probes, imports) back to the OS.

    An idle agent keeps what it holds for days: collect the garbage once, then
    glibc's ``malloc_trim`` returns the free pages (~1.5 MB); musl keeps them.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Agent(Reception):
    """One femd agent process.

    Its intake is ``Reception`` and its tasks ``Dispatch`` (base classes in
    their own modules); this class loads, loops, reloads and stops.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        link: LinkFactory = NodeLink,
        early: EarlyLink | None = None,
        probes: EarlyProbe | None = None,
    ) -> None:
        """Take over *early*'s state and link (else make them); load the rest.

        ``EarlyLink`` checks the TLS files, opens the state and makes the link
        (*link*: tests pass an in-memory one); ``femd run``'s has been
        connecting since before this module was imported. Then the policy and
        the launcher profiles are loaded: *probes*' (``femd run`` has been
        probing its launchers meanwhile), else from their directory, to be
        probed in ``run()``. The agent hears the link once ``run()`` begins.

        Raises:
            PolicyError: the policy is invalid.
            ConfigError: a launcher profile is invalid.
            StateError: the state database cannot be opened.
            BrokerError: a TLS file is unusable, or not this node's identity.
        """
        self.config = config
        self.config_path = config_path
        self.node = config.node
        self._early = early or EarlyLink(config, link=link, start=False)
        self.policy: LoadedPolicy = self._load_policy()
        self._probes = probes
        self.profiles: dict[str, LauncherProfile] = (
            probes.profiles() if probes else load_profiles(Path(config.launchers))
        )
        self.dirs = self._early.dirs
        self.state_dir = self.dirs.root
        self.state = self._early.state
        self.link = self._early.link
        # Built and probed by run(), while the link connects.
        self.launchers: dict[tuple[str, str], Launcher] = {}
        self.caps: dict[tuple[str, str], Capabilities] = {}
        self.reprobe = Reprobe()
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
        self._sd = Notifier()
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
        """One launcher per (profile, back-end): a profile is construction input.

        The first time, ``femd run``'s early probes are taken if it made them.
        """
        probes, self._probes = self._probes, None
        launchers, probed = (
            probes.result()
            if probes
            else build_all(
                self.profiles,
                state_dir=self.state_dir,
                configs=self.config.launcher_configs(),
            )
        )
        caps = {key: self._report(key, cap) for key, cap in probed.items()}
        self.launchers, self.caps = launchers, caps
        self.reprobe.reset(
            time.monotonic(), unavailable=not all(c.available for c in caps.values())
        )

    def _report(self, key: tuple[str, str], cap: Capabilities) -> Capabilities:
        """Log what a probe found, and audit a change of availability."""
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
                self.caps[key] = self._report(key, probe(self.launchers[key]))
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

    def _status(self) -> str:
        counts = self.state.counts()
        done = sum(v for k, v in counts.items() if k in TERMINAL_STATES)
        why = self.link.last_error or "connecting"
        up = self.link.connected.is_set()
        broker = "broker connected" if up else f"broker disconnected ({why})"
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

    # -- main loop --------------------------------------------------------------------

    def _signals(self) -> None:
        def reload(_sig: int, _frame: FrameType | None) -> None:
            self._reload.set()
            self._wake()

        signal.signal(signal.SIGTERM, lambda _sig, _frame: self.request_stop())
        signal.signal(signal.SIGINT, lambda _sig, _frame: self.request_stop())
        signal.signal(signal.SIGHUP, reload)

    def request_stop(self) -> None:
        """Ask the main loop to drain and exit (as SIGTERM does)."""
        self._stop.set()
        self._wake()

    def run(self, *, held: Collection[int] = ()) -> int:
        """Serve until SIGTERM; return the exit code (0 on a clean stop).

        *held*: signals ``femd run`` kept until now. SIGTERM: close, taking no
        task (none handed back, none adopted and cancelled); SIGHUP: reload.
        """
        if threading.current_thread() is threading.main_thread():
            self._signals()
        if signal.SIGTERM in held:
            logger.info("stopped while starting: no task taken")
            if self._probes is not None:
                self._probes.close()
            return self._close()
        if signal.SIGHUP in held:
            self._reload.set()
        audit.emit(
            audit.Event.POLICY_LOADED,
            f"policy loaded from {self.policy.source}",
            node=self.node,
            policy_sha256=self.policy.sha256,
        )
        # The broker connects while the launchers are probed (femd run's early
        # link since before the agent was imported): deliveries wait in the
        # link's inbox until the loop runs, after every probe (nothing is
        # admitted on a capability not yet proven) and the recovery.
        self._early.bind(self._on_broker_state, self._wake)
        self._build_launchers()
        self.recover()
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
            self._sd.notify("READY=1")
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
            self._sd.notify("RELOADING=1")
            self.reload()
            self._sd.notify("READY=1")
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
        self._sd.ping()
        if now - self._last_node_status >= self.config.node_status_interval_s:
            self.publish_node_status()
        if now - self._last_status > _STATUS_EVERY_S:
            self._last_status = now
            self._sd.notify(f"STATUS={self._status()}")

    def _sleep(self) -> None:
        """Wait for a wake-up, or until something on a timer is due."""
        now = time.monotonic()
        due = min(
            self._last_status + _STATUS_EVERY_S,
            self._last_node_status + self.config.node_status_interval_s,
        )
        # issue 17's timers: commits to retry, launchers to probe again, a
        # flood summary, the state's retention; and the watchdog's ping.
        timers = (self.retry, self.reprobe, self.flood, self.retention, self._sd)
        due = min([due, *(at for t in timers if (at := t.next_at()) is not None)])
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
        self._sd.notify("STOPPING=1")
        audit.emit(audit.Event.AGENT_STOPPING, "femd agent stopping", node=self.node)
        self.link.pause_consuming()
        self.publish_node_status("stopping")
        deadline = time.monotonic() + self.config.stop_grace_s
        while self.threads and time.monotonic() < deadline:
            self._sd.ping()
            self._sd.notify(f"STATUS=stopping: waiting for {len(self.threads)} tasks")
            with contextlib.suppress(queue.Empty):
                self._wakeups.get(timeout=0.2)
            self._reap()
        for runner in list(self.runners.values()):
            runner.cancel("agent stopping")
        for thread in list(self.threads.values()):
            thread.join(timeout=30)
        return self._close()

    def _close(self) -> int:
        """Flush and close the link, close the state and the notify socket."""
        self.link.stop(flush_s=5.0)
        self.state.close()
        self._sd.close()
        return 0
