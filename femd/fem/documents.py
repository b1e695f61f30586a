"""FEM v2 documents as the FEM orchestrator serves them, decoded strictly.

Owns ``FemTemplate`` (a task template), ``FemToolPlan`` (a tool: which
templates run on which FEM hosts) and ``FemParams`` (a submission's parametric
args), and their decoders. Field names, nesting and quirks are FEM's own (see
``docs/migrating-from-fem.md``): descriptive fields are accepted and ignored
(``author``, ``visibility``, ``persistent``, ``pre_checks``, ``inputs``,
``arguments``, ``outputs`` as an object, ``deployment_plan``, ``__v``, ...);
any other unknown field is refused, because femd cannot tell what it would
change. Converting them is ``convert``'s business.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from femd.errors import InputError, cut
from femd.model import Strict, explain, refuse_duplicate_keys

__all__ = [
    "FemArg",
    "FemCommand",
    "FemImage",
    "FemOutputs",
    "FemParams",
    "FemPort",
    "FemSource",
    "FemTemplate",
    "FemToolPlan",
    "FemToolTask",
    "FemVolume",
    "Scalar",
    "decode_params",
    "decode_template",
    "decode_tool_plan",
    "id_text",
]

# Descriptive: accepted and ignored (it changes nothing that runs).
_Descriptive = Any
Scalar = str | int | float | bool | None


class _Oid(Strict, frozen=True):
    """MongoDB extended JSON ``{"$oid": "..."}`` (FEM documents come from MongoDB)."""

    oid: str = msgspec.field(name="$oid")


FemId = str | _Oid


def id_text(value: FemId) -> str:
    """The text of a FEM id (a string, or a MongoDB ``$oid``)."""
    return value.oid if isinstance(value, _Oid) else value


class FemImage(Strict, frozen=True, kw_only=True):
    """``image``: ``label`` (full reference) and/or ``repository`` + ``name`` + ``tag``.

    ``hash`` is FEM's digest field (often the placeholder ``image_hash_value``).
    Gen-1 templates give ``url`` (the reference) and ``cmd`` (the command line).
    """

    label: str | None = None
    repository: str | None = None
    name: str | None = None
    tag: str | None = None
    hash: str | None = None
    url: str | None = None
    cmd: str | None = None


class FemVolume(Strict, frozen=True, kw_only=True):
    """``volumes[]``: FEM bound ``host_path`` at ``container_path``."""

    host_path: str | None = None
    container_path: str


class FemPort(Strict, frozen=True, kw_only=True):
    """``port_mappings[]``: a port the task listens on, published on the host."""

    host_port: int
    container_port: int


class FemArg(Strict, frozen=True, kw_only=True):
    """``command.args[]``: one typed, positioned argument."""

    id: str
    type: str
    position: int
    default_value: Scalar = None
    prefix: str | None = None
    separate: bool = True
    required: bool = False
    name: _Descriptive = None
    description: _Descriptive = None


class FemCommand(Strict, frozen=True, kw_only=True):
    """``command``: a ``base`` command line and its ``args``."""

    base: str
    args: tuple[FemArg, ...] = ()


class FemSource(Strict, frozen=True, kw_only=True):
    """``source_code``: a git ``url`` (may end in `` --branch X``), ``commit_hash``."""

    url: str | None = None
    commit_hash: str | None = None


class FemOutputs(Strict, frozen=True, kw_only=True):
    """``outputs`` as FEM v2 stores it: where FEM moved a model (descriptive)."""

    model_dir: _Descriptive = None
    move_to: _Descriptive = None


class FemTemplate(Strict, frozen=True, kw_only=True):
    """A FEM task template (one tool's container, command and resources)."""

    id: FemId = msgspec.field(name="_id")
    image: FemImage | None = None
    var_envs: dict[str, str | int | float] | tuple[str, ...] | None = None
    volumes: tuple[FemVolume, ...] | None = None
    cpus: int | float | str | None = None
    memory: int | str | None = None
    gpus: int | str | None = None
    source_code: FemSource | None = None
    command: FemCommand | None = None
    outputs: FemOutputs | tuple[str, ...] | None = None
    port_mappings: tuple[FemPort, ...] | FemPort | None = None
    name: _Descriptive = None
    author: _Descriptive = None
    version: _Descriptive = None
    visibility: _Descriptive = None
    permissions: _Descriptive = None
    description: _Descriptive = None
    tags: _Descriptive = None
    owner: _Descriptive = None
    inputs: _Descriptive = None
    arguments: _Descriptive = None
    persistent: _Descriptive = None
    pre_checks: _Descriptive = None
    created_by: _Descriptive = None
    created_at: _Descriptive = None
    updated_at: _Descriptive = None
    mongo_version: _Descriptive = msgspec.field(name="__v", default=None)


class FemToolTask(Strict, frozen=True, kw_only=True):
    """``tasks[]`` of a tool plan: which template runs on which FEM hosts.

    ``host_list`` entries may be comma-joined (``"BSC,UB2"``); ``"*"`` is every
    node of the submission.
    """

    task_id: FemId
    host_list: tuple[str, ...]
    single_node: bool = False
    name: _Descriptive = None
    description: _Descriptive = None

    @property
    def hosts(self) -> tuple[str, ...]:
        """``host_list`` split on commas, blanks dropped."""
        return tuple(
            h.strip() for entry in self.host_list for h in entry.split(",") if h.strip()
        )


class FemToolPlan(Strict, frozen=True, kw_only=True):
    """A FEM tool plan: the task templates of one tool and their hosts."""

    id: FemId = msgspec.field(name="_id")
    tasks: Annotated[tuple[FemToolTask, ...], Meta(min_length=1)]
    name: _Descriptive = None
    author: _Descriptive = None
    version: _Descriptive = None
    permissions: _Descriptive = None
    visibility: _Descriptive = None
    plan_type: _Descriptive = None
    deployment_plan: _Descriptive = None
    description: _Descriptive = None
    created_at: _Descriptive = None
    updated_at: _Descriptive = None
    mongo_version: _Descriptive = msgspec.field(name="__v", default=None)


# Parametric args: {"<arg id>": value, "server": {...}, "<FEM node>": {...}}
FemParams = dict[str, Scalar | dict[str, Scalar]]


def _decode(data: bytes, what: str, kind: type[Any]) -> Any:  # noqa: ANN401
    try:
        refuse_duplicate_keys(data)
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
        text = explain(str(e))
        if text.startswith("Object contains unknown field"):
            text += " (refused: femd cannot tell what it would change)"
        raise InputError(f"{what}: {cut(text, 200)}") from e


def decode_template(data: bytes) -> FemTemplate:
    """Decode a FEM task template (JSON) strictly.

    Raises:
        InputError: not JSON, a duplicate key, a wrong type, or an unknown field
            that is not documented as descriptive; the message names the path.
    """
    template: FemTemplate = _decode(data, "fem template", FemTemplate)
    if template.command is None and not (template.image and template.image.cmd):
        raise InputError("fem template: no `command` and no gen-1 `image.cmd`")
    return template


def decode_tool_plan(data: bytes) -> FemToolPlan:
    """Decode a FEM tool plan (JSON) strictly.

    Raises:
        InputError: as ``decode_template``.
    """
    plan: FemToolPlan = _decode(data, "fem tool plan", FemToolPlan)
    return plan


def decode_params(data: bytes) -> FemParams:
    """Decode FEM parametric args: values by arg id, per-node sections by node.

    Raises:
        InputError: not a JSON object of scalars and one-level sections.
    """
    params: FemParams = _decode(data, "fem params", FemParams)
    return params
