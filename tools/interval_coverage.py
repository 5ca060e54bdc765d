"""How often each kind of K* interval holds the measured best split of a budget it did not see:
the leave-one-budget-out checks of a sweep (`lobo_checks`), for every downstream set
and their average, every predictor and every way of drawing the interval.

    .venv/bin/python tools/interval_coverage.py docs/study-synthetic [--samples 200]

A held-out budget counts as covered when the interval holds its measured best K or the K of a
split measured within one seed std of the best (`near_best`). Widths are the median
ratio of the interval's ends (hi / lo) and its median width in classes. Writes the table and
every check as JSON beside it (coverage.json), so docs/synthetic.md can quote them.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import chain
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.study.calibrate import (  # noqa: E402
    PREDICTORS,
    bootstrap,
    interval,
    label,
    pooled_std,
    predict_split,
)
from dptrain.study.predict import data_limits  # noqa: E402
from dptrain.study.results import best_per_size, errors_by_point, read_results  # noqa: E402
from dptrain.study.theory import FitError  # noqa: E402

# How a K* interval may be drawn (calibrate.draws; "mix": the three predictors' "budgets"
# draws pooled, a third each)
INTERVALS = ("seeds", "residuals", "budgets", "mix")
MIXED = "budgets"  # how "mix" draws each predictor's share


def k_samples(points: dict, size: int, method: str, how: str, *, limits: dict | None = None,
              samples: int = 200, seed: int = 0) -> list[int]:
    """K* of `method` over `samples` resamplings of the points (`bootstrap`; "mix": the three
    predictors' `MIXED` draws pooled, a third each)."""
    if how == "mix":
        share = -(-samples // len(PREDICTORS))
        return list(chain.from_iterable(
            k_samples(points, size, m, MIXED, limits=limits, samples=share, seed=seed)
            for m in PREDICTORS))
    return [b["classes"] for b in bootstrap(points, size, method, how, limits=limits,
                                            samples=samples, seed=seed)]


def near_best(points: dict, size: int) -> list[int]:
    """The K of every split measured at a budget whose mean error is within one seed std
    (`pooled_std`) of the best's: splits the runs cannot tell from the best."""
    means = {p[0]: float(np.mean(v)) for p, v in points.items() if p[2] == size}
    best = min(means.values())
    return sorted(k for k, m in means.items() if m <= best + pooled_std(points, size))


def lobo_checks(sizes: list[int]) -> list[tuple[tuple[int, ...], int]]:
    """The leave-one-budget-out checks a study's budgets allow, as (fitted budgets, held-out
    budget): each budget above the smallest predicted from all the smaller ones and from the
    next smaller alone (one budget, as a user starts), and each budget between others
    interpolated from all the others."""
    sizes = sorted(sizes)
    checks = []
    for i, target in enumerate(sizes[1:], start=1):
        checks.append((tuple(sizes[:i]), target))
        if i > 1:
            checks.append(((sizes[i - 1],), target))
        if i < len(sizes) - 1:
            checks.append((tuple(s for s in sizes if s != target), target))
    return checks


def holds(ci: list[float] | None, good: list[int], measured: list[int]) -> bool:
    """Whether an interval holds a split the runs cannot tell from the best (`good`, of the
    `measured` K): one inside it, or, when it falls between two measured K and holds none,
    one of those two (a grid cannot check an interval finer than its own steps)."""
    if not ci:
        return False
    inside = [k for k in measured if ci[0] <= k <= ci[1]]
    if inside:
        return any(k in good for k in inside)
    below = [k for k in measured if k < ci[0]]
    above = [k for k in measured if k > ci[1]]
    return (bool(below) and max(below) in good) or (bool(above) and min(above) in good)


def coverage(by_set: dict[str, dict], how: str, method: str, *, limits: dict | None = None,
             samples: int = 200, level: float = 0.95) -> list[dict]:
    """Each leave-one-budget-out check of each set: `method`'s K* interval (drawn as `how`)
    fitted on the other budgets, and whether it holds the held-out budget's measured best K
    or a split within one seed std of it (`near_best`, `holds`)."""
    rows = []
    for name, points in by_set.items():
        for fitted, target in lobo_checks(sorted({p[2] for p in points})):
            sub = {p: v for p, v in points.items() if p[2] in fitted}
            try:
                k = predict_split(sub, target, method, limits)["classes"]
            except FitError:
                k = None
            ci = interval(k_samples(sub, target, method, how, limits=limits, samples=samples),
                          level)
            good = near_best(points, target)
            rows.append({"set": name, "fitted": list(fitted), "target": target,
                         "predicted": k, "interval": ci, "near_best": good,
                         "best": best_per_size(points)[target][0],
                         "covered": holds(ci, good, [p[0] for p in points if p[2] == target])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--max-classes", type=int, default=None)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--intervals", default=",".join(INTERVALS),
                    help="Which ways of drawing the interval to check [all].")
    a = ap.parse_args()
    by_set = errors_by_point(read_results(a.sweep))
    limits = data_limits(a.sweep, a.max_classes, a.max_per_class)
    rows, checks = [], {}
    for how in a.intervals.split(","):
        for method in (PREDICTORS if how != "mix" else ("any",)):
            got = coverage(by_set, how, PREDICTORS[0] if method == "any" else method,
                           limits=limits, samples=a.samples)
            checks[f"{how}/{method}"] = got
            ok = [c for c in got if c["interval"]]
            ratio = [c["interval"][1] / max(c["interval"][0], 1e-9) for c in ok]
            width = [c["interval"][1] - c["interval"][0] for c in ok]
            rows.append({"interval": how, "predictor": "all three pooled" if method == "any"
                         else label(method), "covered": sum(c["covered"] for c in got),
                         "checks": len(got), "median_hi_over_lo": float(np.median(ratio)),
                         "median_width_classes": float(np.median(width)),
                         "no_interval": len(got) - len(ok)})
    lines = ["| interval | predictor | covered | coverage | median hi/lo | median width, K |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['interval']} | {r['predictor']} | {r['covered']}/{r['checks']} | "
                     f"{r['covered'] / r['checks']:.0%} | {r['median_hi_over_lo']:.2f} | "
                     f"{r['median_width_classes']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (a.sweep / "coverage.json").write_text(json.dumps(
        {"samples": a.samples, "limits": limits, "rows": rows, "checks": checks}, indent=1))
    print(f"wrote {a.sweep / 'coverage.json'}")


if __name__ == "__main__":
    main()
