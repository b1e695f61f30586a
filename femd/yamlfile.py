"""Strict YAML reading shared by the policy, the config and launcher profiles.

Owns the duplicate-refusing YAML loader and the mapping of msgspec's
``$.a.b[0]`` error paths back to ``file:line``. Knows no document types.
"""

from __future__ import annotations

import re
from typing import Any, Final

import yaml

from femd.errors import cut

__all__ = [
    "ANY_KEY",
    "KEY",
    "YamlError",
    "field_of",
    "line_of",
    "load_yaml",
    "split_error",
]

MAX_YAML_BYTES = 1024 * 1024


class YamlError(ValueError):
    """The text is not acceptable YAML; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        """Keep the message and the line."""
        super().__init__(message)
        self.message = message
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, anchors and aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401 (PyYAML API)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise YamlError(
                "anchors and aliases are not allowed", event.start_mark.line + 1
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: ANN401
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise YamlError(
                    "a mapping key must be a scalar", key_node.start_mark.line + 1
                )
            if key in seen:
                raise YamlError(
                    f"duplicate key {cut(key)!r}", key_node.start_mark.line + 1
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: bytes) -> tuple[Any, Any]:
    """Parse one YAML document strictly; return (data, composed node tree).

    Raises:
        YamlError: too large, not UTF-8, not YAML, several documents, a
            duplicate key, or an anchor/alias.
    """
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(f"too large (got {len(text)} bytes, limit {MAX_YAML_BYTES})")
    try:
        decoded = text.decode("utf-8")
        node = yaml.compose(decoded, Loader=_StrictLoader)
        loader = _StrictLoader(decoded)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise YamlError("not UTF-8 text") from e
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        problem: str = e.problem or e.context or "invalid YAML"
        if e.context and problem.startswith("but "):  # "expected X, but found Y"
            problem = f"{e.context}, {problem}"
        raise YamlError(_plain_yaml(problem), line) from e
    except yaml.YAMLError as e:
        raise YamlError(cut(e, 120)) from e
    except RecursionError as e:
        raise YamlError("nests too deeply") from e
    return data, node


# PyYAML's problems in a steward's words (first match wins).
_YAML_WORDS: Final = (
    (
        "expected <block end>",
        "this line is indented differently from the lines above it: keys at "
        "the same level need the same number of spaces",
    ),
    (
        "mapping values are not allowed",
        "a `: ` where YAML does not expect one: check the indentation, or put "
        "the value in quotes",
    ),
    ("'\\t'", "a tab character: indent YAML with spaces"),
    (
        "could not find expected ':'",
        "a line that is not `key: value` (a missing `:`, or a quote not closed?)",
    ),
    ("expected ',' or ']'", "a list opened with `[` is not closed with `]`"),
    ("expected ',' or '}'", "a mapping opened with `{` is not closed with `}`"),
    ("found unexpected end of stream", "a quote is not closed"),
    (
        "expected a single document",
        "a second YAML document (`---`): one document per file",
    ),
)
_TAG: Final = re.compile(r"could not determine a constructor for the tag '([^']*)'")


def _plain_yaml(problem: str) -> str:
    """PyYAML's *problem* as one sentence a steward understands."""
    if m := _TAG.search(problem):
        tag = m.group(1).removeprefix("tag:yaml.org,2002:")
        return (
            f"the YAML tag `{cut(tag, 60)}` is not allowed: femd reads plain "
            "YAML (no `!tags`, no `<<` merge keys)"
        )
    for needle, words in _YAML_WORDS:
        if needle in problem:
            return words
    return f"not valid YAML: {cut(problem, 120)}"


# msgspec never names a dict key in its paths: `$.projects[...].threshold` (some
# entry's value) or "at `key` in `$.projects`" (some key itself). These parts
# stand for them; a caller that knows the data can find the entry at fault.
ANY_KEY: Final = "[...]"
KEY: Final = "[key]"

_PATH = re.compile(r" - at (`key` in )?`\$((?:\.[^.`\[]+|\[\d+\]|\[\.\.\.\])*)`$")
_PART = re.compile(r"\.([^.`\[]+)|\[(\d+)\]|(\[\.\.\.\])")


def split_error(message: str) -> tuple[str, list[str | int]]:
    """Split msgspec's "message - at `$.a.b[0]`" into (message, path parts).

    A dict entry msgspec does not name is ``ANY_KEY``; a bad dict key is a
    final ``KEY`` part.
    """
    m = _PATH.search(message)
    if not m:
        return message, []
    parts: list[str | int] = [
        key if key else int(idx) if idx else ANY_KEY
        for key, idx, _ in _PART.findall(m.group(2))
    ]
    if m.group(1):
        parts.append(KEY)
    return message[: m.start()], parts


def field_of(parts: list[str | int]) -> str:
    """Return a dotted field name (``projects.x.signers[1]``) for path parts."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in (ANY_KEY, KEY):
            out += p
        else:
            out += f".{p}" if out else p
    return out


def line_of(node: Any, parts: list[str | int]) -> tuple[int | None, int]:  # noqa: ANN401
    """Return (1-based line of the deepest node on *parts*, how many parts matched)."""
    if node is None:
        return None, 0
    line = node.start_mark.line + 1
    depth = 0
    for part in parts:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    line = key_node.start_mark.line + 1
                    nxt = value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
        depth += 1
    return line, depth
