"""Shared test factories and backend gating for the whole femd suite.

Factories (plain functions, also offered as fixtures of the same name):
  keypair()                        -> Keypair(private, public, keyid), fresh Ed25519
  policy_dict(**overrides)         -> the DESIGN example policy as a dict
  make_policy(tmp_path, keys, **overrides) -> Path of a policy YAML + key files
  task_dict(**overrides)           -> a valid DESIGN example Task dict
  sign(manifest, *keys)            -> envelope bytes (manifest: dict or bytes)
  NOW                              -> the fixed reference time (passed in, never frozen)

Overrides are deep-merged: nested dicts merge, any other value replaces, and
``None`` deletes the key.

Backend gating: a test marked ``rabbitmq``, ``podman``, ``bwrap`` or ``systemd``
is skipped when that backend is absent, unless ``CI=true`` or
``FEMD_TEST_REQUIRE`` (comma list, or ``all``) names it: then it fails.
"""

from __future__ import annotations

import base64
import copy
import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from femd import envelope as femd_envelope
from femd.keys import keyid as keyid_of
from femd.keys import public_pem
from tests.backends import BACKENDS, required_backends, unavailable

# Fixtures of other areas (e.g. tests/integration/rabbit_support.py) are plugged
# in here, in the root conftest, where pytest allows it:
pytest_plugins = [
    "tests.integration.rabbit_support",
    "tests.integration.podman_support",
    "tests.integration.slurm_support",
]

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
NODE = "fdn-01"
PROJECT = "dt4h-heart-failure"
DIGEST = "sha256:" + "5e" * 32
IMAGE = f"registry.example.org/dt4h/flcore@{DIGEST}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Keypair(NamedTuple):
    private: Ed25519PrivateKey
    public: Ed25519PublicKey
    keyid: str


def keypair() -> Keypair:
    """A fresh Ed25519 key pair and its keyid."""
    private = Ed25519PrivateKey.generate()
    return Keypair(private, private.public_key(), keyid_of(private.public_key()))


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge *overrides* into a copy of *base*; ``None`` deletes a key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def task_dict(**overrides: Any) -> dict[str, Any]:
    """The DESIGN example task, valid at ``NOW`` for node ``fdn-01``."""
    base: dict[str, Any] = {
        "apiVersion": "femd/v1",
        "kind": "Task",
        "id": "7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11",
        "project": PROJECT,
        "issuer": "orchestrator.dt4h.example",
        "issued_at": _iso(NOW - timedelta(hours=2)),
        "expires_at": _iso(NOW + timedelta(hours=22)),
        "nodes": [NODE, "fdn-02"],
        "launcher": "podman",
        "profile": "default",
        "image": IMAGE,
        "source": {
            "git": "https://github.com/example/analysis.git",
            "commit": COMMIT,
            "path": ".",
        },
        "command": ["python", "train.py", "--rounds", "3"],
        "env": {"ROUNDS": "3"},
        "inputs": [{"dataset": "hf-cohort-2024", "mount": "/data/hf"}],
        "outputs": {"path": "/out", "max_bytes": 10485760},
        "resources": {"cpus": 2, "memory_mb": 4096, "timeout_s": 3600, "pids": 256},
        "network": {"mode": "none"},
    }
    return merge(base, overrides)


def policy_dict(**overrides: Any) -> dict[str, Any]:
    """The DESIGN example policy (signers `orchestrator` and `pi-smith`)."""
    base: dict[str, Any] = {
        "apiVersion": "femd/v1",
        "kind": "Policy",
        "node": NODE,
        "signers": {
            "orchestrator": {"public_key_file": "keys/orchestrator.pub"},
            "pi-smith": {"public_key_file": "keys/pi-smith.pub"},
        },
        "revoked_keyids": [],
        "datasets": {"hf-cohort-2024": {"path": "/srv/data/hf-cohort-2024"}},
        "projects": {
            PROJECT: {
                "signers": ["orchestrator", "pi-smith"],
                "threshold": 2,
                "launchers": ["podman"],
                "images": ["registry.example.org/dt4h/*"],
                "git": ["https://github.com/example/*"],
                "datasets": ["hf-cohort-2024"],
                "max_resources": {
                    "cpus": 4,
                    "memory_mb": 8192,
                    "timeout_s": 7200,
                    "pids": 512,
                },
                "network": "none",
                "outputs": {"max_bytes": 52428800},
            }
        },
    }
    return merge(base, overrides)


def make_policy(
    tmp_path: Path, keys: Mapping[str, Keypair] | None = None, **overrides: Any
) -> Path:
    """Write ``policy.yaml`` and ``keys/<name>.pub`` under *tmp_path*; return its path.

    *keys* maps signer names to key pairs; each gets a public key file, which
    the default policy's signers of the same name reference.
    """
    keydir = tmp_path / "keys"
    keydir.mkdir(parents=True, exist_ok=True)
    for name, kp in (keys or {}).items():
        (keydir / f"{name}.pub").write_bytes(public_pem(kp.public))
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict(**overrides), sort_keys=False))
    return path


def _private(k: Keypair | Ed25519PrivateKey) -> Ed25519PrivateKey:
    return k.private if isinstance(k, Keypair) else k


def sign(
    manifest: Mapping[str, Any] | bytes, *keys: Keypair | Ed25519PrivateKey
) -> bytes:
    """Envelope bytes over *manifest* (a dict is JSON-encoded) signed by *keys*."""
    payload = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    env = femd_envelope.sign(payload, [_private(k) for k in keys])
    return femd_envelope.encode_envelope(env)


def envelope_dict(
    payload: bytes,
    signatures: list[tuple[str, bytes]],
    payload_type: str = femd_envelope.PAYLOAD_TYPE,
) -> dict[str, Any]:
    """A raw envelope dict (for hand-built, possibly hostile envelopes)."""
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": kid, "sig": base64.b64encode(sig).decode()}
            for kid, sig in signatures
        ],
    }


# ---------------------------------------------------------------------------
# the same factories as fixtures (session-scoped: they are pure functions)


@pytest.fixture(name="keypair", scope="session")
def _keypair_fixture() -> Callable[[], Keypair]:
    return keypair


@pytest.fixture(name="task_dict", scope="session")
def _task_dict_fixture() -> Callable[..., dict[str, Any]]:
    return task_dict


@pytest.fixture(name="policy_dict", scope="session")
def _policy_dict_fixture() -> Callable[..., dict[str, Any]]:
    return policy_dict


@pytest.fixture(name="make_policy", scope="session")
def _make_policy_fixture() -> Callable[..., Path]:
    return make_policy


@pytest.fixture(name="sign", scope="session")
def _sign_fixture() -> Callable[..., bytes]:
    return sign


@pytest.fixture(scope="session")
def now() -> datetime:
    return NOW


@pytest.fixture
def keys() -> dict[str, Keypair]:
    """Fresh keys for the default policy's two signers."""
    return {"orchestrator": keypair(), "pi-smith": keypair()}


# ---------------------------------------------------------------------------
# backend gating: skips that cannot lie


def pytest_configure(config: pytest.Config) -> None:
    required_backends(os.environ)  # a typo must not silently require nothing


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in sorted({m.name for m in item.iter_markers()} & set(BACKENDS)):
        if BACKENDS[name]():
            continue
        unavailable(name, f"backend {name!r} not available")
