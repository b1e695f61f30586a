"""The agent configuration (``femd.yaml``, sysadmin owned).

Owns ``AgentConfig`` and ``load_config()``: strict YAML, relative paths resolved
against the config file's folder, ``FEMD_CONFIG``/``FEMD_NODE`` overrides.
Reading the policy or the launcher profiles it points at is not its business.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from femd.errors import ConfigError
from femd.model import MAX_ENVELOPE_BYTES, Name, Strict
from femd.yamlfile import YamlError, field_of, line_of, load_yaml

__all__ = [
    "DEFAULT_CONFIG",
    "AgentConfig",
    "BrokerConfig",
    "PodmanConfig",
    "load_config",
]

DEFAULT_CONFIG: Final = Path("/etc/femd/femd.yaml")

_T = TypeVar("_T")
_Path = Annotated[str, Meta(min_length=1, max_length=4096)]


class BrokerConfig(Strict, frozen=True, kw_only=True):
    """The RabbitMQ broker: ``amqps://`` only, mutual TLS, SASL EXTERNAL."""

    url: Annotated[str, Meta(pattern=r"^amqps://[^\s]+$(?!\n)")]
    ca: _Path
    cert: _Path
    key: _Path
    heartbeat_s: Annotated[int, Meta(ge=5, le=600)] = 30
    reconnect_max_s: Annotated[float, Meta(ge=1, le=3600)] = 60.0
    connect_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0


class PodmanConfig(Strict, frozen=True, kw_only=True):
    """Where the rootless Podman API of femd's task user listens."""

    socket: _Path = "unix:///run/femd/podman/podman.sock"


class AgentConfig(Strict, frozen=True, kw_only=True):
    """``femd run`` settings. Every key but node, broker and policy has a default."""

    node: Name
    broker: BrokerConfig
    policy: _Path
    launchers: _Path = "/usr/share/femd/launchers"
    state_dir: _Path = "/var/lib/femd"
    max_concurrent_tasks: Annotated[int, Meta(ge=1, le=64)] = 2
    # Deliveries the broker may hand the agent before it acks them (the AMQP
    # prefetch): each is acked once its decision is durable, so this bounds
    # intake in flight, not tasks run (admitted tasks wait queued on disk).
    intake_window: Annotated[int, Meta(ge=1, le=256)] = 32
    clock_skew_s: Annotated[int, Meta(ge=0, le=86400)] = 300
    max_envelope_bytes: Annotated[int, Meta(ge=1024, le=MAX_ENVELOPE_BYTES)] = (
        MAX_ENVELOPE_BYTES
    )
    stop_grace_s: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    result_chunk_bytes: Annotated[int, Meta(ge=4096, le=4 * 1024 * 1024)] = 256 * 1024
    log_max_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # Published status events and finished tasks' payloads are pruned after
    # this long; task ids, decisions, reasons, keyids and hashes stay for good.
    retention_days: Annotated[float, Meta(gt=0, le=36500)] = 30.0
    node_status_interval_s: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    live_log_bytes_s: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 16 * 1024
    live_log_burst_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    audit: Literal["auto", "journal", "stderr"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    podman: PodmanConfig = msgspec.field(default_factory=PodmanConfig)

    @property
    def policy_path(self) -> Path:
        """The policy file or directory."""
        return Path(self.policy)

    def launcher_configs(self) -> dict[str, msgspec.Struct]:
        """Each launcher's section of this file, by launcher name.

        What a launcher's factory gets as ``LauncherEnv.config``.
        """
        return {"podman": self.podman}

    @property
    def state_path(self) -> Path:
        """The state directory."""
        return Path(self.state_dir)


def _resolve(base: Path, value: str) -> str:
    return str(base / value) if not value.startswith("/") else value


def _load_struct(path: Path, env: Mapping[str, str], kind: type[_T]) -> _T:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    try:
        data, node = load_yaml(raw)
    except YamlError as e:
        where = f"{path}:{e.line}" if e.line else str(path)
        raise ConfigError(f"{where}: {e.message}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top level")
    if env.get("FEMD_NODE") and kind is AgentConfig:
        data["node"] = env["FEMD_NODE"]
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as e:
        # Plain words only for a document that fails: not held by an idle agent.
        from femd.plain import first

        parts, message = first(data, kind, e)
        line = line_of(node, parts)[0]
        field = field_of(parts)
        where = f"{path}:{line}" if line else str(path)
        what = f"{field}: " if field else ""
        raise ConfigError(f"{where}: {what}{message[0].lower()}{message[1:]}") from e


def _resolve_broker(base: Path, broker: BrokerConfig) -> BrokerConfig:
    return msgspec.structs.replace(
        broker,
        ca=_resolve(base, broker.ca),
        cert=_resolve(base, broker.cert),
        key=_resolve(base, broker.key),
    )


def load_config(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Load ``femd.yaml``; relative paths resolve against its folder.

    *path* None means ``$FEMD_CONFIG`` or ``/etc/femd/femd.yaml``;
    ``$FEMD_NODE`` overrides ``node``.

    Raises:
        ConfigError: unreadable or invalid, as ``file:line: field: message``.
    """
    env = {} if env is None else env
    if path is None:
        path = Path(env.get("FEMD_CONFIG") or DEFAULT_CONFIG)
    config = _load_struct(path, env, AgentConfig)
    base = path.resolve().parent
    podman = config.podman
    if podman.socket.startswith("unix://") and not podman.socket.startswith("unix:///"):
        podman = PodmanConfig(socket="unix://" + _resolve(base, podman.socket[7:]))
    return msgspec.structs.replace(
        config,
        broker=_resolve_broker(base, config.broker),
        policy=_resolve(base, config.policy),
        launchers=_resolve(base, config.launchers),
        state_dir=_resolve(base, config.state_dir),
        podman=podman,
    )


class OrchestratorConfig(Strict, frozen=True, kw_only=True):
    """``femd submit``/``femd watch`` settings: the orchestrator's own mTLS identity.

    ``results_dir`` is the orchestrator's inbox (``femd.inbox``): everything
    received is kept there. ``max_output_bytes`` caps one task's outputs from
    one node (archive and unpacked content). ``node_down_after_s`` is how long
    a node may stay silent, at least, before ``femd nodes`` calls it down (it
    also waits three of the node's own status intervals).
    """

    broker: BrokerConfig
    results_dir: _Path = "results"
    max_output_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024 * 1024
    node_down_after_s: Annotated[float, Meta(gt=0, le=86400)] = 90.0


def load_orchestrator_config(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> OrchestratorConfig:
    """Load the orchestrator-side config (``broker:`` and ``results_dir``).

    *path* None means ``$FEMD_CONFIG`` or ``./orchestrator.yaml``.

    Raises:
        ConfigError: unreadable or invalid, as ``file:line: field: message``.
    """
    env = {} if env is None else env
    if path is None:
        path = Path(env.get("FEMD_CONFIG") or "orchestrator.yaml")
    config = _load_struct(path, env, OrchestratorConfig)
    base = path.resolve().parent
    return msgspec.structs.replace(
        config,
        broker=_resolve_broker(base, config.broker),
        results_dir=_resolve(base, config.results_dir),
    )
