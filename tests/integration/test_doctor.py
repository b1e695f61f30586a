"""`femd doctor`: what this host can enforce, probed for real."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (our own interpreter)
        [
            sys.executable,
            "-m",
            "femd",
            "doctor",
            "--launchers",
            str(REPO / "launchers"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.bwrap
def test_doctor_reports_each_launcher_and_what_it_enforces(tmp_path):
    p = _doctor("--podman-socket", f"unix://{tmp_path}/absent.sock")
    assert p.returncode == 1, p.stderr  # a launcher failed
    assert "ok    process (profile default): a trivial task ran" in p.stdout
    assert "enforces: memory yes, cpus yes (min 0.01), pids yes" in p.stdout
    assert "egress yes, ingress yes" in p.stdout  # forwarded by femd
    # This CI host: cgroup v1, femd as root. Never a per-process cap as memory.
    assert "  memory limit: cgroup v1\n" in p.stdout
    assert "  pids limit: cgroup v1\n" in p.stdout
    assert "  cpus limit: cgroup v1\n" in p.stdout
    assert "RLIMIT_AS" not in p.stdout
    # A podman service that is not there is named, not a crash.
    assert "FAIL  podman (profile default): UNAVAILABLE" in p.stdout
    assert "absent.sock" in p.stdout
    assert "tasks can run with: process (default)" in p.stdout
    assert "Traceback" not in p.stderr


@pytest.mark.bwrap
def test_doctor_json(tmp_path):
    p = _doctor("--json", "--podman-socket", f"unix://{tmp_path}/absent.sock")
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["ok"] is False
    assert report["usable"] == ["process (default)"]
    rows = {r["name"]: r for r in report["checks"]}
    assert rows["process (profile default)"]["status"] == "ok"
    podman = rows["podman (profile default)"]
    assert podman["status"] == "fail"
    assert "absent.sock" in podman["summary"]
    assert podman["details"][0].startswith("enforces: ")
    process = rows["process (profile default)"]
    assert "egress yes, ingress yes" in process["details"][0]


def test_doctor_with_a_broken_profile_dir_is_one_line(tmp_path):
    (tmp_path / "default.yaml").write_text("apiVersion: femd/v1\nkind: Nope\n")
    p = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "femd", "doctor", "--launchers", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("femd: error: ")


def _example_in_operator_guide() -> str:
    text = (REPO / "docs/operator.md").read_text()
    block = text.split("femd doctor --config /etc/femd/femd.yaml\n", 1)[1]
    block = block.split("```", 1)[0]
    return "".join(line.removeprefix("# ") for line in block.splitlines(True))


def _normalised(text: str, tmp: Path, url: str) -> str:
    text = text.replace(url, "amqps://broker.example.org:5671/")
    text = text.replace(str(tmp / "state"), "/var/lib/femd")
    text = text.replace(str(tmp), "/etc/femd")
    # Whether this host's clock is synchronised is the host's business.
    text = re.sub(r"(?m)^(\S+ +clock: .*)(\n +fix: .*)?$", "<clock>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d", "<date>", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)


@pytest.mark.rabbitmq
@pytest.mark.podman
@pytest.mark.bwrap
def test_doctor_with_a_config_checks_everything_and_matches_the_guide(
    tmp_path, broker_vhost, podman_service, make_policy, keypair
):
    """The operator guide's example is what doctor prints (numbers aside)."""
    broker = broker_vhost.broker_config("fdn-01")
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, src in (("ca.pem", "ca"), ("node.pem", "cert"), ("node.key", "key")):
        (tls / name).write_bytes(Path(broker[src]).read_bytes())
    keys = {name: keypair() for name in ("orchestrator", "pi-smith")}
    make_policy(tmp_path, keys, datasets={"hf-cohort-2024": {"path": str(tmp_path)}})
    (tmp_path / "state").mkdir()
    config = {
        "node": "fdn-01",
        "broker": {"url": broker["url"], "ca": "tls/ca.pem",
                   "cert": "tls/node.pem", "key": "tls/node.key"},
        "policy": "policy.yaml",
        "launchers": str(REPO / "launchers"),
        "state_dir": str(tmp_path / "state"),
        "podman": {"socket": podman_service.url},
    }  # fmt: skip
    (tmp_path / "femd.yaml").write_text(json.dumps(config))
    p = subprocess.run(  # noqa: S603 (our own interpreter)
        [
            sys.executable,
            "-m",
            "femd",
            "doctor",
            "--config",
            str(tmp_path / "femd.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "Traceback" not in p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    got = _normalised(p.stdout, tmp_path, broker["url"])
    want = _normalised(_example_in_operator_guide(), tmp_path, broker["url"])
    assert got == want
