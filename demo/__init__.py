"""The newcomer's demo: a federated analysis on two femd data nodes, on one machine.

Run it with ``sudo ./scripts/demo`` (or ``.venv/bin/python -m demo`` once
``scripts/install.sh`` has run). It needs root because femd's sandboxes run the
task as a dedicated unprivileged user, as they do in production.

Modules, in the order the story uses them:

- :mod:`demo.walkthrough`: the story, one method per step (start here);
- :mod:`demo.fl_act`: ``--fl``, the FL act: a Flower session imported from
  FEM's documents (``demo/fl/fem``), with its task code in ``demo/fl``;
- :mod:`demo.federation`: what goes on disk (keys, broker, nodes, the git repo);
- :mod:`demo.cohort`: the synthetic cardiac cohorts each node holds;
- :mod:`demo.node_analysis`: the code that runs on each node, in the sandbox;
- :mod:`demo.pooling`: the orchestrator's pooling, and the centralised check;
- :mod:`demo.agents`: a ``femd run`` child process with sd_notify readiness;
- :mod:`demo.image`: the task image for ``--launcher podman``;
- :mod:`demo.console`: the live progress lines.

Not part of the femd package: it imports :mod:`testbed` from the repository root.
"""
