"""The node's policy, written by its data stewards: types, loading, lint.

Owns the policy document (``kind: Policy``, ``document``), ``load_policy()``
(one file or a directory of ``*.yaml`` merged in name order, key files
resolved relative to the policy file: ``load``) and ``lint()``
(``problems``). Errors name the file, line and field. Applying the policy to
a task is ``decision``'s business.
"""

from femd.policy.document import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PIDS,
    DEFAULT_TIMEOUT_S,
    Dataset,
    Defaults,
    IngressPolicy,
    MaxResources,
    NetworkPolicy,
    OutputsPolicy,
    Policy,
    Project,
    Runtime,
    Signer,
    policy_schema,
)
from femd.policy.load import (
    LoadedPolicy,
    SignerKey,
    lint_file,
    lint_warnings,
    load_policy,
)
from femd.policy.problems import Problem, lint, valid_peer

__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_PIDS",
    "DEFAULT_TIMEOUT_S",
    "Dataset",
    "Defaults",
    "IngressPolicy",
    "LoadedPolicy",
    "MaxResources",
    "NetworkPolicy",
    "OutputsPolicy",
    "Policy",
    "Problem",
    "Project",
    "Runtime",
    "Signer",
    "SignerKey",
    "lint",
    "lint_file",
    "lint_warnings",
    "load_policy",
    "policy_schema",
    "valid_peer",
]
