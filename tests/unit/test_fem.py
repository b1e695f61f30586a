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
from femd.cli.orchestrator import _fem_line
from femd.errors import FemdError, InputError
from femd.manifest import Task, decode_manifest, encode_manifest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "fem"  # FEM's own
ISSUED = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "3c" * 32
COMMIT = "3f9a1c2b7d4e8f60a1b2c3d4e5f60718293a4b5c"
NODES = (fem.FemNode("BSC", "fdn-bsc"), fem.FemNode("UB2", "fdn-ub2"))


def load(name: str) -> dict[str, Any]:
    if not SHARED.is_dir():  # CI lays shared/ beside the clone: absent is a failure
        pytest.fail(f"FEM's documents are missing: {SHARED}")
    return json.loads((SHARED / name).read_text())


def ids():
    counter = itertools.count(1)
    return lambda: f"task-{next(counter)}"


# What makes flcore-client.task.json convert: every fix its problems name.
CLIENT_FIXES: dict[str, Any] = {
    "image_digest": DIGEST,
    "commit": COMMIT,
    "datasets": (("cohort", "/data"),),
    "code_dir": "/flcore",
    "output_dir": "/sandbox",
    "env": (
        ("CENTRAL_SERVER_IP", "fl-server.bsc.example"),
        ("FLOWER_SSL_CACERT", "/certs/ca.pem"),
        ("NODE_NAME", "%%node_name%%"),
    ),
}


def options(**kw: Any) -> fem.FemOptions:
    base: dict[str, Any] = {
        "nodes": NODES,
        "project": "dt4h-flower",
        "issued_at": ISSUED,
        "new_id": ids(),
        **CLIENT_FIXES,
    }
    return fem.FemOptions(**(base | kw))


def template(doc: dict[str, Any]) -> fem.FemTemplate:
    return fem.decode_template(json.dumps(doc).encode())


def convert(doc: dict[str, Any], params: dict[str, Any] | None = None, **kw: Any):
    p = fem.decode_params(json.dumps(params).encode()) if params is not None else None
    return list(fem.convert(template(doc), options(**kw), params=p).manifests)


def client(**changes: Any) -> dict[str, Any]:
    doc = load("flcore-client.task.json")
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
    "code_dir": None,
    "env": (),
    "output_dir": "/out",
}


def simple_argv(base: str = "python3 run.py", args=None, params=None, **kw):
    kw = SIMPLE | kw
    (result,) = convert(simple(base, args), params, **kw)
    return list(result.task.command)


# ---------------------------------------------------------------------------
# FEM's flcore documents (shared/fem), as FEM serves them


def test_flcore_client_with_per_node_params_makes_one_manifest_per_node():
    plan = fem.decode_tool_plan(json.dumps(load("flcore.tool.json")).encode())
    params = fem.decode_params(json.dumps(load("flcore.params.json")).encode())
    conversion = fem.convert(template(client()), options(), tool=plan, params=params)
    results = conversion.manifests
    assert [r.nodes for r in results] == [("fdn-bsc",), ("fdn-ub2",)]
    bsc, ub2 = (r.task for r in results)
    assert (bsc.id, ub2.id) == ("task-1", "task-2")
    assert list(bsc.command) == [
        "python3", "client_cmd.py", "--num_rounds", "5", "--model", "random_forest",
        "--data_id", "/data/test_study/3362-2045-1944", "--node_name", "BSC",
        "--sandbox_path", "/sandbox/",
    ]  # fmt: skip
    assert list(ub2.command)[7] == "/data/test_study/7781-0042-1203"
    assert bsc.env == {
        "FLOWER_CENTRAL_SERVER_IP": "fl-server.bsc.example",
        "FLOWER_CENTRAL_SERVER_PORT": "4433",
        "FLOWER_SSL_CACERT": "/certs/ca.pem",
        "NODE_NAME": "BSC",  # --env NODE_NAME=%%node_name%%
    }
    for t in (bsc, ub2):
        assert t.image == f"registry.gitlab.bsc.es/fl/flcore@{DIGEST}"
        assert t.source is not None
        assert (t.source.git, t.source.commit) == (
            "https://github.com/DataTools4Heart/flcore.git",
            COMMIT,
        )
        assert [(i.dataset, i.mount) for i in t.inputs] == [("cohort", "/data")]
        assert t.outputs.path == "/sandbox"
        # the server address in var_envs is the clients' only destination
        assert json.loads(msgspec.json.encode(t.network)) == {
            "mode": "egress",
            "allow": ["fl-server.bsc.example:4433"],
        }
        # never a FEM host path anywhere in the manifest
        assert b"$SANDBOX_PATH" not in encode_manifest(t)
        assert b"$DATA_PATH" not in encode_manifest(t)
        assert decode_manifest(encode_manifest(t)) == t
    # what no argument takes is said, not silently dropped
    assert conversion.notes == (
        "params train_labels, target_label: no argument of flcore-client "
        "takes them; not passed",
    )


def test_host_list_is_split_on_commas_and_star_means_every_node():
    plan = load("flcore.tool.json")
    ub3 = fem.FemNode("UB3", "fdn-ub3")
    conv = fem.convert(
        template(client()),
        options(nodes=(*NODES, ub3)),
        tool=fem.decode_tool_plan(json.dumps(plan).encode()),
        params=fem.decode_params(b'{"data_id": "/d", "UB3": {"data_id": "/data/x"}}'),
    )
    assert {n for r in conv.manifests for n in r.nodes} == {
        "fdn-bsc", "fdn-ub2", "fdn-ub3",
    }  # fmt: skip
    star = _with(plan, ("tasks", 1, "host_list"), ["*"])
    conv = fem.convert(
        template(client()),
        options(nodes=(fem.FemNode("ANY", "fdn-any"),)),
        tool=fem.decode_tool_plan(json.dumps(star).encode()),
        params=fem.decode_params(b'{"data_id": "/data/y"}'),
    )
    assert conv.manifests[0].nodes == ("fdn-any",)


def test_server_section_applies_to_the_single_node_task():
    plan = fem.decode_tool_plan(json.dumps(load("flcore.tool.json")).encode())
    params = fem.decode_params(json.dumps(load("flcore.params.json")).encode())
    fixes = {
        "nodes": (NODES[0],),
        "datasets": (("flower-tls", "/app/config/certificates"),),
        "ingress": (4433,),
        "env": (
            ("FLOWER_SSL_CACERT", "/app/config/certificates/ca.pem"),
            ("FLOWER_SSL_SERVER_CERT", "/app/config/certificates/server.pem"),
            ("FLOWER_SSL_SERVER_KEY", "/app/config/certificates/server.key"),
            ("NODE_NAME", "BSC"),
        ),
    }
    conv = fem.convert(
        template(load("flcore-server.task.json")),
        options(**fixes),
        tool=plan,
        params=params,
    )
    (only,) = conv.manifests
    argv = list(only.task.command)
    # server: {num_rounds: 1, num_clients: 2} over the defaults (5 and 1)
    assert argv[argv.index("--num_rounds") + 1] == "1"
    assert argv[argv.index("--num_clients") + 1] == "2"
    # port_mappings with --ingress: the task listens; a bind address is no egress
    assert json.loads(msgspec.json.encode(only.task.network)) == {
        "mode": "none",
        "listen": [4433],
    }


def test_server_section_is_not_applied_to_a_multi_node_task():
    (bsc, _) = convert(client(), {"server": {"num_rounds": 9}, "data_id": "/d"})
    assert "9" not in bsc.task.command


def test_identical_params_make_one_manifest_for_all_nodes():
    doc = client()
    doc["var_envs"] = {"FLOWER_CENTRAL_SERVER_IP": "$CENTRAL_SERVER_IP",
                       "FLOWER_CENTRAL_SERVER_PORT": "4433",
                       "FLOWER_SSL_CACERT": "$FLOWER_SSL_CACERT"}  # fmt: skip
    doc["command"]["args"] = [
        a for a in doc["command"]["args"] if a["id"] != "node_name"
    ]
    env = CLIENT_FIXES["env"][:2]
    (only,) = convert(doc, {"data_id": "/data/c", "BSC": {"num_rounds": 3},
                            "UB2": {"num_rounds": 3}}, env=env)  # fmt: skip
    assert only.nodes == ("fdn-bsc", "fdn-ub2")
    assert only.task.nodes == ("fdn-bsc", "fdn-ub2")
    assert list(only.task.command)[3] == "3"


def test_node_sections_apply_only_to_their_node():
    bsc, ub2 = convert(client(), {"data_id": "/d", "BSC": {"model": "xgb"}})
    assert "xgb" in bsc.task.command
    assert "xgb" not in ub2.task.command
    assert "random_forest" in ub2.task.command  # the template's default


def test_a_shared_execution_id_keeps_equal_nodes_together():
    doc = simple(args=[arg("run", "str", "%%execution_id%%", prefix="--run")])
    (only,) = convert(doc, **SIMPLE, execution_id="ex-7", issuer="orch.example")
    assert only.nodes == ("fdn-bsc", "fdn-ub2")
    assert list(only.task.command)[-2:] == ["--run", "ex-7"]
    assert only.task.issuer == "orch.example"


def test_nodes_equal_but_for_their_own_task_id_are_split():
    doc = simple(args=[arg("tag", "str", None, prefix="--tag")])
    # equal when the execution id is left out, different with each task's own
    params = {"BSC": {"tag": "x%%execution_id%%"}, "UB2": {"tag": "x"}}
    bsc, upm = convert(doc, params, **SIMPLE)
    assert (bsc.nodes, upm.nodes) == (("fdn-bsc",), ("fdn-ub2",))
    assert bsc.task.id != upm.task.id
    assert list(bsc.task.command)[-2:] == ["--tag", f"x{bsc.task.id}"]
    assert list(upm.task.command)[-2:] == ["--tag", "x"]


def test_placeholders_in_base_are_expanded_per_word_after_splitting():
    bsc, upm = convert(simple("python3 run.py --site '%%node_name%% x'"), **SIMPLE)
    assert list(bsc.task.command)[2:] == ["--site", "BSC x"]
    assert list(upm.task.command)[2:] == ["--site", "UB2 x"]


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
    "env-var": ("python3 a.py --data $DATA_DIR", r"`\$DATA_DIR` is read from FEM"),
    "env-var-braces": ("python3 a.py ${HOME}/x", r"`\$HOME` is read from FEM"),
    "env-var-quoted": ("python3 a.py '$HOME'", r"`\$HOME` is read from FEM"),
    "dollar-subst": ("python3 a.py $(id -u)", r"`\(` \(subshell\)"),
    "dollar-special": ("python3 a.py $1", r"`\$1` is shell syntax"),
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


def test_env_refusal_says_why_and_env_gives_the_value():
    with pytest.raises(InputError) as e:
        simple_argv(base="python3 a.py $SECRET")
    assert "which a femd node does not hand to tasks" in str(e.value)
    assert "(fix: --env SECRET=VALUE)" in str(e.value)
    argv = simple_argv(base="python3 a.py ${SITE}-$SITE", env=(("SITE", "bsc"),))
    assert argv == ["python3", "a.py", "bsc-bsc"]


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


C = _with(client(), ("command", "args", 2, "default_value"), "/data/cohort")
ARG0 = ("command", "args", 1)  # model, a required str
S = load("flcore-server.task.json")
Case = tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None, str]
REFUSED: dict[str, Case] = {
    # (template, options, params, match)
    "port-mappings": (
        S, {"datasets": ()}, None,
        r"port_mappings: the task listens on 4433.* \(fix: --ingress 4433, and "
        r"projects\.<project>\.network\.ingress\.ports",
    ),
    "port-remapped": (
        _with(S, ("port_mappings",), [{"host_port": 1, "container_port": 2}]), {},
        None, "femd publishes a task's port on the same host port",
    ),
    "ingress-without-port": (C, {"ingress": (4433,)}, None, "--ingress 4433: no"),
    "gpus": (_with(C, ("gpus",), 1), {}, None, "gpus: '1' refused: femd has no GPU"),
    "gpus-all": (_with(C, ("gpus",), "all"), {}, None, "gpus: 'all' refused"),
    "unmapped-volume": (
        C, {"datasets": ()}, None,
        r"volumes: `\$DATA_PATH:/data` is not mapped.*fix: --dataset NAME=/data",
    ),
    "output-volume-unmapped": (
        C, {"output_dir": "/out"}, None,
        "volumes: `\\$SANDBOX_PATH/%%user_id%%/%%execution_id%%:/sandbox` is not",
    ),
    "code-volume-unmapped": (
        C, {"code_dir": None}, None, r"fix: .*--code /flcore",
    ),
    "code-for-no-volume": (C, {"code_dir": "/app"}, None, "--code /app: no FEM"),
    "code-without-source": (
        _with(C, ("source_code",), {"url": ""}), {"commit": None}, None,
        "--code /flcore: the template has no usable source_code",
    ),
    "dataset-for-no-volume": (
        C, {"datasets": (("cohort", "/data"), ("extra", "/data/x"))}, None,
        "--dataset extra=/data/x: no FEM volume has that container_path",
    ),
    "dataset-is-output": (
        C, {"datasets": (("cohort", "/sandbox"),)}, None,
        "that is the output or code dir",
    ),
    "output-outside-dir": (
        _with(C, ("outputs",), ["/srv/model.pt"]), {}, None,
        "outputs: '/srv/model.pt' is outside the output dir /sandbox",
    ),
    "tag-not-pinned": (
        C, {"image_digest": None}, None,
        r"image: registry.gitlab.bsc.es/fl/flcore:demo is a tag, not a pin "
        r"\(fix: --image-digest",
    ),
    "no-tag-no-digest": (
        _with(C, ("image",), {"name": "flcore"}), {"image_digest": None}, None,
        "image: flcore has no digest",
    ),
    "digests-differ": (
        _with(C, ("image", "hash"), "sha256:" + "aa" * 32), {}, None,
        "image: the digests differ",
    ),
    "bad-image-digest": (
        C, {"image_digest": "sha256:XYZ"}, None, "is not a sha256:<64 hex> digest",
    ),
    "label-and-name-disagree": (
        _with(C, ("image", "label"), "registry.example.org/x"), {}, None,
        "image: the repositories differ",
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
        r"source_code.url: `--branch production` is a moving ref, not a pin "
        r"\(fix: --commit",
    ),
    "no-commit": (
        _with(C, ("source_code", "url"), "https://github.com/dt4h/flcore.git"),
        {"commit": None}, None, "source_code.url: no commit_hash",
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
        _with(C, ("image", "label"), "registry.gitlab.bsc.es/fl/flcore:2.0"),
        {}, None, "image: the tags differ",
    ),
    "image-without-name": (
        _with(C, ("image",), {"tag": "1"}), {}, None,
        "image: neither `label`, `url` nor `name` is given",
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
        C, {"datasets": (("a", "/data"), ("b", "/data/"))}, None,
        "--dataset: two datasets mapped to /data",
    ),
    "volume-twice": (
        _with(C, ("volumes",), [{"container_path": "/sandbox"}] * 2),
        {"datasets": (), "code_dir": None}, None,
        "volumes: container_path /sandbox appears twice",
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
        "command.args `model`: required but has no value",
    ),
    "required-empty": (
        client(), {}, None, "command.args `data_id`: required but has no value",
    ),
    "int-type": (C, {}, {"num_rounds": "three"}, "`num_rounds`: expected int"),
    "int-from-float": (C, {}, {"num_rounds": 2.5}, "`num_rounds`: expected int"),
    "int-from-bool": (C, {}, {"num_rounds": True}, "`num_rounds`: expected int"),
    "str-from-number": (C, {}, {"model": 8080}, "expected str"),
    "python-literal-type": (
        _with(C, (*ARG0, "type"), "list"), {}, None,
        "type 'list' refused .*femd never evaluates literals",
    ),
    "prefix-whitespace": (
        _with(C, (*ARG0, "prefix"), "--the model"), {}, None,
        "prefix '--the model' has `\\$` or whitespace",
    ),
    "env-in-prefix": (
        _with(C, (*ARG0, "prefix"), "--$OPT"), {}, None,
        r"`model`: prefix '--\$OPT' has",
    ),
    "env-in-default": (
        _with(C, (*ARG0, "default_value"), "$FL_MODEL"), {}, None,
        r"`model`: `\$FL_MODEL` is read from FEM's client environment.*"
        r"\(fix: --env FL_MODEL=VALUE\)",
    ),
    "env-in-param": (
        C, {}, {"UB2": {"model": "${MODEL}"}},
        r"`model`: `\$MODEL` is read from FEM's client",
    ),
    "env-in-var-envs": (
        _with(C, ("var_envs",), {"DATA": "$DATA_ROOT/x"}), {}, None,
        r"var_envs `DATA`: `\$DATA_ROOT` is read from FEM's client environment",
    ),
    "env-unused": (
        _with(C, ("var_envs",), {}), {}, None,
        r"--env CENTRAL_SERVER_IP: no `\$CENTRAL_SERVER_IP` in the template",
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
    "server-address-not-a-host": (
        C, {"env": (("CENTRAL_SERVER_IP", "a b"), *CLIENT_FIXES["env"][1:])}, None,
        "var_envs `FLOWER_CENTRAL_SERVER_IP`: 'a b':4433 is not a host:port",
    ),
    "user-id-missing": (
        _with(C, ("var_envs",), {"U": "%%user_id%%"}), {"env": ()}, None,
        r"`%%user_id%%` has no value \(fix: --user-id\)",
    ),
    "bad-execution-id": (C, {"execution_id": "a b"}, None, "--execution-id: letters"),
    "params-unknown-node": (
        C, {}, {"CHUV": {"num_rounds": 1}}, "params: section 'CHUV' names no --node",
    ),
    "duplicate-node": (
        C, {"nodes": (NODES[0], fem.FemNode("BSC2", "fdn-bsc"))}, None,
        "--node: a node is given twice",
    ),
    "relative-output-dir": (C, {"output_dir": "out"}, None, "--output-dir: not an"),
    "memory-unit": (_with(C, ("memory",), "4 parsecs"), {}, None, "memory: not a size"),
    "cpus-text": (_with(C, ("cpus",), "two"), {}, None, "cpus: not a number"),
    "bad-egress": (C, {"egress": ("no port",)}, None, r"allow\[1\]: expected `host"),
    "bad-project": (C, {"project": "DT4H Flower"}, None, r"project: expected lowerc"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "opts", "params", "match"), list(REFUSED.values()), ids=list(REFUSED)
)
def test_unsafe_or_unsupported_constructs_are_refused(doc, opts, params, match):
    with pytest.raises(InputError) as e:
        convert(doc, params, **opts)
    problems = getattr(e.value, "problems", None) or [e.value]
    lines = [str(p) for p in problems]
    assert any(re.search(match, line) for line in lines), lines
    for line in [*lines, str(e.value)]:
        assert "\n" not in line
        assert line == line.strip()


def test_one_pass_reports_every_problem_with_its_fix():
    bare = {"image_digest": None, "commit": None, "datasets": (), "env": (),
            "code_dir": None}  # fmt: skip
    with pytest.raises(fem.FemImportError) as e:
        fem.convert(template(client()), options(**bare))
    fixes = [p.fix for p in e.value.problems]
    for wanted in ("--image-digest", "--commit", "--dataset NAME=/data",
                   "--env CENTRAL_SERVER_IP=VALUE", "--env NODE_NAME=VALUE",
                   "--env FLOWER_SSL_CACERT=VALUE", "--code /flcore"):  # fmt: skip
        assert any(f and wanted in f for f in fixes), (wanted, fixes)


def test_no_node_is_one_problem():
    with pytest.raises(fem.FemImportError, match="--node: at least one node"):
        convert(C, nodes=())


TOOL = load("flcore.tool.json")
TOOL_REFUSED = {
    "node-not-in-host-list": (S, "does not run on 'UB2' \\(host_list: BSC\\)"),
    "template-not-in-plan": (simple(), "has no task t1"),
}


@pytest.mark.parametrize(
    ("doc", "match"), list(TOOL_REFUSED.values()), ids=list(TOOL_REFUSED)
)
def test_tool_plan_is_respected(doc, match):
    plan = fem.decode_tool_plan(json.dumps(TOOL).encode())
    with pytest.raises(fem.FemImportError) as e:
        fem.convert(template(doc), options(), tool=plan)
    assert any(re.search(match, str(p)) for p in e.value.problems)


def test_single_node_task_refuses_several_nodes():
    plan = _with(TOOL, ("tasks", 0, "host_list"), ["BSC,UB2"])
    with pytest.raises(fem.FemImportError) as e:
        fem.convert(
            template(S),
            options(datasets=()),
            tool=fem.decode_tool_plan(json.dumps(plan).encode()),
        )
    assert any(
        "is single_node but 2 nodes were given" in str(p) for p in e.value.problems
    )


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
    "no-command": ('{"_id": "x"}', "no `command` and no gen-1 `image.cmd`"),
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
    ).manifests
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
    (only,) = convert(doc, **(SIMPLE | {"launcher": "podman", "image_digest": digest}))
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
    one, two = convert(client(), {"data_id": "/d", "BSC": {"model": "xgb"}})
    assert fem.output_paths(None, [one]) == [None]
    assert fem.output_paths("-", [one]) == [None]
    assert fem.output_paths("m.json", [one]) == ["m.json"]
    assert fem.output_paths("m-{node}.json", [one, two]) == [
        "m-fdn-bsc.json",
        "m-fdn-ub2.json",
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
        "import-fem", str(SHARED / "flcore-client.task.json"),
        "--tool", str(SHARED / "flcore.tool.json"),
        "--params", str(SHARED / "flcore.params.json"),
        "--node", "BSC=fdn-bsc", "--node", "UB2=fdn-ub2",
        "--project", "dt4h-flower", "--image-digest", DIGEST, "--commit", COMMIT,
        "--dataset", "cohort=/data", "--output-dir", "/sandbox", "--code", "/flcore",
        "--env", "CENTRAL_SERVER_IP=fl-server.bsc.example",
        "--env", "FLOWER_SSL_CACERT=/certs/ca.pem", "--env", "NODE_NAME=%%node_name%%",
        "--expires-in", "2h", *extra,
    ]  # fmt: skip


def test_cli_writes_one_manifest_per_node(tmp_path, capsys):
    pattern = str(tmp_path / "client-{node}.json")
    assert cli.main(fem_argv(tmp_path, "-o", pattern)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    for line, node in zip(out, ("fdn-bsc", "fdn-ub2"), strict=True):
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
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("femd: error: import-fem: per-node values differ")
    assert len(err) == 2  # and the note on the params no argument takes
    assert not (tmp_path / "m.json").exists()


def test_cli_prints_a_single_manifest_to_stdout(tmp_path, capsys):
    argv = fem_argv(tmp_path, "--execution-id", "r1")
    argv[argv.index("UB2=fdn-ub2") - 1 : argv.index("UB2=fdn-ub2") + 1] = []
    i = argv.index("NODE_NAME=%%node_name%%")
    argv[i] = "NODE_NAME=%%node_name%%-%%execution_id%%"
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    task = decode_manifest(out.out.encode())
    assert isinstance(task, Task)
    assert task.env["NODE_NAME"] == "BSC-r1"
    assert out.err.startswith("femd: note: import-fem: params train_labels")


def test_cli_lists_every_problem_on_its_own_line(tmp_path, capsys):
    argv = fem_argv(tmp_path)
    for flag in ("--image-digest", "--commit", "--dataset", "--code"):
        i = argv.index(flag)
        del argv[i : i + 2]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4  # the code volume and the dataset volume: one fix each
    assert all(line.startswith("femd: error: import-fem: ") for line in err)
    assert all("(fix: " in line for line in err)


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--node", "Bad Node"], "--node: 'Bad Node' is not a femd node id"),
     (["--expires-in", "soon"], "--expires-in"),
     (["--launcher", "docker"], "invalid choice"),
     (["--egress", "server:80", "--launcher", "process"],
      "--image-digest: the process launcher runs no image"),
     (["--ingress", "http"], "--ingress: expected a port"),
     (["--env", "1X=y"], "--env: expected NAME=VALUE")],
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
    "elapsed_time_sec", "error", "process_info",
}  # fmt: skip


def test_fem_line_for_a_succeeded_task():
    event = {
        "node": "fdn-bsc", "task_id": "task-1", "state": "succeeded",
        "at": "2026-11-22T10:05:30.500000Z", "seq": 7, "exit_code": 0,
        "started_at": "2026-11-22T10:00:00.000000Z",
        "outputs": {"sha256": "ab" * 32, "bytes": 10, "chunks": 1},
        "log_tail": "done\n",
    }  # fmt: skip
    line = _fem_line(event)
    assert set(line) == FEM_KEYS
    assert line == {
        "node": "fdn-bsc",
        "task_id": "task-1",
        "exit_code": 0,
        "start_time": "2026-11-22T10:00:00.000000Z",
        "stop_time": "2026-11-22T10:05:30.500000Z",
        "elapsed_time_sec": 330.5,
        "error": None,
        "process_info": {
            "status": "finished",
            "return_code": 0,
            "start_time": "2026-11-22T10:00:00.000000Z",
            "finish_time": "2026-11-22T10:05:30.500000Z",
        },
    }
    json.dumps(line)  # what watch prints


def test_fem_line_for_a_failed_task_names_the_exit_code():
    event = {
        "node": "fdn-ub2", "task_id": "task-2", "state": "failed",
        "at": "2026-11-22T10:00:03.000000Z", "seq": 9, "exit_code": 3,
        "started_at": "2026-11-22T10:00:01.000000Z",
    }  # fmt: skip
    line = _fem_line(event)
    assert (line["exit_code"], line["elapsed_time_sec"]) == (3, 2.0)
    assert line["error"] == "failed (exit code 3)"
    assert line["process_info"] == {
        "status": "failed",
        "return_code": 3,
        "start_time": "2026-11-22T10:00:01.000000Z",
        "finish_time": "2026-11-22T10:00:03.000000Z",
    }


def test_fem_line_for_a_rejected_task_lists_the_rules():
    event = {
        "node": "fdn-ub2", "task_id": "task-2", "state": "rejected",
        "at": "2026-11-22T10:00:00.000000Z", "seq": 2,
        "reasons": [
            {"rule": "image.not_allowed", "message": "image repository x"},
            {"rule": "network.not_allowed", "message": "egress to s:80"},
        ],
    }  # fmt: skip
    line = _fem_line(event)
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
    line = _fem_line(event)
    assert line["elapsed_time_sec"] is None
    assert line["error"] == "timed_out"
