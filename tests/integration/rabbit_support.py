"""pytest fixtures for a real, private, TLS-only RabbitMQ node.

Import them into ``tests/conftest.py``::

    from tests.integration.rabbit_support import broker_vhost, rabbit  # noqa: F401

- ``rabbit`` (session): a started :class:`testbed.RabbitNode` with its CA, server
  certificate and client certificates for ``fdn-01``, ``fdn-02`` and
  ``orchestrator`` (``rabbit.identity(cn)``, ``rabbit.ca.cert``).
- ``broker_vhost`` (function): a fresh vhost provisioned with femd's topology by
  ``packaging/rabbitmq/femd-definitions`` for nodes ``fdn-01``, ``fdn-02`` and the
  orchestrator; a :class:`testbed.Vhost` (``url``, ``ca``, ``cert(cn)``,
  ``key(cn)``, ``broker_config(cn)``, ``parameters(cn)``). Deleted afterwards.

Tests share the node and are isolated by vhost. A test may stop, restart, pause the
node or suspend its listeners: ``broker_vhost`` puts the node back in service before
and after each test.

Without RabbitMQ installed, the fixtures skip; with ``CI=true`` or
``FEMD_TEST_REQUIRE`` naming ``rabbitmq`` (or ``all``) they fail instead.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # testbed/ is not installed; it lives at the root
    sys.path.insert(0, str(REPO))

from testbed import RabbitNode, RabbitNodeError, Vhost, rabbitmq_available  # noqa: E402
from tests.backends import unavailable  # noqa: E402

__all__ = ["IDENTITIES", "NODES", "ORCHESTRATOR", "broker_vhost", "rabbit"]

NODES = ("fdn-01", "fdn-02")
ORCHESTRATOR = "orchestrator"
IDENTITIES = (*NODES, ORCHESTRATOR)


def _unavailable(message: str) -> None:
    unavailable("rabbitmq", message)


def _back_in_service(node: RabbitNode) -> None:
    """Undo whatever fault a test left the shared node in."""
    if node.paused:
        node.resume()
    if not node.running:
        node.start()
    if node.listeners_suspended:
        node.resume_listeners()


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "t"


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node (AMQPS + EXTERNAL only), shared by the session."""
    if not rabbitmq_available():
        _unavailable("rabbitmq: rabbitmq-server (and erlang) not installed")
    base = tmp_path_factory.mktemp("rabbit")
    node = RabbitNode(base)
    for cn in IDENTITIES:
        node.identity(cn)
    try:
        node.start()
    except RabbitNodeError as e:
        node.close()
        pytest.fail(str(e), pytrace=False)
    try:
        yield node
    finally:
        node.close()
        shutil.rmtree(base / "mnesia", ignore_errors=True)  # logs stay for post-mortems


@pytest.fixture
def broker_vhost(rabbit: RabbitNode, request: pytest.FixtureRequest) -> Iterator[Vhost]:
    """A fresh vhost with femd's topology for fdn-01, fdn-02 and the orchestrator."""
    _back_in_service(rabbit)
    name = f"femd-{_slug(request.node.name)}-{secrets.token_hex(3)}"
    vhost = rabbit.provision(name, NODES, ORCHESTRATOR)
    try:
        yield vhost
    finally:
        _back_in_service(rabbit)
        rabbit.delete_vhost(name, wait=False)  # the next test need not wait
