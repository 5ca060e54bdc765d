"""How often each kind of K* interval holds the measured best split of a budget it did not see:
the leave-one-budget-out checks of a sweep (calibrate.lobo_checks), for every downstream set
and their average, every predictor and every way of drawing the interval.

    .venv/bin/python tools/interval_coverage.py docs/study-synthetic [--samples 200]

A held-out budget counts as covered when the interval holds its measured best K or the K of a
split measured within one seed std of the best (calibrate.near_best). Widths are the median
ratio of the interval's ends (hi / lo) and its median width in classes. Writes the table and
every check as JSON beside it (coverage.json), so docs/synthetic.md can quote them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dptrain.calibrate import INTERVALS, PREDICTORS, coverage, label  # noqa: E402
from dptrain.predict import data_limits  # noqa: E402
from dptrain.results import errors_by_point, read_results  # noqa: E402


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
