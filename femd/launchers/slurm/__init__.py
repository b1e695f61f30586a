"""The ``slurm`` launcher: a task becomes a batch job on the site's Slurm cluster.

One femd per site drives a whole cluster with the same policy, sandbox and
events as on one host. A task is submitted with ``sbatch`` (its limits as
Slurm's own: ``--cpus-per-task``, ``--mem``, ``--time``; partition, account and
QOS from the launcher profile) and runs on a compute node in the same
bubblewrap sandbox as the ``process`` launcher. Inputs, code and the output
directory go through the profile's ``stage_dir`` on the shared filesystem.

- ``client``: the Slurm commands (``sbatch``, ``scontrol``, ``squeue``,
  ``scancel``, ``sacct``), with a clean environment and one-line errors.
- ``cluster``: what the cluster can enforce, read from ``scontrol show
  config`` (pure).
- ``stage``: the per-task stage directory, the job script, copying outputs back.
- ``handle``: one job: poll, timeout, cancel, accounting, outcome.
- ``launcher``: ``SlurmLauncher`` (probe, launch, adopt).
- ``settings``: its profile section and spec checks (what the registry needs
  without importing the rest: this package's ``__init__`` imports nothing).

Does not decide what may run (the policy does) nor pack outputs (``stageout``
does, from the copy this launcher brings back).
"""
