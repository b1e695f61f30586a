"""A FEM template's parts, one at a time: what each becomes in a manifest.

Owns the mapping of the tool plan entry (hosts, single node), the
parametric args (common values and per-node sections), volumes (datasets,
output and code dirs), outputs, resources and ports. Each reports its
problems to the conversion's ``Pass`` or raises ``Refusal``. Pure: no I/O.
Does not render command lines (``femd.fem.render``) nor build manifests
(``femd.fem.convert``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from femd.errors import cut
from femd.fem.command import is_float
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
    FemNode,
    FemOptions,
    Pass,
    Refusal,
    norm,
    parse_memory_mb,
)

__all__ = [
    "check_outputs",
    "find_tool_entry",
    "map_inputs",
    "map_ports",
    "map_resources",
    "split_params",
]


def find_tool_entry(
    t: FemTemplate, tool: FemToolPlan, nodes: Sequence[FemNode], p: Pass
) -> FemToolTask | None:
    """The tool plan's entry for the template, checked against the nodes."""
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


def split_params(
    params: FemParams,
    t: FemTemplate,
    names: set[str],
    single_node: bool | None,
    p: Pass,
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


def map_inputs(t: FemTemplate, o: FemOptions, has_source: bool, p: Pass) -> list[Any]:
    """The manifest's ``inputs``: FEM volumes mapped to the operator's datasets."""
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


def check_outputs(t: FemTemplate, o: FemOptions) -> None:
    """Refuse FEM outputs outside the one output dir femd sends back."""
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


def map_resources(t: FemTemplate) -> dict[str, float | int]:
    """The manifest's ``resources`` (cpus, memory); GPUs are refused."""
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


def map_ports(t: FemTemplate, o: FemOptions, p: Pass) -> list[int]:
    """The ports the task listens on, each consented to by ``--ingress``."""
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
