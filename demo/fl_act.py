"""The demo's FL act: a real Flower session across the two data nodes.

``scripts/demo --fl`` runs it. One method per step, like the first act:

1. keys: the orchestrator's signing key, a throwaway CA for the broker and
   for Flower's TLS (the server's certificate names ``fl-server.demo.invalid``);
2. a private RabbitMQ, and the two nodes with their cohorts, their policies
   (the ``flower`` runtime; on fdn-01 an ingress port for the server, on both
   egress to that server only) and their agents;
3. FEM's documents (tool plan, server and client templates, params) through
   ``femd import-fem`` into manifests, signed once each;
4. the server task submitted to fdn-01, the client tasks to fdn-01 and fdn-02;
   the rounds' metrics shown live from the server's output, which femd sends
   as live logs (``femd watch --logs``), then FEM's per-node ``process_info``;
5. the federated model beside a model trained centrally on the pooled data;
6. a client task that asks for one more destination, refused by the policy.

Flower runs from the node's read-only runtime (``/opt/femd/runtimes/flower``,
built by ``scripts/install.sh`` from hash-pinned wheels); nothing is
downloaded while the act runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from demo.agents import AgentError, AgentProcess
from demo.cohort import SITES
from demo.console import Console
from demo.federation import REPO_ROOT, Federation, commit_files
from demo.walkthrough import DemoError, Walkthrough
from testbed import RabbitNodeError

__all__ = ["FL_STEPS", "FlAct", "FlOutcome"]

FL_STEPS: Final = 6
PROJECT: Final = "dt4h-flower"
RUNTIME: Final = "flower"
RUNTIME_PATH: Final = Path("/opt/femd/runtimes/flower")
SERVER_NODE: Final = "fdn-01"
SERVER_HOST: Final = "fl-server.demo.invalid"  # pinned by each site's launcher profile
ROUNDS: Final = 5
TOLERANCE_POINTS: Final = 2.0
FL_DIR: Final = Path(__file__).resolve().parent / "fl"
FEM_DIR: Final = FL_DIR / "fem"
CERTS: Final = "/app/config/certificates"  # in the server's sandbox
CA_DIR: Final = "/app/config/ca"  # in the clients' sandboxes
FEM_NAMES: Final = {"fdn-01": "FDN01", "fdn-02": "FDN02"}
EXTRA_DESTINATION: Final = "exfil.example.org:443"

_POLICY: Final = """\
# The data steward's policy for node {node}, for the Flower study.
apiVersion: femd/v1
kind: Policy
node: {node}
signers:
  orchestrator:
    public_key_file: orchestrator.pub
datasets:
  cohort: {{path: {data}}}
  flower-tls: {{path: {tls}}}         # the CA (and on {server} the server's key pair)
runtimes:
  flower: {{path: {runtime}}}          # read-only virtualenv: flwr + numpy, hash-pinned
projects:
  {project}:
    signers: [orchestrator]
    launchers: [process]
    git: ["{git}"]
    datasets: [cohort, flower-tls]
    runtimes: [flower]
    max_resources: {{cpus: 1, memory_mb: 2048, timeout_s: 110, pids: 1024}}
    network:
      egress: ["{server_host}:{port}"]  # the FL server, and nothing else
{ingress}    outputs: {{max_bytes: 1048576}}
"""
_INGRESS: Final = """\
      ingress: {{ports: [{port}], peers: [127.0.0.0/8]}}  # the clients, via femd
"""


@dataclass
class FlOutcome:
    """What the FL act proved, for the summary and the exit code."""

    federated_accuracy: float | None = None
    central_accuracy: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    live_rounds: int = 0
    refused: str | None = None
    problems: list[str] = field(default_factory=list)
    act_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Every claim held."""
        return not self.problems

    def write(self, path: Path) -> None:
        """Save as JSON (``fl-summary.json`` in the work directory, for tests)."""
        doc = {
            "ok": self.ok,
            "federated_accuracy": self.federated_accuracy,
            "central_accuracy": self.central_accuracy,
            "rounds": self.rounds,
            "live_rounds": self.live_rounds,
            "refused": self.refused,
            "problems": self.problems,
            "act_s": self.act_s,
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")


class FlAct(Walkthrough):
    """Runs the FL act in *root* (an empty directory) with the process launcher."""

    def __init__(self, root: Path, console: Console) -> None:
        """Prepare; nothing starts before :meth:`run`."""
        super().__init__(root, "process", console)
        self.fl = FlOutcome()
        self.port = _free_port()
        self.fed = Federation(root, SITES, "process")

    def run_act(self) -> FlOutcome:
        """Run every step; always stop what was started.

        Raises:
            DemoError: a step could not be carried out.
        """
        began = time.monotonic()
        self._check_workdir()
        try:
            self.fl_keys()
            self.fl_nodes()
            tasks = self.fl_import()
            finals = self.fl_submit(tasks)
            self.fl_compare(tasks, finals)
            self.fl_refusal()
        finally:
            self.stop()
            self.fl.act_s = round(time.monotonic() - began, 1)
            self.fl.write(self.root / "fl-summary.json")
        return self.fl

    # -- 1 ------------------------------------------------------------------------

    def fl_keys(self) -> None:
        """1: signing key, CA, broker and Flower TLS material."""
        c = self.console
        c.step("Keys: the orchestrator's signing key; a CA for the broker and Flower")
        broker = self.fed.make_broker_pki()
        (self.root / "orchestrator").mkdir()
        self.femd("keygen", "orchestrator", "--dir", "orchestrator")
        server = broker.ca.issue(
            "flower-server",
            self.root / "flower-pki",
            server=True,
            client=False,
            sans=(SERVER_HOST,),
        )
        c.say(f"Flower server certificate for {SERVER_HOST}, from {broker.ca.name!r}")
        for node in self.fed.nodes:
            tls = self.root / node / "flower-tls"
            tls.mkdir(parents=True)
            shutil.copy2(broker.ca.cert, tls / "ca.pem")
            if node == SERVER_NODE:  # the server's key pair stays on fdn-01
                shutil.copy2(server.cert, tls / "server.pem")
                shutil.copy2(server.key, tls / "server.key")
            for f in tls.iterdir():
                f.chmod(0o644)  # throwaway demo key: the sandbox user reads it
            tls.chmod(0o755)
        try:
            vhost = self.fed.start_broker()
        except RabbitNodeError as e:
            raise DemoError(f"rabbitmq: {e}") from e
        c.say(f"broker {vhost.url} (TLS, client certificates)")

    # -- 2 ------------------------------------------------------------------------

    def fl_nodes(self) -> None:
        """2: the nodes: cohorts, policies, launcher profiles, agents."""
        c = self.console
        c.step("Two data nodes: cohort, policy with the flower runtime, agent")
        if not (RUNTIME_PATH / "bin" / "python3").exists():
            raise DemoError(
                f"no flower runtime at {RUNTIME_PATH}: run scripts/install.sh"
            )
        url, _ = self._fl_repo()
        for site in SITES:
            node = site.node
            files = self.fed.nodes[node]
            self.fed.make_node(site, git_url=url, image_repo="-", podman_socket=None)
            ingress = _INGRESS.format(port=self.port) if node == SERVER_NODE else ""
            files.policy.write_text(
                _POLICY.format(
                    node=node,
                    server=SERVER_NODE,
                    data=files.data,
                    tls=files.root / "flower-tls",
                    runtime=RUNTIME_PATH,
                    project=PROJECT,
                    git=url,
                    server_host=SERVER_HOST,
                    port=self.port,
                    ingress=ingress,
                )
            )
            self._profiles(files.root, files.config)
        c.say(f"both: runtime {RUNTIME} ({RUNTIME_PATH}, read-only), datasets cohort")
        c.say(f"and flower-tls, egress to {SERVER_HOST}:{self.port} only")
        c.say(f"{SERVER_NODE}: ingress on port {self.port} from 127.0.0.0/8")
        c.say(f"each site's launcher profile pins {SERVER_HOST} to 127.0.0.1")
        for node, files in self.fed.nodes.items():
            agent = AgentProcess(node, files.config, files.log)
            self.agents[node] = agent
            agent.start()
        for node, agent in self.agents.items():
            try:
                took = agent.wait_ready()
            except AgentError as e:
                raise DemoError(str(e)) from e
            c.good(f"{node}: agent READY in {took:.1f} s")

    def _profiles(self, node_root: Path, config: Path) -> None:
        """Write the sysadmin's launcher profiles for one node.

        The repository's profiles, with the FL server's name pinned to this
        machine (where fdn-01 exposes its ingress port).
        """
        launchers = node_root / "launchers"
        shutil.copytree(REPO_ROOT / "launchers", launchers)
        profile = launchers / "default.yaml"
        doc = yaml.safe_load(profile.read_text())
        network = doc.setdefault("network", {})
        network["hosts"] = {SERVER_HOST: ["127.0.0.1"]}
        profile.write_text(yaml.safe_dump(doc, sort_keys=False))
        cfg = yaml.safe_load(config.read_text())
        cfg["launchers"] = str(launchers)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def _fl_repo(self) -> tuple[str, str]:
        if self._repo_id is None:
            self._repo_id = commit_files(
                self.root / "orchestrator" / "flower.git",
                {
                    name: (FL_DIR / name).read_bytes()
                    for name in ("server_cmd.py", "client_cmd.py", "flmodel.py")
                },
                "flower demo v1\n",
            )
        return self._repo_id

    # -- 3 ------------------------------------------------------------------------

    def fl_import(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """3: FEM's documents -> manifests -> envelopes; returns name -> (id, nodes)."""
        c = self.console
        c.step("FEM's documents through `femd import-fem`, then signed")
        url, commit = self._fl_repo()
        fem = self.root / "orchestrator" / "fem"
        fem.mkdir(parents=True)
        for doc in FEM_DIR.glob("*.json"):
            text = doc.read_text().replace("4433", str(self.port))
            text = text.replace("file:///srv/flower-demo.git", url)
            (fem / doc.name).write_text(text)
        c.say("orchestrator/fem/: flower.tool.json, flower-{server,client}.task.json,")
        c.say("flower.params.json (FEM's shapes: descriptive fields, $VARs, volumes)")
        common = [
            "--tool", "orchestrator/fem/flower.tool.json",
            "--params", "orchestrator/fem/flower.params.json",
            "--project", PROJECT, "--launcher", "process", "--runtime", RUNTIME,
            "--commit", commit, "--code", "/flcore", "--output-dir", "/sandbox",
            "--expires-in", "1h", "--issuer", "orchestrator.demo.invalid",
            "--env", "NODE_NAME=%%node_name%%",
        ]  # fmt: skip
        server = [
            "import-fem", "orchestrator/fem/flower-server.task.json", *common,
            "--node", f"{FEM_NAMES[SERVER_NODE]}={SERVER_NODE}",
            "--dataset", f"flower-tls={CERTS}", "--ingress", str(self.port),
            "--env", f"FLOWER_SSL_CACERT={CERTS}/ca.pem",
            "--env", f"FLOWER_SSL_SERVER_CERT={CERTS}/server.pem",
            "--env", f"FLOWER_SSL_SERVER_KEY={CERTS}/server.key",
            "-o", "orchestrator/tasks/flower-server.json",
        ]  # fmt: skip
        client = [
            "import-fem", "orchestrator/fem/flower-client.task.json", *common,
            *_each("--node", [f"{FEM_NAMES[n]}={n}" for n in self.fed.nodes]),
            "--dataset", "cohort=/data", "--dataset", f"flower-tls={CA_DIR}",
            "--env", f"CENTRAL_SERVER_IP={SERVER_HOST}",
            "--env", f"FLOWER_SSL_CACERT={CA_DIR}/ca.pem",
            "-o", "orchestrator/tasks/flower-client-{node}.json",
        ]  # fmt: skip
        (self.root / "orchestrator" / "tasks").mkdir(parents=True, exist_ok=True)
        tasks: dict[str, tuple[str, tuple[str, ...]]] = {}
        for argv in (server, client):
            done = self.femd(*argv)
            for note in done.stderr.strip().splitlines():
                c.say("    " + note)
            for line in done.stdout.strip().splitlines():
                path, task_id, nodes = line.split(" ")
                name = Path(path).stem
                tasks[name] = (task_id, tuple(nodes.split(",")))
                c.say(f"    {path}: task {task_id[:8]}... for {nodes}")
        manifest = json.loads(
            (self.root / "orchestrator/tasks/flower-server.json").read_text()
        )
        c.say(f"server: runtime {manifest['runtime']}, network {manifest['network']}")
        client_one = self.root / f"orchestrator/tasks/flower-client-{SERVER_NODE}.json"
        c.say(f"clients: network {json.loads(client_one.read_text())['network']}")
        for name in tasks:
            self.femd(
                "sign", "--key", "orchestrator/orchestrator.key",
                f"orchestrator/tasks/{name}.json",
                "-o", f"orchestrator/tasks/{name}.env",
            )  # fmt: skip
        c.say(f"{len(tasks)} manifests signed by the orchestrator")
        return tasks

    # -- 4 ------------------------------------------------------------------------

    def fl_submit(
        self, tasks: dict[str, tuple[str, tuple[str, ...]]]
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """4: submit the server, then the clients; rounds live; wait for all."""
        c = self.console
        c.step(f"Submit: server on {SERVER_NODE}, clients on both; {ROUNDS} rounds")
        nodes = list(self.fed.nodes)
        argv = [
            "watch", "--config", "orchestrator/orchestrator.yaml", "--format", "fem",
            "--logs", *_each("--node", nodes), "--timeout", "100",
        ]  # fmt: skip
        c.command(["femd", *argv, "&"])
        watch = subprocess.Popen(  # noqa: S603 (our interpreter and module)
            [sys.executable, "-m", "femd", *argv],
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for name, (_, on) in tasks.items():
                self.femd(
                    "submit", "--config", "orchestrator/orchestrator.yaml",
                    *_each("--node", on), f"orchestrator/tasks/{name}.env",
                )  # fmt: skip
            c.say("live: the server's output, as femd sends it (femd.logs, --logs):")
            finals = self._follow(watch, tasks)
        finally:
            if watch.poll() is None:
                watch.terminate()
            watch.wait(10)
        for name, (_, on) in tasks.items():
            for node in on:
                info = finals.get(name, {}).get(node, {})
                status = (info.get("process_info") or {}).get("status")
                if status != "finished":
                    self.fl.problems.append(
                        f"{name} on {node}: {status or 'no result'} "
                        f"{info.get('error') or ''}"
                    )
        return finals

    def _follow(
        self,
        watch: subprocess.Popen[str],
        tasks: dict[str, tuple[str, tuple[str, ...]]],
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Read FEM's per-node lines until every task ended on each of its nodes."""
        by_id = {task_id: name for name, (task_id, _) in tasks.items()}
        waiting = {(task_id, n) for task_id, on in tasks.values() for n in on}
        finals: dict[str, dict[str, dict[str, Any]]] = {}
        assert watch.stdout is not None  # noqa: S101 (stdout=PIPE)
        for line in watch.stdout:
            info = json.loads(line)
            if "log" in info:
                self._show_log(info, tasks["flower-server"][0])
                continue
            key = (info.get("task_id"), info.get("node"))
            if key not in waiting:
                continue
            waiting.discard(key)
            finals.setdefault(by_id[key[0]], {})[key[1]] = info
            info_text = json.dumps(info.get("process_info"))
            self.console.say(
                f"    {by_id[key[0]]} on {key[1]}: process_info {info_text}"
            )
            if not waiting:
                break
        if waiting:
            err = watch.stderr.read() if watch.stderr else ""
            self.fl.problems.append(f"femd watch ended early: {err.strip()[-300:]}")
        server_id = tasks["flower-server"][0]
        model = self._model(server_id)
        deadline = time.monotonic() + 10  # the outputs follow the terminal event
        while not model.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return finals

    def _model(self, server_id: str) -> Path:
        results = self.root / "orchestrator" / "results"
        return results / SERVER_NODE / server_id / "model.json"

    def _show_log(self, info: dict[str, Any], server_id: str) -> None:
        """Show the server's per-round metrics (its JSON lines) as they arrive."""
        text = str(info.get("log", ""))
        if info.get("task_id") != server_id or not text.startswith("{"):
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            r = json.loads(text)
            self.console.say(
                f"    round {r['round']}: {r['clients']} clients, "
                f"{r['examples']} patients, loss {r['loss']:.4f}, "
                f"accuracy {100 * r['accuracy']:.1f}% (+{r['elapsed_s']:.1f} s)"
            )
            self.fl.live_rounds += 1

    # -- 5 ------------------------------------------------------------------------

    def fl_compare(
        self,
        tasks: dict[str, tuple[str, tuple[str, ...]]],
        finals: dict[str, dict[str, dict[str, Any]]],
    ) -> None:
        """5: the federated model beside a centrally trained one."""
        c = self.console
        c.step("The federated model beside a model trained centrally on pooled data")
        server_id = tasks["flower-server"][0]
        model = self._model(server_id)
        if not model.exists():
            self.fl.problems.append("no federated model came back from the server")
            c.bad("no federated model came back: nothing to compare")
            return
        # The server's own record of the rounds came back with the model (live
        # lines are best effort: a throttled task may have some dropped).
        rounds = model.parent / "rounds.jsonl"
        self.fl.rounds = [json.loads(x) for x in rounds.read_text().splitlines()]
        if len(self.fl.rounds) < ROUNDS:
            self.fl.problems.append(f"only {len(self.fl.rounds)} rounds ran")
        csvs = [str(f.csv) for f in self.fed.nodes.values()]
        done = subprocess.run(  # noqa: S603 (the runtime's interpreter, our script)
            [
                str(RUNTIME_PATH / "bin" / "python3"),
                str(FL_DIR / "central.py"),
                str(model),
                *csvs,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise DemoError(f"central.py: {done.stderr.strip()[-300:]}")
        figures = json.loads(done.stdout)
        fed = 100 * figures["federated"]["accuracy"]
        cen = 100 * figures["central"]["accuracy"]
        self.fl.federated_accuracy = round(fed, 2)
        self.fl.central_accuracy = round(cen, 2)
        c.table(
            ["model", "trained on", "accuracy (pooled cohorts)", "log-loss"],
            [
                ["federated", f"{figures['federated']['rounds']} rounds of FedAvg",
                 f"{fed:.2f}%", f"{figures['federated']['loss']:.4f}"],
                ["centralised", "both CSVs at once", f"{cen:.2f}%",
                 f"{figures['central']['loss']:.4f}"],
            ],
        )  # fmt: skip
        if abs(fed - cen) <= TOLERANCE_POINTS:
            c.good(
                f"federated {fed:.2f}% vs centralised {cen:.2f}%: within "
                f"{TOLERANCE_POINTS:g} points, and no patient row left a node"
            )
        else:
            c.bad(f"federated {fed:.2f}% vs centralised {cen:.2f}%: too far apart")
            self.fl.problems.append("federated accuracy too far from centralised")

    # -- 6 ------------------------------------------------------------------------

    def fl_refusal(self) -> None:
        """6: a client that asks for one more destination is refused."""
        c = self.console
        c.step("A client task that asks for one more destination is refused")
        # Imported again with one more --egress and properly signed: only the
        # node's policy stands in the way.
        _, commit = self._fl_repo()
        argv = [
            "import-fem", "orchestrator/fem/flower-client.task.json",
            "--tool", "orchestrator/fem/flower.tool.json",
            "--params", "orchestrator/fem/flower.params.json",
            "--project", PROJECT, "--launcher", "process", "--runtime", RUNTIME,
            "--commit", commit, "--code", "/flcore", "--output-dir", "/sandbox",
            "--node", "FDN02=fdn-02", "--dataset", "cohort=/data",
            "--dataset", f"flower-tls={CA_DIR}", "--env", "NODE_NAME=%%node_name%%",
            "--env", f"CENTRAL_SERVER_IP={SERVER_HOST}",
            "--env", f"FLOWER_SSL_CACERT={CA_DIR}/ca.pem",
            "--egress", EXTRA_DESTINATION,
            "-o", "orchestrator/tasks/flower-client-extra.json",
        ]  # fmt: skip
        done = self.femd(*argv)
        task_id = done.stdout.split()[1]
        c.say(f"    network.allow now also lists {EXTRA_DESTINATION}")
        self.femd(
            "sign", "--key", "orchestrator/orchestrator.key",
            "orchestrator/tasks/flower-client-extra.json",
            "-o", "orchestrator/tasks/flower-client-extra.env",
        )  # fmt: skip
        self.femd(
            "submit", "--config", "orchestrator/orchestrator.yaml", "--node", "fdn-02",
            "orchestrator/tasks/flower-client-extra.env",
        )  # fmt: skip
        final = self.watch(task_id, ["fdn-02"]).get("fdn-02", {})
        reasons = final.get("reasons") or []
        rules = [str(r.get("rule")) for r in reasons]
        if final.get("state") == "rejected" and "network.not_allowed" in rules:
            self.fl.refused = "network.not_allowed"
            c.good("fdn-02 refused it: network.not_allowed (" + "; ".join(
                str(r.get("message")) for r in reasons) + ")")  # fmt: skip
        else:
            c.bad(f"fdn-02 did not refuse it with network.not_allowed: {final}")
            self.fl.problems.append("extra destination not refused")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _each(flag: str, values: Sequence[str]) -> list[str]:
    return [x for v in values for x in (flag, v)]
