"""Backend gating shared by the whole suite: skips that cannot lie.

A test that needs a backend (RabbitMQ, Podman, bubblewrap, a booted systemd)
skips when it is absent, but FAILS when ``CI=true`` or ``FEMD_TEST_REQUIRE``
(a comma list, or ``all``) names it. Every skip for a missing backend goes
through ``unavailable()``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import NoReturn

import pytest

__all__ = ["BACKENDS", "required_backends", "unavailable"]


def _have(*programs: str) -> bool:
    return all(shutil.which(p) for p in programs)


BACKENDS: dict[str, Callable[[], bool]] = {
    "rabbitmq": lambda: _have("rabbitmq-server"),
    "podman": lambda: _have("podman"),
    "bwrap": lambda: _have("bwrap"),
    "systemd": lambda: _have("systemd-nspawn", "debootstrap"),
    "slurm": lambda: _have("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd"),
}


def required_backends(env: Mapping[str, str]) -> set[str]:
    """Backends whose absence fails a test instead of skipping it."""
    names = {n.strip() for n in env.get("FEMD_TEST_REQUIRE", "").split(",")}
    names.discard("")
    if env.get("CI", "").lower() == "true" or "all" in names:
        return set(BACKENDS)
    unknown = names - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(
            f"FEMD_TEST_REQUIRE names unknown backends {sorted(unknown)} "
            f"(known: {', '.join(BACKENDS)}, all)"
        )
    return names


def unavailable(name: str, message: str) -> NoReturn:
    """Skip for a missing backend *name*, or fail when the run requires it."""
    if name in required_backends(os.environ):
        pytest.fail(
            f"backend {name!r} is required (CI/FEMD_TEST_REQUIRE) but not available "
            f"on this host: {message}",
            pytrace=False,
        )
    pytest.skip(f"{message} (FEMD_TEST_REQUIRE={name} makes this a failure)")
