"""A private, single-node Slurm cluster (with accounting) for tests and demos.

:class:`SlurmCluster` runs Debian's ``slurm-wlm`` daemons as a throwaway cluster
that shares nothing with a system-wide one: in one temporary directory it keeps
its own MUNGE key and socket (``munged``), a MariaDB data directory
(``mariadbd``, loopback only) for ``slurmdbd``, ``slurmctld``, and one
``slurmd`` whose node name is unique (``femd<hex>``), so its cgroups
(``/sys/fs/cgroup/<controller>/slurm_<node>``) are its own. Every daemon gets
its own free loopback port, state and spool directories, pid and log files.
Client commands find the cluster through ``SLURM_CONF`` (``cluster.env``); the
system's ``/etc/slurm`` and MUNGE socket are never read or touched.

The cluster is real: ``task/cgroup`` confines memory (``ConstrainRAMSpace``)
and cores (``ConstrainCores``) on this host's cgroup v1 hierarchy, and
``slurmdbd`` records every job for ``sacct``, with ``AccountingStorageEnforce
= associations`` (an account must exist for a job to be accepted).

``stop()`` cancels the cluster's jobs, stops the daemons it started (by pid,
never by name) and removes the node's empty cgroups.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from testbed.rabbit import _die_with_parent, _free_ports

__all__ = ["SlurmCluster", "SlurmError", "slurm_available"]

_DAEMONS = {
    "munged": "/usr/sbin/munged",
    "mariadbd": "/usr/sbin/mariadbd",
    "slurmdbd": "/usr/sbin/slurmdbd",
    "slurmctld": "/usr/sbin/slurmctld",
    "slurmd": "/usr/sbin/slurmd",
}
_INSTALL_DB = "/usr/bin/mariadb-install-db"
_CLIENT = "/usr/bin/mariadb"
_CGROUP = Path("/sys/fs/cgroup")


class SlurmError(RuntimeError):
    """The private Slurm cluster could not be set up, started or driven."""


def slurm_available() -> str | None:
    """None when a private cluster can be started here, else why not."""
    missing = [
        p for p in [*_DAEMONS.values(), _INSTALL_DB, _CLIENT] if not os.path.exists(p)
    ]
    missing += [t for t in ("sbatch", "sacctmgr") if shutil.which(t) is None]
    if missing:
        return "not installed: " + ", ".join(missing)
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _wait(what: str, check: object, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise SlurmError(f"slurm: {what} not ready after {timeout_s:.0f} s{tail}")


class SlurmCluster:
    """One private single-node Slurm cluster: ``start()``, then ``remove()``."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        account: str = "femd",
        users: tuple[str, ...] = ("root",),
        cpus: int | None = None,
        memory_mb: int = 4096,
    ) -> None:
        """Lay out the cluster's directory and configuration; start nothing."""
        self.root = Path(root or tempfile.mkdtemp(prefix="femd-slurm-", dir="/tmp"))
        self.root.chmod(0o711)
        self.name = "femd" + secrets.token_hex(3)
        self.node = self.name
        self.partition = "femd"
        self.account = account
        self.users = list(users)
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = self.root / "etc" / "slurm.conf"
        self.env: dict[str, str] = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SLURM_CONF": str(self.conf),
            "LANG": "C.UTF-8",
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        (
            self.ctld_port,
            self.slurmd_port,
            self.dbd_port,
            self.db_port,
        ) = _free_ports(4)
        self._db_password = secrets.token_hex(12)
        self.cgroup: dict[str, str] = {
            "CgroupPlugin": "cgroup/v1",
            "CgroupMountpoint": str(_CGROUP),
            "ConstrainCores": "yes",
            "ConstrainRAMSpace": "yes",
            "ConstrainSwapSpace": "yes",
            "AllowedSwapSpace": "0",
        }

    # -- files -----------------------------------------------------------------

    def _dir(self, name: str, mode: int = 0o700) -> Path:
        path = self.root / name
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        return path

    def _write(
        self, path: Path, lines: Mapping[str, object], mode: int = 0o644
    ) -> None:
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        path.chmod(mode)

    def _configure(self) -> None:
        r = self.root
        for d in ("etc", "munge", "run", "log", "state", "spool", "db"):
            self._dir(d)
        (r / "etc").chmod(0o755)
        munge = r / "run" / "munge.sock"
        host = socket.gethostname()
        conf: dict[str, object] = {
            "ClusterName": self.name,
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": self.ctld_port,
            "SlurmdPort": self.slurmd_port,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={munge}",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "run" / "slurmctld.pid",
            "SlurmdPidFile": r / "run" / "slurmd.pid",
            "SlurmctldLogFile": r / "log" / "slurmctld.log",
            "SlurmdLogFile": r / "log" / "slurmd.log",
            "ProctrackType": "proctrack/cgroup",
            "TaskPlugin": "task/cgroup,task/affinity",
            "JobAcctGatherType": "jobacct_gather/cgroup",
            "JobAcctGatherFrequency": "task=1",
            "AccountingStorageType": "accounting_storage/slurmdbd",
            "AccountingStorageHost": "127.0.0.1",
            "AccountingStoragePort": self.dbd_port,
            # The persistent connection to slurmdbd authenticates with this socket.
            "AccountingStoragePass": munge,
            "AccountingStorageEnforce": "associations",
            "AccountingStoreFlags": "job_comment",
            "JobCompType": "jobcomp/none",
            "SchedulerType": "sched/backfill",
            # Schedule a batch job when it is submitted, not up to 3 s later.
            "SchedulerParameters": "batch_sched_delay=0",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "ReturnToService": 2,
            "KillWait": 5,
            "MinJobAge": 300,
            "SlurmdParameters": "config_overrides",
            "MpiDefault": "none",
            "NodeName": (
                f"{self.node} NodeHostname={host} NodeAddr=127.0.0.1"
                f" CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            ),
            "PartitionName": (
                f"{self.partition} Nodes={self.node} Default=YES"
                " MaxTime=INFINITE State=UP"
            ),
        }
        self._write(self.conf, conf)
        self.write_cgroup()
        dbd = {
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={munge}",
            "DbdHost": "localhost",
            "DbdAddr": "127.0.0.1",
            "DbdPort": self.dbd_port,
            "SlurmUser": "root",
            "PidFile": r / "run" / "slurmdbd.pid",
            "LogFile": r / "log" / "slurmdbd.log",
            "StorageType": "accounting_storage/mysql",
            "StorageHost": "127.0.0.1",
            "StoragePort": self.db_port,
            "StorageUser": "slurm",
            "StoragePass": self._db_password,
            "StorageLoc": "slurm_acct_db",
        }
        self._write(r / "etc" / "slurmdbd.conf", dbd, 0o600)
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)

    def write_cgroup(self) -> None:
        """(Re)write ``cgroup.conf`` from ``self.cgroup``."""
        self._write(self.root / "etc" / "cgroup.conf", self.cgroup)

    # -- processes -------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("ab")
        with log:
            self._procs[name] = subprocess.Popen(
                [_DAEMONS[name], *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.root,
                preexec_fn=_die_with_parent,
            )

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            log = self.root / "log" / f"{name}.out"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise SlurmError(f"slurm: {name} exited:\n{tail}")
        return True

    def run(
        self, *args: str, check: bool = True, timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sinfo``, ``sacctmgr``...) against this cluster."""
        done = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise SlurmError(f"slurm: {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done

    def _port_open(self, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.3)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def start(self) -> SlurmCluster:
        """Start munged, MariaDB, slurmdbd, slurmctld and slurmd; wait until idle.

        Raises:
            SlurmError: a daemon did not start (its log tail is in the message).
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        r = self.root
        self._configure()
        self._spawn(
            "munged",
            ["--foreground", "--force", f"--socket={r / 'run' / 'munge.sock'}",
             f"--key-file={r / 'munge' / 'munge.key'}",
             f"--log-file={r / 'log' / 'munged.log'}",
             f"--pid-file={r / 'run' / 'munged.pid'}",
             f"--seed-file={r / 'munge' / 'seed'}"],
        )  # fmt: skip
        subprocess.run(
            [_INSTALL_DB, "--no-defaults", f"--datadir={r / 'db'}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            check=True, capture_output=True, env=self.env, timeout=120,
        )  # fmt: skip
        db_sock = r / "run" / "db.sock"
        self._spawn(
            "mariadbd",
            ["--no-defaults", f"--datadir={r / 'db'}", f"--socket={db_sock}",
             f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root",
             f"--pid-file={r / 'run' / 'db.pid'}",
             f"--log-error={r / 'log' / 'mariadb.err'}",
             "--innodb-buffer-pool-size=32M", "--skip-log-bin"],
        )  # fmt: skip
        _wait(
            "mariadb",
            lambda: self._alive("mariadbd") and db_sock.exists(),
            60,
            r / "log" / "mariadb.err",
        )
        grant = (
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';"
            " GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        self.run(_CLIENT, "--no-defaults", f"--socket={db_sock}", "-u", "root",
                 "-e", grant)  # fmt: skip
        self._spawn("slurmdbd", ["-D"])
        _wait(
            "slurmdbd",
            lambda: self._alive("slurmdbd") and self._port_open(self.dbd_port),
            60,
            r / "log" / "slurmdbd.log",
        )
        self.run("sacctmgr", "-i", "add", "cluster", self.name)
        self.run("sacctmgr", "-i", "add", "account", self.account)
        for user in self.users:
            self.add_user(user)
        self._spawn("slurmctld", ["-D", "-i"])
        _wait(
            "slurmctld",
            lambda: (
                self._alive("slurmctld")
                and self.run("scontrol", "ping", check=False).returncode == 0
            ),
            60,
            r / "log" / "slurmctld.log",
        )
        self._spawn("slurmd", ["-D", "-N", self.node])

        def idle() -> bool:
            self._alive("slurmd")
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout
            return out.strip() == "idle"

        _wait("slurmd", idle, 60, r / "log" / "slurmd.log")

    def add_user(self, user: str) -> None:
        """Give *user* an association with the cluster's account."""
        self.run("sacctmgr", "-i", "add", "user", user, f"account={self.account}")
        if user not in self.users:
            self.users.append(user)

    def reconfigure(self) -> None:
        """``scontrol reconfigure``: the daemons reread slurm.conf and cgroup.conf."""
        self.run("scontrol", "reconfigure")

    def jobs(self, states: str = "all") -> list[tuple[str, str, str]]:
        """(id, name, state) of the cluster's jobs in *states*."""
        out = self.run("squeue", "-h", f"--states={states}", "-o", "%i|%j|%T").stdout
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line]  # type: ignore[misc]

    def stop(self) -> None:
        """Cancel every job, stop the daemons we started, drop the node's cgroups."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            ids = [j for j, _, state in self._safe_jobs() if state != "COMPLETED"]
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(
                    s in ("RUNNING", "COMPLETING", "PENDING")
                    for _, _, s in self._safe_jobs()
                ):
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._drop_cgroups()

    def _safe_jobs(self) -> list[tuple[str, str, str]]:
        try:
            return self.jobs()
        except (SlurmError, subprocess.SubprocessError):
            return []

    def _drop_cgroups(self) -> None:
        for controller in ("cpuset", "memory", "freezer", "cpuacct", "devices"):
            top = _CGROUP / controller / f"slurm_{self.node}"
            if not top.is_dir():
                continue
            for base, dirs, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                for d in dirs:
                    with contextlib.suppress(OSError):
                        os.rmdir(Path(base, d))
            with contextlib.suppress(OSError):
                os.rmdir(top)

    def remove(self) -> None:
        """Stop, then delete the cluster's directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
