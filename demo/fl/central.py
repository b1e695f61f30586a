"""The orchestrator's check of the FL act: federated vs centrally trained model.

``python central.py MODEL_JSON CSV...`` (with the flower runtime's interpreter)
prints one JSON object: the federated model's accuracy on the pooled cohorts,
and the accuracy of the same model trained centrally on them (possible here
only because the demo made both cohorts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import flmodel
import numpy as np

CENTRAL_STEPS = 2000  # to convergence, on the pooled data


def main(argv: list[str]) -> int:
    """Print the comparison."""
    model = json.loads(Path(argv[0]).read_text())
    parts = [flmodel.load(Path(p)) for p in argv[1:]]
    x = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    federated = np.asarray(model["weights"], dtype=np.float64)
    central = flmodel.train(flmodel.initial(), x, y, CENTRAL_STEPS)
    f_loss, f_acc = flmodel.evaluate(federated, x, y)
    c_loss, c_acc = flmodel.evaluate(central, x, y)
    print(
        json.dumps(
            {
                "patients": len(y),
                "federated": {
                    "accuracy": f_acc,
                    "loss": f_loss,
                    "rounds": model["rounds"],
                },
                "central": {"accuracy": c_acc, "loss": c_loss, "steps": CENTRAL_STEPS},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
