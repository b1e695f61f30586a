"""The agent configuration (femd.yaml): defaults, relative paths, env, errors."""

from pathlib import Path

import pytest

from femd.config import DEFAULT_CONFIG, AgentConfig, load_config
from femd.envelope import MAX_ENVELOPE_BYTES
from femd.errors import ConfigError

REPO = Path(__file__).parent.parent.parent

MINIMAL = """\
node: fdn-01
broker:
  url: amqps://broker.example.org:5671/femd
  ca: tls/ca.pem
  cert: tls/node.pem
  key: /etc/femd/tls/node.key
policy: policy.yaml
"""


def _write(tmp_path: Path, text: str, name: str = "femd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_femd_yaml_loads():
    config = load_config(REPO / "femd.yaml")
    assert isinstance(config, AgentConfig)
    assert config.node == "fdn-01"
    assert config.broker.url == "amqps://broker.example.org:5671/"
    assert config.policy == "/etc/femd/policy.yaml"
    assert config.max_concurrent_tasks == 2
    assert config.intake_window == 32  # the prefetch, apart from the task slots
    assert config.clock_skew_s == 300


def test_defaults_and_relative_paths(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL))
    base = tmp_path.resolve()
    assert config.policy == str(base / "policy.yaml")
    assert config.policy_path == base / "policy.yaml"
    assert config.broker.ca == str(base / "tls" / "ca.pem")
    assert config.broker.cert == str(base / "tls" / "node.pem")
    assert config.broker.key == "/etc/femd/tls/node.key"
    assert config.launchers == "/usr/share/femd/launchers"
    assert config.state_path == Path("/var/lib/femd")
    assert config.clock_skew_s == 300
    assert config.max_envelope_bytes == MAX_ENVELOPE_BYTES
    assert config.broker.heartbeat_s == 30
    assert config.podman.socket == "unix:///run/femd/podman/podman.sock"


def test_relative_podman_socket_resolves(tmp_path):
    config = load_config(
        _write(tmp_path, MINIMAL + "podman:\n  socket: unix://run/podman.sock\n")
    )
    assert config.podman.socket == f"unix://{tmp_path.resolve()}/run/podman.sock"


def test_env_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    config = load_config(None, {"FEMD_CONFIG": str(path), "FEMD_NODE": "fdn-09"})
    assert config.node == "fdn-09"
    assert config.policy == str(tmp_path.resolve() / "policy.yaml")


def test_env_node_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="node: expected lowercase name"):
        load_config(_write(tmp_path, MINIMAL), {"FEMD_NODE": "FDN 9"})


def test_default_path_is_etc(tmp_path):
    assert Path("/etc/femd/femd.yaml") == DEFAULT_CONFIG
    if not DEFAULT_CONFIG.exists():
        with pytest.raises(ConfigError, match=r"/etc/femd/femd\.yaml: No such file"):
            load_config(None, {})
    else:  # a host with femd installed
        assert load_config(None, {}).node


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            MINIMAL.replace("node: fdn-01\n", ""),
            r":1: node: the required field `node` is missing",
        ),
        (
            MINIMAL.replace("policy: policy.yaml\n", ""),
            r"policy: the required field `policy` is missing",
        ),
        (
            MINIMAL.replace("amqps://", "amqp://"),
            r"femd\.yaml:3: broker\.url: expected `str` matching regex",
        ),
        (
            MINIMAL + "max_concurrent_tasks: 0\n",
            r":8: max_concurrent_tasks: must be at least 1 \(got 0\)",
        ),
        (
            MINIMAL + "intake_window: 257\n",
            r":8: intake_window: must be at most 256 \(got 257\)",
        ),
        (
            MINIMAL + "clock_skew_s: -1\n",
            r":8: clock_skew_s: must be at least 0 \(got -1\)",
        ),
        (
            MINIMAL + "max_envelope_bytes: 2000000\n",
            r":8: max_envelope_bytes: must be at most 1048576 \(got 2000000\)",
        ),
        (
            MINIMAL + "audit: syslog\n",
            r':8: audit: "syslog" is not allowed here; '
            r"use one of: auto, journal, stderr",
        ),
        (MINIMAL + "polcy: x\n", r"unknown field `polcy`"),
        (MINIMAL + "node: fdn-02\n", r":8: duplicate key 'node'"),
        (MINIMAL + "x: &a 1\ny: *a\n", r":9: anchors and aliases are not allowed"),
        ("- node\n", r":1: expected a mapping at the top level"),
        ("", r":1: expected a mapping at the top level"),
        ("node: [\n", r"femd\.yaml:2: "),
    ],
    ids=[
        "no-node",
        "no-policy",
        "plain-amqp",
        "zero-tasks",
        "window-above-256",
        "negative-skew",
        "envelope-limit-above-1mib",
        "audit-syslog",
        "unknown-key",
        "duplicate-key",
        "anchor",
        "list",
        "empty",
        "bad-yaml",
    ],
)
def test_bad_config_is_one_line_with_file_line_field(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="No such file or directory"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(tmp_path)
