"""The shipped Flower example policies admit a Flower client and server task,
and nothing more on the network (policies/fl-client.yaml, fl-server.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from femd.decision import Rule, evaluate
from femd.envelope import SignatureCheck
from femd.manifest import Task, decode_manifest
from femd.policy import load_policy
from tests.conftest import NOW, task_dict

POLICIES = Path(__file__).resolve().parents[2] / "policies"
DIGEST = "@sha256:" + "ab" * 32


def decide(policy_name: str, node: str, **overrides):
    loaded = load_policy(POLICIES / policy_name)
    task = task_dict(
        project="sepsis-fl",
        nodes=[node],
        source=None,
        inputs=[],
        resources={"cpus": 2, "memory_mb": 4096, "timeout_s": 3600, "pids": 256},
        outputs={"path": "/out", "max_bytes": 1048576},
        **overrides,
    )
    task = {k: v for k, v in task.items() if v is not None}
    manifest = decode_manifest(json.dumps(task).encode())
    assert isinstance(manifest, Task)
    both = SignatureCheck(valid=frozenset(loaded.keys))
    return evaluate(manifest, both, loaded, node=node, now=NOW)


CLIENT = {
    "image": "registry.example.org/sepsis/flower-client" + DIGEST,
    "network": {"mode": "egress", "allow": ["fl-server.example:4433"]},
}
SERVER = {
    "image": "registry.example.org/sepsis/flower-server" + DIGEST,
    "network": {"mode": "none", "listen": [4433]},
}


def test_fl_client_admits_a_flower_client():
    assert decide("fl-client.yaml", "fdn-03", **CLIENT).allowed


@pytest.mark.parametrize(
    "network",
    [
        {"mode": "egress", "allow": ["fl-server.example:4433", "evil.example:443"]},
        {"mode": "egress", "allow": ["fl-server.example:22"]},
        {"mode": "egress", "allow": ["fl-server.example:4433"], "listen": [4433]},
    ],
    ids=["another-host", "another-port", "listening"],
)
def test_fl_client_admits_nothing_more(network):
    decision = decide("fl-client.yaml", "fdn-03", **(CLIENT | {"network": network}))
    assert [r.rule for r in decision.reasons] == [Rule.NETWORK_NOT_ALLOWED]


def test_fl_server_admits_a_flower_server_on_its_port_only():
    assert decide("fl-server.yaml", "fl-server", **SERVER).allowed
    other = SERVER | {"network": {"mode": "none", "listen": [4433, 8080]}}
    decision = decide("fl-server.yaml", "fl-server", **other)
    assert [r.message for r in decision.reasons] == [
        "listening on port 8080 is not allowed"
    ]
    egress = SERVER | {"network": {"mode": "egress", "allow": ["a.example:1"]}}
    decision = decide("fl-server.yaml", "fl-server", **egress)
    assert [r.rule for r in decision.reasons] == [Rule.NETWORK_NOT_ALLOWED]
