"""The broker side of DESIGN "Trust model" 3 and "Broker topology", on a real node.

mTLS with SASL EXTERNAL (the certificate is the only credential), the permissions
from ``packaging/rabbitmq/femd-definitions`` (node X reads only ``femd.node.X`` and
speaks only for X), durable quorum queues, the poison-message delivery limit, and
the testbed's own promises (fault knobs, no stray processes).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pika.exceptions
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testbed import (  # noqa: E402
    Issued,
    RabbitNode,
    RabbitNodeError,
    Vhost,
    client_context,
    make_ca,
)
from testbed.rabbit import DEFINITIONS_SCRIPT  # noqa: E402

rabbitmq = pytest.mark.rabbitmq
PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


def open_and_close(vhost: Vhost, cn: str | None, **overrides) -> None:
    pika.BlockingConnection(vhost.parameters(cn, **overrides)).close()


@contextmanager
def connect(
    vhost: Vhost, cn: str | None, **overrides
) -> Iterator[pika.BlockingConnection]:
    connection = pika.BlockingConnection(vhost.parameters(cn, **overrides))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def confirmed_channel(connection: pika.BlockingConnection):
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


# With TLS 1.3 the client may finish its side of the handshake and see the
# server's refusal only as a lost stream, before it reads the alert.
LOST_IN_HANDSHAKE = ("EOF occurred", "Connection reset", "Broken pipe")


def assert_tls_refused(vhost: Vhost, alert: str, **overrides) -> None:
    """A valid identity gets in right now; the one in *overrides* is refused."""
    with connect(vhost, "fdn-01") as control:
        assert control.is_open
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        open_and_close(vhost, "fdn-01", **overrides)
    text = repr(info.value)
    assert alert in text or any(lost in text for lost in LOST_IN_HANDSHAKE), text


def ssl_options(vhost: Vhost, cert: Path, key: Path) -> pika.SSLOptions:
    return pika.SSLOptions(client_context(vhost.ca, Issued(cert, key)), vhost.host)


def definitions(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script, argv list
        [sys.executable, str(DEFINITIONS_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
    )


# -- mutual TLS, SASL EXTERNAL ---------------------------------------------------


@rabbitmq
def test_node_certificate_connects_and_sees_its_queue(broker_vhost):
    with connect(broker_vhost, "fdn-01") as connection:
        channel = connection.channel()
        # the agent declares passively: no configure permission needed
        ok = channel.queue_declare("femd.node.fdn-01", passive=True)
        assert ok.method.queue == "femd.node.fdn-01"
        assert ok.method.message_count == 0


@rabbitmq
def test_no_client_certificate_is_refused(broker_vhost):
    no_cert = pika.SSLOptions(broker_vhost.ssl_context(None), broker_vhost.host)
    assert_tls_refused(broker_vhost, "CERTIFICATE_REQUIRED", ssl_options=no_cert)


@rabbitmq
def test_certificate_from_another_ca_is_refused(broker_vhost, tmp_path):
    other = make_ca(tmp_path / "other-ca", "some other CA")
    forged = other.issue("fdn-01", tmp_path / "forged")
    options = ssl_options(broker_vhost, forged.cert, forged.key)
    assert_tls_refused(broker_vhost, "UNKNOWN_CA", ssl_options=options)


@rabbitmq
def test_expired_certificate_is_refused(broker_vhost, rabbit, tmp_path):
    now = dt.datetime.now(dt.UTC)
    expired = rabbit.ca.issue(
        "fdn-01",
        tmp_path,
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    options = ssl_options(broker_vhost, expired.cert, expired.key)
    assert_tls_refused(broker_vhost, "CERTIFICATE_EXPIRED", ssl_options=options)


@rabbitmq
def test_certificate_for_unknown_cn_is_refused(broker_vhost, rabbit):
    stranger = rabbit.identity("fdn-99")  # right CA, but no such user
    options = ssl_options(broker_vhost, stranger.cert, stranger.key)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as info:
        open_and_close(broker_vhost, "fdn-99", ssl_options=options)
    assert "ACCESS_REFUSED" in repr(info.value)
    assert "EXTERNAL" in repr(info.value)


@rabbitmq
def test_node_user_has_no_access_to_other_vhosts(broker_vhost, rabbit):
    other = rabbit.provision(broker_vhost.name + "-b", ["fdn-02"], "orchestrator")
    try:
        with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
            open_and_close(other, "fdn-01")
    finally:
        rabbit.delete_vhost(other.name)


# -- permissions ------------------------------------------------------------------


@rabbitmq
def test_node_cannot_consume_another_nodes_queue(broker_vhost):
    with connect(broker_vhost, "fdn-01") as connection:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.basic_consume("femd.node.fdn-02", lambda *_: None)
        assert info.value.reply_code == 403
        assert "femd.node.fdn-02" in info.value.reply_text


@rabbitmq
def test_node_cannot_publish_events_for_another_node(broker_vhost):
    with connect(broker_vhost, "fdn-01") as connection:
        channel = confirmed_channel(connection)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.basic_publish("femd.events", "fdn-02.x.running", b"{}")
        assert info.value.reply_code == 403
        assert "fdn-02.x.running" in info.value.reply_text
        for exchange, key in (
            ("femd.results", "fdn-02.x"),
            ("femd.nodes", "fdn-02.status"),
            ("femd.logs", "fdn-02.x"),
            # Keys of its own prefix but another shape (a node "fdn-01.x"'s).
            ("femd.events", "fdn-01.x.t.running"),
            ("femd.results", "fdn-01.x.t"),
            ("femd.nodes", "fdn-01.x.status"),
            ("femd.logs", "fdn-01.x.t"),
        ):
            channel = confirmed_channel(connection)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
                channel.basic_publish(exchange, key, b"chunk")
            assert info.value.reply_code == 403


@rabbitmq
def test_node_status_and_live_logs_reach_the_orchestrator(broker_vhost):
    with connect(broker_vhost, "fdn-01") as node:
        confirmed_channel(node).basic_publish("femd.nodes", "fdn-01.status", b"{}")
        confirmed_channel(node).basic_publish("femd.logs", "fdn-01.x", b"line\n")
    with connect(broker_vhost, "orchestrator") as orchestrator:
        channel = orchestrator.channel()
        for queue, key in (("nodes", "fdn-01.status"), ("logs", "fdn-01.x")):
            method, _, _ = channel.basic_get(f"femd.orchestrator.{queue}", True)
            assert method is not None
            assert method.routing_key == key


FORBIDDEN_TO_A_NODE = {
    "publish-tasks": lambda ch: ch.basic_publish("femd.tasks", "fdn-02", b"{}"),
    "publish-default-exchange": lambda ch: ch.basic_publish(
        "", "femd.node.fdn-02", b"{}"
    ),
    "declare-queue": lambda ch: ch.queue_declare("femd.node.fdn-01.x", durable=True),
    "declare-exchange": lambda ch: ch.exchange_declare("femd.x", "fanout"),
    "read-orchestrator": lambda ch: ch.basic_get("femd.orchestrator.events"),
}


@rabbitmq
@pytest.mark.parametrize("action", sorted(FORBIDDEN_TO_A_NODE))
def test_node_cannot_act_as_orchestrator_or_configure(broker_vhost, action):
    with connect(broker_vhost, "fdn-01") as connection:
        channel = confirmed_channel(connection)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            FORBIDDEN_TO_A_NODE[action](channel)
        assert info.value.reply_code == 403


@rabbitmq
def test_orchestrator_cannot_read_node_queue(broker_vhost):
    with connect(broker_vhost, "orchestrator") as connection:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.basic_get("femd.node.fdn-01")
        assert info.value.reply_code == 403


@rabbitmq
def test_node_event_reaches_the_orchestrator(broker_vhost):
    event = json.dumps({"node": "fdn-01", "task_id": "x", "state": "running"}).encode()
    with connect(broker_vhost, "fdn-01") as node:
        confirmed_channel(node).basic_publish(
            "femd.events", "fdn-01.x.running", event, PERSISTENT
        )
        confirmed_channel(node).basic_publish(
            "femd.results", "fdn-01.x", b"chunk-0", PERSISTENT
        )
    with connect(broker_vhost, "orchestrator") as orchestrator:
        channel = orchestrator.channel()
        method, _, body = channel.basic_get("femd.orchestrator.events", auto_ack=True)
        assert method is not None
        assert method.routing_key == "fdn-01.x.running"
        assert body == event
        method, _, body = channel.basic_get("femd.orchestrator.results", auto_ack=True)
        assert method is not None
        assert (method.routing_key, body) == ("fdn-01.x", b"chunk-0")


@rabbitmq
def test_task_reaches_only_its_node(broker_vhost):
    with connect(broker_vhost, "orchestrator") as orchestrator:
        channel = confirmed_channel(orchestrator)
        channel.basic_publish("femd.tasks", "fdn-01", b"envelope-1", PERSISTENT)
    with connect(broker_vhost, "fdn-02") as node:
        assert node.channel().basic_get("femd.node.fdn-02")[0] is None
    with connect(broker_vhost, "fdn-01") as node:
        channel = node.channel()
        method, _, body = channel.basic_get("femd.node.fdn-01")
        assert method is not None
        assert body == b"envelope-1"
        channel.basic_ack(method.delivery_tag)


@rabbitmq
def test_task_queue_survives_restart(broker_vhost, rabbit):
    with connect(broker_vhost, "orchestrator") as orchestrator:
        confirmed_channel(orchestrator).basic_publish(
            "femd.tasks", "fdn-01", b"envelope-durable", PERSISTENT
        )
    old_pid = rabbit.pid
    rabbit.restart()
    assert rabbit.pid != old_pid
    rabbit.await_messages(broker_vhost.name, "femd.node.fdn-01", 1)
    with connect(broker_vhost, "fdn-01") as node:
        method, _, body = node.channel().basic_get("femd.node.fdn-01", auto_ack=True)
        assert method is not None
        assert body == b"envelope-durable"
    rabbit.await_messages(broker_vhost.name, "femd.node.fdn-01", 0)


@rabbitmq
def test_poison_task_is_dead_lettered_after_delivery_limit(rabbit, request):
    vhost = rabbit.provision(f"femd-poison-{os.getpid()}", ["fdn-01"], delivery_limit=2)
    request.addfinalizer(lambda: rabbit.delete_vhost(vhost.name))
    with connect(vhost, "orchestrator") as orchestrator:
        confirmed_channel(orchestrator).basic_publish(
            "femd.tasks", "fdn-01", b"poison", PERSISTENT
        )
    with connect(vhost, "fdn-01") as node:
        channel = node.channel()
        for _ in range(3):  # the agent crashes on it, again and again
            method, _, _ = channel.basic_get("femd.node.fdn-01")
            assert method is not None
            channel.basic_nack(method.delivery_tag, requeue=True)
        assert channel.basic_get("femd.node.fdn-01")[0] is None
    with connect(vhost, "orchestrator") as orchestrator:
        channel = orchestrator.channel()
        deadline = time.monotonic() + 10
        method = None
        while method is None and time.monotonic() < deadline:
            method, _, body = channel.basic_get("femd.orchestrator.dead", auto_ack=True)
            if method is None:
                time.sleep(0.1)
        assert method is not None
        assert body == b"poison"
        assert method.routing_key == "fdn-01"


# -- the testbed's fault knobs ------------------------------------------------------


def serve(connection: pika.BlockingConnection) -> None:
    connection.process_data_events(time_limit=5)
    connection.channel()


@rabbitmq
def test_close_connections_cuts_clients(broker_vhost, rabbit):
    with connect(broker_vhost, "fdn-01") as connection:
        rabbit.close_connections(broker_vhost.name)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
            serve(connection)
        assert info.value.reply_code == 320  # CONNECTION_FORCED


@rabbitmq
def test_suspended_listeners_refuse_then_accept(broker_vhost, rabbit):
    rabbit.suspend_listeners()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        open_and_close(broker_vhost, "fdn-01")
    rabbit.resume_listeners()
    with connect(broker_vhost, "fdn-01") as connection:
        assert connection.is_open


@rabbitmq
def test_paused_node_black_holes_then_recovers(broker_vhost, rabbit):
    rabbit.pause()
    try:
        began = time.monotonic()
        # it hangs, it is not refused (NB: not an AMQPConnectionError subclass)
        with pytest.raises(AMQPConnectorStackTimeout):
            open_and_close(broker_vhost, "fdn-01", socket_timeout=1, stack_timeout=2)
        assert time.monotonic() - began >= 1.9
    finally:
        rabbit.resume()
    with connect(broker_vhost, "fdn-01") as connection:
        assert connection.is_open


def _processes_of(session_id: int, epmd_port: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, sid = fields[0], int(fields[4])
        if state != "Z" and (sid == session_id or f"-port {epmd_port} " in cmdline):
            found.append(f"{entry.name}: {cmdline[:80]}")
    return found


@rabbitmq
def test_failed_start_reports_log_and_leaves_nothing_running(rabbit, tmp_path):
    node = RabbitNode(tmp_path, ca=rabbit.ca, start_timeout_s=60)
    with (node.base_dir / "rabbitmq.conf").open("a") as conf:
        conf.write("no_such_setting.at_all = 42\n")  # the node refuses to boot
    try:
        with pytest.raises(RabbitNodeError, match=r"(?s)node exited.*no_such_setting"):
            node.start()
        assert not node.running
        assert node.pid is None
        assert _processes_of(-1, node.epmd_port) == []
    finally:
        node.stop()


@rabbitmq
def test_stop_leaves_no_process_behind(tmp_path):
    node = RabbitNode(tmp_path / "node")
    node.start()
    pid, epmd_port = node.pid, node.epmd_port
    assert pid is not None
    assert _processes_of(pid, epmd_port)
    began = time.monotonic()
    node.stop()
    assert time.monotonic() - began < 30
    assert _processes_of(pid, epmd_port) == []
    with pytest.raises(RabbitNodeError, match="node not running"):
        node.ctl("status")


# -- the definitions script and the PKI, no broker needed ---------------------------


def test_definitions_script_output_is_the_documented_topology():
    done = definitions("--vhost", "v1", "--node", "fdn-01", "--node", "fdn-02")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    queues = {q["name"]: q for q in doc["queues"]}
    assert set(queues) == {
        "femd.node.fdn-01",
        "femd.node.fdn-02",
        "femd.orchestrator.events",
        "femd.orchestrator.results",
        "femd.orchestrator.nodes",
        "femd.orchestrator.logs",
        "femd.orchestrator.dead",
    }
    assert all(
        q["durable"] and q["arguments"]["x-queue-type"] == "quorum"
        for q in queues.values()
    )
    kinds = {e["name"]: e["type"] for e in doc["exchanges"]}
    assert kinds == {
        "femd.tasks": "direct",
        "femd.events": "topic",
        "femd.results": "topic",
        "femd.nodes": "topic",
        "femd.logs": "topic",
        "femd.dead": "fanout",
    }
    assert {u["name"] for u in doc["users"]} == {"fdn-01", "fdn-02", "orchestrator"}
    assert all(u["password_hash"] == "" and u["tags"] == [] for u in doc["users"])
    perms = {p["user"]: p for p in doc["permissions"]}
    assert perms["fdn-01"]["read"] == r"^femd\.node\.fdn\-01$"
    assert all(p["configure"] == "^$" for p in perms.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vhost", "v", "--node", "FDN-01"], "--node: not a node id"),
        (["--vhost", "v", "--node", "a/b"], "--node: not a node id"),
        (["--vhost", "v", "--node", "x", "--node", "x"], "listed twice"),
        (["--vhost", "v", "--node", "x", "--orchestrator", "x"], "must differ"),
        (["--vhost", "v"], "required"),
        (["--vhost", "v", "--node", "x", "--delivery-limit", "-1"], "0 or more"),
    ],
    ids=[
        "uppercase",
        "slash",
        "duplicate",
        "orchestrator-is-node",
        "no-node",
        "negative-limit",
    ],
)
def test_definitions_script_refuses_bad_input(args, message):
    done = definitions(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_issued_certificates_have_the_asked_usages_and_private_keys(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = ca.issue("localhost", tmp_path / "s", server=True, client=False)
    client = ca.issue("fdn-01", tmp_path / "c", key_type="rsa")
    for issued, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [usage]
        assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="not a safe file name"):
        ca.issue("../evil", tmp_path)
