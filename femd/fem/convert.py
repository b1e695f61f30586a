"""FEM documents -> ``femd/v1`` ``Task`` manifests, every problem in one pass.

Owns ``convert()``: one FEM task template (with its tool plan and a
submission's parametric args) becomes one or more manifests ready for
``femd sign``. Like ``policy lint``, one pass reports *every* construct that
stops the conversion (``FemImportError``), each with the flag or policy entry
that fixes it; what is accepted but not passed on comes back as notes.

Pure: no I/O, no clock (the issue time is passed in). Does not sign and does
not decide whether a task may run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, Final, TypeVar

import msgspec

from femd.errors import InputError, cut
from femd.fem.command import expand, is_float, render_arg, split_base, substitute
from femd.fem.documents import (
    FemOutputs,
    FemParams,
    FemPort,
    FemTemplate,
    FemToolPlan,
    FemToolTask,
    Scalar,
    id_text,
)
from femd.fem.options import (
    Converted,
    FemImportError,
    FemNode,
    FemOptions,
    Problem,
    Refusal,
    norm,
    parse_memory_mb,
)
from femd.fem.pins import pin_image, pin_source
from femd.manifest import Task, decode_manifest

__all__ = ["Conversion", "convert"]

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_COMMIT: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_ID_TEXT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_ENV_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HOST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_ADDRESS_KEY: Final = re.compile(r"(.*)_(?:IP|HOST|ADDRESS)")
_BIND_ANY: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (a FEM value)
_T = TypeVar("_T")
_NONE: Final[list[str]] = []  # a step's result when it was refused (never mutated)
_NO_PAIRS: Final[list[tuple[str, str]]] = []


class Conversion(msgspec.Struct, frozen=True):
    """The manifests of a conversion, and notes on what was not passed on."""

    manifests: tuple[Converted, ...]
    notes: tuple[str, ...] = ()


class _Pass:
    """One conversion pass: problems (deduplicated, in order) and notes."""

    def __init__(self) -> None:
        self.problems: dict[str, Problem] = {}
        self.notes: list[str] = []

    def run(self, default: _T, fn: Callable[..., _T], *args: Any) -> _T:  # noqa: ANN401
        try:
            return fn(*args)
        except Refusal as e:
            self.problems.setdefault(str(e.problem), e.problem)
        except InputError as e:
            self.problems.setdefault(str(e), Problem(str(e)))
        return default

    def add(self, message: str, fix: str | None = None) -> None:
        p = Problem(message, fix)
        self.problems.setdefault(str(p), p)


# ---------------------------------------------------------------------------
# the tool plan, nodes and params


def _tool_entry(
    t: FemTemplate, tool: FemToolPlan, nodes: Sequence[FemNode], p: _Pass
) -> FemToolTask | None:
    tid, plan = id_text(t.id), cut(id_text(tool.id), 40)
    entry = next((x for x in tool.tasks if id_text(x.task_id) == tid), None)
    if entry is None:
        known = ", ".join(id_text(x.task_id) for x in tool.tasks)
        p.add(f"tool plan {plan}: has no task {cut(tid, 40)} (tasks: {cut(known)})")
        return None
    hosts = entry.hosts
    if "*" not in hosts:
        for n in nodes:
            if n.fem_name not in hosts:
                p.add(
                    f"tool plan {plan}: task {cut(tid, 40)} does not run on "
                    f"{cut(n.fem_name, 40)!r} (host_list: {cut(', '.join(hosts))})",
                    "--node FEM_NAME=NODE with a FEM_NAME of host_list",
                )
    if entry.single_node and len(nodes) > 1:
        p.add(
            f"tool plan {plan}: task {cut(tid, 40)} is single_node "
            f"but {len(nodes)} nodes were given",
            "one --node",
        )
    return entry


def _split_params(
    params: FemParams,
    t: FemTemplate,
    names: set[str],
    single_node: bool | None,
    p: _Pass,
) -> tuple[dict[str, Scalar], dict[str, dict[str, Scalar]]]:
    """Values common to every node (flat keys, ``server``) and per-node sections."""
    arg_ids = {a.id for a in t.command.args} if t.command else set()
    tid = cut(id_text(t.id), 40)
    flat: dict[str, Scalar] = {}
    server: dict[str, Scalar] = {}
    per_node: dict[str, dict[str, Scalar]] = {}
    unused: list[str] = []
    for key, value in params.items():
        if not isinstance(value, dict):
            if key in arg_ids:
                flat[key] = value
            else:
                unused.append(key)
            continue
        if key in names:
            per_node[key] = {k: v for k, v in value.items() if k in arg_ids}
            unused += [f"{key}.{k}" for k in value if k not in arg_ids]
        elif key == "server":
            if single_node:
                server = {k: v for k, v in value.items() if k in arg_ids}
                unused += [f"server.{k}" for k in value if k not in arg_ids]
            elif single_node is None:
                p.notes.append(
                    "params `server`: not applied (give --tool: it says whether "
                    f"{tid} is the single-node task)"
                )
        else:
            p.add(
                f"params: section {cut(key, 40)!r} names no --node and no tool plan "
                f"host (known: {cut(', '.join(sorted(names)))})",
                f"--node {cut(key, 40)}=NODE",
            )
    if unused:
        p.notes.append(
            f"params {cut(', '.join(unused), 160)}: no argument of {tid} takes "
            "them; not passed"
        )
    return {**flat, **server}, per_node


# ---------------------------------------------------------------------------
# image, source, volumes, resources, ports


def _inputs(t: FemTemplate, o: FemOptions, has_source: bool, p: _Pass) -> list[Any]:
    out_dir = norm(o.output_dir)
    code_dir = norm(o.code_dir) if o.code_dir else None
    by_mount: dict[str, str] = {}
    for name, path in o.datasets:
        mount = norm(path)
        if mount in by_mount:
            p.add(f"--dataset: two datasets mapped to {cut(mount)}")
        elif mount in (out_dir, code_dir):
            p.add(f"--dataset {name}={mount}: that is the output or code dir")
        else:
            by_mount[mount] = name
    inputs: list[dict[str, str]] = []
    seen: set[str] = set()
    for v in t.volumes or ():
        path = norm(v.container_path)
        if path in seen:
            p.add(f"volumes: container_path {cut(path)} appears twice")
            continue
        seen.add(path)
        if path == out_dir:
            continue
        if path == code_dir:
            if not has_source:
                p.add(f"--code {path}: the template has no usable source_code")
            continue
        # SECURITY: a FEM host_path never becomes a host path; the policy maps datasets.
        if path not in by_mount:
            shown = f"{cut(v.host_path or '?', 60)}:{cut(path, 60)}"
            p.add(
                f"volumes: `{shown}` is not mapped: host paths are the node's",
                f"--dataset NAME={cut(path, 60)} (a policy dataset, read-only), "
                f"--output-dir {cut(path, 60)} or --code {cut(path, 60)}",
            )
            continue
        inputs.append({"dataset": by_mount[path], "mount": path})
    for mount, name in by_mount.items():
        if mount not in seen:
            p.add(
                f"--dataset {name}={cut(mount)}: no FEM volume has that container_path"
            )
    if code_dir is not None and code_dir not in seen:
        p.add(f"--code {cut(code_dir)}: no FEM volume has that container_path")
    return inputs


def _check_outputs(t: FemTemplate, o: FemOptions) -> None:
    if t.outputs is None or isinstance(t.outputs, FemOutputs):
        return  # FEM v2's {model_dir, move_to}: descriptive
    out_dir = norm(o.output_dir)
    for path in t.outputs:
        rel = not path.startswith("/")
        inside = (
            out_dir == "/" or norm(path) == out_dir or path.startswith(out_dir + "/")
        )
        if (rel and ".." not in path.split("/")) or (not rel and inside):
            continue
        raise Refusal(
            f"outputs: {cut(path)!r} is outside the output dir {out_dir}: femd sends "
            "back only that directory",
            "--output-dir",
        )


def _resources(t: FemTemplate) -> dict[str, float | int]:
    if t.gpus not in (None, 0, "", "0"):
        raise Refusal(
            f"gpus: {cut(t.gpus)!r} refused: femd has no GPU support yet",
            "a template without gpus",
        )
    res: dict[str, float | int] = {}
    cpus = t.cpus
    if isinstance(cpus, str):
        if cpus.strip() and not is_float(cpus.strip()):
            raise Refusal(f"cpus: not a number (got {cut(cpus)!r})")
        cpus = float(cpus) if cpus.strip() else None
    if cpus:
        res["cpus"] = cpus
    if t.memory is not None:
        memory_mb = parse_memory_mb(t.memory)
        if memory_mb:
            res["memory_mb"] = memory_mb
    return res


def _ports(t: FemTemplate, o: FemOptions, p: _Pass) -> list[int]:
    pm = t.port_mappings
    mappings: Iterable[FemPort] = (pm,) if isinstance(pm, FemPort) else pm or ()
    listen: list[int] = []
    for m in mappings:
        if m.host_port == 0 and m.container_port == 0:
            continue  # gen-1's "no port"
        port = m.container_port
        if m.host_port != port or not 0 < port < 65536:
            p.add(
                f"port_mappings: host {m.host_port} -> container {port}: femd "
                "publishes a task's port on the same host port (1-65535)",
                "host_port equal to container_port",
            )
        elif port not in o.ingress:
            p.add(
                f"port_mappings: the task listens on {port}, inbound connections "
                "need the operator's consent and the node's policy",
                f"--ingress {port}, and projects.<project>.network.ingress.ports "
                "in each node's policy",
            )
        elif port not in listen:
            listen.append(port)
    for port in o.ingress:
        if port not in listen:
            p.add(f"--ingress {port}: no port_mappings entry has that port")
    return listen


# ---------------------------------------------------------------------------
# environment, command, network


def _env_pairs(t: FemTemplate) -> list[tuple[str, str]]:
    if isinstance(t.var_envs, dict):
        # Decoding refused booleans already (`int | float | str`).
        return [(k, v if isinstance(v, str) else str(v)) for k, v in t.var_envs.items()]
    pairs = []
    for item in t.var_envs or ():
        k, sep, v = item.partition("=")
        if not sep:
            raise Refusal(f"var_envs: expected NAME=VALUE (got {cut(item)!r})")
        pairs.append((k, v))
    return pairs


def _egress_from_env(env: dict[str, str]) -> list[str]:
    """``<X>_IP``/``_HOST``/``_ADDRESS`` beside ``<X>_PORT``: a destination."""
    allow = []
    for key, host in env.items():
        m = _ADDRESS_KEY.fullmatch(key)
        port = env.get(f"{m.group(1)}_PORT", "") if m else ""
        if not m or not port.isdigit() or host.strip() in _BIND_ANY:
            continue
        if not _HOST.fullmatch(host) or not 0 < int(port) < 65536:
            raise Refusal(
                f"var_envs `{key}`: {cut(host)!r}:{cut(port)} is not a host:port "
                "destination",
                f"--env with a host name for {key}",
            )
        allow.append(f"{host}:{int(port)}")
    return allow


class _Renderer:
    """Renders one node's argv, environment and network; collects problems."""

    def __init__(
        self,
        t: FemTemplate,
        o: FemOptions,
        values: dict[str, Scalar],
        per_node: dict[str, dict[str, Scalar]],
        listen: list[int],
    ) -> None:
        self.t, self.o, self.values, self.per_node = t, o, values, per_node
        self.listen = listen
        self.env = dict(o.env)
        self.used: set[str] = set()

    def base(self) -> list[str]:
        t = self.t
        if t.command is not None and t.image is not None and t.image.cmd:
            raise Refusal("command: both `command` and gen-1 `image.cmd` are given")
        if t.command is not None:
            return split_base(t.command.base, "command.base", self.env, self.used)
        cmd = t.image.cmd if t.image is not None else None
        return split_base(cmd or "", "image.cmd", self.env, self.used)

    def node(
        self, node: FemNode, run_id: str, base: list[str], p: _Pass
    ) -> tuple[tuple[str, ...], dict[str, str], dict[str, Any]]:
        o = self.o
        marks = {
            "node_name": node.fem_name,
            "execution_id": run_id,
            "user_id": o.user_id,
        }
        values = {**self.values, **self.per_node.get(node.fem_name, {})}
        argv = [p.run(w, expand, w, "command.base", marks) for w in base]
        args = self.t.command.args if self.t.command else ()
        ordered = sorted(enumerate(args), key=lambda x: (x[1].position, x[0]))
        for _, arg in ordered:
            value = values.get(arg.id, arg.default_value)
            argv += p.run(_NONE, render_arg, arg, value, marks, self.env, self.used)
        env: dict[str, str] = {}
        for key, raw in p.run(_NO_PAIRS, _env_pairs, self.t):
            where = f"var_envs `{cut(key, 40)}`"
            if not _ENV_KEY.fullmatch(key):
                p.add(f"{where}: not an environment variable name")
                continue
            if key in env:
                p.add(f"{where}: given twice")
                continue
            value = p.run("", substitute, raw, where, self.env, self.used)
            env[key] = p.run("", expand, value, where, marks)
        allow = sorted({*o.egress, *p.run(_NONE, _egress_from_env, env)})
        network: dict[str, Any] = (
            {"mode": "egress", "allow": allow} if allow else {"mode": "none"}
        )
        if self.listen:
            network["listen"] = list(self.listen)
        return tuple(argv), env, network


def convert(
    template: FemTemplate,
    options: FemOptions,
    *,
    tool: FemToolPlan | None = None,
    params: FemParams | None = None,
) -> Conversion:
    """Convert a FEM task template into femd ``Task`` manifests.

    One manifest lists every node whose rendered command, environment and
    network are the same; nodes that differ get one manifest each. Every
    manifest is checked with ``decode_manifest``: conversion never yields an
    invalid manifest.

    Raises:
        FemImportError: every unsafe or unmappable construct, each with its fix.
        ManifestError: the result is not a valid ``femd/v1`` task.
    """
    o, t, p = options, template, _Pass()
    nodes = list(o.nodes)
    if not nodes:
        raise FemImportError([Problem("--node: at least one node is required")])
    for field, seen in (
        ("FEM name", [n.fem_name for n in nodes]),
        ("node", [n.node for n in nodes]),
    ):
        if len(set(seen)) != len(seen):
            p.add(f"--node: a {field} is given twice")
    if not o.output_dir.startswith("/"):
        p.add(f"--output-dir: not an absolute path (got {cut(o.output_dir)!r})")
    for what, text in (("--execution-id", o.execution_id), ("--user-id", o.user_id)):
        if text is not None and not _ID_TEXT.fullmatch(text):
            p.add(
                f"{what}: letters, digits, `_`, `.`, `@`, `-` only (got {cut(text)!r})"
            )
    entry = _tool_entry(t, tool, nodes, p) if tool is not None else None
    plan_hosts = {h for x in tool.tasks for h in x.hosts} if tool else set()
    names = ({n.fem_name for n in nodes} | plan_hosts) - {"*"}
    single = None if tool is None else bool(entry and entry.single_node)
    values, per_node = _split_params(params or {}, t, names, single, p)
    image = p.run(None, pin_image, t, o, p.notes)
    source = p.run(None, pin_source, t, o)
    inputs = _inputs(t, o, source is not None, p)
    p.run(None, _check_outputs, t, o)
    no_resources: dict[str, float | int] = {}
    resources = p.run(no_resources, _resources, t)
    listen = _ports(t, o, p)
    r = _Renderer(t, o, values, per_node, listen)
    base = p.run(_NONE, r.base)
    rendered = {n.node: r.node(n, o.execution_id or "", base, p) for n in nodes}
    for name in sorted(set(r.env) - r.used):
        p.add(f"--env {name}: no `${name}` in the template")
    if p.problems:
        raise FemImportError(list(p.problems.values()))

    fixed: dict[str, Any] = {
        "apiVersion": "femd/v1",
        "kind": "Task",
        "project": o.project,
        "issued_at": o.issued_at,
        "expires_at": o.issued_at + timedelta(seconds=o.expires_in_s),
        "launcher": o.launcher,
        "profile": o.profile,
        "inputs": inputs,
        "outputs": {"path": norm(o.output_dir)},
        "resources": resources,
    }
    for key, value in (("issuer", o.issuer), ("image", image), ("source", source)):
        if value is not None:
            fixed[key] = value
    if o.runtime is not None:
        fixed["runtime"] = o.runtime

    def render(node: FemNode, run_id: str) -> tuple[Any, ...]:
        q = _Pass()
        out = r.node(node, run_id, base, q)
        if q.problems:
            raise FemImportError(list(q.problems.values()))
        return out

    def build(part: Sequence[FemNode], task_id: str) -> Converted:
        argv, env, network = render(part[0], o.execution_id or task_id)
        doc = {
            **fixed,
            "id": task_id,
            "nodes": [n.node for n in part],
            "command": list(argv),
            "env": env,
            "network": network,
        }
        # SECURITY: never emit a manifest femd itself would refuse.
        task = decode_manifest(msgspec.json.encode(doc))
        if not isinstance(task, Task):  # kind is fixed above
            raise RuntimeError("fem: conversion made a non-Task manifest")
        return Converted(tuple(n.node for n in part), task)

    # One manifest per group of nodes whose command, env and network are equal.
    groups: dict[bytes, list[FemNode]] = {}
    for node in nodes:
        groups.setdefault(msgspec.json.encode(rendered[node.node]), []).append(node)
    results: list[Converted] = []
    for members in groups.values():
        task_id = o.new_id()
        first = render(members[0], o.execution_id or task_id)
        if all(render(n, o.execution_id or task_id) == first for n in members[1:]):
            results.append(build(members, task_id))
            continue
        # `%%execution_id%%` (the task id) made the group differ after all.
        for i, node in enumerate(members):
            results.append(build([node], task_id if i == 0 else o.new_id()))
    return Conversion(tuple(results), tuple(p.notes))
