"""Synthetic heart-failure cohorts: the data each demo node holds.

Nothing here is real patient data. Each node gets a seeded random cohort, so a
run is reproducible: the same seed gives the same CSV bytes, hence the same
statistics. The two nodes differ in size and case mix, as two hospitals would.

Columns (one row per patient):

- ``age``: years, integer;
- ``sex``: 1 male, 0 female;
- ``ejection_fraction``: left-ventricular ejection fraction, %, integer;
- ``nt_probnp``: NT-proBNP, pg/mL, one decimal;
- ``outcome``: 1 if death or heart-failure hospitalisation within a year.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["COLUMNS", "SITES", "Site", "read_cohort", "write_cohort"]

COLUMNS: Final = ("age", "sex", "ejection_fraction", "nt_probnp", "outcome")


@dataclass(frozen=True)
class Site:
    """One data node's cohort recipe: how many patients, and its case mix."""

    node: str
    patients: int
    seed: int
    mean_age: float
    male_share: float


SITES: Final = (
    Site("fdn-01", patients=1200, seed=20261122, mean_age=68.0, male_share=0.62),
    Site("fdn-02", patients=800, seed=20261123, mean_age=73.0, male_share=0.55),
)


def _clip(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _patient(rng: random.Random, site: Site) -> tuple[int, int, int, float, int]:
    age = round(_clip(rng.gauss(site.mean_age, 10.0), 30, 97))
    sex = int(rng.random() < site.male_share)
    ef = round(_clip(rng.gauss(40.0 - 3.0 * sex, 12.0), 10, 75))
    log_bnp = rng.gauss(7.0 + 0.03 * (age - 70) - 0.03 * (ef - 40), 0.9)
    nt_probnp = round(math.exp(log_bnp), 1)
    risk = -1.2 + 0.35 * (age - 70) / 10 + 0.2 * sex - 0.45 * (ef - 40) / 10
    risk += 0.6 * (log_bnp - 7.0)
    outcome = int(rng.random() < 1 / (1 + math.exp(-risk)))
    return age, sex, ef, nt_probnp, outcome


def write_cohort(site: Site, path: Path) -> int:
    """Write *site*'s cohort as CSV to *path* (world-readable); return the rows."""
    rng = random.Random(site.seed)  # noqa: S311 (synthetic data, seeded on purpose)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(COLUMNS)
        for _ in range(site.patients):
            out.writerow(_patient(rng, site))
    path.chmod(0o644)  # the sandboxed task runs as an unprivileged user
    return site.patients


def read_cohort(path: Path) -> list[dict[str, float]]:
    """Read a cohort CSV back as floats, one dict per patient."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(row[k]) for k in COLUMNS} for row in csv.DictReader(f)]
