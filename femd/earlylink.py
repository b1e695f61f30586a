"""The broker link, started before the rest of the agent is imported.

Owns ``EarlyLink``: ``femd run`` checks the node's TLS files, opens its state
database and starts its link to the broker first; then it imports and builds
the agent (its policy, profiles and launcher probes) while the TLS and AMQP
handshakes run, which on a small host take as long as all of that.
What the link says before the agent listens (connected, disconnected, a
delivery) is held and handed over in order once the agent binds, after its
policy is loaded: the audit trail reads as it would have. The link connects
and publishes what the outbox holds, but takes no delivery until the agent
binds (``hold_intake``): an agent that fails to start hands nothing back to
the queue. Deliveries then wait in the inbox until the agent's loop runs,
after every probe and the recovery, as before. Does not build the agent
(``femd.agent``) nor know its loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from femd.broker import NodeLink
from femd.config import AgentConfig
from femd.messages import Link, LinkFactory
from femd.state import State
from femd.statedir import StateDir
from femd.tlsfiles import check_tls_files

__all__ = ["EarlyLink"]

_OnState = Callable[[bool, str], None]
_OnDelivery = Callable[[], None]


class EarlyLink:
    """A node's state and its started broker link, waiting for their agent."""

    def __init__(
        self, config: AgentConfig, *, link: LinkFactory = NodeLink, start: bool = True
    ) -> None:
        """Check the TLS files, open the state, make the link; start it if *start*.

        Without *start*, the link starts when it is bound (an agent built
        without ``femd run``: the tests' in-memory links).

        Raises:
            BrokerError: a TLS file is unusable, or not this node's identity.
            StateError: the state database cannot be opened.
        """
        b = config.broker
        check_tls_files(b.ca, b.cert, b.key, expected_cn=config.node)
        self.dirs = StateDir(config.state_path)
        self.state: State = self.dirs.open_state()
        self._lock = threading.Lock()
        self._held: list[tuple[bool, str]] = []
        self._delivered = False
        self._on_state: _OnState | None = None
        self._on_delivery: _OnDelivery | None = None
        self.link: Link = link(
            b,
            config.node,
            self.state,
            prefetch=config.intake_window,
            max_body=config.max_envelope_bytes,
            on_state=self._state,
            on_delivery=self._delivery,
        )
        # SECURITY: no delivery is taken before an agent is built on this
        # link: one that then fails to start (a bad policy, again and again
        # under systemd's restarts) must not hand tasks back to the queue,
        # each time closer to its delivery limit and the dead-letter queue.
        self.link.hold_intake()
        self._started = start
        if start:
            self.link.start()

    def bind(self, on_state: _OnState, on_delivery: _OnDelivery) -> None:
        """Hand the link to its agent: what it said meanwhile, then intake."""
        with self._lock:
            self._on_state, self._on_delivery = on_state, on_delivery
            held, self._held = self._held, []
            for up, why in held:
                on_state(up, why)
            if self._delivered:
                on_delivery()
        if not self._started:
            self._started = True
            self.link.start()
        self.link.open_intake()

    def close(self) -> None:
        """The agent could not be built: close the link (it took nothing), the state."""
        if self._started:
            self.link.stop(0)
        self.state.close()

    def _state(self, up: bool, why: str) -> None:
        with self._lock:
            if self._on_state is None:
                self._held.append((up, why))
                return
            self._on_state(up, why)

    def _delivery(self) -> None:
        with self._lock:
            if self._on_delivery is None:
                self._delivered = True
                return
            self._on_delivery()
