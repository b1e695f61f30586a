"""The wire's JSON Schemas in docs/ are the ones the Structs generate."""

import json
from pathlib import Path

import msgspec
import pytest

from femd.events import NodeStatus, StatusEvent, wire_schemas

DOCS = Path(__file__).parent.parent.parent / "docs"


@pytest.mark.parametrize("name", sorted(wire_schemas()))
def test_shipped_schema_is_the_generated_one(name: str):
    # Regenerate with: .venv/bin/python -c 'import json, pathlib, femd.events as e;
    # [pathlib.Path("docs", n).write_text(json.dumps(s, indent=2, sort_keys=True)
    #  + "\n") for n, s in e.wire_schemas().items()]'
    shipped = (DOCS / name).read_text()
    assert shipped == json.dumps(wire_schemas()[name], indent=2, sort_keys=True) + "\n"


def test_every_message_type_is_described_for_readers():
    for schema in wire_schemas().values():
        for name, d in schema["$defs"].items():
            if "enum" in d:
                continue
            assert d.get("description"), name
            assert "\n    " not in d["description"], name


def test_a_status_event_as_a_node_sends_it_decodes_to_the_struct():
    body = {
        "node": "fdn-01", "task_id": "t1", "state": "succeeded",
        "at": "2026-11-22T10:00:03.000250Z", "seq": 9, "event_seq": 4,
        "exit_code": 0,
        "outputs": {"sha256": "ef" * 32, "bytes": 1234, "chunks": 1},
        "usage": {"cpu_s": 1.5, "wall_s": 2.0},
        "log_tail": "done\n", "started_at": "2026-11-22T10:00:01.000000Z",
        "network": [{"direction": "egress", "destination": "h:443",
                     "connections": 1}],
    }  # fmt: skip
    event = msgspec.json.decode(json.dumps(body), type=StatusEvent)
    assert msgspec.json.decode(msgspec.json.encode(event)) == body
    # Absent optional fields stay absent: the bytes say only what is known.
    bare = msgspec.json.decode(
        b'{"node":"n","task_id":"unverified","state":"rejected","at":"t","seq":1}',
        type=StatusEvent,
    )
    assert set(msgspec.to_builtins(bare)) == {"node", "task_id", "state", "at", "seq"}


def test_node_status_requires_every_field():
    required = set(wire_schemas()["node-status.schema.json"]["$defs"]["NodeStatus"]
                   ["required"])  # fmt: skip
    assert required == set(NodeStatus.__struct_fields__)
