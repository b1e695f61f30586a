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
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final

import msgspec

from femd.errors import cut
from femd.fem.documents import FemParams, FemTemplate, FemToolPlan
from femd.fem.options import (
    Converted,
    FemImportError,
    FemNode,
    FemOptions,
    Pass,
    Problem,
    norm,
)
from femd.fem.parts import (
    check_outputs,
    find_tool_entry,
    map_inputs,
    map_ports,
    map_resources,
    split_params,
)
from femd.fem.pins import pin_image, pin_source
from femd.fem.render import NONE, Renderer
from femd.manifest import Task, decode_manifest

__all__ = ["Conversion", "convert"]

_ID_TEXT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


class Conversion(msgspec.Struct, frozen=True):
    """The manifests of a conversion, and notes on what was not passed on."""

    manifests: tuple[Converted, ...]
    notes: tuple[str, ...] = ()


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
    o, t, p = options, template, Pass()
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
    entry = find_tool_entry(t, tool, nodes, p) if tool is not None else None
    plan_hosts = {h for x in tool.tasks for h in x.hosts} if tool else set()
    names = ({n.fem_name for n in nodes} | plan_hosts) - {"*"}
    single = None if tool is None else bool(entry and entry.single_node)
    values, per_node = split_params(params or {}, t, names, single, p)
    image = p.run(None, pin_image, t, o, p.notes)
    source = p.run(None, pin_source, t, o)
    inputs = map_inputs(t, o, source is not None, p)
    p.run(None, check_outputs, t, o)
    no_resources: dict[str, float | int] = {}
    resources = p.run(no_resources, map_resources, t)
    listen = map_ports(t, o, p)
    r = Renderer(t, o, values, per_node, listen)
    base = p.run(NONE, r.base)
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
        q = Pass()
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
