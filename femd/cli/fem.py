"""``femd import-fem``: FEM task templates to femd manifests.

Owns the command's arguments and its per-manifest output lines; the
conversion is ``femd.fem``'s.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from femd.cli.console import Subcommands, read_input, write_output

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``import-fem`` to the ``femd`` parser."""
    s = sub.add_parser(
        "import-fem", help="orchestrator: FEM task template -> femd manifests"
    )
    s.add_argument("template", help="FEM task template (JSON)")
    s.add_argument("--tool", metavar="TOOL_PLAN", help="FEM tool plan (JSON)")
    s.add_argument("--params", help="FEM parametric args (JSON), per-node sections")
    s.add_argument("--node", action="append", required=True, metavar="[FEM_NAME=]NODE")
    s.add_argument("--project", required=True, help="femd project of the task")
    s.add_argument("--image-digest", metavar="sha256:HEX", help="pins the image")
    s.add_argument("--commit", metavar="SHA", help="pins source_code (full id)")
    s.add_argument("--dataset", action="append", default=[], metavar="NAME=MOUNT")
    s.add_argument("--output-dir", default="/out", help="output dir (default /out)")
    s.add_argument("--code", metavar="MOUNT", help="the FEM volume that held the code")
    s.add_argument("--egress", action="append", default=[], metavar="HOST:PORT")
    s.add_argument("--ingress", action="append", default=[], metavar="PORT")
    s.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for $NAME"
    )
    s.add_argument("--runtime", help="a runtime the nodes' policies name")
    s.add_argument("--launcher", choices=["podman", "process"], default="podman")
    s.add_argument("--profile", default="default", help="launcher profile name")
    s.add_argument("--expires-in", default="24h", help="validity (default 24h)")
    s.add_argument("--execution-id", help="%%%%execution_id%%%% (default: task id)")
    s.add_argument("--user-id", help="value of %%%%user_id%%%%")
    s.add_argument("--issuer", help="the manifest's issuer")
    s.add_argument("-o", "--output", help="manifest file, or a {node} pattern")
    s.set_defaults(func=_cmd_import_fem)


def _cmd_import_fem(args: argparse.Namespace) -> int:
    from femd import fem

    tool = params = None
    template = fem.decode_template(read_input(args.template, "fem template"))
    if args.tool:
        tool = fem.decode_tool_plan(read_input(args.tool, "fem tool plan"))
    if args.params:
        params = fem.decode_params(read_input(args.params, "fem params"))
    options = fem.FemOptions(
        nodes=tuple(fem.parse_node(n) for n in args.node),
        project=args.project,
        issued_at=datetime.now(UTC).replace(microsecond=0),
        expires_in_s=fem.parse_duration(args.expires_in),
        launcher=args.launcher,
        profile=args.profile,
        issuer=args.issuer,
        image_digest=args.image_digest,
        commit=args.commit,
        datasets=tuple(fem.parse_dataset(d) for d in args.dataset),
        output_dir=args.output_dir,
        code_dir=args.code,
        egress=tuple(args.egress),
        ingress=tuple(fem.parse_port(p) for p in args.ingress),
        env=tuple(fem.parse_env(e) for e in args.env),
        runtime=args.runtime,
        execution_id=args.execution_id,
        user_id=args.user_id,
    )
    try:
        conversion = fem.convert(template, options, tool=tool, params=params)
    except fem.FemImportError as e:
        # Like `policy lint`: every problem, one line each, with its fix.
        for problem in e.problems:
            print(f"femd: error: import-fem: {problem}", file=sys.stderr)
        return e.exit_code
    for note in conversion.notes:
        print(f"femd: note: import-fem: {note}", file=sys.stderr)
    results = conversion.manifests
    paths = fem.output_paths(args.output, results)
    for path, r in zip(paths, results, strict=True):
        write_output(path, fem.manifest_json(r.task))
        if path is not None:
            print(f"{path} {r.task.id} {','.join(r.nodes)}")
    return 0
