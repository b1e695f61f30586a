"""Issue 6 end to end: the installed femd agent under a booted systemd.

One Debian 12 container (module scope, ``--private-network``) gets the built
``.deb``, a TLS-only RabbitMQ on its loopback (the distribution's
``rabbitmq-server.service``, SASL EXTERNAL, provisioned with
``packaging/rabbitmq/femd-definitions``), certificates made on the host by
``testbed.pki``, an orchestrator key made on the host, ``/etc/femd/femd.yaml``
and a policy for node ``fdn-01``, a dataset and a local git repository. Then,
from outside through ``nsenter``, the tests below run **in file order** against
that one agent, as a sysadmin and an auditor would:

1. ``systemctl enable --now femd``: active once READY, the STATUS line, the
   process launcher probed successfully *inside* the hardened unit;
2. a signed process task (git source at a commit, a dataset) submitted with
   ``femd submit`` runs, succeeds and its outputs come back to ``femd watch``;
   ``journalctl -u femd FEMD_TASK_ID=<id> -o json`` shows the decision, the
   signer, the commit, the datasets and the digest of what left;
3. a task asking for a dataset the policy does not allow is denied, with its
   rule in ``FEMD_RULES``;
3b. a task allowed one destination on the container's loopback reaches it
   through femd's forwarder (unprivileged, under the hardened unit) and not
   the broker next to it; the connection is in the journal;
4. ``systemctl reload femd`` with a broken policy keeps the old one;
5. a stopped (``kill -STOP``) agent is restarted by the watchdog;
6. ``systemctl stop femd`` is clean.

Tasks are signed on the host and submitted from inside the container (the
broker listens on the container's loopback only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pygit2
import pytest
from nspawn_support import (
    REPO,
    Container,
    build_deb,
    drop_in,
    femd_container,
    wait_for,
    write_etc,
)

from femd.audit import Event
from femd.envelope import encode_envelope, sign
from femd.keys import load_private_key, write_keypair
from femd.launchers.cgroup import scope_of
from testbed.pki import make_ca

pytestmark = [pytest.mark.systemd, pytest.mark.rabbitmq, pytest.mark.bwrap]

NODE = "fdn-01"
ORCHESTRATOR = "orchestrator"
PROJECT = "cohort-study"
UNIT = "femd.service"
BROKER_PORT = 5671
ORCH = "/root/orch"  # the orchestrator's side, inside the container
GIT_URL = "file:///srv/git/analysis.git"
# MESSAGE_ID of systemd's "Deactivated successfully" (sd-messages.h UNIT_SUCCESS)
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"
READY_LOG = f"femd: INFO: ready: node {NODE}"

RABBITMQ_CONF = f"""\
# written by tests/system/test_agent_systemd.py: TLS only, certificates only
listeners.tcp = none
listeners.ssl.1 = 127.0.0.1:{BROKER_PORT}
ssl_options.cacertfile = /etc/rabbitmq/tls/ca.pem
ssl_options.certfile = /etc/rabbitmq/tls/server.pem
ssl_options.keyfile = /etc/rabbitmq/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = EXTERNAL
ssl_cert_login_from = common_name
disk_free_limit.absolute = 10MB
"""

FEMD_YAML = f"""\
node: {NODE}
broker:
  url: amqps://localhost:{BROKER_PORT}/femd
  ca: /etc/femd/tls/ca.pem
  cert: /etc/femd/tls/node.pem
  key: /etc/femd/tls/node.key
  heartbeat_s: 10
  reconnect_max_s: 2
policy: /etc/femd/policy.yaml
launchers: /usr/share/femd/launchers
state_dir: /var/lib/femd
stop_grace_s: 5
"""

WEB_PORT = 8089  # a web server on the container's loopback (test 3b)

POLICY_YAML = f"""\
apiVersion: femd/v1
kind: Policy
node: {NODE}
signers:
  orchestrator:
    public_key_file: keys/orchestrator.pub
datasets:
  cohort-2024: {{path: /srv/data/cohort-2024}}
projects:
  {PROJECT}:
    signers: [orchestrator]
    threshold: 1
    launchers: [process]
    git: ["file:///srv/git/*"]
    datasets: [cohort-2024]
    max_resources: {{cpus: 1, memory_mb: 256, timeout_s: 60, pids: 32}}
    network:
      egress: ["127.0.0.1:{WEB_PORT}"]
    outputs: {{max_bytes: 1048576}}
"""

ORCHESTRATOR_YAML = f"""\
broker:
  url: amqps://localhost:{BROKER_PORT}/femd
  ca: tls/ca.pem
  cert: tls/{ORCHESTRATOR}.pem
  key: tls/{ORCHESTRATOR}.key
results_dir: results
"""

# The task's code (committed to the git repository the task names). What it
# writes to /out shows what the sandbox enforced: its own cgroup (memory, pids,
# cpu) and no network but loopback.
ANALYSIS_SH = """\
set -eu
echo "analysis: starting"
wc -l < /data/cohort/rows.csv | tr -d ' ' > /out/rows.txt
sed -n 's/^0:://p' /proc/self/cgroup > /out/cgroup.txt
grep -c ':' /proc/net/dev > /out/netdevs.txt
echo "analysis: done"
"""


@dataclass
class Node:
    """The container and what the tests need to drive it."""

    box: Container
    key_file: Path
    keyid: str
    commit: str
    policy_sha256: str = ""
    ran: str = ""  # the task that succeeded (test 2)
    denied: str = ""  # the task that was denied (test 3)
    delegated: bool = False  # the booted systemd can delegate cgroup v2 controllers
    unenforced: str = ""  # test 2's task, when refused as unenforceable


def can_delegate(box: Container) -> bool:
    """True when the container's systemd runs cgroup v2 with memory, pids, cpu.

    Under systemd-nspawn on a cgroup v1 host (this CI machine) the controller
    hierarchies are mounted read-only in the container: no per-task cgroup can
    exist, and femd refuses every process task (fail closed).
    """
    done = box.exec(["cat", "/sys/fs/cgroup/cgroup.controllers"], check=False)
    return done.returncode == 0 and {"memory", "pids", "cpu"} <= set(
        done.stdout.split()
    )


def journal_text(box: Container, lines: int = 120) -> str:
    """The unit's recent journal, for assertion messages."""
    box.journal_sync()
    out = box.exec(
        ["journalctl", "-u", UNIT, "--no-pager", "-n", str(lines),
         "-o", "short-precise"],
        check=False,
    )  # fmt: skip
    return "\n--- journalctl -u femd\n" + out.stdout


def femd_entries(box: Container, **matches: str) -> list[dict[str, Any]]:
    """The auditor's query: ``journalctl -u femd <matches> -o json``."""
    box.journal_sync()
    return box.journal(UNIT, **matches)


def audit_events(box: Container, task_id: str) -> dict[str, dict[str, Any]]:
    """The agent's audit entries of *task_id*, by Event name (each exactly once)."""
    by_id = {e.value: e.name for e in Event}
    found: dict[str, dict[str, Any]] = {}
    for entry in femd_entries(box, FEMD_TASK_ID=task_id):
        name = by_id.get(entry.get("MESSAGE_ID", ""))
        if name is None:
            continue
        assert name not in found, f"{name} twice for {task_id}" + journal_text(box)
        found[name] = entry
    return found


def _written_at(entry: dict[str, Any]) -> int:
    """When an entry was written (µs): the sender's own time where it gave one."""
    return int(entry.get("_SOURCE_REALTIME_TIMESTAMP") or entry["__REALTIME_TIMESTAMP"])


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def envelope(node: Node, task_id: str, **fields: Any) -> bytes:
    """A process task for *task_id*, signed on the host with the orchestrator key."""
    now = datetime.now(UTC)
    manifest: dict[str, Any] = {
        "apiVersion": "femd/v1",
        "kind": "Task",
        "id": task_id,
        "project": PROJECT,
        "issuer": ORCHESTRATOR,
        "issued_at": _iso(now - timedelta(minutes=1)),
        "expires_at": _iso(now + timedelta(hours=1)),
        "nodes": [NODE],
        "launcher": "process",
        "source": {"git": GIT_URL, "commit": node.commit},
        "command": ["/bin/sh", "analysis.sh"],
        "inputs": [{"dataset": "cohort-2024", "mount": "/data/cohort"}],
        "outputs": {"path": "/out", "max_bytes": 65536},
        "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 30, "pids": 32},
        "network": {"mode": "none"},
    }
    manifest.update(fields)
    payload = json.dumps(manifest).encode()
    return encode_envelope(sign(payload, [load_private_key(node.key_file)]))


def submit(node: Node, task_id: str, data: bytes) -> None:
    """``femd submit`` inside the container, as the orchestrator."""
    path = f"{ORCH}/{task_id}.envelope.json"
    node.box.write(path, data, mode=0o600)
    done = node.box.exec(
        ["femd", "submit", "--config", f"{ORCH}/orchestrator.yaml",
         "--node", NODE, path],
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + journal_text(node.box)
    assert done.stdout.strip() == f"submitted task {task_id} to {NODE}"


def watch(node: Node, task_id: str) -> list[dict[str, Any]]:
    """``femd watch --task ID`` until the task is done; its status events."""
    done = node.box.exec(
        ["femd", "watch", "--config", f"{ORCH}/orchestrator.yaml", "--task", task_id,
         "--node", NODE, "--timeout", "60"],
        check=False,
        timeout_s=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + journal_text(node.box)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [e for e in events if e.get("task_id") == task_id]


def tasks(node: Node) -> dict[str, dict[str, Any]]:
    """``femd tasks --json`` on the node (as the femd user)."""
    done = node.box.exec(["femd", "tasks", "--json"], user="femd", check=False)
    assert done.returncode == 0, done.stderr
    return {row["task_id"]: row for row in json.loads(done.stdout)}


def main_pid(box: Container) -> int:
    return int(box.unit_property(UNIT, "MainPID"))


# --- the world ----------------------------------------------------------------


def _git_repo(path: Path) -> str:
    """A bare repository with analysis.sh on main; returns the commit id."""
    repo = pygit2.init_repository(str(path), bare=True)
    blob = repo.create_blob(ANALYSIS_SH.encode())
    tree = repo.TreeBuilder()
    tree.insert("analysis.sh", blob, pygit2.enums.FileMode.BLOB)
    who = pygit2.Signature("femd test", "femd@example.org", 1_700_000_000, 0)
    oid = repo.create_commit("refs/heads/main", who, who, "analysis", tree.write(), [])
    repo.set_head("refs/heads/main")
    return str(oid)


def _pki(base: Path) -> dict[str, Path]:
    ca = make_ca(base / "pki")
    server = ca.issue("localhost", base / "pki" / "server", server=True, client=False)
    node = ca.issue(NODE, base / "pki" / "clients", sans=())
    orch = ca.issue(ORCHESTRATOR, base / "pki" / "clients", sans=())
    return {
        "ca": ca.cert,
        "server.pem": server.cert,
        "server.key": server.key,
        "node.pem": node.cert,
        "node.key": node.key,
        "orch.pem": orch.cert,
        "orch.key": orch.key,
    }


def _start_rabbitmq(box: Container, pki: dict[str, Path], base: Path) -> None:
    """The stock rabbitmq-server.service, TLS + EXTERNAL on the container's loopback."""
    box.exec(["install", "-d", "-o", "root", "-g", "rabbitmq", "-m", "0750",
              "/etc/rabbitmq/tls"])  # fmt: skip
    for name, src in (("ca.pem", "ca"), ("server.pem", "server.pem"),
                      ("server.key", "server.key")):  # fmt: skip
        path = f"/etc/rabbitmq/tls/{name}"
        box.write(path, pki[src].read_bytes(), mode=0o640)
        box.exec(["chown", "root:rabbitmq", path])
    box.write("/etc/rabbitmq/rabbitmq.conf", RABBITMQ_CONF)
    box.write("/etc/rabbitmq/enabled_plugins", "[rabbitmq_auth_mechanism_ssl].\n")
    box.systemctl("start", "--no-block", "rabbitmq-server.service")
    definitions = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(REPO / "packaging/rabbitmq/femd-definitions"),
         "--vhost", "femd", "--node", NODE, "--orchestrator", ORCHESTRATOR],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    (base / "definitions.json").write_bytes(definitions)


def _provision_rabbitmq(box: Container, base: Path) -> None:
    box.wait_unit("rabbitmq-server.service", timeout_s=120)
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it
    path = "/var/lib/rabbitmq/femd-definitions.json"
    box.write(path, (base / "definitions.json").read_bytes(), mode=0o644)
    box.exec(["rabbitmqctl", "import_definitions", path])
    box.exec(["rabbitmqctl", "delete_user", "guest"])

    def provisioned() -> bool:
        queues = box.exec(["rabbitmqctl", "-q", "list_queues", "-p", "femd", "name"])
        users = box.exec(["rabbitmqctl", "-q", "list_users"]).stdout
        return f"femd.node.{NODE}" in queues.stdout.split() and ORCHESTRATOR in users

    wait_for(provisioned, timeout_s=30)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    started = time.monotonic()
    base = tmp_path_factory.mktemp("agent-systemd")
    deb = build_deb()
    built = time.monotonic()
    pki = _pki(base)
    key_file, pub_file, keyid = write_keypair("orchestrator", base / "keys")
    commit = _git_repo(base / "analysis.git")
    with femd_container(deb) as box:
        _start_rabbitmq(box, pki, base)
        # The sysadmin's part (docs/operator.md): certificates, config, policy.
        write_etc(box, {
            "femd.yaml": FEMD_YAML,
            "policy.yaml": POLICY_YAML,
            "keys/orchestrator.pub": pub_file.read_bytes(),
            "tls/ca.pem": pki["ca"].read_bytes(),
            "tls/node.pem": pki["node.pem"].read_bytes(),
            "tls/node.key": pki["node.key"].read_bytes(),
        })  # fmt: skip
        box.exec(["chown", "femd:femd", "/etc/femd/tls/node.key"])
        box.exec(["chmod", "0600", "/etc/femd/tls/node.key"])
        # The data steward's dataset, and a site-local git repository.
        box.write("/srv/data/cohort-2024/rows.csv", "id,age\n1,63\n2,71\n")
        box.copy_in(base / "analysis.git", "/srv/git/analysis.git")
        box.exec(["chmod", "-R", "a+rX", "/srv"])
        # libgit2 (like git's safe.directory) opens a local repository only
        # when it belongs to the user asking: the agent's user, here.
        box.exec(["chown", "-R", "femd:femd", "/srv/git/analysis.git"])
        # The orchestrator's side: its identity and config.
        box.write(f"{ORCH}/orchestrator.yaml", ORCHESTRATOR_YAML, mode=0o600)
        box.write(f"{ORCH}/tls/ca.pem", pki["ca"].read_bytes())
        box.write(f"{ORCH}/tls/{ORCHESTRATOR}.pem", pki["orch.pem"].read_bytes())
        box.write(f"{ORCH}/tls/{ORCHESTRATOR}.key", pki["orch.key"].read_bytes(),
                  mode=0o600)  # fmt: skip
        lint = box.exec(["femd", "policy", "lint", "/etc/femd/policy.yaml"])
        assert "1 project(s)" in lint.stdout
        _provision_rabbitmq(box, base)
        took = time.monotonic() - started
        print(f"\nsetup: {took:.1f} s, deb {built - started:.1f} s")  # noqa: T201
        yield Node(box=box, key_file=key_file, keyid=keyid, commit=commit)


# --- 1. enable --now ----------------------------------------------------------


def test_enable_now_is_active_after_ready(node: Node) -> None:
    box = node.box
    done = box.exec(["systemctl", "enable", "--now", UNIT], check=False)
    assert done.returncode == 0, done.stderr + journal_text(box)
    # Type=notify: `systemctl start` returned only once READY=1 came.
    assert box.unit_property(UNIT, "ActiveState") == "active", journal_text(box)
    assert box.unit_property(UNIT, "SubState") == "running"
    assert box.unit_property(UNIT, "UnitFileState") == "enabled"
    assert box.unit_property(UNIT, "User") == "femd"
    user = box.exec(["ps", "-o", "user=", "-p", str(main_pid(box))]).stdout.strip()
    assert user == "femd"

    status = "running 0 tasks, 0 queued, 0 done, broker connected"

    def status_line() -> str:
        out = box.exec(["systemctl", "status", "--no-pager", UNIT], check=False)
        return out.stdout if f'Status: "{status}"' in out.stdout else ""

    try:
        wait_for(status_line, timeout_s=15)
    except TimeoutError:
        pytest.fail(f"no STATUS line {status!r}" + journal_text(box))

    text = journal_text(box)
    # READY came after the broker connection and the policy (DESIGN "systemd").
    lines = [line.split(": ", 1)[-1] for line in text.splitlines()]
    assert "femd: INFO: launcher default/process: available" in lines, text
    # journalctl interleaves the stderr stream and native entries by arrival,
    # not by when they were written: compare the times the entries carry.
    entries = femd_entries(box)
    [ready] = [e for e in entries if str(e.get("MESSAGE", "")).startswith(READY_LOG)]
    [connected] = [
        e for e in entries if e.get("MESSAGE_ID") == Event.BROKER_CONNECTED.value
    ]
    assert _written_at(connected) < _written_at(ready), text
    [loaded] = femd_entries(box, MESSAGE_ID=Event.POLICY_LOADED.value)
    assert loaded["FEMD_NODE"] == NODE
    assert re.fullmatch(r"[0-9a-f]{64}", loaded["FEMD_POLICY_SHA256"])
    node.policy_sha256 = loaded["FEMD_POLICY_SHA256"]
    [started] = femd_entries(box, MESSAGE_ID=Event.AGENT_STARTED.value)
    assert started["_SYSTEMD_UNIT"] == UNIT
    # "up and ready" (docs/auditor.md): written once READY was due (the broker
    # is connected), not at start-up. Both are audit entries: one transport,
    # so their order in the journal is the order they were written.
    audited = next(i for i, ln in enumerate(lines) if started["MESSAGE"] in ln)
    assert audited > lines.index("broker connected"), text


# --- 2. an allowed task -------------------------------------------------------


def test_signed_task_runs_succeeds_and_is_audited(node: Node) -> None:
    box = node.box
    task_id = str(uuid.uuid4())
    submit(node, task_id, envelope(node, task_id))
    events = watch(node, task_id)
    states = [e["state"] for e in events]
    node.delegated = can_delegate(box)
    if not node.delegated:
        # Fail closed: no cgroup under this unit here, so memory, pids and cpu
        # cannot be enforced and the task never runs, saying why.
        assert states == ["received", "rejected"], f"{events}" + journal_text(box)
        reasons = events[-1]["reasons"]
        assert {r["rule"] for r in reasons} == {"launcher.unenforceable"}
        assert "memory limit of 256 MB cannot be enforced" in reasons[0]["message"]
        assert "cgroup" in reasons[0]["message"]
        denied = audit_events(box, task_id)["TASK_REJECTED"]
        assert "launcher.unenforceable" in denied["FEMD_RULES"]
        node.unenforced = task_id
        femd = ["/opt/femd/bin/femd", "doctor", "--config", "/etc/femd/femd.yaml"]
        doctor = box.exec(femd, check=False, user="femd")
        assert "memory limit: none" in doctor.stdout, doctor.stdout + doctor.stderr
        return
    assert states[-1] == "succeeded", f"{events}" + journal_text(box)
    node.ran = task_id
    assert states == ["received", "staging", "running", "uploading", "succeeded"]
    final = events[-1]
    assert final["exit_code"] == 0

    # What came back to the orchestrator is what the agent says it sent.
    results = f"{ORCH}/results/{NODE}/{task_id}"
    archive = box.exec(["cat", f"{results}.tar.gz"], check=False)
    assert archive.returncode == 0, archive.stderr
    sent = box.exec(["sha256sum", f"{results}.tar.gz"]).stdout.split()[0]
    assert final["outputs"]["sha256"] == sent
    out = {
        name: box.read(f"{results}/{name}.txt").strip()
        for name in ("rows", "cgroup", "netdevs")
    }
    assert out["rows"] == "3"
    # The sandbox under the hardened unit: its own cgroup in femd.service's
    # delegated subtree, loopback only.
    scope = scope_of(Path("/var/lib/femd"))
    assert out["cgroup"] == f"/system.slice/{UNIT}/femd-task-{scope}-{task_id}", out
    assert out["netdevs"] == "1"
    assert final["usage"]["memory_peak_bytes"] > 0

    # The node's own history agrees.
    row = tasks(node)[task_id]
    assert row["state"] == "succeeded"
    assert row["decision"] == "allow"
    assert row["signer_keyids"] == [node.keyid]
    assert row["output_sha256"] == sent

    # The auditor's query (docs/auditor.md).
    audit = audit_events(box, task_id)
    assert set(audit) == {
        "TASK_RECEIVED", "TASK_ADMITTED", "TASK_STAGED", "TASK_STARTED",
        "TASK_FINISHED", "OUTPUTS_SENT",
    }, journal_text(box)  # fmt: skip
    admitted = audit["TASK_ADMITTED"]
    assert admitted["FEMD_DECISION"] == "allow"
    assert admitted["FEMD_SIGNER_KEYIDS"] == node.keyid
    assert admitted["FEMD_GIT_COMMIT"] == node.commit
    assert admitted["FEMD_DATASETS"] == "cohort-2024"
    assert admitted["FEMD_PROJECT"] == PROJECT
    assert admitted["FEMD_NODE"] == NODE
    assert admitted["FEMD_POLICY_SHA256"] == node.policy_sha256
    assert admitted["MESSAGE"] == f"task {task_id} admitted, signed by orchestrator"
    manifest_sha = audit["TASK_RECEIVED"]["FEMD_MANIFEST_SHA256"]
    assert manifest_sha == row["manifest_sha256"]
    assert audit["TASK_FINISHED"]["FEMD_STATE"] == "succeeded"
    assert audit["TASK_FINISHED"]["FEMD_EXIT_CODE"] == "0"
    assert audit["OUTPUTS_SENT"]["FEMD_OUTPUT_SHA256"] == sent
    assert "FEMD_IMAGE_DIGEST" not in admitted  # a process task has no image
    for entry in audit.values():
        assert entry["_SYSTEMD_UNIT"] == UNIT
        assert entry["SYSLOG_IDENTIFIER"] == "femd"
        assert entry["FEMD_TASK_ID"] == task_id
    assert admitted["FEMD_STATE"] == "queued"
    # The whole story in one query, in order, with the task's own output
    # under its own identifier (docs/auditor.md).
    by_id = {e.value: e.name for e in Event}
    story = [
        by_id.get(e.get("MESSAGE_ID", ""), e["MESSAGE"])
        for e in femd_entries(box, FEMD_TASK_ID=task_id)
    ]
    assert story == [
        "TASK_RECEIVED", "TASK_ADMITTED", "TASK_STAGED", "TASK_STARTED",
        "analysis: starting", "analysis: done", "TASK_FINISHED", "OUTPUTS_SENT",
    ], journal_text(box)  # fmt: skip
    said = femd_entries(box, FEMD_TASK_ID=task_id, SYSLOG_IDENTIFIER="femd-task")
    assert [e["FEMD_PROJECT"] for e in said] == [PROJECT, PROJECT]
    assert [e["PRIORITY"] for e in said] == ["6", "6"]
    # The payload hash an auditor compares with the orchestrator's copy.
    payload = json.loads(box.read(f"{ORCH}/{task_id}.envelope.json"))["payload"]
    assert hashlib.sha256(base64.b64decode(payload)).hexdigest() == manifest_sha


# --- 3. a denied task ---------------------------------------------------------


def test_denied_task_shows_its_rule(node: Node) -> None:
    box = node.box
    task_id = str(uuid.uuid4())
    data = envelope(
        node, task_id, inputs=[{"dataset": "other-cohort", "mount": "/data/other"}]
    )
    submit(node, task_id, data)
    events = watch(node, task_id)
    states = [e["state"] for e in events]
    assert states == ["received", "rejected"], f"{events}" + journal_text(box)
    node.denied = task_id
    assert [r["rule"] for r in events[-1]["reasons"]] == ["dataset.not_allowed"]

    audit = audit_events(box, task_id)
    assert set(audit) == {"TASK_RECEIVED", "TASK_REJECTED"}, journal_text(box)
    rejected = audit["TASK_REJECTED"]
    assert rejected["FEMD_DECISION"] == "deny"
    assert rejected["FEMD_RULES"] == "dataset.not_allowed"
    assert rejected["FEMD_SIGNER_KEYIDS"] == node.keyid
    assert rejected["PRIORITY"] == "5"
    assert rejected["FEMD_STATE"] == "rejected"
    assert rejected["MESSAGE"].startswith(f"task {task_id} denied: dataset.not_allowed")
    # nothing ran: no sandbox, no output line
    assert not [
        e for e in femd_entries(box, FEMD_TASK_ID=task_id)
        if e.get("SYSLOG_IDENTIFIER") == "femd-task"
    ]  # fmt: skip
    assert tasks(node)[task_id]["state"] == "rejected"


# --- the auditor's queries, exactly as docs/auditor.md gives them --------------

ADMISSIONS = (
    "journalctl -u femd MESSAGE_ID=fc251ce4d5a042068ef0a0efcd706a62 -o json"
    " --output-fields=FEMD_TASK_ID,FEMD_PROJECT,FEMD_SIGNER_KEYIDS,"
    "FEMD_IMAGE_DIGEST,FEMD_GIT_COMMIT,FEMD_DATASETS,FEMD_POLICY_SHA256"
)
OUTPUTS = (
    "journalctl -u femd MESSAGE_ID=0af2713c12b443a4833ea7a56501080e -o json"
    " --output-fields=FEMD_TASK_ID,FEMD_PROJECT,FEMD_OUTPUT_SHA256"
)
REFUSALS = (
    "journalctl -u femd MESSAGE_ID=f3bead9109b94633ba3f03e63abe0ad1 -o json"
    " --output-fields=FEMD_TASK_ID,FEMD_PROJECT,FEMD_RULES,FEMD_SIGNER_KEYIDS"
)
ONE_TASK = "journalctl -u femd FEMD_TASK_ID=<task id> -o json"
EXPLAINED = "journalctl -u femd FEMD_TASK_ID=<task id> -x"


def query(box: Container, command: str, task_id: str = "") -> list[dict[str, Any]]:
    """Run one of the documented queries (it must be in docs/auditor.md)."""
    doc = " ".join((REPO / "docs/auditor.md").read_text().replace("\\\n", " ").split())
    assert command in doc, f"docs/auditor.md does not give: {command}"
    box.journal_sync()
    out = box.exec(["sh", "-c", command.replace("<task id>", task_id)]).stdout
    if " -o json" not in command:
        return [{"text": out}]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_auditor_queries_from_the_docs(node: Node) -> None:
    box = node.box
    assert node.denied, "test 3 ran first"
    refusals = query(box, REFUSALS)
    assert [r["FEMD_TASK_ID"] for r in refusals] == [
        t for t in (node.unenforced, node.denied) if t
    ]
    refused = refusals[-1]
    assert refused["FEMD_RULES"] == "dataset.not_allowed"
    assert refused["FEMD_SIGNER_KEYIDS"] == node.keyid
    [explained] = query(box, EXPLAINED, node.denied)
    text = explained["text"]
    # The rules are repeated FEMD_RULES fields, listed in MESSAGE, not the Subject.
    assert f"Subject: femd rejected task {node.denied}\n" in text
    if not node.delegated:
        assert query(box, OUTPUTS) == []  # nothing ran, nothing left
        return
    assert node.ran, "test 2 ran first"
    [admitted] = query(box, ADMISSIONS)
    assert admitted["FEMD_TASK_ID"] == node.ran
    assert admitted["FEMD_PROJECT"] == PROJECT
    assert admitted["FEMD_SIGNER_KEYIDS"] == node.keyid
    assert admitted["FEMD_GIT_COMMIT"] == node.commit
    assert admitted["FEMD_DATASETS"] == "cohort-2024"
    assert admitted["FEMD_POLICY_SHA256"] == node.policy_sha256
    [sent] = query(box, OUTPUTS)
    assert sent["FEMD_TASK_ID"] == node.ran
    archive = f"{ORCH}/results/{NODE}/{node.ran}.tar.gz"
    assert sent["FEMD_OUTPUT_SHA256"] == box.exec(["sha256sum", archive]).stdout[:64]
    everything = query(box, ONE_TASK, node.ran)
    assert len(everything) == 6 + 2  # six audit entries, two output lines


# --- 3b. network egress, forwarded by femd ------------------------------------

# A task allowed one destination: it reaches it, and not the broker next to it.
EGRESS_PY = f"""\
import socket, urllib.request
body = urllib.request.urlopen("http://127.0.0.1:{WEB_PORT}/", timeout=10).read()
try:
    socket.create_connection(("127.0.0.1", {BROKER_PORT}), 3)
except OSError:
    print("broker: unreachable")
else:
    raise SystemExit("broker: reachable")
print("web:", len(body), "bytes")
"""


def test_egress_is_forwarded_under_the_hardened_unit(node: Node) -> None:
    # The unprivileged, hardened femd forwards what the policy allows
    # (docs/network.md): setns, AF_NETLINK and the namespaces it needs pass
    # the unit's filters, and each connection is in the journal. Where the
    # container cannot delegate cgroups (a v1 host), the task is refused.
    box = node.box
    box.exec(
        ["systemd-run", "--unit", "femd-test-web", "--property", "User=nobody",
         "python3", "-m", "http.server", "--bind", "127.0.0.1",
         "--directory", "/usr/share/doc", str(WEB_PORT)],
    )  # fmt: skip
    task_id = str(uuid.uuid4())
    data = envelope(
        node, task_id,
        command=["python3", "-c", EGRESS_PY],
        network={"mode": "egress", "allow": [f"127.0.0.1:{WEB_PORT}"]},
    )  # fmt: skip
    try:
        submit(node, task_id, data)
        events = watch(node, task_id)
    finally:
        box.exec(["systemctl", "stop", "femd-test-web"], check=False)
    done = events[-1]
    if not can_delegate(box):
        # Fail closed (as in test 2): femd runs unprivileged under the unit and
        # this cgroup v1 container gives it no cgroup, so the task is refused
        # before anything runs and no connection is forwarded.
        states = [e["state"] for e in events]
        assert states == ["received", "rejected"], f"{events}" + journal_text(box)
        assert {r["rule"] for r in done["reasons"]} == {"launcher.unenforceable"}
        assert not done.get("network"), done
        audit = audit_events(box, task_id)
        assert "launcher.unenforceable" in audit["TASK_REJECTED"]["FEMD_RULES"]
        assert "TASK_ADMITTED" not in audit, audit
        assert "NETWORK_CONNECTION" not in audit, audit
        ran = [
            e for e in femd_entries(box, FEMD_TASK_ID=task_id)
            if e.get("SYSLOG_IDENTIFIER") == "femd-task"
        ]  # fmt: skip
        assert ran == [], ran
        web = box.journal("femd-test-web.service")
        assert not [e for e in web if "GET /" in str(e.get("MESSAGE", ""))], web
        return
    assert done["state"] == "succeeded", f"{events}" + journal_text(box)
    (traffic,) = done["network"]
    assert traffic["destination"] == f"127.0.0.1:{WEB_PORT}"
    assert traffic["connections"] == 1
    assert traffic["bytes_in"] > 0
    lines = [
        e["MESSAGE"] for e in femd_entries(box, FEMD_TASK_ID=task_id)
        if e.get("SYSLOG_IDENTIFIER") == "femd-task"
    ]  # fmt: skip
    assert "broker: unreachable" in lines, lines
    audit = audit_events(box, task_id)
    record = audit["NETWORK_CONNECTION"]
    assert record["FEMD_DIRECTION"] == "egress"
    assert record["FEMD_PEER"] == f"127.0.0.1:{WEB_PORT}"
    assert int(record["FEMD_BYTES_IN"]) == traffic["bytes_in"]


# --- 4. reload with a broken policy -------------------------------------------


def test_reload_with_a_broken_policy_keeps_the_old_one(node: Node) -> None:
    box = node.box
    pid = main_pid(box)
    failed_id = Event.POLICY_RELOAD_FAILED.value
    assert femd_entries(box, MESSAGE_ID=failed_id) == []
    broken = POLICY_YAML.replace("threshold: 1", "threshold: one")
    write_etc(box, {"policy.yaml": broken})
    try:
        done = box.exec(["systemctl", "reload", UNIT], check=False)
        assert done.returncode == 0, done.stderr + journal_text(box)
        try:
            [entry] = wait_for(
                lambda: femd_entries(box, MESSAGE_ID=failed_id), timeout_s=15
            )
        except TimeoutError:
            pytest.fail("no POLICY_RELOAD_FAILED entry" + journal_text(box))
        assert entry["PRIORITY"] == "3"
        assert entry["FEMD_POLICY_SHA256"] == node.policy_sha256  # the one kept
        assert entry["MESSAGE"].startswith(
            "policy reload refused: /etc/femd/policy.yaml:"
        ), entry["MESSAGE"]
        assert "threshold" in entry["MESSAGE"]
        box.wait_unit(UNIT, timeout_s=10)  # back from "reloading"
        assert main_pid(box) == pid, journal_text(box)

        # A task still runs, under the old policy.
        task_id = str(uuid.uuid4())
        submit(node, task_id, envelope(node, task_id))
        events = watch(node, task_id)
        # Decided under the old policy (refused here only if test 2 was).
        ends = "succeeded" if node.delegated else "rejected"
        assert events[-1]["state"] == ends, f"{events}" + journal_text(box)
        event = "TASK_ADMITTED" if node.delegated else "TASK_REJECTED"
        decided = audit_events(box, task_id)[event]
        assert decided["FEMD_POLICY_SHA256"] == node.policy_sha256
    finally:
        write_etc(box, {"policy.yaml": POLICY_YAML})
    box.systemctl("reload", UNIT)
    reloaded = wait_for(
        lambda: femd_entries(box, MESSAGE_ID=Event.POLICY_RELOADED.value),
        timeout_s=15,
    )
    assert [e["FEMD_POLICY_SHA256"] for e in reloaded] == [node.policy_sha256]
    assert main_pid(box) == pid


# --- 5. the watchdog ----------------------------------------------------------


def test_watchdog_restarts_a_hung_agent(node: Node) -> None:
    box = node.box
    # A short watchdog keeps the test quick; the shipped unit says 30 s.
    drop_in(box, UNIT, "[Service]\nWatchdogSec=5s\n", name="watchdog")
    try:
        box.systemctl("restart", UNIT)
        assert box.unit_property(UNIT, "WatchdogUSec") == "5s"
        restarts = int(box.unit_property(UNIT, "NRestarts"))
        pid = main_pid(box)
        time.sleep(7)  # longer than WatchdogSec: the main loop's pings keep it up
        assert main_pid(box) == pid, journal_text(box)
        box.exec(["kill", "-STOP", str(pid)])
        hung_at = time.monotonic()

        def restarted() -> bool:
            active = box.unit_property(UNIT, "ActiveState") == "active"
            return active and main_pid(box) not in (0, pid)

        try:
            wait_for(restarted, timeout_s=40)
        except TimeoutError:
            pytest.fail("the watchdog did not restart femd" + journal_text(box))
        took = time.monotonic() - hung_at
        assert int(box.unit_property(UNIT, "NRestarts")) == restarts + 1
        text = journal_text(box, 60)
        assert f"{UNIT}: Watchdog timeout (limit 5s)!" in text, text
        assert f"{UNIT}: Failed with result 'watchdog'." in text, text
        # watchdog (5 s) + RestartSec (5 s) + start; not TimeoutStopSec
        assert took < 30, f"{took:.1f} s" + text
        gone = box.exec(["kill", "-0", str(pid)], check=False)
        assert gone.returncode != 0, "the hung agent is still there"
    finally:
        drop_in(box, UNIT, "", name="watchdog")


# --- 6. stop ------------------------------------------------------------------


def test_stop_is_clean(node: Node) -> None:
    box = node.box
    pid = main_pid(box)
    invocation = box.unit_property(UNIT, "InvocationID")
    done = box.exec(["systemctl", "stop", UNIT], check=False, timeout_s=120)
    assert done.returncode == 0, done.stderr + journal_text(box)
    assert box.unit_property(UNIT, "ActiveState") == "inactive"
    assert box.unit_property(UNIT, "Result") == "success", journal_text(box)
    assert box.unit_property(UNIT, "ExecMainCode") == "1"  # CLD_EXITED
    assert box.unit_property(UNIT, "ExecMainStatus") == "0"
    assert box.unit_property(UNIT, "ExecMainPID") == str(pid)
    stopping = femd_entries(box, MESSAGE_ID=Event.AGENT_STOPPING.value, _PID=str(pid))
    assert len(stopping) == 1, journal_text(box)
    box.journal_sync()
    success = box.journal(
        None, MESSAGE_ID=UNIT_SUCCESS, UNIT=UNIT, INVOCATION_ID=invocation
    )
    said = [e["MESSAGE"] for e in success]
    assert said == [f"{UNIT}: Deactivated successfully."], journal_text(box)
