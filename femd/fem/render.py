"""Rendering one node's part of a FEM task: argv, environment and network.

Owns ``Renderer``: the command line (``command.base`` and its arguments, or
gen-1 ``image.cmd``) with ``%%marks%%`` and ``$NAME`` substituted, the
``var_envs`` environment, and the egress a node needs (``--egress`` and the
``<X>_HOST``/``<X>_PORT`` pairs of the environment). Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Final

from femd.errors import cut
from femd.fem.command import expand, render_arg, split_base, substitute
from femd.fem.documents import FemTemplate, Scalar
from femd.fem.options import ENV_NAME, FemNode, FemOptions, Pass, Refusal

__all__ = ["NONE", "Renderer"]

_HOST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_ADDRESS_KEY: Final = re.compile(r"(.*)_(?:IP|HOST|ADDRESS)")
_BIND_ANY: Final = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (a FEM value)
NONE: Final[list[str]] = []  # a step's result when it was refused (never mutated)
_NO_PAIRS: Final[list[tuple[str, str]]] = []


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


class Renderer:
    """Renders one node's argv, environment and network; collects problems."""

    def __init__(
        self,
        t: FemTemplate,
        o: FemOptions,
        values: dict[str, Scalar],
        per_node: dict[str, dict[str, Scalar]],
        listen: list[int],
    ) -> None:
        """Prepare the values every node shares."""
        self.t, self.o, self.values, self.per_node = t, o, values, per_node
        self.listen = listen
        self.env = dict(o.env)
        self.used: set[str] = set()

    def base(self) -> list[str]:
        """The command line before arguments, as argv words."""
        t = self.t
        if t.command is not None and t.image is not None and t.image.cmd:
            raise Refusal("command: both `command` and gen-1 `image.cmd` are given")
        if t.command is not None:
            return split_base(t.command.base, "command.base", self.env, self.used)
        cmd = t.image.cmd if t.image is not None else None
        return split_base(cmd or "", "image.cmd", self.env, self.used)

    def node(
        self, node: FemNode, run_id: str, base: list[str], p: Pass
    ) -> tuple[tuple[str, ...], dict[str, str], dict[str, Any]]:
        """One node's (argv, env, network)."""
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
            argv += p.run(NONE, render_arg, arg, value, marks, self.env, self.used)
        env: dict[str, str] = {}
        for key, raw in p.run(_NO_PAIRS, _env_pairs, self.t):
            where = f"var_envs `{cut(key, 40)}`"
            if not ENV_NAME.fullmatch(key):
                p.add(f"{where}: not an environment variable name")
                continue
            if key in env:
                p.add(f"{where}: given twice")
                continue
            value = p.run("", substitute, raw, where, self.env, self.used)
            env[key] = p.run("", expand, value, where, marks)
        allow = sorted({*o.egress, *p.run(NONE, _egress_from_env, env)})
        network: dict[str, Any] = (
            {"mode": "egress", "allow": allow} if allow else {"mode": "none"}
        )
        if self.listen:
            network["listen"] = list(self.listen)
        return tuple(argv), env, network
