"""Write femd(1) in roff from the CLI's own argparse definitions (build time).

    python packaging/deb/manpage.py VERSION DATE > femd.1

Generated at package build so the manual never drifts from ``femd --help``:
every subcommand (nested ones too), its usage line, its arguments and help.
"""

from __future__ import annotations

import argparse
import sys

from femd.cli import _parser


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _subparsers(p: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:  # type: ignore[type-arg]
    return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]


def _commands(
    p: argparse.ArgumentParser, prefix: str
) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for sub in _subparsers(p):
        helps = {c.dest: c.help or "" for c in sub._choices_actions}
        for name, child in sub.choices.items():
            full = f"{prefix} {name}".strip()
            if _subparsers(child):
                out += _commands(child, full)
            else:
                out.append((full, helps.get(name, ""), child))
    return out


def _options(p: argparse.ArgumentParser) -> list[str]:
    formatter = p._get_formatter()
    out = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if a.option_strings:
            spec = ", ".join(a.option_strings)
            if a.nargs != 0:
                spec += " " + (a.metavar or a.dest.upper())
        else:
            spec = str(a.metavar or a.dest)
        text = formatter._expand_help(a) if a.help else ""
        out.append(f".TP\n.B {_roff(spec)}\n{_roff(text)}")
    return out


def render(version: str, date: str) -> str:
    """The whole manual page."""
    p = _parser()
    head = [
        f'.TH FEMD 1 "{date}" "femd {version}" "User Commands"',
        ".SH NAME",
        "femd \\- " + _roff(p.description or ""),
        ".SH SYNOPSIS",
        ".B femd",
        "[\\fB\\-\\-version\\fR] [\\fB\\-v\\fR] \\fICOMMAND\\fR ...",
        ".SH DESCRIPTION",
        "femd runs on a federated data node: it pulls signed tasks from a "
        "RabbitMQ broker over mutual TLS, verifies them against the node's "
        "policy, runs them in a sandbox and reports the results. Errors are one "
        "line on standard error. Exit status: 0 ok or allow, 1 deny (or, for "
        "\\fBdoctor\\fR, a failed check), 2 invalid input.",
        ".SH OPTIONS",
        *_options(p),
        ".SH COMMANDS",
    ]
    body = []
    for name, summary, child in _commands(p, ""):
        usage = child.format_usage().removeprefix("usage: ").strip()
        body += [
            f".SS {_roff(name)}",
            _roff(summary[:1].upper() + summary[1:] + "."),
            ".PP",
            ".nf",
            _roff(" ".join(usage.split())),
            ".fi",
            *_options(child),
        ]
    tail = [
        ".SH FILES",
        ".TP",
        ".I /etc/femd/femd.yaml",
        "the agent configuration",
        ".TP",
        ".I /etc/femd/policy.yaml",
        "the data steward's policy",
        ".SH SEE ALSO",
        ".BR journalctl (1),",
        ".BR systemctl (1);",
        "/usr/share/doc/femd/operator.md",
    ]
    return "\n".join(head + body + tail) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1], sys.argv[2]))
