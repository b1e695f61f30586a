"""The agent's intake of deliveries: verify, decide, commit, then ack.

Owns ``Reception``, the part of the ``Agent`` that turns one broker delivery
into a recorded task (or a rejection) through the one admission path
(``admission.admit_here``): input that never becomes a task is rejected with
its rule (floods of it summarised), a replayed id is refused, an admitted
task is committed before its delivery is acked and then queued (a cancel is
applied at once). Does not run tasks (``dispatch``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from femd import audit
from femd.admission import Host, admit_here
from femd.decision import Decision, EventRule, Verdict
from femd.dispatch import Dispatch
from femd.envelope import too_large
from femd.errors import EnvelopeError, FemdError, ManifestError, cut
from femd.events import TaskState
from femd.flood import Tally
from femd.manifest import Cancel, Task
from femd.messages import Delivery
from femd.model import utc_now as _now

__all__ = ["REPLAY_RULE", "Reception"]

logger = logging.getLogger(__name__)

REPLAY_RULE: Final = EventRule.TASK_REPLAYED


class Reception(Dispatch):
    """Deliveries until they are recorded and acked (attributes: ``Agent``)."""

    flood: Tally

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
            state=TaskState.REJECTED,
            decision="deny",
            rules=[r for r, _ in reasons],
            policy_sha256=self.policy.sha256,
        )
        self.state.event_only(
            task_id="unverified",
            state=TaskState.REJECTED,
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
                state=TaskState.REJECTED,
                decision="deny",
                rules=list(kind),
                policy_sha256=self.policy.sha256,
                extra={"COUNT": str(count)},
            )
            try:
                self.state.event_only(
                    task_id="unverified",
                    state=TaskState.REJECTED,
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
        if d.too_large is not None:
            # Dropped by the link as it arrived: the same refusal as an
            # envelope over the limit (the body was never held).
            why = str(too_large(d.too_large, self.config.max_envelope_bytes))
            self._reject_unverified(d, why, [(EventRule.INPUT_ENVELOPE, why)])
            return
        host = Host(self.profiles, self.caps, self.dirs.work)
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
            state=TaskState.RECEIVED,
            **common,
        )
        if not allowed:
            audit.emit(
                audit.Event.TASK_REJECTED,
                f"task {m.id} denied: " + "; ".join(f"{r}: {t}" for r, t in reasons),
                priority=5,
                state=TaskState.REJECTED,
                decision="deny",
                rules=[r for r, _ in reasons],
                **common,
            )
            return
        task = m if isinstance(m, Task) else None
        audit.emit(
            audit.Event.TASK_ADMITTED,
            f"task {m.id} admitted, signed by {', '.join(verdict.signers)}",
            state=TaskState.QUEUED,
            decision="allow",
            image_digest=task.image.partition("@")[2] or None
            if task and task.image
            else None,
            git_commit=task.source.commit if task and task.source else None,
            datasets=[i.dataset for i in task.inputs] if task else (),
            **common,
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
                state=TaskState.REJECTED,
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
                state=TaskState.REJECTED,
                decision="deny",
                rules=[REPLAY_RULE],
                manifest_sha256=sha,
            )
        self.link.ack(d)
        self.link.wake()
