"""Throwaway infrastructure for femd's integration tests and the README demo.

Not part of the femd package and never installed with it: the tests and the demo
import it with the repository root on ``sys.path``.

- :mod:`testbed.pki` makes a test CA and issues server and client certificates.
- :mod:`testbed.rabbit` runs a private RabbitMQ node (TLS only, SASL EXTERNAL) in a
  temporary directory and provisions femd's broker topology into vhosts.
- :mod:`testbed.slurm` runs a private single-node Slurm cluster (munge, slurmdbd
  on MariaDB, slurmctld, slurmd with cgroup limits) in a temporary directory.
"""

from __future__ import annotations

from testbed.pki import CA, Issued, client_context, make_ca
from testbed.rabbit import RabbitNode, RabbitNodeError, Vhost, rabbitmq_available

__all__ = [
    "CA",
    "Issued",
    "RabbitNode",
    "RabbitNodeError",
    "Vhost",
    "client_context",
    "make_ca",
    "rabbitmq_available",
]
