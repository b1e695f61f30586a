"""Task states, rule ids and broker names are spelled in one place each."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args, get_type_hints

from femd import broker, orchestrator, state
from femd.decision import EventRule, Rule
from femd.events import (
    EVENTS_EXCHANGE,
    EVENTS_QUEUE,
    RESULTS_EXCHANGE,
    STATES,
    TERMINAL_STATES,
    TaskState,
)
from femd.launchers import Outcome

FEMD = Path(__file__).resolve().parents[2] / "femd"
# The shape of a rule id: `area.name` (e.g. `input.envelope`, `task.failed`).
RULE_ID = re.compile(r"^(input|task|agent|signature|signer|manifest|node|project"
                     r"|launcher|mount|image|git|dataset|runtime|resources|network"
                     r"|outputs)\.[a-z_]+$")  # fmt: skip


def test_terminal_states_are_task_states():
    assert {
        "rejected", "succeeded", "failed", "timed_out", "cancelled"
    } == TERMINAL_STATES  # fmt: skip
    assert TERMINAL_STATES < STATES == set(TaskState)
    assert state.TERMINAL_STATES is TERMINAL_STATES
    assert orchestrator.TERMINAL is TERMINAL_STATES


def test_every_way_a_task_ends_has_a_rule():
    ends = set(get_args(get_type_hints(Outcome)["state"])) - {"succeeded"}
    assert {EventRule.ended(s).value for s in ends} == {
        "task.failed", "task.timed_out", "task.cancelled"
    }  # fmt: skip


def test_broker_names_are_one_set():
    assert broker.EVENTS_EXCHANGE is EVENTS_EXCHANGE
    assert state.RESULTS_EXCHANGE is RESULTS_EXCHANGE
    assert orchestrator.EVENTS_QUEUE is EVENTS_QUEUE


def test_rule_ids_are_written_only_in_their_enums():
    """No module but rules.py spells a rule id as a string literal."""
    known = {r.value for r in Rule} | {r.value for r in EventRule}
    found = []
    for path in sorted(FEMD.rglob("*.py")):
        if path.name == "rules.py" and path.parent == FEMD:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and RULE_ID.match(node.value)
                and node.value in known
            ):
                found.append(f"{path.relative_to(FEMD)}:{node.lineno}: {node.value}")
    assert found == []
