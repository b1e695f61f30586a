"""FEM interoperability: FEM task templates, tool plans and parametric args.

Owns the FEM v2 documents as femd reads them (``FemTemplate``, ``FemToolPlan``,
``FemParams``) and ``convert()``, which turns one task template into one or
more ``femd/v1`` ``Task`` manifests, ready for ``femd sign``. Also owns the
small parsers of ``femd import-fem``'s option values. Runs where the signing
happens, never on a data node.

Pure: no I/O (the CLI reads the files and writes the manifests), no clock (the
issue time is passed in). Does not sign (``envelope``) and does not decide
whether a task may run (``decision``): it refuses, with one line naming the
construct, everything FEM allowed that femd does not do — commands assembled as
shell strings, host paths chosen by the task, ``$VAR`` passthrough, untyped or
Python-literal arguments, inbound ports, GPUs, unpinned images and branches.
"""

from __future__ import annotations

import math
import re
import shlex
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from femd.errors import InputError, cut
from femd.manifest import Task, decode_manifest, encode_manifest
from femd.model import Name, Strict, explain, refuse_duplicate_keys

__all__ = [
    "Converted",
    "FemArg",
    "FemCommand",
    "FemImage",
    "FemNode",
    "FemOptions",
    "FemParams",
    "FemSource",
    "FemTemplate",
    "FemToolPlan",
    "FemToolTask",
    "FemVolume",
    "convert",
    "decode_params",
    "decode_template",
    "decode_tool_plan",
    "manifest_json",
    "output_paths",
    "parse_dataset",
    "parse_duration",
    "parse_memory_mb",
    "parse_node",
]

# ---------------------------------------------------------------------------
# the FEM documents

# Documented metadata: accepted and ignored (it changes nothing that runs).
# Any other unknown field is refused: femd cannot tell what it would change.
_Metadata = Any
Scalar = str | int | float | bool | None


class _Oid(Strict, frozen=True):
    """MongoDB extended JSON ``{"$oid": "..."}`` (FEM documents come from MongoDB)."""

    oid: str = msgspec.field(name="$oid")


FemId = str | _Oid


def _id_text(value: FemId) -> str:
    return value.oid if isinstance(value, _Oid) else value


class FemImage(Strict, frozen=True, kw_only=True):
    """``image``: a ``label`` (full reference) or ``repository`` + ``name``."""

    label: str | None = None
    repository: str | None = None
    name: str | None = None
    tag: str | None = None
    hash: str | None = None


class FemVolume(Strict, frozen=True, kw_only=True):
    """``volumes[]``: FEM bound ``host_path`` at ``container_path``."""

    host_path: str | None = None
    container_path: str


class FemArg(Strict, frozen=True, kw_only=True):
    """``command.args[]``: one typed, positioned argument."""

    id: str
    type: str
    position: int
    default_value: Scalar = None
    prefix: str | None = None
    separate: bool = True
    required: bool = False
    name: _Metadata = None
    description: _Metadata = None


class FemCommand(Strict, frozen=True, kw_only=True):
    """``command``: a ``base`` command line and its ``args``."""

    base: str
    args: tuple[FemArg, ...] = ()


class FemSource(Strict, frozen=True, kw_only=True):
    """``source_code``: a git ``url`` (may carry `` --branch X``) and a commit."""

    url: str | None = None
    commit_hash: str | None = None


class FemTemplate(Strict, frozen=True, kw_only=True):
    """A FEM v2 task template (one tool's container, command and resources)."""

    id: FemId = msgspec.field(name="_id")
    name: str | None = None
    image: FemImage | None = None
    var_envs: dict[str, str | int | float] | tuple[str, ...] | None = None
    volumes: tuple[FemVolume, ...] | None = None
    cpus: int | float | str | None = None
    memory: int | str | None = None
    gpus: int | str | None = None
    source_code: FemSource | None = None
    command: FemCommand
    outputs: tuple[str, ...] | None = None
    port_mappings: tuple[Any, ...] | dict[str, Any] | None = None
    description: _Metadata = None
    version: _Metadata = None
    tags: _Metadata = None
    owner: _Metadata = None
    created_by: _Metadata = None
    created_at: _Metadata = None
    updated_at: _Metadata = None
    mongo_version: _Metadata = msgspec.field(name="__v", default=None)


class FemToolTask(Strict, frozen=True, kw_only=True):
    """``tasks[]`` of a tool plan: which template runs on which FEM hosts."""

    task_id: FemId
    host_list: tuple[str, ...]
    single_node: bool = False
    name: _Metadata = None
    description: _Metadata = None


class FemToolPlan(Strict, frozen=True, kw_only=True):
    """A FEM tool plan: the task templates of one tool and their hosts."""

    id: FemId = msgspec.field(name="_id")
    tasks: Annotated[tuple[FemToolTask, ...], Meta(min_length=1)]
    name: _Metadata = None
    description: _Metadata = None
    version: _Metadata = None
    created_at: _Metadata = None
    updated_at: _Metadata = None
    mongo_version: _Metadata = msgspec.field(name="__v", default=None)


# Parametric args: {"<arg id>": value, ..., "<FEM node name>": {"<arg id>": value}}
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
            that is not documented metadata; the message names the field path.
    """
    template: FemTemplate = _decode(data, "fem template", FemTemplate)
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
        InputError: not a JSON object of scalars and one-level node sections.
    """
    params: FemParams = _decode(data, "fem params", FemParams)
    return params


# ---------------------------------------------------------------------------
# options (what `femd import-fem` is told) and results


class FemNode(msgspec.Struct, frozen=True):
    """A target node: its FEM name (params sections, ``%%node_name%%``) and id."""

    fem_name: str
    node: str


class FemOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the operator adds to a FEM template to make femd manifests.

    ``datasets`` maps policy dataset names to FEM volume container paths.
    ``new_id`` makes task ids (uuid4 by default; tests pass their own).
    """

    nodes: tuple[FemNode, ...]
    project: str
    issued_at: datetime
    expires_in_s: int = 86400
    launcher: Literal["podman", "process"] = "podman"
    profile: str = "default"
    issuer: str | None = None
    image_digest: str | None = None
    commit: str | None = None
    datasets: tuple[tuple[str, str], ...] = ()
    output_dir: str = "/out"
    egress: tuple[str, ...] = ()
    execution_id: str | None = None
    user_id: str | None = None
    new_id: Callable[[], str] = lambda: str(uuid.uuid4())


class Converted(msgspec.Struct, frozen=True):
    """One manifest of a conversion and the nodes (femd ids) it lists."""

    nodes: tuple[str, ...]
    task: Task


# ---------------------------------------------------------------------------
# option parsers (argparse hands these strings over)

_DIGEST: Final = re.compile(r"sha256:[0-9a-f]{64}")
_COMMIT: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_ID_TEXT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_DURATION: Final = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MEMORY: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNIT_B: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _is_name(text: str) -> bool:
    try:
        msgspec.convert(text, Name)
    except msgspec.ValidationError:
        return False
    return True


def parse_node(text: str) -> FemNode:
    """Parse ``--node NODE`` or ``--node FEM_NAME=NODE``.

    Raises:
        InputError: an empty FEM name or a node that is not a femd node id.
    """
    fem_name, sep, node = text.partition("=")
    if not sep:
        fem_name = node = text
    if not fem_name or "%" in fem_name:
        raise InputError(f"--node: empty or invalid FEM name (got {cut(text)!r})")
    if not _is_name(node):
        raise InputError(
            f"--node: {cut(node)!r} is not a femd node id (lowercase letters, "
            "digits, `.`, `_`, `-`); map a FEM name with FEM_NAME=NODE"
        )
    return FemNode(fem_name, node)


def parse_dataset(text: str) -> tuple[str, str]:
    """Parse ``--dataset NAME=CONTAINER_PATH``.

    Raises:
        InputError: no ``=``, a bad dataset name or a relative path.
    """
    name, sep, mount = text.partition("=")
    if not sep or not _is_name(name) or not mount.startswith("/"):
        raise InputError(
            f"--dataset: expected NAME=CONTAINER_PATH with a policy dataset name "
            f"and an absolute path (got {cut(text)!r})"
        )
    return name, _norm(mount)


def parse_duration(text: str) -> int:
    """Parse ``--expires-in``: seconds, or a number with ``s``, ``m``, ``h``, ``d``.

    Raises:
        InputError: not such a duration, or zero.
    """
    m = _DURATION.fullmatch(text.strip())
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if seconds <= 0:
        raise InputError(
            f"--expires-in: expected e.g. 3600, 90m, 24h, 7d (got {cut(text)!r})"
        )
    return seconds


def parse_memory_mb(value: int | str) -> int | None:
    """FEM ``memory`` (bytes, or Docker units ``512m``, ``4g``) as MiB, rounded up.

    ``0`` and ``""`` mean no request (the policy's maximum applies): None.

    Raises:
        InputError: not a size.
    """
    if isinstance(value, bool):
        raise InputError(f"memory: not a size (got {value!r})")
    if isinstance(value, int):
        size = float(value)
    else:
        if not value.strip():
            return None
        m = _MEMORY.fullmatch(value.strip())
        if m is None:
            raise InputError(f"memory: not a size like 512m or 4g (got {cut(value)!r})")
        size = float(m.group(1)) * _UNIT_B[m.group(2).lower()]
    if size < 0:
        raise InputError(f"memory: negative size (got {value!r})")
    return math.ceil(size / (1 << 20)) if size else None


# ---------------------------------------------------------------------------
# refusals and small conversions


def _norm(path: str) -> str:
    return path.rstrip("/") or "/"


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


_ENV_REF: Final = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[^}]*\}?|\(|[0-9@*#?$!-])")
_PLACEHOLDER: Final = re.compile(r"%%([A-Za-z0-9_]*)%%")
_KNOWN_PLACEHOLDERS: Final = ("node_name", "execution_id", "user_id")


def _refuse_env_refs(text: str, where: str) -> None:
    m = _ENV_REF.search(text)
    if m:
        raise InputError(
            f"{where}: `{cut(m.group(0), 40)}` refers to the node's environment: "
            "refused (the node's environment is the node's, not the task's; "
            "give the value in var_envs or as a parameter)"
        )


def _expand(text: str, where: str, values: Mapping[str, str | None]) -> str:
    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            known = ", ".join(f"%%{k}%%" for k in _KNOWN_PLACEHOLDERS)
            raise InputError(
                f"{where}: unknown placeholder `{cut(m.group(0), 40)}` (known: {known})"
            )
        value = values[key]
        if value is None:
            raise InputError(f"{where}: `%%{key}%%` needs --{key.replace('_', '-')}")
        return value

    return _PLACEHOLDER.sub(repl, text)


_OPERATORS: Final = {
    ";": "`;` (command separator)",
    "&": "`&`/`&&` (background or and-list)",
    "|": "`|`/`||` (pipe or or-list)",
    "<": "`<` (redirection)",
    ">": "`>` (redirection)",
    "(": "`(` (subshell)",
    ")": "`)` (subshell)",
    "`": "`` ` `` (command substitution)",
    "\n": "a newline (command separator)",
    "*": "`*` (glob)",
    "?": "`?` (glob)",
    "[": "`[` (glob)",
}


def _refuse_shell(base: str) -> None:
    """Refuse what a shell would have interpreted in *base* (it is no shell here)."""
    state: str | None = None  # None, "'" or '"'
    word_start = True
    i = 0
    while i < len(base):
        c = base[i]
        what = None
        if state == "'":
            state = None if c == "'" else state
        elif state == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                state = None
            elif c == "`":
                what = _OPERATORS[c]
        elif c == "\\":
            i += 1
        elif c in "'\"":
            state = c
        elif c in _OPERATORS:
            what = _OPERATORS[c]
        elif word_start and c in "#~":
            what = "`#` (comment)" if c == "#" else "`~` (home directory)"
        if c < " " and c not in "\t\n":  # shlex splits at "\r", a shell does not
            what = f"a control character {c!r}"
        if what:
            raise InputError(
                f"command.base: {what} refused: femd runs the command as an argv "
                "list, not through a shell (it would silently become a literal "
                f"argument); got {cut(base)!r}"
            )
        word_start = state is None and c in " \t"
        i += 1


def _split_base(base: str) -> list[str]:
    # SECURITY: issue 7: no `$VAR` passthrough, and no shell syntax that would
    # silently change meaning once the argv is executed without a shell.
    _refuse_env_refs(base, "command.base")
    _refuse_shell(base)
    try:
        words = shlex.split(base, posix=True)
    except ValueError as e:
        raise InputError(f"command.base: {str(e).lower()} (got {cut(base)!r})") from e
    if not words:
        raise InputError("command.base: empty command")
    return words


_INT: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLS: Final = {"true": True, "True": True, "false": False, "False": False}


def _typed(arg: FemArg, value: str | int | float | bool) -> str | bool:
    """*value* checked against ``arg.type``; a bool stays a bool, others render."""
    where = f"command.args `{cut(arg.id, 40)}`"
    ok: str | bool | None = None
    if arg.type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            ok = str(value)
        elif isinstance(value, str) and _INT.fullmatch(value):
            ok = str(int(value))
    elif arg.type == "float":
        if isinstance(value, float) and math.isfinite(value):
            ok = repr(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            ok = str(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value):
            ok = value
    elif arg.type == "str":
        if isinstance(value, str):
            ok = value
    elif arg.type == "bool":
        if isinstance(value, bool):
            ok = value
        elif isinstance(value, str) and value in _BOOLS:
            ok = _BOOLS[value]
    else:
        raise InputError(
            f"{where}: type {cut(arg.type, 40)!r} refused (expected int, float, str "
            "or bool; femd never evaluates literals)"
        )
    if ok is None:
        raise InputError(f"{where}: expected {arg.type} (got {cut(repr(value))})")
    return ok


def _render_arg(
    arg: FemArg, value: Scalar, expand: Callable[[str, str], str]
) -> list[str]:
    where = f"command.args `{cut(arg.id, 40)}`"
    if value is None or value == "":
        if arg.required:
            raise InputError(
                f"{where}: required but has no value (no default_value, no parameter)"
            )
        return []
    prefix = arg.prefix or ""
    _refuse_env_refs(prefix, f"{where} prefix")
    if any(c.isspace() for c in prefix):
        raise InputError(
            f"{where}: prefix {cut(prefix)!r} has whitespace "
            "(one argument here, several in a shell)"
        )
    if isinstance(value, str):
        _refuse_env_refs(value, where)
        value = expand(value, where)
    rendered = _typed(arg, value)
    if isinstance(rendered, bool):
        if not prefix:
            raise InputError(
                f"{where}: a bool argument needs a prefix "
                "(it is rendered as a flag when true)"
            )
        return [prefix] if rendered else []
    if not prefix:
        return [rendered]
    return [prefix, rendered] if arg.separate else [prefix + rendered]


def _image(t: FemTemplate, o: FemOptions) -> str | None:
    if o.launcher == "process":
        if o.image_digest is not None:
            raise InputError("--image-digest: the process launcher runs no image")
        return None
    img = t.image
    if img is None:
        raise InputError(
            "image: the FEM template has none (required for --launcher podman)"
        )
    if img.label and (img.repository or img.name):
        raise InputError("image: give `label` or `repository`+`name`, not both")
    tag = img.tag or None
    digests: dict[str, str] = {}
    if img.label:
        repo, _, label_digest = img.label.partition("@")
        if label_digest:
            digests["image.label"] = label_digest
        slash, colon = repo.rfind("/"), repo.rfind(":")
        if colon > slash:
            repo, label_tag = repo[:colon], repo[colon + 1 :]
            if tag and tag != label_tag:
                raise InputError(
                    f"image: tag {tag!r} differs from the label's {label_tag!r}"
                )
            tag = label_tag
    elif img.name:
        repo = (
            f"{img.repository.rstrip('/')}/{img.name}" if img.repository else img.name
        )
    else:
        raise InputError("image: neither `label` nor `name` is given")
    if img.hash and _DIGEST.fullmatch(img.hash):
        digests["image.hash"] = img.hash
    if o.image_digest is not None:
        digests["--image-digest"] = o.image_digest
    elif img.hash and not _DIGEST.fullmatch(img.hash):
        raise InputError(
            f"image.hash {cut(img.hash)!r} is not a sha256:<64 hex> digest: "
            "give --image-digest"
        )
    if len(set(digests.values())) > 1:
        found = ", ".join(f"{k} {cut(v, 20)}" for k, v in digests.items())
        raise InputError(f"image: the digests differ ({found})")
    if not digests:
        what = (
            f"{repo}:{tag} is a tag, not a pin"
            if tag
            else f"{repo} has no tag and no digest"
        )
        raise InputError(f"image: {cut(what)}: give --image-digest sha256:...")
    digest = next(iter(digests.values()))
    if not _DIGEST.fullmatch(digest):
        raise InputError(f"image: {cut(digest)!r} is not a sha256:<64 hex> digest")
    return f"{repo}@{digest}"


def _source(t: FemTemplate, o: FemOptions) -> dict[str, str] | None:
    src = t.source_code
    url_text = (src.url or "").strip() if src else ""
    if not url_text:
        if o.commit is not None or (src and src.commit_hash):
            raise InputError(
                "source_code: a commit without a url (--commit needs source_code.url)"
            )
        return None
    try:
        words = shlex.split(url_text)
    except ValueError as e:
        raise InputError(f"source_code.url: {str(e).lower()}") from e
    url, branch, rest = words[0], None, words[1:]
    while rest:
        opt = rest.pop(0)
        if opt in ("--branch", "-b") and rest:
            branch = rest.pop(0)
        elif opt.startswith("--branch="):
            branch = opt.partition("=")[2]
        else:
            raise InputError(
                f"source_code.url: git option {cut(opt)!r} refused "
                "(only --branch is understood)"
            )
    if not re.match(r"(?:https|ssh|git|file)://", url):
        raise InputError(
            f"source_code.url: {cut(url)!r} is not an https, ssh, git or file URL"
        )
    commits: dict[str, str] = {}
    if src and src.commit_hash:
        fem_commit = src.commit_hash.strip().lower()
        if not _COMMIT.fullmatch(fem_commit):
            raise InputError(
                f"source_code.commit_hash {cut(src.commit_hash)!r} is not a "
                "full commit id (40 or 64 hex)"
            )
        commits["source_code.commit_hash"] = fem_commit
    if o.commit is not None:
        if not _COMMIT.fullmatch(o.commit):
            raise InputError(
                f"--commit: {cut(o.commit)!r} is not a full commit id "
                "(40 or 64 lowercase hex)"
            )
        commits["--commit"] = o.commit
    if len(set(commits.values())) > 1:
        raise InputError("source_code: --commit differs from source_code.commit_hash")
    if not commits:
        why = (
            f"`--branch {cut(branch, 40)}` is a moving ref, not a pin"
            if branch
            else "no commit_hash"
        )
        raise InputError(
            f"source_code.url: {why}: give --commit SHA (a full commit id)"
        )
    return {"git": url, "commit": next(iter(commits.values())), "path": "."}


def _inputs(t: FemTemplate, o: FemOptions) -> list[dict[str, str]]:
    out_dir = _norm(o.output_dir)
    by_mount: dict[str, str] = {}
    for name, path in o.datasets:
        mount = _norm(path)
        if mount in by_mount:
            raise InputError(f"--dataset: two datasets mapped to {cut(mount)}")
        if mount == out_dir:
            raise InputError(f"--dataset {name}={mount}: that is the output dir")
        by_mount[mount] = name
    inputs: list[dict[str, str]] = []
    seen: set[str] = set()
    for v in t.volumes or ():
        path = _norm(v.container_path)
        if path in seen:
            raise InputError(f"volumes: container_path {cut(path)} appears twice")
        seen.add(path)
        if path == out_dir:
            continue
        # SECURITY: a FEM host_path never becomes a host path; the policy maps datasets.
        if path not in by_mount:
            shown = f"{cut(v.host_path or '?', 60)}:{cut(path, 60)}"
            raise InputError(
                f"volumes: `{shown}` is not mapped: host paths are the node's; give "
                f"--dataset NAME={cut(path, 60)} (read-only input) "
                f"or --output-dir {cut(path, 60)}"
            )
        inputs.append({"dataset": by_mount[path], "mount": path})
    for mount, name in by_mount.items():
        if mount not in seen:
            raise InputError(
                f"--dataset {name}={cut(mount)}: no FEM volume has that container_path"
            )
    return inputs


def _check_outputs(t: FemTemplate, o: FemOptions) -> None:
    out_dir = _norm(o.output_dir)
    for path in t.outputs or ():
        rel = not path.startswith("/")
        if (rel and ".." not in path.split("/")) or (
            not rel and _within(_norm(path), out_dir)
        ):
            continue
        raise InputError(
            f"outputs: {cut(path)!r} is outside the output dir {out_dir}: femd sends "
            "back only that directory (set --output-dir)"
        )


def _refusals(t: FemTemplate) -> None:
    if t.port_mappings:
        raise InputError(
            "port_mappings: refused: femd tasks accept no inbound connections "
            "(an FL client reaches its server with --egress HOST:PORT instead)"
        )
    gpus = t.gpus
    if gpus not in (None, 0, "", "0"):
        raise InputError(f"gpus: {cut(gpus)!r} refused: femd has no GPU support yet")


def _resources(t: FemTemplate) -> dict[str, float | int]:
    res: dict[str, float | int] = {}
    cpus = t.cpus
    if isinstance(cpus, str):
        if cpus.strip() and not _FLOAT.fullmatch(cpus.strip()):
            raise InputError(f"cpus: not a number (got {cut(cpus)!r})")
        cpus = float(cpus) if cpus.strip() else None
    if cpus:
        res["cpus"] = cpus
    if t.memory is not None:
        memory_mb = parse_memory_mb(t.memory)
        if memory_mb:
            res["memory_mb"] = memory_mb
    return res


def _env(t: FemTemplate, expand: Callable[[str, str], str]) -> dict[str, str]:
    pairs: list[tuple[str, str]] = []
    if isinstance(t.var_envs, dict):
        # Decoding refused booleans already (`int | float | str`).
        pairs += [
            (k, v if isinstance(v, str) else str(v)) for k, v in t.var_envs.items()
        ]
    else:
        for item in t.var_envs or ():
            k, sep, v = item.partition("=")
            if not sep:
                raise InputError(f"var_envs: expected NAME=VALUE (got {cut(item)!r})")
            pairs.append((k, v))
    env: dict[str, str] = {}
    for k, v in pairs:
        where = f"var_envs `{cut(k, 40)}`"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", k):
            raise InputError(f"{where}: not an environment variable name")
        if k in env:
            raise InputError(f"{where}: given twice")
        _refuse_env_refs(v, where)
        env[k] = expand(v, where)
    return env


# ---------------------------------------------------------------------------
# parameters and nodes


def _split_params(
    params: FemParams, t: FemTemplate, fem_names: set[str]
) -> tuple[dict[str, Scalar], dict[str, dict[str, Scalar]]]:
    """Split common values from node sections (sections of *fem_names* only)."""
    arg_ids = {a.id for a in t.command.args}
    common: dict[str, Scalar] = {}
    per_node: dict[str, dict[str, Scalar]] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            if key not in fem_names:
                raise InputError(
                    f"params: section {cut(key, 40)!r} names no --node and no "
                    f"tool plan host (known: {cut(', '.join(sorted(fem_names)))})"
                )
            for arg in value:
                if arg not in arg_ids:
                    raise InputError(
                        f"params {cut(key, 40)}: "
                        f"no command.args has id {cut(arg, 40)!r}"
                    )
            per_node[key] = value
        elif key in arg_ids:
            common[key] = value
        else:
            raise InputError(f"params: no command.args has id {cut(key, 40)!r}")
    return common, per_node


def _tool_check(
    t: FemTemplate, tool: FemToolPlan, nodes: Sequence[FemNode]
) -> tuple[str, ...]:
    """Check the nodes against the tool plan; return the task's ``host_list``."""
    tid = _id_text(t.id)
    entry = next((x for x in tool.tasks if _id_text(x.task_id) == tid), None)
    if entry is None:
        raise InputError(
            f"tool plan {cut(_id_text(tool.id), 40)}: has no task {cut(tid, 40)}"
        )
    for n in nodes:
        if n.fem_name not in entry.host_list:
            raise InputError(
                f"tool plan {cut(_id_text(tool.id), 40)}: task {cut(tid, 40)} "
                f"does not run on {cut(n.fem_name, 40)!r} "
                f"(host_list: {cut(', '.join(entry.host_list), 120)})"
            )
    if entry.single_node and len(nodes) > 1:
        raise InputError(
            f"tool plan: task {cut(tid, 40)} is single_node "
            f"but {len(nodes)} nodes were given"
        )
    return entry.host_list


def _render(
    t: FemTemplate,
    base: list[str],
    values: Mapping[str, Scalar],
    placeholders: Mapping[str, str | None],
) -> tuple[tuple[str, ...], dict[str, str]]:
    def expand(text: str, where: str) -> str:
        return _expand(text, where, placeholders)

    argv = [expand(w, "command.base") for w in base]
    ordered = sorted(enumerate(t.command.args), key=lambda p: (p[1].position, p[0]))
    for _, arg in ordered:
        argv += _render_arg(arg, values.get(arg.id, arg.default_value), expand)
    return tuple(argv), _env(t, expand)


def convert(
    template: FemTemplate,
    options: FemOptions,
    *,
    tool: FemToolPlan | None = None,
    params: FemParams | None = None,
) -> list[Converted]:
    """Convert a FEM task template into femd ``Task`` manifests.

    One manifest lists every node whose rendered command and environment are
    the same; nodes whose per-node parameters (or ``%%node_name%%``) make them
    differ get one manifest each. Every manifest is encoded and decoded with
    ``decode_manifest`` before it is returned: conversion never yields an
    invalid manifest.

    Raises:
        InputError: an unsafe or unsupported FEM construct, a missing pin or
            mapping, a bad parameter; the message names the construct.
        ManifestError: the result is not a valid ``femd/v1`` task.
    """
    o = options
    nodes = list(o.nodes)
    if not nodes:
        raise InputError("--node: at least one node is required")
    for field, seen in (
        ("FEM name", [n.fem_name for n in nodes]),
        ("node", [n.node for n in nodes]),
    ):
        if len(set(seen)) != len(seen):
            raise InputError(f"--node: a {field} is given twice")
    if not o.output_dir.startswith("/"):
        raise InputError(
            f"--output-dir: not an absolute path (got {cut(o.output_dir)!r})"
        )
    hosts = _tool_check(template, tool, nodes) if tool is not None else ()
    _refusals(template)
    # A section for a host of the tool plan that is not converted now is valid.
    names = {n.fem_name for n in nodes} | set(hosts)
    common, per_node = _split_params(params or {}, template, names)
    base = _split_base(template.command.base)
    for what, text in (("--execution-id", o.execution_id), ("--user-id", o.user_id)):
        if text is not None and not _ID_TEXT.fullmatch(text):
            raise InputError(
                f"{what}: letters, digits, `_`, `.`, `@`, `-` only (got {cut(text)!r})"
            )
    inputs = _inputs(template, o)
    _check_outputs(template, o)
    fixed: dict[str, Any] = {
        "apiVersion": "femd/v1",
        "kind": "Task",
        "project": o.project,
        "issued_at": o.issued_at,
        "expires_at": o.issued_at + timedelta(seconds=o.expires_in_s),
        "launcher": o.launcher,
        "profile": o.profile,
        "inputs": inputs,
        "outputs": {"path": _norm(o.output_dir)},
        "resources": _resources(template),
        "network": {"mode": "egress", "allow": list(o.egress)}
        if o.egress
        else {"mode": "none"},
    }
    if o.issuer is not None:
        fixed["issuer"] = o.issuer
    image = _image(template, o)
    if image is not None:
        fixed["image"] = image
    source = _source(template, o)
    if source is not None:
        fixed["source"] = source

    def render(
        node: FemNode, execution_id: str
    ) -> tuple[tuple[str, ...], dict[str, str]]:
        values = {**common, **per_node.get(node.fem_name, {})}
        marks = {
            "node_name": node.fem_name,
            "execution_id": execution_id,
            "user_id": o.user_id,
        }
        return _render(template, base, values, marks)

    def build(part: Sequence[FemNode], task_id: str) -> Converted:
        argv, env = render(part[0], o.execution_id or task_id)
        doc = {
            **fixed,
            "id": task_id,
            "nodes": [n.node for n in part],
            "command": list(argv),
            "env": env,
        }
        # SECURITY: never emit a manifest femd itself would refuse.
        task = decode_manifest(msgspec.json.encode(doc))
        if not isinstance(task, Task):  # kind is fixed above
            raise RuntimeError("fem: conversion made a non-Task manifest")
        return Converted(tuple(n.node for n in part), task)

    # One manifest per group of nodes whose command and environment are equal.
    groups: dict[bytes, list[FemNode]] = {}
    for node in nodes:
        key = msgspec.json.encode(render(node, o.execution_id or ""))
        groups.setdefault(key, []).append(node)
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
    return results


# ---------------------------------------------------------------------------
# output


def manifest_json(task: Task) -> bytes:
    """The manifest as indented JSON, for review before ``femd sign``."""
    return msgspec.json.format(encode_manifest(task), indent=2) + b"\n"


def output_paths(pattern: str | None, results: Sequence[Converted]) -> list[str | None]:
    """Where each manifest goes: ``-o`` as is, or with ``{node}`` replaced.

    ``{node}`` becomes the manifest's node ids joined by ``+``. Without ``-o``
    (or ``-o -``) a single manifest goes to stdout (None).

    Raises:
        InputError: several manifests but no ``{node}`` in ``-o``.
    """
    if len(results) == 1 and (pattern is None or "{node}" not in pattern):
        return [None if pattern in (None, "-") else pattern]
    if pattern is None or "{node}" not in pattern:
        nodes = "; ".join(", ".join(r.nodes) for r in results)
        raise InputError(
            f"import-fem: per-node values differ, so {len(results)} manifests "
            f"({cut(nodes, 120)}): give -o with a {{node}} pattern, "
            "e.g. -o task-{node}.json"
        )
    return [pattern.replace("{node}", "+".join(r.nodes)) for r in results]
