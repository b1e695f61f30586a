"""The femd/v1 manifest: strict decoding, one ManifestError per bad input."""

import json

import pytest

from femd.errors import ManifestError
from femd.manifest import (
    Cancel,
    NetworkEgress,
    NetworkNone,
    Task,
    decode_manifest,
    encode_manifest,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _bytes(d) -> bytes:
    return json.dumps(d).encode()


def test_design_example_decodes(task_dict):
    t = decode_manifest(_bytes(task_dict()))
    assert isinstance(t, Task)
    assert t.project == "dt4h-heart-failure"
    assert t.nodes == ("fdn-01", "fdn-02")
    assert t.source is not None
    assert t.source.commit == COMMIT
    assert t.inputs[0].mount == "/data/hf"
    assert isinstance(t.network, NetworkNone)
    assert t.resources.memory_mb == 4096
    assert t.issued_at.tzinfo is not None


def test_optional_fields_take_their_defaults(task_dict):
    t = decode_manifest(
        _bytes(
            task_dict(
                issuer=None,
                profile=None,
                source=None,
                env=None,
                inputs=None,
                outputs=None,
                resources=None,
                network=None,
            )
        )
    )
    assert isinstance(t, Task)
    assert t.profile == "default"
    assert t.source is None
    assert t.outputs.path == "/out"
    assert t.outputs.max_bytes is None
    assert t.resources.cpus is None
    assert isinstance(t.network, NetworkNone)


def test_listen_ports_on_both_network_modes(task_dict):
    for network in (
        {"mode": "none", "listen": [4433]},
        {"mode": "egress", "allow": ["fl-server.example:4433"], "listen": [4433]},
    ):
        t = decode_manifest(json.dumps(task_dict(network=network)).encode())
        assert isinstance(t, Task)
        assert t.network.listen == (4433,)
        assert json.loads(encode_manifest(t))["network"] == network
    t = decode_manifest(json.dumps(task_dict(network={"mode": "none"})).encode())
    assert json.loads(encode_manifest(t))["network"] == {"mode": "none"}


def test_sha256_commit_and_egress_network(task_dict):
    t = decode_manifest(
        _bytes(
            task_dict(
                source={"commit": "ab" * 32},
                network={"mode": "egress", "allow": ["fl.example.org:8443"]},
            )
        )
    )
    assert isinstance(t, Task)
    assert isinstance(t.network, NetworkEgress)
    assert t.network.allow == ("fl.example.org:8443",)


def test_cancel_decodes():
    c = decode_manifest(
        _bytes(
            {
                "apiVersion": "femd/v1",
                "kind": "Cancel",
                "id": "c-1",
                "project": "p",
                "target": "t-1",
                "issued_at": "2026-11-22T10:00:00Z",
                "expires_at": "2026-11-22T11:00:00Z",
                "nodes": ["fdn-01"],
            }
        )
    )
    assert isinstance(c, Cancel)
    assert c.target == "t-1"


def test_encode_roundtrips(task_dict):
    t = decode_manifest(_bytes(task_dict()))
    assert decode_manifest(encode_manifest(t)) == t


def test_unpinned_image_is_not_an_input_error(task_dict):
    # DESIGN: an unpinned image is a deny (`image.not_pinned`), so it decodes.
    t = decode_manifest(_bytes(task_dict(image="registry.example.org/dt4h/flcore:1.0")))
    assert isinstance(t, Task)
    assert t.image == "registry.example.org/dt4h/flcore:1.0"


# Each case: overrides of the DESIGN example -> the message ManifestError must match.
BAD = {
    "unknown-field": ({"extra": 1}, r"unknown field `extra`"),
    "unknown-nested-field": ({"source": {"branch": "main"}}, r"unknown field `branch`"),
    "api-version": ({"apiVersion": "femd/v2"}, r"apiVersion: "),
    "kind-missing": (
        {"kind": None},
        r"the required field `kind` is missing; use one of: Task, Cancel",
    ),
    "kind-unknown": (
        {"kind": "Job"},
        r'kind: "Job" is not allowed here; use one of: Task, Cancel',
    ),
    "id-missing": ({"id": None}, r"id: the required field `id` is missing"),
    "id-with-slash": ({"id": "../x"}, r"id: "),
    "id-newline": ({"id": "abc\n"}, r"id: "),
    "project-uppercase": ({"project": "DT4H"}, r"project: expected lowercase name"),
    "nodes-empty": ({"nodes": []}, r"nodes: needs at least 1 entry \(got 0\)"),
    "nodes-string": (
        {"nodes": "fdn-01"},
        r'nodes: expected a list, got text "fdn-01"',
    ),
    "nodes-twice": ({"nodes": ["fdn-01", "fdn-01"]}, r"`nodes` lists a node twice"),
    "issued-at-naive": ({"issued_at": "2026-11-22T10:00:00"}, r"issued_at: "),
    "issued-at-not-time": ({"issued_at": "yesterday"}, r"issued_at: "),
    "expires-equal-issued": (
        {"issued_at": "2026-11-22T10:00:00Z", "expires_at": "2026-11-22T10:00:00Z"},
        r"`expires_at` must be later than `issued_at`",
    ),
    "expires-before-issued": (
        {"issued_at": "2026-11-22T10:00:00Z", "expires_at": "2026-11-22T09:00:00Z"},
        r"`expires_at` must be later than `issued_at`",
    ),
    "expires-before-issued-other-zone": (
        {
            "issued_at": "2026-11-22T10:00:00Z",
            "expires_at": "2026-11-22T10:30:00+01:00",
        },
        r"`expires_at` must be later than `issued_at`",
    ),
    "launcher-docker": ({"launcher": "docker"}, r"launcher: "),
    "podman-without-image": ({"image": None}, r"`image` is required"),
    "process-without-command": (
        {"launcher": "process", "image": None, "command": []},
        r"`command` is required",
    ),
    "slurm-without-command": (
        {"launcher": "slurm", "image": None, "command": []},
        r"`command` is required when `launcher` is `slurm`",
    ),
    "image-with-space": ({"image": "reg/x y@sha256:" + "a" * 64}, r"image: "),
    "commit-branch": (
        {"source": {"commit": "main"}},
        r"source\.commit: expected a full git object id",
    ),
    "commit-short": ({"source": {"commit": COMMIT[:12]}}, r"source\.commit"),
    "commit-uppercase": ({"source": {"commit": COMMIT.upper()}}, r"source\.commit"),
    "commit-newline": ({"source": {"commit": COMMIT + "\n"}}, r"source\.commit"),
    "commit-41": ({"source": {"commit": COMMIT + "0"}}, r"source\.commit"),
    "git-http": ({"source": {"git": "http://github.com/x/y"}}, r"source\.git"),
    "git-dotdot": (
        {"source": {"git": "https://github.com/example/../evil/x"}},
        r"source\.git: .*no `\.\.` segment",
    ),
    "git-ext-transport": ({"source": {"git": "ext::sh -c evil"}}, r"source\.git"),
    "source-path-dotdot": ({"source": {"path": "a/../../etc"}}, r"source\.path"),
    "source-path-dotdot-only": ({"source": {"path": ".."}}, r"source\.path"),
    "source-path-absolute": ({"source": {"path": "/etc"}}, r"source\.path"),
    "mount-relative": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "data/hf"}]},
        r"inputs\[0\]\.mount: expected absolute path",
    ),
    "mount-dotdot": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/data/../etc"}]},
        r"inputs\[0\]\.mount",
    ),
    "mount-trailing-dotdot": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/data/.."}]},
        r"inputs\[0\]\.mount",
    ),
    "mount-root": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/"}]},
        r"cannot be `/`",
    ),
    "mount-control-char": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/data\nx"}]},
        r"inputs\[0\]\.mount",
    ),
    "mount-twice": (
        {
            "inputs": [
                {"dataset": "hf-cohort-2024", "mount": "/data"},
                {"dataset": "other", "mount": "/data/"},
            ]
        },
        r"must all differ",
    ),
    "mount-is-output": (
        {"inputs": [{"dataset": "hf-cohort-2024", "mount": "/out"}]},
        r"must all differ",
    ),
    "output-relative": ({"outputs": {"path": "out"}}, r"outputs\.path"),
    "output-dotdot": ({"outputs": {"path": "/out/../etc"}}, r"outputs\.path"),
    "output-root": ({"outputs": {"path": "//"}}, r"cannot be `/`"),
    "output-negative": ({"outputs": {"max_bytes": -1}}, r"outputs\.max_bytes"),
    "cpus-zero": ({"resources": {"cpus": 0}}, r"resources\.cpus"),
    "memory-string": ({"resources": {"memory_mb": "4096"}}, r"resources\.memory_mb"),
    "memory-bool": ({"resources": {"memory_mb": True}}, r"resources\.memory_mb"),
    "env-bad-name": ({"env": {"A B": "x"}}, r"env"),
    "env-not-string": ({"env": {"A": 1}}, r"env"),
    "network-mode-host": ({"network": {"mode": "host"}}, r"network"),
    "network-egress-empty": ({"network": {"mode": "egress", "allow": []}}, r"allow"),
    "network-egress-no-port": (
        {"network": {"mode": "egress", "allow": ["fl.example.org"]}},
        r"network\.allow\[0\]",
    ),
    "listen-port-zero": (
        {"network": {"mode": "none", "listen": [0]}},
        r"network\.listen\[0\]",
    ),
    "listen-port-too-big": (
        {"network": {"mode": "none", "listen": [65536]}},
        r"network\.listen\[0\]",
    ),
    "listen-port-twice": (
        {"network": {"mode": "egress", "allow": ["a:1"], "listen": [80, 80]}},
        r"lists a port twice",
    ),
    "listen-too-many": (
        {"network": {"mode": "none", "listen": list(range(1000, 1017))}},
        r"network\.listen",
    ),
    "listen-not-int": (
        {"network": {"mode": "none", "listen": ["4433"]}},
        r"network\.listen\[0\]",
    ),
    "network-none-with-allow": (
        {"network": {"mode": "none", "allow": ["a:1"]}},
        r"unknown field `allow`",
    ),
}


@pytest.mark.parametrize(("overrides", "match"), BAD.values(), ids=BAD.keys())
def test_bad_manifest_is_an_input_error(task_dict, overrides, match):
    with pytest.raises(ManifestError, match=match) as e:
        decode_manifest(_bytes(task_dict(**overrides)))
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("manifest: ")


RAW_BAD = {
    "duplicate-top-level": (
        b'{"kind": "Task", "kind": "Cancel"}',
        "duplicate key 'kind'",
    ),
    "not-utf8": (b'{"kind": "Task\xff"}', "manifest: "),
    "utf16": ('{"kind": "Task"}'.encode("utf-16"), "manifest: "),
    "not-json": (b"kind: Task", "manifest: "),
    "empty": (b"", "manifest: "),
    "deep-array": (b"[" * 100_000, "nests too deeply"),
    "deep-object": (b'{"a":' * 100_000, "nests too deeply"),
    "nan": (b'{"resources": {"cpus": NaN}}', "manifest: "),
    "array": (b"[]", "expected a mapping"),
}


@pytest.mark.parametrize(("data", "match"), RAW_BAD.values(), ids=RAW_BAD.keys())
def test_bad_payload_bytes_are_an_input_error(data, match):
    with pytest.raises(ManifestError, match=match):
        decode_manifest(data)


@pytest.mark.parametrize(
    "path",
    [
        ("env",),
        ("source",),
        ("resources",),
        ("outputs",),
        ("inputs", 0),
        ("network",),
    ],
    ids=["env", "source", "resources", "outputs", "inputs-0", "network"],
)
def test_duplicate_keys_nested_anywhere_are_refused(task_dict, path):
    # A reviewer must never see one value while the node runs another.
    text = json.dumps(task_dict(network={"mode": "egress", "allow": ["a:1"]}))
    obj = task_dict(network={"mode": "egress", "allow": ["a:1"]})
    inner = obj
    for p in path:
        inner = inner[p]
    first = next(iter(inner))
    original = json.dumps(inner)
    doubled = original[:-1] + f", {json.dumps(first)}: {json.dumps(inner[first])}}}"
    assert original in text
    with pytest.raises(ManifestError, match=f"duplicate key {first!r}"):
        decode_manifest(text.replace(original, doubled, 1).encode())


def test_duplicate_key_spelled_with_an_escape_is_refused(task_dict):
    text = json.dumps(task_dict())
    text = text.replace(
        '"launcher": "podman"', '"launcher": "podman", "launch\\u0065r": "process"'
    )
    with pytest.raises(ManifestError, match="duplicate key 'launcher'"):
        decode_manifest(text.encode())


def test_cancel_window_must_be_well_formed():
    cancel = {
        "apiVersion": "femd/v1",
        "kind": "Cancel",
        "id": "c-1",
        "project": "p",
        "target": "t-1",
        "issued_at": "2026-11-22T10:00:00Z",
        "expires_at": "2026-11-22T10:00:00Z",
        "nodes": ["fdn-01"],
    }
    with pytest.raises(ManifestError, match="`expires_at` must be later"):
        decode_manifest(_bytes(cancel))
    with pytest.raises(ManifestError, match="unknown field `image`"):
        decode_manifest(
            _bytes({**cancel, "expires_at": "2026-11-23T10:00:00Z", "image": "x"})
        )
