"""The model the demo's FL act trains: logistic regression in numpy.

Shared by the Flower server and clients (committed with them to the task's
git repository) and by the demo's centralised comparison, so both sides
compute exactly the same features, loss and accuracy. No torch, no download.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FEATURES = ("intercept", "age/10", "sex", "ejection_fraction/10", "log nt_probnp")
LOCAL_STEPS = 25
LEARNING_RATE = 0.5

Array = NDArray[np.float64]


def load(path: Path) -> tuple[Array, Array]:
    """Features and outcomes of a cohort CSV (demo/cohort.py's columns)."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append(
                [
                    1.0,
                    (float(r["age"]) - 70.0) / 10.0,
                    float(r["sex"]),
                    (float(r["ejection_fraction"]) - 40.0) / 10.0,
                    float(np.log(float(r["nt_probnp"]))) - 7.0,
                    float(r["outcome"]),
                ]
            )
    data = np.asarray(rows, dtype=np.float64)
    return data[:, :-1], data[:, -1]


def initial() -> Array:
    """The starting weights: zeros."""
    return np.zeros(len(FEATURES), dtype=np.float64)


def _sigmoid(z: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-z))


def train(w: Array, x: Array, y: Array, steps: int = LOCAL_STEPS) -> Array:
    """*steps* full-batch gradient steps on the mean log-loss from *w*."""
    w = w.copy()
    for _ in range(steps):
        w -= LEARNING_RATE * x.T @ (_sigmoid(x @ w) - y) / len(y)
    return w


def evaluate(w: Array, x: Array, y: Array) -> tuple[float, float]:
    """Mean log-loss and accuracy (threshold 0.5) of *w* on (*x*, *y*)."""
    p = np.clip(_sigmoid(x @ w), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return loss, float(np.mean((p >= 0.5) == (y == 1.0)))
