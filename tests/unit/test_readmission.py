"""A reload decides queued tasks again exactly as a fresh admission would.

A task queued under one host (profiles, probed capabilities) is decided again
on the reloaded host by ``decide_again()``: the policy rules and the launch
checks, through admission's own decision, so it ends ``rejected`` with the
same rules ``admit_here()`` would give it now.
"""

from __future__ import annotations

import msgspec
import pytest

import tests.unit.test_admission as admission_cases
import tests.unit.test_decision as table
from femd.admission import Host, admit_here
from femd.decision import Rule
from femd.policy import load_policy
from femd.readmission import decide_again
from tests.conftest import NODE, NOW

CASES = admission_cases.HOST_CASES


@pytest.mark.parametrize(("task", "caps", "rules"), CASES.values(), ids=CASES.keys())
def test_a_reload_decides_as_admission_does(
    tmp_path, keys, make_policy, task_dict, sign, task, caps, rules
):
    path = make_policy(
        tmp_path,
        keys,
        projects={table.PROJECT: {"launchers": ["podman", "process", "slurm"]}},
    )
    policy = load_policy(path)
    data = sign(task_dict(**task), *keys.values())
    # Admitted (queued) while the host could run it as asked (a reserved
    # mount target is refused on any host: such a task is never queued) ...
    full = admission_cases._host()
    gpu = msgspec.structs.replace(full.profiles["default"], name="gpu")
    before = Host(
        {**full.profiles, "gpu": gpu},
        {**full.caps, **{("gpu", n): c for (_, n), c in full.caps.items()}},
        full.work_root,
    )
    queued = admit_here(data, policy, node=NODE, now=NOW, host=before)
    assert queued.manifest is not None
    assert queued.decision.allowed == (Rule.MOUNT_RESERVED not in rules)
    # ... then the profiles or the capabilities changed (SIGHUP, re-probe).
    after = admission_cases._host(**caps)
    again = decide_again(
        queued.manifest, queued.keyids, policy,
        node=NODE, now=NOW, skew_s=300, host=after,
    )  # fmt: skip
    fresh = admit_here(data, policy, node=NODE, now=NOW, host=after)
    assert again == fresh.decision
    assert [r.rule for r in again.reasons] == rules
