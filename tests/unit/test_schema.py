"""The shipped policy JSON Schema and the example policies."""

import json
import re
from pathlib import Path

import msgspec
import pytest

from femd.policy import Policy, lint, lint_file, load_policy, policy_schema
from femd.yamlfile import load_yaml

POLICIES = Path(__file__).parent.parent.parent / "policies"
EXAMPLES = sorted(POLICIES.glob("*.yaml"))


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_shipped_schema_is_the_generated_one():
    # Regenerate with: femd policy schema > policies/schema.json
    shipped = (POLICIES / "schema.json").read_text()
    assert shipped == json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def test_schema_describes_every_policy_type_for_stewards():
    schema = policy_schema()
    assert schema["$ref"] == "#/$defs/Policy"
    defs = schema["$defs"]
    assert {
        "Policy",
        "Project",
        "Signer",
        "Dataset",
        "MaxResources",
        "Defaults",
    } <= set(defs)
    for name, d in defs.items():
        assert d.get("description"), name
        assert d["additionalProperties"] is False, name
        assert "\n    " not in d["description"], name  # dedented on every Python


def test_schema_patterns_are_anchored_and_compile():
    patterns = [n["pattern"] for n in _walk(policy_schema()) if "pattern" in n]
    assert patterns
    for p in patterns:
        assert p.startswith("^(?:")
        assert p.endswith("$(?!\\n)")
        re.compile(p)


def test_schema_requires_kind_and_node():
    assert set(policy_schema()["$defs"]["Policy"]["required"]) >= {
        "apiVersion",
        "kind",
        "node",
    }


def test_there_are_example_policies():
    assert {p.stem for p in EXAMPLES} >= {"lab-analysis", "heart-failure", "fl-client"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_policy_validates_and_lints_clean(path):
    data, _ = load_yaml(path.read_bytes())
    policy = msgspec.convert(data, Policy, strict=True)
    assert lint(policy) == []
    assert lint_file(path) == []
    loaded = load_policy(path)
    assert set(loaded.policy.signers) == {k.name for k in loaded.keys.values()}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_policy_points_editors_at_the_schema(path):
    assert path.read_text().startswith(
        "# yaml-language-server: $schema=./schema.json\n"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_policy_is_commented_for_stewards(path):
    comments = [ln for ln in path.read_text().splitlines() if "#" in ln]
    assert len(comments) >= 8
