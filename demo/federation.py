"""Everything the demo puts on disk: keys, broker, two data nodes, the analysis repo.

Layout of the work directory (what a newcomer can open with ``--keep``)::

    broker/                 the private RabbitMQ node (data, logs)
    broker/pki/             throwaway CA (ca.pem), broker and client certificates
    orchestrator/           signing key, orchestrator.yaml, analysis.git, tasks
    orchestrator/results/   what ``femd watch`` collected: events and outputs
    fdn-01/, fdn-02/        one data node each: data/cohort.csv, policy.yaml,
                            femd.yaml, state/ (sqlite history), agent.log (audit)

Each node's policy is what its data steward would write: it trusts the
orchestrator's key for one project, names its own dataset, and allows only the
process (bubblewrap) or podman launcher, the analysis repository and small
resources. Nothing here is production PKI: keys are unencrypted on disk.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pygit2
import yaml

from demo.cohort import Site, write_cohort
from testbed import RabbitNode, Vhost, make_ca

__all__ = [
    "DATASET",
    "PROJECT",
    "REPO_ROOT",
    "VHOST",
    "Federation",
    "NodeFiles",
    "commit_analysis",
    "commit_files",
]

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
PROJECT: Final = "dt4h-heart-failure"
DATASET: Final = "hf-cohort"
VHOST: Final = "femd-demo"
ANALYSIS: Final = Path(__file__).resolve().parent / "node_analysis.py"
# A fixed author and time make the commit id the same on every run.
_AUTHOR: Final = ("femd demo", "demo@femd.invalid", 1795392000)

_POLICY: Final = """\
# The data steward's policy for node {node}: default deny, everything named.
apiVersion: femd/v1
kind: Policy
node: {node}
signers:
  orchestrator:                      # the study's orchestrator signs every task
    public_key_file: orchestrator.pub
datasets:
  {dataset}:                          # tasks name the dataset; only we know the path
    path: {data}
projects:
  {project}:
    signers: [orchestrator]
    threshold: 1
    launchers: [{launcher}]
    git: ["{git}"]                   # code only from this repository, pinned by commit
    images: ["{images}"]
    datasets: [{dataset}]
    max_resources: {{cpus: 1, memory_mb: 512, timeout_s: 120, pids: 512}}
    network: none
    outputs: {{max_bytes: 1048576}}    # 1 MiB of results may leave, no more
"""


@dataclass(frozen=True)
class NodeFiles:
    """Where one data node's files are."""

    node: str
    root: Path

    @property
    def data(self) -> Path:
        """The dataset directory (the policy's ``datasets.hf-cohort.path``)."""
        return self.root / "data"

    @property
    def csv(self) -> Path:
        """The cohort file."""
        return self.data / "cohort.csv"

    @property
    def policy(self) -> Path:
        """The steward's policy."""
        return self.root / "policy.yaml"

    @property
    def config(self) -> Path:
        """The sysadmin's ``femd.yaml``."""
        return self.root / "femd.yaml"

    @property
    def state(self) -> Path:
        """The agent's state directory (sqlite history, work dirs)."""
        return self.root / "state"

    @property
    def log(self) -> Path:
        """The agent's stderr: logs and the audit records (JSON lines)."""
        return self.root / "agent.log"


def unreachable_parent(path: Path, user: str) -> Path | None:
    """The first directory on *path* that *user* cannot traverse, if any.

    bubblewrap binds the dataset as the sandbox user, so every directory from
    ``/`` down to the work directory must let that user through (``x``).
    """
    entry = pwd.getpwnam(user)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid}
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == entry.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return d
    return None


def commit_files(
    repo_dir: Path, files: dict[str, bytes], message: str
) -> tuple[str, str]:
    """Commit *files* to a new bare repository on ``main``; return (url, commit).

    The commit id is stable across runs (fixed author, time and content).
    """
    repo = pygit2.init_repository(str(repo_dir), bare=True)
    builder = repo.TreeBuilder()
    for name, data in sorted(files.items()):
        builder.insert(name, repo.create_blob(data), pygit2.GIT_FILEMODE_BLOB)
    name, email, when = _AUTHOR
    who = pygit2.Signature(name, email, when, 0)
    commit = repo.create_commit(
        "refs/heads/main", who, who, message, builder.write(), []
    )
    repo.set_head("refs/heads/main")
    return f"file://{repo_dir}", str(commit)


def commit_analysis(repo_dir: Path) -> tuple[str, str]:
    """Commit the node analysis to a new bare repository; return (url, commit).

    The tree holds ``node_analysis.py`` and a README.
    """
    readme = b"Partial statistics of a cardiac cohort, for the femd demo.\n"
    files = {"README": readme, "node_analysis.py": ANALYSIS.read_bytes()}
    return commit_files(repo_dir, files, "node analysis v1\n")


class Federation:
    """The demo's world under *root*: a broker, an orchestrator, two data nodes."""

    def __init__(self, root: Path, sites: tuple[Site, ...], launcher: str) -> None:
        """Lay out paths under *root*; nothing is created yet."""
        self.root = root
        self.sites = sites
        self.launcher = launcher
        self.orchestrator = root / "orchestrator"
        self.nodes = {s.node: NodeFiles(s.node, root / s.node) for s in sites}
        self.broker: RabbitNode | None = None
        self.vhost: Vhost | None = None

    # -- step 1: throwaway PKI --------------------------------------------------

    def make_broker_pki(self) -> RabbitNode:
        """Make the CA and the broker's certificate; return the (stopped) broker."""
        ca = make_ca(self.root / "broker" / "pki", "femd demo CA")
        self.broker = RabbitNode(self.root / "broker", ca=ca)
        return self.broker

    # -- step 2: broker ---------------------------------------------------------

    def start_broker(self) -> Vhost:
        """Start RabbitMQ; provision femd's topology and client certificates."""
        if self.broker is None:
            raise RuntimeError("make_broker_pki() first")
        self.broker.start()
        self.vhost = self.broker.provision(VHOST, list(self.nodes), "orchestrator")
        self.orchestrator.mkdir(parents=True, exist_ok=True)
        config = {
            "broker": self.vhost.broker_config("orchestrator"),
            "results_dir": "results",
        }
        (self.orchestrator / "orchestrator.yaml").write_text(yaml.safe_dump(config))
        return self.vhost

    # -- step 3: data nodes -----------------------------------------------------

    def make_node(
        self,
        site: Site,
        *,
        git_url: str,
        image_repo: str,
        podman_socket: str | None,
    ) -> int:
        """Write one node's dataset, policy and ``femd.yaml``; return the rows."""
        if self.vhost is None:
            raise RuntimeError("start_broker() first")
        files = self.nodes[site.node]
        files.root.mkdir(parents=True, exist_ok=True)
        rows = write_cohort(site, files.csv)
        files.data.chmod(0o755)
        shutil.copy2(self.orchestrator / "orchestrator.pub", files.root)
        files.policy.write_text(
            _POLICY.format(
                node=site.node,
                dataset=DATASET,
                data=files.data,
                project=PROJECT,
                launcher=self.launcher,
                git=git_url,
                images=image_repo,
            )
        )
        config: dict[str, object] = {
            "node": site.node,
            "broker": self.vhost.broker_config(site.node),
            "policy": "policy.yaml",
            "launchers": str(REPO_ROOT / "launchers"),
            "state_dir": "state",
            "audit": "stderr",  # outside systemd: one JSON line per audit record
            "log_level": "info",
        }
        if podman_socket is not None:
            config["podman"] = {"socket": podman_socket}
        files.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self._open_to_sandbox(files)
        return rows

    def _open_to_sandbox(self, files: NodeFiles) -> None:
        """Let the unprivileged sandbox user reach the dataset, and no more.

        femd runs as root here, so bubblewrap tasks run as ``femd-task`` and
        need to traverse (not list) the path to the dataset. Rootless podman
        needs the opposite: its output directories are world-writable, so some
        parent must be closed to "other"; the node directory is group
        ``femd-podman``, mode 0750.
        """
        self.root.chmod(0o711)
        if self.launcher == "podman":
            os.chown(files.root, 0, grp.getgrnam("femd-podman").gr_gid)
            files.root.chmod(0o750)
        else:
            files.root.chmod(0o711)

    def stop(self) -> None:
        """Stop the broker (if it runs)."""
        if self.broker is not None:
            self.broker.stop()
