"""Plain words for typed-document errors: every problem, in one pass.

msgspec stops at the first problem and speaks its own language (``Expected
`int | null`, got `str```, ``Invalid enum value 'any'``). ``problems()``
walks a decoded document against its Struct type and returns **every**
problem, each as a path and one sentence a data steward understands, with the
allowed values and a "did you mean" where that helps. Used for policies,
manifests, the agent configuration and launcher profiles.

Knows no document type; ``yamlfile`` maps the paths to lines.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from femd.errors import cut
from femd.model import explain, unknown_launcher
from femd.yamlfile import field_of, split_error

__all__ = ["Found", "first", "one_line", "problems", "reword"]

Path = list[str | int]
Found = tuple[Path, str]

_WORDS: Final[Mapping[str, str]] = {
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "bool": "true or false",
    "null": "nothing",
    "array": "a list",
    "object": "a mapping (`key: value` lines)",
    "date": "a date (YYYY-MM-DD)",
    "datetime": "a date and time (RFC 3339, e.g. 2026-11-22T10:00:00Z)",
}
_EXPECTED: Final = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
_BOUND: Final = re.compile(r"Expected `(\w+)`( of length)? (>=|<=|>|<) ([\d.e+-]+)")
_BOUND_WORDS: Final = {
    ">=": "at least",
    "<=": "at most",
    ">": "more than",
    "<": "less than",
}


def _words(kinds: str) -> str:
    """``int | null`` -> "a whole number (or nothing)"."""
    names = [k.strip() for k in kinds.split("|")]
    main = [_WORDS.get(n, n) for n in names if n != "null"]
    text = " or ".join(main) or _WORDS["null"]
    return text + (" (or leave it out)" if "null" in names and main else "")


def _shown(value: object) -> str:
    if isinstance(value, str):
        return f'"{cut(value, 60)}"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return cut(str(value).lower() if isinstance(value, bool) else str(value), 60)


def reword(message: str, value: object = None, choices: tuple[object, ...] = ()) -> str:
    """One of msgspec's messages (without its ``- at `$...``` part), in plain words.

    *value* is the value at fault when known; *choices* the allowed values of
    an enum (``Literal``).
    """
    message = explain(message)
    if m := _EXPECTED.fullmatch(message):
        want = _words(m.group(1))
        got = _words(m.group(2))
        scalar = value is not None and not isinstance(value, dict | list)
        text = (
            f"expected {want}, got {got} {_shown(value)}"
            if scalar
            else (f"expected {want}, got {got}")
        )
        if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value):
            text += " (write the number without quotes)"
        return text
    if m := _BOUND.fullmatch(message):
        bound = f"{_BOUND_WORDS[m.group(3)]} {m.group(4)}"
        if not m.group(2):
            return f"must be {bound} (got {_shown(value)})"
        one = m.group(4) == "1"
        if m.group(1) in ("array", "object"):
            unit = "entry" if one else "entries"
        else:
            unit = "character" if one else "characters"
        size = f" (got {len(value)})" if isinstance(value, str | list | dict) else ""
        return f"needs {bound} {unit}{size}"
    if message == "Expected `datetime` with a timezone component":
        return f"{_shown(value)} needs a time zone, e.g. Z (2026-11-22T10:00:00Z)"
    if message.startswith("Invalid enum value"):
        allowed = ", ".join(str(c) for c in choices)
        return f"{_shown(value)} is not allowed here; use one of: {allowed}"
    if message == "Invalid RFC3339 encoded date":
        return f"{_shown(value)} is not a date; write it as YYYY-MM-DD (2027-06-30)"
    if message == "Invalid RFC3339 encoded datetime":
        return (
            f"{_shown(value)} is not a date and time; write it in RFC 3339 "
            "(2026-11-22T10:00:00Z)"
        )
    if m := re.fullmatch(r"Object missing required field `([^`]+)`", message):
        return f"the required field `{m.group(1)}` is missing"
    return message[:1].lower() + message[1:]


def _strip(tp: Any) -> Any:  # noqa: ANN401 (a typing form)
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _options(tp: Any) -> tuple[Any, ...]:  # noqa: ANN401
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(_strip(a) for a in typing.get_args(tp))
    return (tp,)


def _is_struct(tp: Any) -> bool:  # noqa: ANN401
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _enum_choices(tp: Any) -> tuple[object, ...]:  # noqa: ANN401
    out: list[object] = []
    for opt in _options(tp):
        if typing.get_origin(opt) is Literal:
            out += typing.get_args(opt)
        elif typing.get_origin(opt) is tuple:
            out += _enum_choices(typing.get_args(opt)[0])
    return tuple(out)


def _first(e: msgspec.ValidationError) -> tuple[str, Path]:
    message, parts = split_error(str(e))
    return message, parts


def _unknown_field(key: str, known: list[str]) -> str:
    import difflib  # lazily: only a mistyped key needs it

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown field `{cut(key, 60)}`; did you mean `{close[0]}`?"
    return f"unknown field `{cut(key, 60)}` (known: {cut(', '.join(known), 160)})"


def _tagged(
    data: dict[Any, Any], structs: list[type[msgspec.Struct]]
) -> type[msgspec.Struct] | None:
    """The member of a tagged union that *data*'s tag names, if any."""
    for st in structs:
        config = st.__struct_config__
        if config.tag_field is not None and data.get(config.tag_field) == config.tag:
            return st
    return None


def _struct_problems(data: dict[Any, Any], tp: type[msgspec.Struct]) -> list[Found]:
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    tag_field = tp.__struct_config__.tag_field
    out: list[Found] = []
    for key in data:
        if key not in fields and key != tag_field:
            out.append(([str(key)], _unknown_field(str(key), list(fields))))
    for name, f in fields.items():
        if name not in data:
            if f.required:
                out.append(([name], f"the required field `{name}` is missing"))
            continue
        out += [([name, *p], m) for p, m in problems(data[name], f.type)]
    return out


def _unregistered(data: object, tp: Any) -> list[Found]:  # noqa: ANN401
    """Launcher names (``model.LauncherName``) the registry does not have.

    Well-typed, yet refused by the Struct holding them: found here too, so
    the problem is named at the item, with every other problem.
    """
    if isinstance(data, str):
        metas = typing.get_args(tp)[1:] if typing.get_origin(tp) else ()
        marked = any(
            isinstance(m, msgspec.Meta) and (m.extra or {}).get("registry")
            for m in metas
        )
        unknown = unknown_launcher([data]) if marked else None
        return [] if unknown is None else [([], unknown[1])]
    if isinstance(data, list) and typing.get_origin(tp) in (tuple, list):
        item_t = typing.get_args(tp)[0]
        return [
            ([i, *p], m)
            for i, v in enumerate(data)
            for p, m in _unregistered(v, item_t)
        ]
    return []


def problems(data: object, tp: Any) -> list[Found]:  # noqa: ANN401 (a typing form)
    """Every problem of *data* as a value of type *tp*, in plain words.

    Empty when ``msgspec.convert(data, tp, strict=True)`` accepts it. Where a
    problem cannot be split further (a check across fields), msgspec's own
    first message, reworded, is returned.
    """
    try:
        msgspec.convert(data, tp, strict=True)
    except msgspec.ValidationError as e:
        first_message, first_path = _first(e)
    else:
        return _unregistered(data, tp)
    found: list[Found] = []
    opts = _options(tp)
    structs = [o for o in opts if _is_struct(o)]
    if isinstance(data, dict) and structs:
        chosen = structs[0] if len(structs) == 1 else _tagged(data, structs)
        if chosen is not None:
            found = _struct_problems(data, chosen)
        elif (field := structs[0].__struct_config__.tag_field) is not None:
            tags = ", ".join(str(st.__struct_config__.tag) for st in structs)
            if field in data:
                text = f"{_shown(data[field])} is not allowed here; use one of: {tags}"
            else:
                text = f"the required field `{field}` is missing; use one of: {tags}"
            found = [([field], text)]
    elif isinstance(data, dict):
        for o in opts:
            if typing.get_origin(o) is dict:
                key_t, value_t = typing.get_args(o)
                for k, v in data.items():
                    found += [([str(k), *p], m) for p, m in problems(k, key_t)]
                    found += [([str(k), *p], m) for p, m in problems(v, value_t)]
                break
    elif isinstance(data, list):
        for o in opts:
            if typing.get_origin(o) in (tuple, list) and (
                typing.get_origin(o) is list or typing.get_args(o)[-1] is Ellipsis
            ):
                item_t = typing.get_args(o)[0]
                for i, v in enumerate(data):
                    found += [([i, *p], m) for p, m in problems(v, item_t)]
                break
    if found:
        return found
    value: object = data
    for part in first_path:
        try:
            value = value[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    choices = _enum_choices(tp) if not first_path else ()
    if choices and structs:  # e.g. `network: none` or `network: {egress: [...]}`
        keys = ", ".join(
            f"`{f.encode_name}`" for f in msgspec.structs.fields(structs[0])
        )
        choices = (*choices, f"or a mapping with {keys}")
    if not first_path and "matching regex" in first_message:
        first_message = _pattern_words(tp, value) or first_message
    return [(first_path, reword(first_message, value, choices))]


_ALTERNATIVES: Final = re.compile(r"\^\(\?:([\w|.-]+)\)\$(?:\(\?!\\n\))?")


def _pattern_words(tp: Any, value: object) -> str | None:  # noqa: ANN401
    """A pattern-constrained string's own description, or its alternatives."""
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) else ():
        if not isinstance(meta, msgspec.Meta) or not meta.pattern:
            continue
        if m := _ALTERNATIVES.fullmatch(meta.pattern):
            allowed = ", ".join(m.group(1).split("|"))
            return f"{_shown(value)} is not allowed here; use one of: {allowed}"
        if meta.description:
            text = meta.description.rstrip(".")
            return f"expected {text[:1].lower()}{text[1:]}, got {_shown(value)}"
    return None


def one_line(data: object, tp: Any, fallback: str = "") -> str:  # noqa: ANN401
    """Every problem of *data* as a *tp*, on one line: ``field: problem; ...``.

    At most three are spelled out, then how many more; *fallback* when the
    walk finds none (a decoder stricter than ``convert``).
    """
    found = problems(data, tp)
    if not found:
        return fallback
    shown = [f"{field_of(p)}: {m}" if p else m for p, m in found[:3]]
    more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
    return cut("; ".join(shown), 400) + more


def first(data: object, tp: Any, error: msgspec.ValidationError) -> Found:  # noqa: ANN401
    """The first problem in plain words (msgspec's own *error* if none is found)."""
    found = problems(data, tp)
    if found:
        return found[0]
    message, parts = split_error(explain(str(error)))
    return parts, reword(message)
