"""The orchestrator's side of the analysis: pool partial results, and check them.

:func:`pool` combines the nodes' ``partial.json`` files (sums only) into pooled
means, variances and one Newton-Raphson step of a logistic regression.
:func:`centralise` computes the same figures the way a central analysis would,
over all rows at once; the demo can do that only because it generated both
datasets itself. :func:`compare` lines the two up.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from demo.node_analysis import FEATURES, SCHEMA, VARIABLES, logistic_terms

__all__ = ["Comparison", "Figures", "centralise", "compare", "pool"]


@dataclass(frozen=True)
class Figures:
    """The analysis result: per-variable mean and sample variance, and the model."""

    n: int
    mean: dict[str, float]
    variance: dict[str, float]
    coefficients: list[float]  # after one Newton-Raphson step from `start`
    start: list[float]


@dataclass(frozen=True)
class Comparison:
    """One figure, pooled and centralised, and how far apart they are."""

    name: str
    pooled: float
    central: float

    @property
    def difference(self) -> float:
        """The absolute difference."""
        return abs(self.pooled - self.central)

    @property
    def relative(self) -> float:
        """The difference relative to the centralised value (absolute below 1)."""
        return self.difference / max(1.0, abs(self.central))


def solve(a: Sequence[Sequence[float]], b: Sequence[float]) -> list[float]:
    """Solve ``a x = b`` by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if m[pivot][col] == 0:
            raise ValueError("singular information matrix")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - math.fsum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def newton_step(
    start: Sequence[float],
    gradient: Sequence[float],
    information: Sequence[Sequence[float]],
) -> list[float]:
    """``start + information^-1 gradient``: one Newton-Raphson round."""
    return [w + d for w, d in zip(start, solve(information, gradient), strict=True)]


def pool(partials: Iterable[Mapping[str, Any]]) -> Figures:
    """Combine the nodes' partial statistics into the pooled analysis.

    Raises:
        ValueError: a partial result is not what the analysis writes, or the
            nodes were given different starting weights.
    """
    parts = list(partials)
    if not parts or any(p.get("schema") != SCHEMA for p in parts):
        raise ValueError(f"expected partial results of schema {SCHEMA}")
    start = parts[0]["logistic"]["weights"]
    if any(p["logistic"]["weights"] != start for p in parts):
        raise ValueError("the nodes computed at different weights")
    n = sum(int(p["n"]) for p in parts)
    mean: dict[str, float] = {}
    variance: dict[str, float] = {}
    for name in VARIABLES:
        s = math.fsum(p["variables"][name]["sum"] for p in parts)
        q = math.fsum(p["variables"][name]["sum_sq"] for p in parts)
        mean[name] = s / n
        variance[name] = (q - s * s / n) / (n - 1)  # sample variance
    k = len(FEATURES)
    gradient = [
        math.fsum(p["logistic"]["gradient"][i] for p in parts) for i in range(k)
    ]
    information = [
        [math.fsum(p["logistic"]["information"][i][j] for p in parts) for j in range(k)]
        for i in range(k)
    ]
    return Figures(n, mean, variance, newton_step(start, gradient, information), start)


def centralise(rows: Sequence[dict[str, float]], start: Sequence[float]) -> Figures:
    """The same analysis over all rows at once (what pooling the data would give)."""
    mean = {v: statistics.fmean(r[v] for r in rows) for v in VARIABLES}
    variance = {v: statistics.variance([r[v] for r in rows]) for v in VARIABLES}
    gradient, information, _ = logistic_terms(rows, start)
    return Figures(
        len(rows),
        mean,
        variance,
        newton_step(start, gradient, information),
        list(start),
    )


def compare(pooled: Figures, central: Figures) -> list[Comparison]:
    """Every figure side by side: means, variances, coefficients."""
    rows = [Comparison("patients", pooled.n, central.n)]
    rows += [
        Comparison(f"mean {v}", pooled.mean[v], central.mean[v]) for v in VARIABLES
    ]
    rows += [
        Comparison(f"variance {v}", pooled.variance[v], central.variance[v])
        for v in VARIABLES
    ]
    rows += [
        Comparison(f"coef {f}", p, c)
        for f, p, c in zip(
            FEATURES, pooled.coefficients, central.coefficients, strict=True
        )
    ]
    return rows
