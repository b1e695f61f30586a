"""The analysis that runs on each data node, inside femd's sandbox.

The demo commits this file to a git repository; the signed task names that
repository and the exact commit, and femd stages it in read-only at ``/src``.
It uses the Python standard library only (the sandbox has the host's
``/usr/bin/python3`` and nothing else), reads the cohort CSVs from the dataset
mount (read-only) and writes one JSON file of **partial sufficient statistics**
to the output directory. No row leaves the node, only sums:

- ``n`` and, per variable, the sum and the sum of squares: enough for the
  orchestrator to compute the pooled mean and variance exactly;
- for a logistic regression of ``outcome`` at the weights it was given, the
  gradient of the log-likelihood and the Fisher information (X'WX): enough for
  one federated Newton-Raphson round.

Sums use ``math.fsum`` (correctly rounded), so the pooled figures agree with a
centralised computation to the last few bits.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

VARIABLES: Final = ("age", "sex", "ejection_fraction", "nt_probnp", "outcome")
FEATURES: Final = ("intercept", "age_per_10y", "male", "ef_per_10pct", "log_ntprobnp")
SCHEMA: Final = "femd-demo/partial-stats/v1"


def features(row: dict[str, float]) -> list[float]:
    """The regression's design row for one patient (centred, readable units)."""
    return [
        1.0,
        (row["age"] - 70.0) / 10.0,
        row["sex"],
        (row["ejection_fraction"] - 40.0) / 10.0,
        math.log(row["nt_probnp"]) - 7.0,
    ]


def read_rows(data_dir: Path) -> list[dict[str, float]]:
    """Every row of every ``*.csv`` in *data_dir*, as floats."""
    rows: list[dict[str, float]] = []
    for path in sorted(data_dir.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            rows += [{k: float(r[k]) for k in VARIABLES} for r in csv.DictReader(f)]
    return rows


def logistic_terms(
    rows: Sequence[dict[str, float]], weights: Sequence[float]
) -> tuple[list[float], list[list[float]], float]:
    """Gradient, information matrix and log-likelihood at *weights*, over rows."""
    k = len(FEATURES)
    grad: list[list[float]] = [[] for _ in range(k)]
    info: list[list[list[float]]] = [[[] for _ in range(k)] for _ in range(k)]
    loglik: list[float] = []
    for row in rows:
        x = features(row)
        z = math.fsum(w * v for w, v in zip(weights, x, strict=True))
        p = 1.0 / (1.0 + math.exp(-z))
        y = row["outcome"]
        loglik.append(y * math.log(p) + (1.0 - y) * math.log1p(-p))
        for i in range(k):
            grad[i].append((y - p) * x[i])
            for j in range(k):
                info[i][j].append(p * (1.0 - p) * x[i] * x[j])
    return (
        [math.fsum(g) for g in grad],
        [[math.fsum(c) for c in line] for line in info],
        math.fsum(loglik),
    )


def partial_statistics(
    rows: Sequence[dict[str, float]], weights: Sequence[float]
) -> dict[str, object]:
    """This node's share of the analysis: sums only, never rows."""
    gradient, information, loglik = logistic_terms(rows, weights)
    return {
        "schema": SCHEMA,
        "n": len(rows),
        "variables": {
            name: {
                "sum": math.fsum(r[name] for r in rows),
                "sum_sq": math.fsum(r[name] * r[name] for r in rows),
            }
            for name in VARIABLES
        },
        "logistic": {
            "features": list(FEATURES),
            "weights": list(weights),
            "gradient": gradient,
            "information": information,
            "log_likelihood": loglik,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Read the cohort, write ``partial.json``; print one line for the log."""
    ap = argparse.ArgumentParser(description="partial statistics of a cohort")
    ap.add_argument("--data", type=Path, required=True, help="directory of CSVs")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--weights", required=True, help="comma-separated, one a feature")
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    if len(weights) != len(FEATURES):
        ap.error(f"--weights: expected {len(FEATURES)} values, got {len(weights)}")
    rows = read_rows(args.data)
    result = partial_statistics(rows, weights)
    (args.out / "partial.json").write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(f"partial statistics of {len(rows)} patients written\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
