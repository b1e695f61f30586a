"""FEM command lines, arguments and placeholders, rendered as an argv list.

Owns what FEM assembled as strings and femd runs without a shell:
``command.base`` split into words (shell syntax that would silently change
meaning is refused), typed ``command.args`` rendered in ``position`` order,
``%%node_name%%``/``%%execution_id%%``/``%%user_id%%`` placeholders, and
``$NAME`` references to FEM's client environment (replaced by ``--env`` values,
refused otherwise). Raises ``Refusal`` naming the construct and its fix.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from typing import Final

from femd.errors import cut
from femd.fem.documents import FemArg, Scalar
from femd.fem.options import Refusal

__all__ = ["KNOWN_PLACEHOLDERS", "expand", "render_arg", "split_base", "substitute"]

_ENV_REF: Final = re.compile(
    r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{[^}]*\}?|\(|[0-9@*#?$!-])"
)
_PLACEHOLDER: Final = re.compile(r"%%([A-Za-z0-9_]*)%%")
KNOWN_PLACEHOLDERS: Final = ("node_name", "execution_id", "user_id")


def substitute(text: str, where: str, env: Mapping[str, str], used: set[str]) -> str:
    """Replace ``$NAME``/``${NAME}`` by ``--env`` values; refuse the others.

    Raises:
        Refusal: a reference with no ``--env`` value (the fix names the flag),
            or a shell construct such as ``$(...)``.
    """
    out: list[str] = []
    last = 0
    for m in _ENV_REF.finditer(text):
        name = m.group(1) or m.group(2)
        if name is None:
            raise Refusal(
                f"{where}: `{cut(m.group(0), 40)}` is shell syntax: refused "
                "(femd runs no shell)"
            )
        if name not in env:
            raise Refusal(
                f"{where}: `${name}` is read from FEM's client environment, "
                "which a femd node does not hand to tasks",
                f"--env {name}=VALUE",
            )
        used.add(name)
        out += [text[last : m.start()], env[name]]
        last = m.end()
    return "".join([*out, text[last:]])


def expand(text: str, where: str, values: Mapping[str, str | None]) -> str:
    """Replace ``%%name%%`` placeholders by *values*.

    Raises:
        Refusal: an unknown placeholder, or one with no value.
    """

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            known = ", ".join(f"%%{k}%%" for k in KNOWN_PLACEHOLDERS)
            raise Refusal(
                f"{where}: unknown placeholder `{cut(m.group(0), 40)}` (known: {known})"
            )
        value = values[key]
        if value is None:
            raise Refusal(
                f"{where}: `%%{key}%%` has no value", f"--{key.replace('_', '-')}"
            )
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


def _refuse_shell(base: str, where: str) -> None:
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
            raise Refusal(
                f"{where}: {what} refused: femd runs the command as an argv "
                "list, not through a shell (it would silently become a literal "
                f"argument); got {cut(base)!r}"
            )
        word_start = state is None and c in " \t"
        i += 1


def split_base(
    base: str, where: str, env: Mapping[str, str], used: set[str]
) -> list[str]:
    """Split a FEM command line into argv words, without a shell.

    Raises:
        Refusal: shell syntax, an unresolved ``$NAME``, unbalanced quotes, empty.
    """
    # SECURITY: issue 7: no `$VAR` passthrough, and no shell syntax that would
    # silently change meaning once the argv is executed without a shell.
    _refuse_shell(base, where)
    try:
        words = shlex.split(base, posix=True)
    except ValueError as e:
        raise Refusal(f"{where}: {str(e).lower()} (got {cut(base)!r})") from e
    if not words:
        raise Refusal(f"{where}: empty command")
    return [substitute(w, where, env, used) for w in words]


_INT: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOLS: Final = {"true": True, "True": True, "false": False, "False": False}


def is_float(text: str) -> bool:
    """Whether *text* is a plain decimal or exponent number."""
    return _FLOAT.fullmatch(text) is not None


def _typed(arg: FemArg, value: str | int | float | bool, where: str) -> str | bool:
    """*value* checked against ``arg.type``; a bool stays a bool, others render."""
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
        raise Refusal(
            f"{where}: type {cut(arg.type, 40)!r} refused (expected int, float, str "
            "or bool; femd never evaluates literals)"
        )
    if ok is None:
        raise Refusal(f"{where}: expected {arg.type} (got {cut(repr(value))})")
    return ok


def render_arg(
    arg: FemArg,
    value: Scalar,
    marks: Mapping[str, str | None],
    env: Mapping[str, str],
    used: set[str],
) -> list[str]:
    """Render one argument as argv words (none when unset and not required).

    Raises:
        Refusal: required but unset, a wrong type, an unsafe prefix.
    """
    where = f"command.args `{cut(arg.id, 40)}`"
    if value is None or value == "":
        if arg.required:
            raise Refusal(
                f"{where}: required but has no value (no default_value, no parameter)",
                f"a params value for {cut(arg.id, 40)!r}",
            )
        return []
    prefix = arg.prefix or ""
    if "$" in prefix or any(c.isspace() for c in prefix):
        raise Refusal(
            f"{where}: prefix {cut(prefix)!r} has `$` or whitespace "
            "(one argument here, several in a shell)"
        )
    if isinstance(value, str):
        value = expand(substitute(value, where, env, used), where, marks)
    rendered = _typed(arg, value, where)
    if isinstance(rendered, bool):
        if not prefix:
            raise Refusal(
                f"{where}: a bool argument needs a prefix "
                "(it is rendered as a flag when true)"
            )
        return [prefix] if rendered else []
    if not prefix:
        return [rendered]
    return [prefix, rendered] if arg.separate else [prefix + rendered]
