"""Admission: every Rule, allow and deny, through admit() with real signatures."""

import base64
import hashlib
import json
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from femd.decision import Decision, Reason, Rule, admit, evaluate, split_image
from femd.envelope import PAYLOAD_TYPE, SignatureCheck, pae
from femd.errors import EnvelopeError, ManifestError
from femd.manifest import decode_manifest
from femd.policy import load_policy

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
NODE = "fdn-01"
PROJECT = "dt4h-heart-failure"
DIGEST = "sha256:" + "5e" * 32
ISSUED = NOW - timedelta(hours=2)
EXPIRES = NOW + timedelta(hours=22)
BOTH = ("orchestrator", "pi-smith")


class Case:
    """One admission scenario: policy and task overrides, who signs, when, where."""

    def __init__(
        self,
        rules=(),
        *,
        task=None,
        policy=None,
        signers=BOTH,
        node=None,
        now=NOW,
    ):
        self.rules = list(rules)
        self.task = task or {}
        self.policy = policy or {}
        self.signers = signers
        self.node = node
        self.now = now


def project(**fields):
    return {"projects": {PROJECT: fields}}


# Every case: the exact list of rules admit() must report (empty: allow).
CASES = {
    # --- signatures and signers
    "both-sign": Case(),
    "threshold-one-of-two": Case([Rule.SIGNATURE_THRESHOLD], signers=("orchestrator",)),
    "threshold-1-met": Case(policy=project(threshold=1), signers=("pi-smith",)),
    "same-signer-twice": Case(
        [Rule.SIGNATURE_THRESHOLD], signers=("orchestrator", "orchestrator")
    ),
    "stranger-only": Case([Rule.SIGNATURE_THRESHOLD], signers=("stranger",)),
    "no-signatures": Case([Rule.SIGNATURE_THRESHOLD], signers=()),
    "stranger-too-is-noted-not-denied": Case(signers=(*BOTH, "stranger")),
    "liar-claims-pi": Case(
        [Rule.SIGNATURE_THRESHOLD], signers=("orchestrator", "liar")
    ),
    "revoked-signed": Case(
        [Rule.SIGNER_REVOKED, Rule.SIGNATURE_THRESHOLD],
        policy={"revoked_keyids": ["@pi-smith"]},
    ),
    "revoked-alone-denies": Case(
        [Rule.SIGNER_REVOKED],
        policy={"revoked_keyids": ["@pi-smith"], **project(threshold=1)},
    ),
    "revoked-did-not-sign": Case(
        policy={"revoked_keyids": ["@pi-smith"], **project(threshold=1)},
        signers=("orchestrator",),
    ),
    "revoked-only-signer": Case(
        [Rule.SIGNER_REVOKED, Rule.SIGNATURE_THRESHOLD],
        policy={"revoked_keyids": ["@orchestrator"]},
        signers=("orchestrator",),
    ),
    "expired-signer-last-day": Case(
        policy={"signers": {"pi-smith": {"expires": NOW.date()}}},
        now=datetime(2026, 11, 22, 23, 59, 59, tzinfo=UTC),
    ),
    "expired-signer-next-day": Case(
        [Rule.SIGNER_EXPIRED, Rule.SIGNATURE_THRESHOLD],
        policy={"signers": {"pi-smith": {"expires": NOW.date()}}},
        now=datetime(2026, 11, 23, 0, 0, 0, tzinfo=UTC),
    ),
    "expired-signer-day-in-utc": Case(
        [Rule.SIGNER_EXPIRED, Rule.SIGNATURE_THRESHOLD],
        policy={"signers": {"pi-smith": {"expires": NOW.date()}}},
        # 23:30 in New York on the 22nd is the 23rd in UTC
        now=datetime(2026, 11, 22, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
    ),
    "key-for-other-project": Case(
        [Rule.SIGNATURE_THRESHOLD],
        policy={
            "projects": {
                PROJECT: {"signers": ["orchestrator"], "threshold": 1},
                "other": {"signers": ["pi-smith"], "threshold": 1},
            }
        },
        signers=("pi-smith",),
    ),
    # --- time window (skew 300 s)
    "expires-within-skew": Case(now=EXPIRES + timedelta(seconds=300)),
    "expired": Case([Rule.MANIFEST_EXPIRED], now=EXPIRES + timedelta(seconds=301)),
    "issued-within-skew": Case(now=ISSUED - timedelta(seconds=300)),
    "not-yet-valid": Case(
        [Rule.MANIFEST_NOT_YET_VALID], now=ISSUED - timedelta(seconds=301)
    ),
    # signed extreme times are values, not OverflowErrors
    "expires-year-9999": Case(task={"expires_at": "9999-12-31T23:59:59Z"}),
    "issued-year-1": Case(task={"issued_at": "0001-01-01T00:00:00Z"}),
    "expired-year-1-with-offset": Case(
        [Rule.MANIFEST_EXPIRED],
        task={
            "issued_at": "0001-01-01T00:00:00+23:59",
            "expires_at": "0001-01-01T00:00:00+23:58",
        },
    ),
    "issued-year-9999-with-offset": Case(
        [Rule.MANIFEST_NOT_YET_VALID],
        task={
            "issued_at": "9999-12-31T23:59:58-23:59",
            "expires_at": "9999-12-31T23:59:59-23:59",
        },
    ),
    # --- node audience
    "other-node-in-list": Case(
        task={"nodes": ["fdn-02", NODE]},
    ),
    "node-not-in-task": Case([Rule.NODE_AUDIENCE], task={"nodes": ["fdn-02"]}),
    "node-differs-from-policy": Case(
        [Rule.NODE_AUDIENCE], node="fdn-02", task={"nodes": [NODE, "fdn-02"]}
    ),
    "node-neither": Case([Rule.NODE_AUDIENCE, Rule.NODE_AUDIENCE], node="fdn-03"),
    # --- project
    "project-unknown": Case([Rule.PROJECT_UNKNOWN], task={"project": "other"}),
    # --- launcher
    "launcher-process-not-allowed": Case(
        [Rule.LAUNCHER_NOT_ALLOWED], task={"launcher": "process", "image": None}
    ),
    "launcher-process-allowed": Case(
        task={"launcher": "process", "image": None},
        policy=project(launchers=["process"]),
    ),
    "launchers-omitted-fail-closed": Case(
        [Rule.LAUNCHER_NOT_ALLOWED], policy=project(launchers=None)
    ),
    # --- image
    "image-other-repo-same-registry": Case(
        task={"image": f"registry.example.org/dt4h/other@{DIGEST}"}
    ),
    # `*` stays inside one path segment (shell pathname globs); `**` crosses `/`.
    "image-nested-repo-needs-double-star": Case(
        task={"image": f"registry.example.org/dt4h/other/deep@{DIGEST}"},
        rules=[Rule.IMAGE_NOT_ALLOWED],
    ),
    "image-nested-repo-double-star": Case(
        task={"image": f"registry.example.org/dt4h/other/deep@{DIGEST}"},
        policy={"projects": {PROJECT: {"images": ["registry.example.org/dt4h/**"]}}},
    ),
    "git-star-cannot-cross-slash": Case(
        task={
            "source": {"git": "https://evil.io/x.example.org/y.git", "commit": "0" * 40}
        },
        policy={"projects": {PROJECT: {"git": ["https://*.example.org/*"]}}},
        rules=[Rule.GIT_NOT_ALLOWED],
    ),
    "image-with-tag-and-digest": Case(
        task={"image": f"registry.example.org/dt4h/flcore:1.2@{DIGEST}"}
    ),
    "image-registry-suffix-attack": Case(
        [Rule.IMAGE_NOT_ALLOWED],
        task={"image": f"registry.example.org.evil.io/dt4h/flcore@{DIGEST}"},
        policy=project(images=["registry.example.org/*"]),
    ),
    "image-prefix-attack": Case(
        [Rule.IMAGE_NOT_ALLOWED],
        task={"image": f"evil.io/registry.example.org/dt4h/x@{DIGEST}"},
    ),
    "image-path-prefix-attack": Case(
        [Rule.IMAGE_NOT_ALLOWED],
        task={"image": f"registry.example.org/dt4h-evil/x@{DIGEST}"},
    ),
    "image-not-allowed-and-unpinned": Case(
        [Rule.IMAGE_NOT_PINNED, Rule.IMAGE_NOT_ALLOWED],
        task={"image": "docker.io/library/python:3.12"},
    ),
    "images-omitted-fail-closed": Case(
        [Rule.IMAGE_NOT_ALLOWED], policy=project(images=None)
    ),
    "image-tag-only": Case(
        [Rule.IMAGE_NOT_PINNED],
        task={"image": "registry.example.org/dt4h/flcore:latest"},
    ),
    "image-short-digest": Case(
        [Rule.IMAGE_NOT_PINNED],
        task={"image": "registry.example.org/dt4h/flcore@sha256:abc"},
    ),
    "image-sha512": Case(
        [Rule.IMAGE_NOT_PINNED],
        task={"image": "registry.example.org/dt4h/flcore@sha512:" + "a" * 128},
    ),
    "image-port-no-tag": Case(
        [Rule.IMAGE_NOT_PINNED, Rule.IMAGE_NOT_ALLOWED],
        task={"image": "registry.example.org:5000/dt4h/flcore"},
    ),
    # --- git
    "git-allowed": Case(
        task={"source": {"git": "https://github.com/example/other.git"}}
    ),
    "git-no-source": Case(task={"source": None}),
    "git-other-org": Case(
        [Rule.GIT_NOT_ALLOWED],
        task={"source": {"git": "https://github.com/examples/x"}},
    ),
    "git-host-suffix-attack": Case(
        [Rule.GIT_NOT_ALLOWED],
        task={"source": {"git": "https://github.com.evil.io/example/x"}},
    ),
    "git-embedded-url": Case(
        [Rule.GIT_NOT_ALLOWED],
        task={"source": {"git": "https://evil.io/https://github.com/example/x"}},
    ),
    "git-other-scheme": Case(
        [Rule.GIT_NOT_ALLOWED], task={"source": {"git": "ssh://github.com/example/x"}}
    ),
    "git-omitted-fail-closed": Case([Rule.GIT_NOT_ALLOWED], policy=project(git=None)),
    # --- datasets
    "dataset-none-asked": Case(task={"inputs": []}),
    "dataset-unknown": Case(
        [Rule.DATASET_NOT_ALLOWED],
        task={"inputs": [{"dataset": "other-cohort", "mount": "/data/o"}]},
    ),
    "dataset-of-another-project": Case(
        [Rule.DATASET_NOT_ALLOWED],
        task={"inputs": [{"dataset": "genomes", "mount": "/data/g"}]},
        policy={"datasets": {"genomes": {"path": "/srv/data/genomes"}}},
    ),
    "datasets-each-reported": Case(
        [Rule.DATASET_NOT_ALLOWED, Rule.DATASET_NOT_ALLOWED],
        task={
            "inputs": [
                {"dataset": "a", "mount": "/a"},
                {"dataset": "hf-cohort-2024", "mount": "/data/hf"},
                {"dataset": "b", "mount": "/b"},
            ]
        },
    ),
    # --- runtimes
    "runtime-none-asked": Case(task={"runtime": None}),
    "runtime-allowed": Case(
        task={"runtime": "flower"},
        policy={
            "runtimes": {"flower": {"path": "/opt/femd/runtimes/flower"}},
            **project(runtimes=["flower"]),
        },
    ),
    "runtime-not-in-project": Case(
        [Rule.RUNTIME_NOT_ALLOWED],
        task={"runtime": "flower"},
        policy={"runtimes": {"flower": {"path": "/opt/femd/runtimes/flower"}}},
    ),
    "runtime-unknown-to-node": Case(
        [Rule.RUNTIME_NOT_ALLOWED], task={"runtime": "torch"}
    ),
    # --- resources
    "resources-at-maximum": Case(
        task={
            "resources": {"cpus": 4, "memory_mb": 8192, "timeout_s": 7200, "pids": 512}
        }
    ),
    "resources-omitted": Case(task={"resources": None}),
    "cpus-exceeded": Case([Rule.RESOURCES_EXCEEDED], task={"resources": {"cpus": 4.5}}),
    "memory-exceeded": Case(
        [Rule.RESOURCES_EXCEEDED], task={"resources": {"memory_mb": 8193}}
    ),
    "timeout-exceeded": Case(
        [Rule.RESOURCES_EXCEEDED], task={"resources": {"timeout_s": 7201}}
    ),
    "pids-exceeded": Case([Rule.RESOURCES_EXCEEDED], task={"resources": {"pids": 513}}),
    "resources-all-exceeded": Case(
        [Rule.RESOURCES_EXCEEDED] * 4,
        task={
            "resources": {"cpus": 8, "memory_mb": 9000, "timeout_s": 9000, "pids": 9000}
        },
    ),
    "resources-node-defaults": Case(
        [Rule.RESOURCES_EXCEEDED] * 4, policy=project(max_resources=None)
    ),
    "resources-partial-project-limits": Case(
        [Rule.RESOURCES_EXCEEDED],
        policy={
            **project(
                max_resources={
                    "cpus": 2,
                    "memory_mb": None,
                    "timeout_s": None,
                    "pids": None,
                }
            ),
            "defaults": {
                "max_resources": {"memory_mb": 4096, "timeout_s": 3600, "pids": 100}
            },
        },
    ),
    # --- network
    "network-none": Case(task={"network": {"mode": "none"}}),
    "egress-with-network-none": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "egress", "allow": ["fl.example.org:443"]}},
    ),
    "egress-allowed": Case(
        task={"network": {"mode": "egress", "allow": ["fl.example.org:443"]}},
        policy=project(network={"egress": ["fl.example.org:443"]}),
    ),
    "egress-glob": Case(
        task={"network": {"mode": "egress", "allow": ["fl-2.example.org:8443"]}},
        policy=project(network={"egress": ["*.example.org:*"]}),
    ),
    "egress-suffix-attack": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "egress", "allow": ["fl.example.org.evil.io:443"]}},
        policy=project(network={"egress": ["fl.example.org:443"]}),
    ),
    "egress-other-port": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "egress", "allow": ["fl.example.org:22"]}},
        policy=project(network={"egress": ["fl.example.org:443"]}),
    ),
    "egress-each-reported": Case(
        [Rule.NETWORK_NOT_ALLOWED, Rule.NETWORK_NOT_ALLOWED],
        task={
            "network": {
                "mode": "egress",
                "allow": ["a.io:1", "fl.example.org:443", "b.io:2"],
            }
        },
        policy=project(network={"egress": ["fl.example.org:443"]}),
    ),
    "listen-allowed": Case(
        task={"network": {"mode": "none", "listen": [4433]}},
        policy=project(
            network={"ingress": {"ports": [4433, 8080], "peers": ["10.0.0.0/8"]}}
        ),
    ),
    "listen-with-network-none": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "none", "listen": [4433]}},
    ),
    "listen-other-port": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "none", "listen": [4433, 22]}},
        policy=project(network={"ingress": {"ports": [4433], "peers": ["10.0.0.0/8"]}}),
    ),
    "listen-with-egress-only-policy": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={
            "network": {
                "mode": "egress",
                "allow": ["fl.example.org:443"],
                "listen": [4433],
            }
        },
        policy=project(network={"egress": ["fl.example.org:443"]}),
    ),
    "egress-with-ingress-only-policy": Case(
        [Rule.NETWORK_NOT_ALLOWED],
        task={"network": {"mode": "egress", "allow": ["fl.example.org:443"]}},
        policy=project(
            network={"ingress": {"ports": [4433], "peers": ["fl.example.org"]}}
        ),
    ),
    "egress-and-listen-allowed": Case(
        task={
            "network": {
                "mode": "egress",
                "allow": ["fl.example.org:443"],
                "listen": [4433],
            }
        },
        policy=project(
            network={
                "egress": ["fl.example.org:443"],
                "ingress": {"ports": [4433], "peers": ["::1/128"]},
            }
        ),
    ),
    # --- outputs
    "outputs-at-cap": Case(task={"outputs": {"max_bytes": 52428800}}),
    "outputs-exceeded": Case(
        [Rule.OUTPUTS_EXCEEDED], task={"outputs": {"max_bytes": 52428801}}
    ),
    "outputs-node-default": Case(
        [Rule.OUTPUTS_EXCEEDED],
        task={"outputs": {"max_bytes": 2 * 1024**3 + 1}},
        policy=project(outputs=None),
    ),
    "outputs-unasked": Case(task={"outputs": {"path": "/results"}}),
    # --- several at once: every violated rule is reported
    "everything-wrong": Case(
        [
            Rule.SIGNER_EXPIRED,
            Rule.SIGNATURE_THRESHOLD,
            Rule.MANIFEST_EXPIRED,
            Rule.NODE_AUDIENCE,
            Rule.LAUNCHER_NOT_ALLOWED,
            Rule.IMAGE_NOT_PINNED,
            Rule.IMAGE_NOT_ALLOWED,
            Rule.GIT_NOT_ALLOWED,
            Rule.DATASET_NOT_ALLOWED,
            Rule.RESOURCES_EXCEEDED,
            Rule.NETWORK_NOT_ALLOWED,
            Rule.OUTPUTS_EXCEEDED,
        ],
        task={
            "nodes": ["fdn-09"],
            "launcher": "process",
            "image": "docker.io/evil/x:latest",
            "source": {"git": "https://evil.io/x.git"},
            "inputs": [{"dataset": "genomes", "mount": "/g"}],
            "resources": {"pids": 100000},
            "network": {"mode": "egress", "allow": ["evil.io:443"]},
            "outputs": {"max_bytes": 10**12},
        },
        policy={"signers": {"pi-smith": {"expires": date(2026, 12, 1)}}},
        now=datetime(2026, 12, 2, tzinfo=UTC),
    ),
}


@pytest.fixture
def world(tmp_path, keys, keypair, make_policy, task_dict, sign):
    """Keys, a policy written to disk, and admit() for a Case."""
    stranger = keypair()
    kid = {name: kp.keyid for name, kp in keys.items()}

    def run(case: Case):
        overrides = json.loads(
            json.dumps(case.policy, default=str)
            .replace('"@orchestrator"', json.dumps(kid["orchestrator"]))
            .replace('"@pi-smith"', json.dumps(kid["pi-smith"]))
        )
        path = make_policy(tmp_path, keys, **overrides)
        policy = load_policy(path)
        manifest = task_dict(**case.task)
        payload = json.dumps(manifest).encode()
        sigs = []
        for name in case.signers:
            if name == "stranger":
                sigs.append(
                    (stranger.keyid, stranger.private.sign(pae(PAYLOAD_TYPE, payload)))
                )
            elif name == "liar":  # stranger's signature under pi-smith's keyid
                sigs.append(
                    (kid["pi-smith"], stranger.private.sign(pae(PAYLOAD_TYPE, payload)))
                )
            else:
                sigs.append(
                    (kid[name], keys[name].private.sign(pae(PAYLOAD_TYPE, payload)))
                )
        data = json.dumps(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": base64.b64encode(payload).decode(),
                "signatures": [
                    {"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in sigs
                ],
            }
        ).encode()
        return admit(data, policy, node=case.node or NODE, now=case.now)

    run.keys = keys
    run.stranger = stranger
    return run


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rule(world, case):
    verdict = world(case)
    assert [r.rule for r in verdict.decision.reasons] == case.rules
    assert verdict.decision.allowed == (not case.rules)
    for r in verdict.decision.reasons:
        assert r.message
        assert "\n" not in r.message


def test_every_rule_is_produced_by_some_case():
    produced = {rule for case in CASES.values() for rule in case.rules}
    # launcher.unenforceable and mount.reserved come from the host's launchers
    # (femd.admission, tests/unit/test_admission.py), not from the policy.
    assert set(Rule) - produced == {Rule.LAUNCHER_UNENFORCEABLE, Rule.MOUNT_RESERVED}
    assert Rule.LAUNCHER_UNENFORCEABLE.value == "launcher.unenforceable"


def test_every_rule_has_an_allow_case_next_to_it():
    allowed = [name for name, case in CASES.items() if not case.rules]
    assert len(allowed) >= 15


def test_rule_names_are_the_design_names():
    assert {r.value for r in Rule} == {
        "signature.threshold",
        "signer.revoked",
        "signer.expired",
        "manifest.expired",
        "manifest.not_yet_valid",
        "node.audience",
        "project.unknown",
        "launcher.not_allowed",
        "launcher.unenforceable",
        "mount.reserved",
        "image.not_allowed",
        "image.not_pinned",
        "git.not_allowed",
        "dataset.not_allowed",
        "runtime.not_allowed",
        "resources.exceeded",
        "network.not_allowed",
        "outputs.exceeded",
    }


# ---------------------------------------------------------------------------
# what the verdict says besides the rules


def test_allow_verdict_names_signers_and_keyids(world):
    v = world(Case(signers=("pi-smith", "stranger", "orchestrator")))
    assert v.decision.allowed
    assert v.signers == tuple(
        n for _, n in sorted((world.keys[n].keyid, n) for n in BOTH)
    )
    assert set(v.keyids) == {world.keys[n].keyid for n in BOTH}
    assert v.check.unknown == {world.stranger.keyid}
    assert v.manifest is not None
    assert v.manifest.project == PROJECT
    assert v.manifest_sha256 == hashlib.sha256(v.payload).hexdigest()


def test_threshold_message_names_who_counted(world):
    v = world(Case(signers=("orchestrator",)))
    (reason,) = v.decision.reasons
    assert reason.message == "needs 2 of [orchestrator, pi-smith], got 1 (orchestrator)"
    assert v.signers == ("orchestrator",)


def test_signer_for_another_project_does_not_count(world):
    case = CASES["key-for-other-project"]
    v = world(case)
    assert v.signers == ()
    assert v.manifest is not None  # a trusted key signed: decoded, then denied


def test_liar_lands_in_invalid(world):
    v = world(CASES["liar-claims-pi"])
    assert v.check.invalid == {world.keys["pi-smith"].keyid}


def test_no_trusted_signature_never_decodes_the_payload(
    tmp_path, keys, keypair, make_policy
):
    policy = load_policy(make_policy(tmp_path, keys))
    stranger = keypair()
    garbage = b"\xff not json {{{"
    data = json.dumps(
        {
            "payloadType": PAYLOAD_TYPE,
            "payload": base64.b64encode(garbage).decode(),
            "signatures": [
                {
                    "keyid": stranger.keyid,
                    "sig": base64.b64encode(
                        stranger.private.sign(pae(PAYLOAD_TYPE, garbage))
                    ).decode(),
                }
            ],
        }
    ).encode()
    v = admit(data, policy, node=NODE, now=NOW)
    assert [r.rule for r in v.decision.reasons] == [Rule.SIGNATURE_THRESHOLD]
    assert "1 from unknown keys" in v.decision.reasons[0].message
    assert v.manifest is None


def test_trusted_signature_over_garbage_is_a_manifest_error(
    tmp_path, keys, make_policy, sign
):
    policy = load_policy(make_policy(tmp_path, keys))
    with pytest.raises(ManifestError):
        admit(sign(b"\xff not json", keys["orchestrator"]), policy, node=NODE, now=NOW)


def test_trusted_signature_over_a_bad_manifest_is_a_manifest_error(
    tmp_path, keys, make_policy, sign, task_dict
):
    policy = load_policy(make_policy(tmp_path, keys))
    data = sign(task_dict(source={"commit": "main"}), *keys.values())
    with pytest.raises(ManifestError, match=r"source\.commit"):
        admit(data, policy, node=NODE, now=NOW)


def test_bad_envelope_is_an_envelope_error(tmp_path, keys, make_policy):
    policy = load_policy(make_policy(tmp_path, keys))
    with pytest.raises(EnvelopeError):
        admit(b"{}", policy, node=NODE, now=NOW)


def test_admit_size_limit_is_configurable(tmp_path, keys, make_policy, sign, task_dict):
    policy = load_policy(make_policy(tmp_path, keys))
    data = sign(task_dict(), *keys.values())
    assert admit(data, policy, node=NODE, now=NOW, max_bytes=len(data)).decision.allowed
    with pytest.raises(EnvelopeError, match="too large"):
        admit(data, policy, node=NODE, now=NOW, max_bytes=len(data) - 1)


def test_skew_is_configurable(tmp_path, keys, make_policy, sign, task_dict):
    policy = load_policy(make_policy(tmp_path, keys))
    data = sign(task_dict(), *keys.values())
    late = EXPIRES + timedelta(seconds=60)
    assert admit(data, policy, node=NODE, now=late, skew_s=60).decision.allowed
    v = admit(data, policy, node=NODE, now=late, skew_s=59)
    assert [r.rule for r in v.decision.reasons] == [Rule.MANIFEST_EXPIRED]


def test_cancel_is_admitted_by_the_same_signers(tmp_path, keys, make_policy, sign):
    policy = load_policy(make_policy(tmp_path, keys))
    cancel = {
        "apiVersion": "femd/v1",
        "kind": "Cancel",
        "id": "c-1",
        "project": PROJECT,
        "target": "7b0f6c1e-4a53-4f8e-9b8e-0d6f0a3d2c11",
        "issued_at": "2026-11-22T11:00:00Z",
        "expires_at": "2026-11-22T13:00:00Z",
        "nodes": [NODE],
    }
    assert admit(
        sign(cancel, *keys.values()), policy, node=NODE, now=NOW
    ).decision.allowed
    v = admit(sign(cancel, keys["orchestrator"]), policy, node=NODE, now=NOW)
    assert [r.rule for r in v.decision.reasons] == [Rule.SIGNATURE_THRESHOLD]
    v = admit(
        sign({**cancel, "nodes": ["fdn-02"]}, *keys.values()),
        policy,
        node=NODE,
        now=NOW,
    )
    assert [r.rule for r in v.decision.reasons] == [Rule.NODE_AUDIENCE]


def test_evaluate_is_pure_and_takes_a_signature_check(
    tmp_path, keys, make_policy, task_dict
):
    policy = load_policy(make_policy(tmp_path, keys))
    manifest = decode_manifest(json.dumps(task_dict()).encode())
    all_keys = SignatureCheck(valid=frozenset(k.keyid for k in keys.values()))
    assert evaluate(manifest, all_keys, policy, node=NODE, now=NOW) == Decision()
    none = SignatureCheck()
    d = evaluate(manifest, none, policy, node=NODE, now=NOW)
    assert d.reasons == (
        Reason(Rule.SIGNATURE_THRESHOLD, "needs 2 of [orchestrator, pi-smith], got 0"),
    )
    assert not d.allowed


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (f"reg.io/a/b@{DIGEST}", ("reg.io/a/b", DIGEST)),
        (f"reg.io:5000/a/b:1.0@{DIGEST}", ("reg.io:5000/a/b", DIGEST)),
        ("reg.io:5000/a/b", ("reg.io:5000/a/b", None)),
        ("reg.io/a/b:latest", ("reg.io/a/b", None)),
        ("reg.io/a/b@sha256:ABC", ("reg.io/a/b", None)),
        (f"reg.io/a/b@{DIGEST}@{DIGEST}", ("reg.io/a/b", None)),
    ],
    ids=[
        "digest",
        "port-tag-digest",
        "port-no-tag",
        "tag",
        "bad-digest",
        "two-digests",
    ],
)
def test_split_image(ref, expected):
    assert split_image(ref) == expected


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("registry.example.org/dt4h/*", "registry.example.org/dt4h/flcore", True),
        ("registry.example.org/dt4h/*", "registry.example.org/dt4h/a/b", False),
        ("registry.example.org/dt4h/**", "registry.example.org/dt4h/a/b", True),
        ("registry.example.org/*", "registry.example.org.evil.io/x", False),
        ("https://*.example.org/*", "https://evil.io/x.example.org/y", False),
        ("fl-?.example.org:443", "fl-1.example.org:443", True),
        ("fl-?.example.org:443", "fl-12.example.org:443", False),
        ("a?b", "a/b", False),
        ("a.b", "aXb", False),  # every other character is literal
        ("fl.example.org:*", "fl.example.org:8443", True),
    ],
    ids=lambda v: str(v),
)
def test_glob_match(pattern, text, matches):
    from femd.decision import glob_match

    assert glob_match(pattern, text) is matches
