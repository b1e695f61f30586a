"""FEM interoperability: FEM documents -> femd manifests, and FEM result lines.

Every unsafe FEM construct is refused with a message naming it; per-node
parameters make distinct manifests; what comes out always decodes as a Task.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femd import cli, fem
from femd.errors import FemdError, InputError
from femd.manifest import Task, decode_manifest, encode_manifest

DATA = Path(__file__).resolve().parents[1] / "data" / "fem"
ISSUED = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "3c" * 32
COMMIT = "3f9a1c2b7d4e8f60a1b2c3d4e5f60718293a4b5c"
NODES = (fem.FemNode("BSC", "fdn-bsc"), fem.FemNode("UPM", "fdn-upm"))


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def ids():
    counter = itertools.count(1)
    return lambda: f"task-{next(counter)}"


def options(**kw: Any) -> fem.FemOptions:
    base: dict[str, Any] = {
        "nodes": NODES,
        "project": "dt4h-flower",
        "issued_at": ISSUED,
        "image_digest": DIGEST,
        "commit": COMMIT,
        "datasets": (("hf-cohort", "/data/cohort"),),
        "output_dir": "/results",
        "new_id": ids(),
    }
    return fem.FemOptions(**(base | kw))


def template(doc: dict[str, Any]) -> fem.FemTemplate:
    return fem.decode_template(json.dumps(doc).encode())


def convert(doc: dict[str, Any], params: dict[str, Any] | None = None, **kw: Any):
    p = fem.decode_params(json.dumps(params).encode()) if params is not None else None
    return fem.convert(template(doc), options(**kw), params=p)


def client(**changes: Any) -> dict[str, Any]:
    doc = load("flower-client.json")
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def simple(base: str = "python3 run.py", args: list[dict[str, Any]] | None = None):
    """A minimal template: no image, no volumes, no source (process launcher)."""
    return {
        "_id": "t1",
        "name": "simple",
        "command": {"base": base, "args": args or []},
    }


def arg(id_: str, type_: str, value: Any = None, position: int = 1, **kw: Any):
    base = {"id": id_, "type": type_, "default_value": value, "position": position}
    return base | kw


SIMPLE: dict[str, Any] = {
    "launcher": "process",
    "image_digest": None,
    "datasets": (),
    "commit": None,
}


def simple_argv(base: str = "python3 run.py", args=None, params=None, **kw):
    kw = SIMPLE | kw
    (result,) = convert(simple(base, args), params, **kw)
    return list(result.task.command)


# ---------------------------------------------------------------------------
# the Flower fixtures


def test_fixtures_decode_as_fem_documents():
    plan = fem.decode_tool_plan((DATA / "flower-tool-plan.json").read_bytes())
    assert [t.host_list for t in plan.tasks] == [("BSC",), ("BSC", "UPM")]
    server = fem.decode_template((DATA / "flower-server.json").read_bytes())
    assert server.port_mappings
    params = fem.decode_params((DATA / "flower-params.json").read_bytes())
    assert params["UPM"] == {"local_epochs": 5, "dp": True}


def test_flower_client_with_per_node_params_makes_one_manifest_per_node():
    plan = fem.decode_tool_plan((DATA / "flower-tool-plan.json").read_bytes())
    params = fem.decode_params((DATA / "flower-params.json").read_bytes())
    results = fem.convert(
        template(client()),
        options(egress=("flower-server.dt4h.example:8080",)),
        tool=plan,
        params=params,
    )
    assert [r.nodes for r in results] == [("fdn-bsc",), ("fdn-upm",)]
    bsc, upm = (r.task for r in results)
    assert bsc.id == "task-1"
    assert upm.id == "task-2"
    assert list(bsc.command) == [
        "python3", "client.py", "logistic_regression",
        "--server-address", "flower-server.dt4h.example:8080",
        "--client-id=BSC", "--local-epochs", "3", "--lr", "0.005",
        "--data", "/data/cohort",
    ]  # fmt: skip
    assert list(upm.command)[5:] == [
        "--client-id=UPM", "--local-epochs", "5", "--lr", "0.005",
        "--data", "/data/cohort", "--differential-privacy",
    ]  # fmt: skip
    assert bsc.env == {
        "PYTHONUNBUFFERED": "1",
        "FL_CLIENT_NAME": "BSC",
        "FL_RUN_ID": "task-1",  # %%execution_id%% is the femd task id
    }
    assert upm.env["FL_RUN_ID"] == "task-2"
    for t in (bsc, upm):
        assert t.image == f"registry.example.org/dt4h/flcore-client@{DIGEST}"
        assert t.source is not None
        assert (t.source.git, t.source.commit) == (
            "https://github.com/dt4h/flcore.git",
            COMMIT,
        )
        assert [(i.dataset, i.mount) for i in t.inputs] == [
            ("hf-cohort", "/data/cohort")
        ]
        assert t.outputs.path == "/results"
        assert (t.resources.cpus, t.resources.memory_mb) == (1, 512)
        assert json.loads(msgspec.json.encode(t.network)) == {
            "mode": "egress",
            "allow": ["flower-server.dt4h.example:8080"],
        }
        assert (t.issued_at, t.expires_at - t.issued_at) == (
            ISSUED,
            t.expires_at - ISSUED,
        )
        assert (t.expires_at - ISSUED).total_seconds() == 86400
        # never a host path from FEM anywhere in the manifest
        assert b"/mnt/fem" not in encode_manifest(t)
        assert decode_manifest(encode_manifest(t)) == t


def test_identical_params_make_one_manifest_for_all_nodes():
    doc = client()
    doc["var_envs"] = {"PYTHONUNBUFFERED": "1"}
    doc["command"]["args"] = [
        a for a in doc["command"]["args"] if a["id"] != "client_id"
    ]
    params = {"local_epochs": 4, "BSC": {"dp": True}, "UPM": {"dp": True}}
    (only,) = convert(doc, params)
    assert only.nodes == ("fdn-bsc", "fdn-upm")
    assert only.task.nodes == ("fdn-bsc", "fdn-upm")
    assert "--differential-privacy" in only.task.command


def test_node_sections_apply_only_to_their_node():
    params = {"BSC": {"learning_rate": 0.5}}
    bsc, upm = convert(client(), params)
    assert "0.5" in bsc.task.command
    assert "0.5" not in upm.task.command
    assert "0.01" in upm.task.command  # the template's default


def test_a_shared_execution_id_keeps_equal_nodes_together():
    doc = simple(args=[arg("run", "str", "%%execution_id%%", prefix="--run")])
    (only,) = convert(doc, **SIMPLE, execution_id="ex-7", issuer="orch.example")
    assert only.nodes == ("fdn-bsc", "fdn-upm")
    assert list(only.task.command)[-2:] == ["--run", "ex-7"]
    assert only.task.issuer == "orch.example"


def test_nodes_equal_but_for_their_own_task_id_are_split():
    doc = simple(args=[arg("tag", "str", None, prefix="--tag")])
    # equal when the execution id is left out, different with each task's own
    params = {"BSC": {"tag": "x%%execution_id%%"}, "UPM": {"tag": "x"}}
    bsc, upm = convert(doc, params, **SIMPLE)
    assert (bsc.nodes, upm.nodes) == (("fdn-bsc",), ("fdn-upm",))
    assert bsc.task.id != upm.task.id
    assert list(bsc.task.command)[-2:] == ["--tag", f"x{bsc.task.id}"]
    assert list(upm.task.command)[-2:] == ["--tag", "x"]


def test_placeholders_in_base_are_expanded_per_word_after_splitting():
    bsc, upm = convert(simple("python3 run.py --site '%%node_name%% x'"), **SIMPLE)
    assert list(bsc.task.command)[2:] == ["--site", "BSC x"]
    assert list(upm.task.command)[2:] == ["--site", "UPM x"]


def test_user_id_placeholder_is_expanded():
    who = arg("who", "str", "%%user_id%%/%%node_name%%", prefix="--who=")
    argv = simple_argv(
        args=[who | {"separate": False}], nodes=(NODES[0],), user_id="dr.smith@upm"
    )
    assert argv[2:] == ["--who=dr.smith@upm/BSC"]


# ---------------------------------------------------------------------------
# arguments: order, prefix, separate, types


def test_args_are_ordered_by_position_then_by_list_order():
    argv = simple_argv(
        args=[
            arg("c", "str", "third", position=2),
            arg("a", "str", "first", position=0),
            arg("b1", "str", "second-a", position=1),
            arg("b2", "str", "second-b", position=1),
        ]
    )
    assert argv == ["python3", "run.py", "first", "second-a", "second-b", "third"]


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ({"type": "int", "prefix": "--n"}, 3, ["--n", "3"]),
        ({"type": "int", "prefix": "--n"}, "-12", ["--n", "-12"]),
        ({"type": "int", "prefix": "--n=", "separate": False}, 3, ["--n=3"]),
        ({"type": "float", "prefix": "--lr"}, 0.001, ["--lr", "0.001"]),
        ({"type": "float", "prefix": "--lr"}, 2, ["--lr", "2"]),
        ({"type": "float", "prefix": "--lr"}, "1e-3", ["--lr", "1e-3"]),
        ({"type": "str", "prefix": "--name"}, "a b; c", ["--name", "a b; c"]),
        ({"type": "str", "prefix": ""}, "positional", ["positional"]),
        ({"type": "bool", "prefix": "--dp"}, True, ["--dp"]),
        ({"type": "bool", "prefix": "--dp"}, "True", ["--dp"]),
        ({"type": "bool", "prefix": "--dp"}, False, []),
        ({"type": "bool", "prefix": "--dp"}, "false", []),
        ({"type": "str", "prefix": "--opt"}, None, []),
        ({"type": "str", "prefix": "--opt"}, "", []),
    ],
    ids=[
        "int", "int-text", "joined", "float", "float-int", "float-text",
        "str-is-one-word", "positional", "bool-true", "bool-python-text",
        "bool-false", "bool-false-text", "optional-none", "optional-empty",
    ],
)  # fmt: skip
def test_argument_rendering(spec, value, expected):
    a = {"id": "x", "position": 1, "default_value": value} | spec
    assert simple_argv(args=[a])[2:] == expected


def test_parametric_args_override_defaults():
    argv = simple_argv(args=[arg("n", "int", 1, prefix="--n")], params={"n": 7})
    assert argv[2:] == ["--n", "7"]


def test_base_is_split_once_with_shell_word_rules():
    argv = simple_argv(base="python3 -c 'print(1); print(2)' \"a b\" c\\ d ';'")
    assert argv == ["python3", "-c", "print(1); print(2)", "a b", "c d", ";"]
    argv = simple_argv(base='python3 -c "print(\\"a;b\\")"')
    assert argv == ["python3", "-c", 'print("a;b")']


# ---------------------------------------------------------------------------
# every unsafe or unsupported construct is refused, naming it

REFUSED_BASE = {
    "semicolon": ("python3 a.py; rm -rf /data", r"`;` \(command separator\)"),
    "and-list": ("python3 a.py && echo ok", "`&`/`&&`"),
    "pipe": ("python3 a.py | tee log", "`|`/`||`"),
    "redirect-out": ("python3 a.py > /out/log", r"`>` \(redirection\)"),
    "redirect-in": ("python3 a.py < in.txt", r"`<` \(redirection\)"),
    "subshell": ("(python3 a.py)", r"`\(` \(subshell\)"),
    "backtick": ("python3 a.py `id`", "command substitution"),
    "backtick-in-double-quotes": ('python3 a.py "`id`"', "command substitution"),
    "newline": ("python3 a.py\nid", "a newline"),
    "carriage-return": ("python3 a.py\rid", "a control character"),
    "glob": ("python3 a.py data/*.csv", r"`\*` \(glob\)"),
    "comment": ("python3 a.py #--debug", r"`#` \(comment\)"),
    "tilde": ("python3 ~/a.py", "home directory"),
    "env-var": ("python3 a.py --data $DATA_DIR", r"`\$DATA_DIR` refers to the node"),
    "env-var-braces": ("python3 a.py ${HOME}/x", r"`\$\{HOME\}` refers to the node"),
    "env-var-quoted": ("python3 a.py '$HOME'", r"`\$HOME` refers to the node"),
    "dollar-subst": ("python3 a.py $(id -u)", r"`\$\(` refers to the node"),
    "unterminated": ("python3 'a.py", "no closing quotation"),
    "empty": ("   ", "empty command"),
    "unknown-placeholder": ("python3 a.py %%site_secret%%", "unknown placeholder"),
}


@pytest.mark.parametrize(
    ("base", "match"), list(REFUSED_BASE.values()), ids=list(REFUSED_BASE)
)
def test_shell_constructs_in_base_are_refused(base, match):
    with pytest.raises(InputError, match=match) as e:
        simple_argv(base=base)
    assert "\n" not in str(e.value)
    if "refused" in match or "(" in match:
        assert "command.base" in str(e.value)


def test_env_refusal_says_why():
    with pytest.raises(InputError) as e:
        simple_argv(base="python3 a.py $SECRET")
    assert "the node's environment is the node's, not the task's" in str(e.value)


def _drop(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path
    target = doc
    for p in parents:
        target = target[p]
    del target[last]
    return doc


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path
    target = doc
    for p in parents:
        target = target[p]
    target[last] = value
    return doc


C = load("flower-client.json")
ARG0 = ("command", "args", 1)  # server_address, a required str
Case = tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None, str]
REFUSED: dict[str, Case] = {
    # (template, options, params, match)
    "port-mappings": (
        load("flower-server.json"), {"datasets": ()}, None,
        "port_mappings: refused: femd tasks accept no inbound connections",
    ),
    "gpus": (_with(C, ("gpus",), 1), {}, None, "gpus: '1' refused: femd has no GPU"),
    "gpus-all": (_with(C, ("gpus",), "all"), {}, None, "gpus: 'all' refused"),
    "unmapped-volume": (
        C, {"datasets": ()}, None,
        r"volumes: `/mnt/fem/datasets/hf-cohort:/data/cohort` is not mapped",
    ),
    "output-volume-unmapped": (
        C, {"output_dir": "/out"}, None,
        "volumes: `/mnt/fem/results/%%execution_id%%:/results` is not mapped",
    ),
    "dataset-for-no-volume": (
        C, {"datasets": (("hf-cohort", "/data/cohort"), ("extra", "/data/x"))}, None,
        "--dataset extra=/data/x: no FEM volume has that container_path",
    ),
    "dataset-is-output": (
        C, {"datasets": (("hf-cohort", "/results"),)}, None,
        "that is the output dir",
    ),
    "output-outside-dir": (
        _with(C, ("outputs",), ["/srv/model.pt"]), {}, None,
        "outputs: '/srv/model.pt' is outside the output dir /results",
    ),
    "tag-not-pinned": (
        C, {"image_digest": None}, None,
        "image: registry.example.org/dt4h/flcore-client:1.4.0 is a tag, not a pin",
    ),
    "no-tag-no-digest": (
        _with(C, ("image", "tag"), ""), {"image_digest": None}, None,
        "has no tag and no digest: give --image-digest",
    ),
    "fem-hash-not-digest": (
        _with(C, ("image", "hash"), "4f1e2d"), {"image_digest": None}, None,
        "image.hash '4f1e2d' is not a sha256",
    ),
    "digests-differ": (
        _with(C, ("image", "hash"), "sha256:" + "aa" * 32), {}, None,
        "image: the digests differ",
    ),
    "bad-image-digest": (
        C, {"image_digest": "sha256:XYZ"}, None, "is not a sha256:<64 hex> digest",
    ),
    "label-and-name": (
        _with(C, ("image", "label"), "registry.example.org/x:1"), {}, None,
        "give `label` or `repository`\\+`name`, not both",
    ),
    "no-image-for-podman": (
        _drop(C, "image"), {}, None, "image: the FEM template has none",
    ),
    "image-digest-for-process": (
        C, {"launcher": "process"}, None,
        "--image-digest: the process launcher runs no image",
    ),
    "branch-without-commit": (
        C, {"commit": None}, None,
        "source_code.url: `--branch main` is a moving ref, not a pin: give --commit",
    ),
    "no-commit": (
        _with(C, ("source_code", "url"), "https://github.com/dt4h/flcore.git"),
        {"commit": None}, None, "source_code.url: no commit_hash: give --commit",
    ),
    "short-commit-hash": (
        _with(C, ("source_code", "commit_hash"), "3f9a1c2"), {"commit": None}, None,
        "source_code.commit_hash '3f9a1c2' is not a full commit id",
    ),
    "commits-differ": (
        _with(C, ("source_code", "commit_hash"), "ab" * 20), {}, None,
        "--commit differs from source_code.commit_hash",
    ),
    "label-tag-differs": (
        _with(
            _drop(_drop(C, "image", "repository"), "image", "name"),
            ("image", "label"),
            "registry.example.org/dt4h/flcore-client:2.0",
        ),
        {}, None, "image: tag '1.4.0' differs from the label's '2.0'",
    ),
    "image-without-name": (
        _with(C, ("image",), {"tag": "1"}), {}, None,
        "image: neither `label` nor `name` is given",
    ),
    "branch-option-form": (
        _with(C, ("source_code", "url"), "https://x.org/r.git --branch=dev"),
        {"commit": None}, None, "`--branch dev` is a moving ref",
    ),
    "url-quoting": (
        _with(C, ("source_code", "url"), "https://x.org/r.git --branch 'dev"), {},
        None, "source_code.url: no closing quotation",
    ),
    "two-datasets-one-mount": (
        C, {"datasets": (("a", "/data/cohort"), ("b", "/data/cohort/"))}, None,
        "--dataset: two datasets mapped to /data/cohort",
    ),
    "volume-twice": (
        _with(C, ("volumes",), [{"container_path": "/results"}] * 2),
        {}, None, "volumes: container_path /results appears twice",
    ),
    "memory-negative": (_with(C, ("memory",), -1), {}, None, "memory: negative"),
    "bad-commit-option": (C, {"commit": "main"}, None, "--commit: 'main' is not"),
    "git-option": (
        _with(C, ("source_code", "url"), "https://x.org/r.git --depth 1"), {}, None,
        "source_code.url: git option '--depth' refused",
    ),
    "scp-url": (
        _with(C, ("source_code", "url"), "git@github.com:dt4h/flcore.git"), {}, None,
        "is not an https, ssh, git or file URL",
    ),
    "commit-without-url": (
        _drop(C, "source_code"), {}, None, "source_code: a commit without a url",
    ),
    "required-without-value": (
        _with(C, (*ARG0, "default_value"), None), {}, None,
        "command.args `server_address`: required but has no value",
    ),
    "required-empty": (
        _with(C, (*ARG0, "default_value"), ""), {}, None,
        "command.args `server_address`: required but has no value",
    ),
    "int-type": (C, {}, {"local_epochs": "three"}, "`local_epochs`: expected int"),
    "int-from-float": (C, {}, {"local_epochs": 2.5}, "`local_epochs`: expected int"),
    "int-from-bool": (C, {}, {"local_epochs": True}, "`local_epochs`: expected int"),
    "float-nan": (C, {}, {"learning_rate": "nan"}, "`learning_rate`: expected float"),
    "bool-yes": (C, {}, {"dp": "yes"}, "`dp`: expected bool"),
    "str-from-number": (C, {}, {"server_address": 8080}, "expected str"),
    "python-literal-type": (
        _with(C, (*ARG0, "type"), "list"), {}, None,
        "type 'list' refused .*femd never evaluates literals",
    ),
    "bool-without-prefix": (
        _with(C, ("command", "args", 6, "prefix"), ""), {}, {"dp": True},
        "`dp`: a bool argument needs a prefix",
    ),
    "prefix-whitespace": (
        _with(C, (*ARG0, "prefix"), "--server address"), {}, None,
        "prefix '--server address' has whitespace",
    ),
    "env-in-prefix": (
        _with(C, (*ARG0, "prefix"), "--$OPT"), {}, None,
        r"`server_address` prefix: `\$OPT` refers to the node",
    ),
    "env-in-default": (
        _with(C, (*ARG0, "default_value"), "$FL_SERVER:8080"), {}, None,
        r"`server_address`: `\$FL_SERVER` refers to the node's environment",
    ),
    "env-in-param": (
        C, {}, {"UPM": {"server_address": "${SERVER}"}},
        r"`server_address`: `\$\{SERVER\}` refers to the node",
    ),
    "env-in-var-envs": (
        _with(C, ("var_envs",), {"DATA": "$DATA_ROOT/x"}), {}, None,
        r"var_envs `DATA`: `\$DATA_ROOT` refers to the node's environment",
    ),
    "var-envs-name": (
        _with(C, ("var_envs",), {"1X": "a"}), {}, None,
        "var_envs `1X`: not an environment variable name",
    ),
    "var-envs-twice": (
        _with(C, ("var_envs",), ["A=1", "A=2"]), {}, None, "var_envs `A`: given twice",
    ),
    "var-envs-no-equals": (
        _with(C, ("var_envs",), ["A"]), {}, None, "var_envs: expected NAME=VALUE",
    ),
    "var-envs-bool": (
        _with(C, ("var_envs",), {"A": True}), {}, None,
        r"fem template: Expected `int \| float \| str`, got `bool` - at `\$\.var_envs",
    ),
    "user-id-missing": (
        _with(C, ("var_envs",), {"U": "%%user_id%%"}), {}, None,
        "`%%user_id%%` needs --user-id",
    ),
    "bad-execution-id": (C, {"execution_id": "a b"}, None, "--execution-id: letters"),
    "params-unknown-node": (
        C, {}, {"CHUV": {"local_epochs": 1}}, "params: section 'CHUV' names no --node",
    ),
    "params-unknown-arg": (C, {}, {"epochs": 1}, "params: no command.args has id"),
    "params-node-unknown-arg": (
        C, {}, {"BSC": {"epochs": 1}}, "params BSC: no command.args has id 'epochs'",
    ),
    "duplicate-node": (
        C, {"nodes": (NODES[0], fem.FemNode("BSC2", "fdn-bsc"))}, None,
        "--node: a node is given twice",
    ),
    "no-node": (C, {"nodes": ()}, None, "--node: at least one node"),
    "relative-output-dir": (C, {"output_dir": "out"}, None, "--output-dir: not an"),
    "memory-unit": (_with(C, ("memory",), "4 parsecs"), {}, None, "memory: not a size"),
    "cpus-text": (_with(C, ("cpus",), "two"), {}, None, "cpus: not a number"),
    "bad-egress": (C, {"egress": ("no port",)}, None, r"allow\[0\]: expected `host"),
    "bad-project": (C, {"project": "DT4H Flower"}, None, r"project: expected lowerc"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "opts", "params", "match"), list(REFUSED.values()), ids=list(REFUSED)
)
def test_unsafe_or_unsupported_constructs_are_refused(doc, opts, params, match):
    with pytest.raises(InputError, match=match) as e:
        convert(doc, params, **opts)
    assert "\n" not in str(e.value)
    assert str(e.value) == str(e.value).strip()


TOOL = load("flower-tool-plan.json")
TOOL_REFUSED = {
    "node-not-in-host-list": (
        load("flower-server.json"),
        "does not run on 'UPM' \\(host_list: BSC\\)",
    ),
    "template-not-in-plan": (simple(), "has no task t1"),
}


@pytest.mark.parametrize(
    ("doc", "match"), list(TOOL_REFUSED.values()), ids=list(TOOL_REFUSED)
)
def test_tool_plan_is_respected(doc, match):
    plan = fem.decode_tool_plan(json.dumps(TOOL).encode())
    with pytest.raises(InputError, match=match):
        fem.convert(template(doc), options(), tool=plan)


def test_single_node_task_refuses_several_nodes():
    plan = _with(TOOL, ("tasks", 0, "host_list"), ["BSC", "UPM"])
    server = load("flower-server.json")
    server["port_mappings"] = []
    with pytest.raises(InputError, match="is single_node but 2 nodes were given"):
        fem.convert(
            template(server),
            options(datasets=()),
            tool=fem.decode_tool_plan(json.dumps(plan).encode()),
        )


def test_server_template_converts_once_ports_are_gone():
    server = load("flower-server.json")
    server["port_mappings"] = []
    (only,) = convert(server, datasets=(), nodes=(NODES[0],), image_digest=None)
    t = only.task
    assert t.image == (
        "registry.example.org/dt4h/flcore-server@sha256:"
        "8d2f6c0b4e1a9f7d3c5b2a1e0f9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d"
    )
    assert t.env == {"PYTHONUNBUFFERED": "1", "FL_RUN_ID": t.id}
    assert list(t.command) == [
        "python3", "server.py", "--strategy", "fedavg",
        "--num-rounds", "3", "--min-clients", "2",
    ]  # fmt: skip
    assert (t.resources.cpus, t.resources.memory_mb) == (2, 4096)
    assert t.inputs == ()


DECODE_REFUSED = {
    "unknown-field": (
        '{"_id": "x", "command": {"base": "a"}, "privileged": true}',
        "unknown field `privileged`.*refused: femd cannot tell",
    ),
    "unknown-arg-field": (
        '{"_id": "x", "command": {"base": "a", "args": [{"id": "a", "type": "str",'
        ' "position": 0, "eval": true}]}}',
        r"unknown field `eval`.*\$\.command\.args\[0\]",
    ),
    "unknown-volume-field": (
        '{"_id": "x", "command": {"base": "a"}, "volumes": [{"host_path": "/h",'
        ' "container_path": "/c", "mode": "rw"}]}',
        "unknown field `mode`",
    ),
    "duplicate-key": (
        '{"_id": "x", "command": {"base": "a", "base": "b"}}',
        "duplicate key 'base'",
    ),
    "base-not-string": ('{"_id": "x", "command": {"base": ["a"]}}', "Expected `str`"),
    "no-command": ('{"_id": "x"}', "missing required field `command`"),
    "not-json": ("{", "fem template: "),
}


@pytest.mark.parametrize(
    ("text", "match"), list(DECODE_REFUSED.values()), ids=list(DECODE_REFUSED)
)
def test_template_decoding_is_strict(text, match):
    with pytest.raises(InputError, match=match):
        fem.decode_template(text.encode())


def test_documented_metadata_is_accepted_and_ignored():
    doc = simple() | {
        "_id": {"$oid": "65f1c0de9a1b2c3d4e5f6a72"},
        "description": "d",
        "version": "2",
        "tags": ["fl"],
        "owner": "bsc",
        "created_by": "u",
        "created_at": "2025-01-01",
        "updated_at": "2025-01-02",
        "__v": 3,
    }
    doc["command"]["args"] = [arg("a", "str", "x") | {"description": "y", "name": "z"}]
    (only,) = fem.convert(
        fem.decode_template(json.dumps(doc).encode()),
        options(**SIMPLE),
    )
    assert list(only.task.command) == ["python3", "run.py", "x"]


def test_params_and_tool_plan_decoding_is_strict():
    with pytest.raises(InputError, match="fem params: "):
        fem.decode_params(b'{"BSC": {"a": {"deep": 1}}}')
    with pytest.raises(InputError, match=r"fem tool plan: .*host_list"):
        fem.decode_tool_plan(b'{"_id": "p", "tasks": [{"task_id": "t"}]}')
    with pytest.raises(InputError, match=r"fem tool plan: .*tasks"):
        fem.decode_tool_plan(b'{"_id": "p", "tasks": []}')


# ---------------------------------------------------------------------------
# images, resources, option parsers


@pytest.mark.parametrize(
    ("image", "digest", "expected"),
    [
        ({"label": "reg.example/a/b:1.0"}, DIGEST, f"reg.example/a/b@{DIGEST}"),
        ({"label": f"reg.example/a/b@{DIGEST}"}, None, f"reg.example/a/b@{DIGEST}"),
        ({"label": "reg.example:5000/a"}, DIGEST, f"reg.example:5000/a@{DIGEST}"),
        ({"name": "b", "repository": "reg.example/a/"}, DIGEST,
         f"reg.example/a/b@{DIGEST}"),
        ({"name": "reg.example/b", "tag": "2", "hash": DIGEST}, None,
         f"reg.example/b@{DIGEST}"),
        ({"name": "reg.example/b", "hash": "not-a-digest"}, DIGEST,
         f"reg.example/b@{DIGEST}"),
    ],
    ids=["label-tag", "label-digest", "registry-port", "repository-name",
         "fem-hash", "digest-beats-bad-hash"],
)  # fmt: skip
def test_image_is_pinned_by_digest(image, digest, expected):
    doc = simple() | {"image": image}
    (only,) = convert(doc, image_digest=digest, datasets=(), commit=None)
    assert only.task.image == expected


@pytest.mark.parametrize(
    ("value", "mb"),
    [(536870912, 512), ("512m", 512), ("4g", 4096), ("4GiB", 4096), ("1.5g", 1536),
     ("1024k", 1), ("1000", 1), ("2 GB", 2048), (0, None), ("", None)],
)  # fmt: skip
def test_memory_units(value, mb):
    assert fem.parse_memory_mb(value) == mb


def test_memory_refuses_a_bool():
    with pytest.raises(InputError, match="memory: not a size"):
        fem.parse_memory_mb(True)


def test_zero_resources_mean_the_policy_maximum():
    doc = simple() | {"cpus": 0, "memory": "0", "gpus": "0"}
    (only,) = convert(doc, **SIMPLE)
    assert only.task.resources == type(only.task.resources)()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fdn-01", fem.FemNode("fdn-01", "fdn-01")),
     ("BSC=fdn-bsc", fem.FemNode("BSC", "fdn-bsc"))],
)  # fmt: skip
def test_parse_node(text, expected):
    assert fem.parse_node(text) == expected


@pytest.mark.parametrize("text", ["BSC", "=fdn-1", "A=Bad Node", "%%x%%=fdn-1"])
def test_parse_node_refuses(text):
    with pytest.raises(InputError, match="--node"):
        fem.parse_node(text)


def test_parse_dataset():
    assert fem.parse_dataset("hf-cohort=/data/cohort/") == ("hf-cohort", "/data/cohort")
    for bad in ("hf", "HF=/data", "hf=data"):
        with pytest.raises(InputError, match="--dataset"):
            fem.parse_dataset(bad)


@pytest.mark.parametrize(
    ("text", "seconds"), [("3600", 3600), ("90m", 5400), ("24h", 86400), ("7d", 604800)]
)
def test_parse_duration(text, seconds):
    assert fem.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1h", "1w", "h", ""])
def test_parse_duration_refuses(text):
    with pytest.raises(InputError, match="--expires-in"):
        fem.parse_duration(text)


def test_output_paths():
    one, two = convert(client())
    assert fem.output_paths(None, [one]) == [None]
    assert fem.output_paths("-", [one]) == [None]
    assert fem.output_paths("m.json", [one]) == ["m.json"]
    assert fem.output_paths("m-{node}.json", [one, two]) == [
        "m-fdn-bsc.json",
        "m-fdn-upm.json",
    ]
    with pytest.raises(InputError, match=r"2 manifests .*-o task-\{node\}\.json"):
        fem.output_paths("m.json", [one, two])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_base_converts_to_a_valid_task_or_a_clear_error(base):
    try:
        argv = simple_argv(base=base)
    except FemdError as e:
        message = str(e)
        assert "\n" not in message
        return
    assert argv
    # nothing that a shell would have expanded from the node's environment
    assert re.search(r"\$[A-Za-z_{(]", base) is None
    assert "\n" not in base


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_template_or_an_input_error(data):
    try:
        fem.decode_template(data)
    except InputError as e:
        message = str(e)
        assert "\n" not in message


# ---------------------------------------------------------------------------
# the CLI


def fem_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "import-fem", str(DATA / "flower-client.json"),
        "--tool", str(DATA / "flower-tool-plan.json"),
        "--params", str(DATA / "flower-params.json"),
        "--node", "BSC=fdn-bsc", "--node", "UPM=fdn-upm",
        "--project", "dt4h-flower", "--image-digest", DIGEST, "--commit", COMMIT,
        "--dataset", "hf-cohort=/data/cohort", "--output-dir", "/results",
        "--expires-in", "2h", *extra,
    ]  # fmt: skip


def test_cli_writes_one_manifest_per_node(tmp_path, capsys):
    pattern = str(tmp_path / "client-{node}.json")
    assert cli.main(fem_argv(tmp_path, "-o", pattern)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    for line, node in zip(out, ("fdn-bsc", "fdn-upm"), strict=True):
        path, task_id, nodes = line.split(" ")
        assert (path, nodes) == (str(tmp_path / f"client-{node}.json"), node)
        task = decode_manifest(Path(path).read_bytes())
        assert isinstance(task, Task)
        assert task.id == task_id
        assert task.nodes == (node,)
        assert (task.expires_at - task.issued_at).total_seconds() == 7200
        assert task.issued_at.microsecond == 0
    # what import-fem writes is what `femd sign` takes
    key = tmp_path / "k"
    assert cli.main(["keygen", "k", "--dir", str(tmp_path)]) == 0
    signed = tmp_path / "env.json"
    first = out[0].split()[0]
    assert cli.main(["sign", "--key", f"{key}.key", first, "-o", str(signed)]) == 0
    assert signed.read_bytes().startswith(b'{"payloadType"')


def test_cli_refuses_one_file_for_differing_nodes(tmp_path, capsys):
    assert cli.main(fem_argv(tmp_path, "-o", str(tmp_path / "m.json"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("femd: error: import-fem: per-node values differ")
    assert err.count("\n") == 1
    assert not (tmp_path / "m.json").exists()


def test_cli_prints_a_single_manifest_to_stdout(tmp_path, capsys):
    argv = fem_argv(tmp_path, "--execution-id", "run-1")
    argv[argv.index("UPM=fdn-upm") - 1 : argv.index("UPM=fdn-upm") + 1] = []
    assert cli.main(argv) == 0
    task = decode_manifest(capsys.readouterr().out.encode())
    assert isinstance(task, Task)
    assert task.env["FL_RUN_ID"] == "run-1"


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--node", "Bad Node"], "--node: 'Bad Node' is not a femd node id"),
     (["--expires-in", "soon"], "--expires-in"),
     (["--launcher", "docker"], "invalid choice"),
     (["--egress", "server:80", "--node", "CHUV=fdn-chuv"],
      "does not run on 'CHUV'")],
)  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, capsys, extra, match):
    assert cli.main(fem_argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert match in err


def test_cli_missing_template_file(tmp_path, capsys):
    argv = fem_argv(tmp_path)
    argv[1] = str(tmp_path / "missing.json")
    assert cli.main(argv) == 2
    assert "fem template" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# `femd watch --format fem`: FEM's per-node result shape

FEM_KEYS = {
    "node", "task_id", "exit_code", "start_time", "stop_time",
    "elapsed_time_sec", "error",
}  # fmt: skip


def test_fem_line_for_a_succeeded_task():
    event = {
        "node": "fdn-bsc", "task_id": "task-1", "state": "succeeded",
        "at": "2026-11-22T10:05:30.500000Z", "seq": 7, "exit_code": 0,
        "started_at": "2026-11-22T10:00:00.000000Z",
        "outputs": {"sha256": "ab" * 32, "bytes": 10, "chunks": 1},
        "log_tail": "done\n",
    }  # fmt: skip
    line = cli._fem_line(event)
    assert set(line) == FEM_KEYS
    assert line == {
        "node": "fdn-bsc",
        "task_id": "task-1",
        "exit_code": 0,
        "start_time": "2026-11-22T10:00:00.000000Z",
        "stop_time": "2026-11-22T10:05:30.500000Z",
        "elapsed_time_sec": 330.5,
        "error": None,
    }
    json.dumps(line)  # what watch prints


def test_fem_line_for_a_failed_task_names_the_exit_code():
    event = {
        "node": "fdn-upm", "task_id": "task-2", "state": "failed",
        "at": "2026-11-22T10:00:03.000000Z", "seq": 9, "exit_code": 3,
        "started_at": "2026-11-22T10:00:01.000000Z",
    }  # fmt: skip
    line = cli._fem_line(event)
    assert (line["exit_code"], line["elapsed_time_sec"]) == (3, 2.0)
    assert line["error"] == "failed (exit code 3)"


def test_fem_line_for_a_rejected_task_lists_the_rules():
    event = {
        "node": "fdn-upm", "task_id": "task-2", "state": "rejected",
        "at": "2026-11-22T10:00:00.000000Z", "seq": 2,
        "reasons": [
            {"rule": "image.not_allowed", "message": "image repository x"},
            {"rule": "network.not_allowed", "message": "egress to s:80"},
        ],
    }  # fmt: skip
    line = cli._fem_line(event)
    assert (line["exit_code"], line["start_time"], line["elapsed_time_sec"]) == (
        None,
        None,
        None,
    )
    assert line["stop_time"] == "2026-11-22T10:00:00.000000Z"
    assert line["error"] == (
        "image.not_allowed: image repository x; network.not_allowed: egress to s:80"
    )


@pytest.mark.parametrize(
    "started", ["yesterday", "2026-11-22T10:00:00"], ids=["garbage", "naive"]
)
def test_fem_line_survives_a_malformed_time(started):
    event = {
        "node": "n", "task_id": "t", "state": "timed_out", "seq": 1,
        "at": "2026-11-22T10:00:00.000000Z", "started_at": started,
    }  # fmt: skip
    line = cli._fem_line(event)
    assert line["elapsed_time_sec"] is None
    assert line["error"] == "timed_out"
