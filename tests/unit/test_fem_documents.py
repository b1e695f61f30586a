"""FEM's own documents (``../shared/fem``, as FEM serves them) through import-fem.

Every file there is decoded; every task template converts with the fixes its
problems name (golden manifests in tests/data/fem/golden), and without them is
refused with *all* its problems, each with its fix (golden too). A new file in
``shared/fem`` that no case covers fails here. Set ``FEMD_UPDATE_GOLDEN=1`` to
rewrite the golden files after a deliberate change, and review the diff.
"""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from femd import fem

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "fem"  # CI lays shared/ beside the clone
GOLDEN = REPO / "tests" / "data" / "fem" / "golden"
ISSUED = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "5e" * 32
COMMIT = "4f9c2b1e8d7a6c5b4a39281706f5e4d3c2b1a098"
CERTS = "/app/config/certificates"

BSC, UB2, UB3 = (fem.FemNode(n, f"fdn-{n.lower()}") for n in ("BSC", "UB2", "UB3"))

# template -> (tool plan, params, nodes, the fixes its problems name)
CASES: dict[str, tuple[str | None, str | None, tuple[fem.FemNode, ...], dict[str, Any]]]
CASES = {
    "flcore-server.task.json": ("flcore.tool.json", "flcore.params.json", (BSC,), {
        "image_digest": DIGEST, "commit": COMMIT, "code_dir": "/flcore",
        "output_dir": "/sandbox", "datasets": (("flower-tls", CERTS),),
        "ingress": (4433,),
        "env": (("FLOWER_SSL_CACERT", f"{CERTS}/ca.pem"),
                ("FLOWER_SSL_SERVER_CERT", f"{CERTS}/server.pem"),
                ("FLOWER_SSL_SERVER_KEY", f"{CERTS}/server.key"),
                ("NODE_NAME", "%%node_name%%")),
    }),
    "flcore-client.task.json": (
        "flcore.tool.json", "flcore.params.json", (BSC, UB2), {
            "image_digest": DIGEST, "commit": COMMIT, "code_dir": "/flcore",
            "output_dir": "/sandbox", "datasets": (("cohort", "/data"),),
            "env": (("CENTRAL_SERVER_IP", "fl-server.bsc.example"),
                    ("FLOWER_SSL_CACERT", f"{CERTS}/ca.pem"),
                    ("NODE_NAME", "%%node_name%%")),
        },
    ),
    "health-check.task.json": ("health-check.tool.json", None, (BSC, UB2, UB3), {
        "image_digest": DIGEST, "datasets": (("cohort", "/data"),),
    }),
    "gen1-template.task.json": (None, None, (BSC,), {
        "image_digest": DIGEST, "output_dir": "/sandbox",
        "datasets": (("cohort", "/data"),), "env": (("DATA_PATH", "/data"),),
    }),
}  # fmt: skip
OTHERS = {"flcore.tool.json", "flcore.params.json", "health-check.tool.json"}


def read(name: str) -> bytes:
    if not SHARED.is_dir():
        pytest.fail(f"FEM's documents are missing: {SHARED} (shared/ beside the repo)")
    return (SHARED / name).read_bytes()


def run(name: str, fixes: dict[str, Any]) -> fem.Conversion:
    tool_name, params_name, nodes, _ = CASES[name]
    counter = itertools.count(1)
    options = fem.FemOptions(
        nodes=nodes,
        project="dt4h-flcore",
        issued_at=ISSUED,
        new_id=lambda: f"{name.split('.')[0]}-{next(counter)}",
        **fixes,
    )
    return fem.convert(
        fem.decode_template(read(name)),
        options,
        tool=fem.decode_tool_plan(read(tool_name)) if tool_name else None,
        params=fem.decode_params(read(params_name)) if params_name else None,
    )


def golden(path: Path, text: str) -> None:
    if os.environ.get("FEMD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with FEMD_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"differs from {path.name}"


def test_every_shared_document_is_covered():
    assert sorted(p.name for p in SHARED.glob("*.json")) == sorted({*CASES, *OTHERS})
    for name in OTHERS:
        decode = fem.decode_params if "params" in name else fem.decode_tool_plan
        decode(read(name))  # decodes as FEM serves it, descriptive fields and all


@pytest.mark.parametrize("name", sorted(CASES))
def test_converts_with_the_fixes_its_problems_name(name):
    conversion = run(name, CASES[name][3])
    manifests = [json.loads(fem.manifest_json(r.task)) for r in conversion.manifests]
    doc = {"manifests": manifests, "notes": list(conversion.notes)}
    golden(GOLDEN / name.replace(".json", ".manifests.json"),
           json.dumps(doc, indent=2) + "\n")  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_without_fixes_every_problem_is_listed_with_its_fix(name):
    with pytest.raises(fem.FemImportError) as e:
        run(name, {})
    lines = [str(p) for p in e.value.problems]
    # each fix given above answers one problem or more: all are listed at once
    assert all(p.fix for p in e.value.problems if "image" in p.message)
    golden(GOLDEN / name.replace(".json", ".problems.txt"), "\n".join(lines) + "\n")
