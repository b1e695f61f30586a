"""The ``slurm`` launcher end to end on a real Slurm cluster (issue 19).

Every task goes through the broker to a real agent (``python -m femd run``),
becomes a batch job of a private Slurm cluster (``testbed.slurm``: slurmctld,
slurmd with cgroup limits, slurmdbd for ``sacct``) and runs on its compute node
in the bubblewrap sandbox. A job's sandbox has no network (femd's forwarders
cannot reach a compute node), so executions are counted by Slurm itself
(``Jobs``: the controller's record of jobs that started, per task), not by what
femd reports; tasks note their first instruction's time in ``/out/.started``.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testbed.slurm import SlurmCluster  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    TASK_USER,
    NodeEnv,
    check_runs,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture under `slurm_env`)
    wait_for,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap, pytest.mark.slurm]

SLURM = {"launcher": "slurm", "network": {"mode": "none"}}
STARTED = "date +%s.%N > /out/.started"


def slurm_task(env: NodeEnv, tid: str, then: str = "", **fields: object) -> bytes:
    """A signed task without network that notes when it started, as a job."""
    script = f"{STARTED}; {then}" if then else STARTED
    command = ["/bin/bash", "-c", script]
    return env.sign(env.manifest(tid, command, **(SLURM | fields)))


class Jobs:
    """The cluster's own witness of executions: jobs that started, per task.

    Read from the controller (``squeue --states=all``, which keeps finished jobs
    for MinJobAge), which knows at once; slurmdbd lags a few seconds.
    """

    def __init__(self, cluster: SlurmCluster) -> None:
        self.cluster = cluster

    def _rows(self) -> list[list[str]]:
        out = self.cluster.run("squeue", "-h", "--states=all", "-o", "%j|%S|%T").stdout
        return [line.split("|") for line in out.splitlines() if line]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, start, state in self._rows():
            if name.startswith("femd-") and state != "PENDING" and start != "N/A":
                counts[name[5:]] = counts.get(name[5:], 0) + 1
        return counts

    def count(self, task_id: str) -> int:
        return self.counts().get(task_id, 0)

    def running(self, tid: str) -> bool:
        return [f"femd-{tid}", "RUNNING"] in [[r[0], r[2]] for r in self._rows()]


def _files(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {
            m.name: (tar.extractfile(m) or io.BytesIO()).read()
            for m in tar.getmembers()
            if m.isfile()
        }


def _sacct(cluster: SlurmCluster, name: str) -> list[str]:
    """``JobID|State|User`` of the jobs named *name* in the accounting database.

    slurmdbd answers a query by name a few seconds after the same job by id:
    wait (up to 15 s) for at least one row.
    """

    def rows() -> list[str]:
        return cluster.run(
            "sacct", "-a", "-X", "-n", "-P", f"--name={name}", "-o", "JobID,State,User"
        ).stdout.splitlines()

    return wait_for(f"sacct to know {name}", rows, 15, every_s=0.5)  # type: ignore[no-any-return]


def test_task_runs_as_a_job_with_the_process_launchers_events(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env
    events = env.collect()
    agent = env.start_agent()
    work = "echo hello > /out/greeting.txt; cat /proc/self/cgroup > /out/cgroup"
    latency: dict[str, list[float]] = {"process": [], "slurm": []}
    for i in range(3):
        for launcher in ("process", "slurm"):
            tid = f"{launcher}-{i}"
            sent = time.time()
            env.publish(slurm_task(env, tid, work, launcher=launcher))
            events.await_terminal([tid], 60)
            started = float(_files(events.outputs(tid))[".started"])
            latency[launcher].append(started - sent)
    ends = check_runs(events, Jobs(slurm_cluster), [f"slurm-{i}" for i in range(3)])
    assert set(ends.values()) == {"succeeded"}, ends
    for i in range(3):
        proc, job = events.of(f"process-{i}"), events.of(f"slurm-{i}")
        # The same events, field for field, but Slurm's accounting.
        assert [e["state"] for e in proc] == [e["state"] for e in job]
        assert [set(e) for e in proc] == [set(e) - {"accounting"} for e in job]
        acct = job[-1]["accounting"]
        assert acct["node"] == slurm_cluster.node
        assert acct["state"] == "COMPLETED"
        assert acct["exit_code"] == 0
        assert acct["job_id"].isdigit()
        assert {"elapsed_s", "cpu_s", "max_rss_kb"} <= set(acct)
        files = _files(events.outputs(f"slurm-{i}"))
        assert files["greeting.txt"] == b"hello\n"
        # It ran inside the job's cgroups on the compute node.
        cgroup = files["cgroup"].decode()
        assert f"slurm_{slurm_cluster.node}/" in cgroup
        assert f"/job_{acct['job_id']}/" in cgroup
        assert _sacct(slurm_cluster, f"femd-slurm-{i}") == [
            f"{acct['job_id']}|COMPLETED|{TASK_USER}"
        ]
    assert agent.terminate() == 0
    rounded = {k: [round(v, 2) for v in vs] for k, vs in latency.items()}
    sys.stdout.write(
        "\nsubmit-to-start (publish -> task's first instruction), median of 3: "
        f"process {statistics.median(latency['process']):.2f} s, "
        f"slurm {statistics.median(latency['slurm']):.2f} s "
        f"(all: {json.dumps(rounded)})\n"
    )


def test_timeout_cancel_and_memory_limit_end_the_job(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env
    env.write_config(max_concurrent_tasks=3)
    events = env.collect()
    env.start_agent()
    jobs = Jobs(slurm_cluster)
    env.publish(slurm_task(env, "slow-1", "sleep 120", resources={"timeout_s": 3}))
    env.publish(slurm_task(env, "long-1", "sleep 120"))
    hog = "python3 -c 'b = b\"x\" * (200 << 20)'; echo survived > /out/x"
    small = {"memory_mb": 64, "timeout_s": 60}
    env.publish(slurm_task(env, "hog-1", hog, resources=small))
    events.await_state("long-1", "running", 60)
    wait_for("long-1's job to run", lambda: jobs.running("long-1"), 60)
    env.publish(env.cancel("cancel-1", "long-1"))
    ended = events.await_terminal(["slow-1", "long-1", "cancel-1", "hog-1"], 90)
    assert ended["slow-1"]["state"] == "timed_out"
    assert ended["long-1"]["state"] == "cancelled"
    # Slurm's cgroup, not an rlimit, stopped it: the job ran out of memory.
    hog_end = ended["hog-1"]
    assert (hog_end["state"], hog_end["accounting"]["state"]) == (
        "failed",
        "OUT_OF_MEMORY",
    ), hog_end
    assert "out of memory" in hog_end["reasons"][0]["message"]
    for tid in ("slow-1", "long-1"):
        acct = ended[tid]["accounting"]
        assert acct["state"] == "CANCELLED", acct
        [row] = _sacct(slurm_cluster, f"femd-{tid}")
        job, state, user = row.split("|")
        assert (job, state.split()[0], user) == (acct["job_id"], "CANCELLED", TASK_USER)
    # Slurm's start time counts, not the queue: a 3 s task ran about 3 s.
    assert 3 <= ended["slow-1"]["accounting"]["elapsed_s"] <= 15
    assert not [j for j in slurm_cluster.jobs("running,pending")]
    check_runs(events, jobs, ["slow-1", "long-1", "hog-1"])


def test_unenforceable_memory_is_refused_and_doctor_says_why(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env

    def doctor(rc: int) -> dict[str, Any]:
        done = env.femd("doctor", "--launchers", str(env.root / "launchers"), "--json")
        assert done.returncode == rc, done.stdout + done.stderr
        report = json.loads(done.stdout)
        [check] = [c for c in report["checks"] if c["name"].startswith("slurm")]
        return {**check, "usable": report["usable"]}

    # The doctor's trivial task runs as a real job through the cluster.
    check = doctor(0)
    assert check["status"] == "ok", check
    assert "a trivial task ran" in check["summary"]
    assert "slurm (default)" in check["usable"]
    slurm_cluster.cgroup["ConstrainRAMSpace"] = "no"
    slurm_cluster.write_cgroup()
    slurm_cluster.reconfigure()
    try:
        # The launcher refuses even the trivial task: a failed check, said why.
        check = doctor(1)
        assert check["status"] == "fail", check
        assert "memory limit of 256 MB cannot be enforced" in check["summary"]
        assert "ConstrainRAMSpace is not yes" in check["summary"]
        assert "enforces: memory NO" in check["details"][0]
        assert check["usable"] == ["process (default)"]
        events = env.collect()
        env.start_agent()
        # net-1 asks for egress: no launcher of a job's sandbox can give it.
        env.publish(
            slurm_task(env, "nomem-1"),
            slurm_task(env, "proc-1", launcher="process"),
            env.task("net-1", launcher="slurm"),
        )
        ended = events.await_terminal(["nomem-1", "proc-1", "net-1"], 60)
    finally:
        slurm_cluster.cgroup["ConstrainRAMSpace"] = "yes"
        slurm_cluster.write_cgroup()
        slurm_cluster.reconfigure()
    assert ended["nomem-1"]["state"] == "rejected"
    [reason] = ended["nomem-1"]["reasons"]
    assert reason["rule"] == "launcher.unenforceable"
    assert "memory limit" in reason["message"]
    assert "ConstrainRAMSpace" in reason["message"]
    assert ended["net-1"]["state"] == "rejected"
    rules = {r["rule"]: r["message"] for r in ended["net-1"]["reasons"]}
    assert "network egress" in rules["launcher.unenforceable"]
    # A task whose limits this node can enforce still runs.
    assert ended["proc-1"]["state"] == "succeeded"
    names = {name for _, name, _ in slurm_cluster.jobs()}
    assert not names & {"femd-nomem-1", "femd-net-1"}


def test_agent_killed_while_jobs_run_adopts_them_once(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env
    events = env.collect()
    agent = env.start_agent()
    # adopt-1 still runs when the agent is back; adopt-2 ends while it is away.
    witness = Jobs(slurm_cluster)
    env.publish(slurm_task(env, "adopt-1", "sleep 8; echo after > /out/late.txt"))
    env.publish(slurm_task(env, "adopt-2", "sleep 1; echo early > /out/early.txt"))
    for tid in ("adopt-1", "adopt-2"):
        events.await_state(tid, "running", 60)
        wait_for(f"{tid}'s job to start", lambda t=tid: witness.counts().get(t), 60)
    agent.kill()
    jobs = {name: (job, state) for job, name, state in slurm_cluster.jobs()}
    assert jobs["femd-adopt-1"][1] == "RUNNING", jobs
    wait_for(
        "adopt-2's job to end without the agent",
        lambda: (
            dict((n, s) for _, n, s in slurm_cluster.jobs())["femd-adopt-2"]
            == "COMPLETED"
        ),
        30,
    )
    env.start_agent()
    ended = events.await_terminal(["adopt-1", "adopt-2"], 90)
    for tid, name in (("adopt-1", "late.txt"), ("adopt-2", "early.txt")):
        assert ended[tid]["state"] == "succeeded", ended[tid]
        assert ended[tid]["accounting"]["job_id"] == jobs[f"femd-{tid}"][0]
        assert name in _files(events.outputs(tid))
        assert events.states(tid) == [
            "received", "staging", "running", "uploading", "succeeded"
        ]  # fmt: skip
    check_runs(events, witness, ["adopt-1", "adopt-2"])
    # Reported once: one job each, and no second terminal event a while later.
    time.sleep(2)
    for tid in ("adopt-1", "adopt-2"):
        assert len(_sacct(slurm_cluster, f"femd-{tid}")) == 1
        raw = [e["state"] for e in events.raw if e["task_id"] == tid]
        assert raw.count("succeeded") == 1, raw


def test_ten_tasks_queue_in_slurm_and_all_finish_once(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env
    env.write_config(max_concurrent_tasks=10)
    events = env.collect()
    env.start_agent()
    ids = [f"many-{i}" for i in range(10)]
    env.publish(*(slurm_task(env, t, "sleep 2; echo $$ > /out/pid") for t in ids))
    # The cluster has fewer cpus than tasks: Slurm itself holds most back.
    held = 10 - slurm_cluster.cpus - 2
    wait_for(
        f"{held} jobs pending in Slurm at once",
        lambda: len(slurm_cluster.jobs("pending")) >= held,
        60,
        every_s=0.2,
    )
    ended = events.await_terminal(ids, 180)
    failed = {t: e for t, e in ended.items() if e["state"] != "succeeded"}
    assert not failed, failed
    check_runs(events, Jobs(slurm_cluster), ids)
    jobs = {ended[t]["accounting"]["job_id"] for t in ids}
    assert len(jobs) == 10
    for t in ids:
        assert len(_sacct(slurm_cluster, f"femd-{t}")) == 1


def test_escape_checks_inside_the_job(
    slurm_env: NodeEnv, slurm_cluster: SlurmCluster
) -> None:
    env = slurm_env
    data = env.root / "data"
    data.mkdir()
    (data / "cohort.csv").write_text("id,age\n1,64\n")
    data.chmod(0o755)
    policy_file = env.root / "policy.yaml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["datasets"] = {"cohort": {"path": str(data)}}
    policy["projects"]["demo"]["datasets"] = ["cohort"]
    policy_file.write_text(yaml.safe_dump(policy))
    events = env.collect()
    env.start_agent()
    port = env.counter.port
    probe = (
        f"(echo escape-1 > /dev/tcp/127.0.0.1/{port}) 2>/dev/null"
        " && echo net:open || echo net:none;"
        " touch /data/x 2>/dev/null && echo inputs:writable || echo inputs:ro;"
        " cat /data/cohort.csv > /out/copy.csv;"
        " for d in / /usr /etc /var/tmp /home /root; do"
        "   touch $d/femd-escape 2>/dev/null && echo wrote:$d; done;"
        " echo uid:$(id -u); ls / | tr '\\n' ' ';"
        " test -e /etc/shadow && echo shadow:visible;"
        # Each of these the task user could see outside the sandbox.
        f" test -e {env.config} && echo config:visible;"
        f" test -e {slurm_cluster.conf} && echo slurm:visible;"
        f" test -e {env.root}/stage/femd-escape-1/job.sh && echo stage:visible;"
        " grep -q '^Seccomp:[[:space:]]*2' /proc/self/status && echo seccomp:on;"
        " unshare -U true 2>/dev/null && echo unshare:yes;"
        " echo nproc:$(ulimit -u) cpus:$(nproc)"
    )
    manifest = env.manifest(
        "escape-1",
        ["/bin/bash", "-c", f"({probe}) > /out/report 2>&1"],
        inputs=[{"dataset": "cohort", "mount": "/data"}],
        **SLURM,
    )
    env.publish(env.sign(manifest))
    ended = events.await_terminal(["escape-1"], 90)
    assert ended["escape-1"]["state"] == "succeeded", ended
    files = _files(events.outputs("escape-1"))
    report = files["report"].decode()
    assert "net:none" in report
    assert "inputs:ro" in report
    assert "wrote:" not in report
    assert "uid:0" not in report
    for leak in ("shadow:", "config:", "slurm:", "stage:", "unshare:"):
        assert leak not in report, report
    # femd's seccomp filter is on; the pids limit is the task's, cpus Slurm's.
    assert "seccomp:on" in report, report
    assert "nproc:64 cpus:1" in report, report
    assert files["copy.csv"] == b"id,age\n1,64\n"
    assert env.counter.count("escape-1") == 0
    assert sorted(p.name for p in data.iterdir()) == ["cohort.csv"]
    # Nothing of the task is left on the shared filesystem.
    assert list((env.root / "stage").iterdir()) == []
