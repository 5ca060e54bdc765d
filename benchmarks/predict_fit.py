"""The error model's fits, the inner loop of `dptrain predict`'s bootstraps: dptrain's solver
(trf with the exact Jacobian) against the baseline, trf with finite differences as before
2026-11-30, and against dogbox with the exact Jacobian, the same fits in one run.

    .venv/bin/python benchmarks/predict_fit.py
    # target: baseline / dptrain > 1, the same point fit, refits and interval

The committed study's average error (docs/study-synthetic), fitted on N = 1,000 and 4,000:
the point fit (8 starts), then the interval `predict` prints (the free fit's "budgets"
bootstrap) for N = 16,000 with 100 refits. Each solver is scipy's least_squares with the
Jacobian or the method `theory.fit` passes swapped; CPU time of this process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import scipy.optimize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

from dptrain.study.calibrate import bootstrap, interval  # noqa: E402
from dptrain.study.results import AVERAGE, errors_by_point, read_results  # noqa: E402
from dptrain.study.theory import fit_points  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "docs" / "study-synthetic"
LIMITS = {"max_classes": 600, "max_per_class": 500}
SAMPLES = 100


def run(name: str, points: dict) -> dict:
    steps = []
    real = scipy.optimize.least_squares

    def counted(*a, **kw):
        if name == "baseline":  # a 2-point finite-difference Jacobian, scipy's default
            kw.pop("jac")
        elif name == "dogbox":
            kw["method"] = "dogbox"
        r = real(*a, **kw)
        steps.append(r.nfev)
        return r

    scipy.optimize.least_squares = counted
    try:
        t = time.process_time()
        f, _ = fit_points(points)
        fit_s = time.process_time() - t
        t = time.process_time()
        ks = [b["classes"] for b in bootstrap(points, 16000, "free", "budgets", limits=LIMITS,
                                              samples=SAMPLES)]
        boot_s = time.process_time() - t
    finally:
        scipy.optimize.least_squares = real
    lo, hi = interval(ks)
    return {"solver": name, "point fit, s": fit_s, "bootstrap, s": boot_s,
            "solves": len(steps), "steps a solve": sum(steps) / len(steps),
            "most steps": max(steps), "refits kept": len(ks),
            "alpha": round(f.alpha, 4), "beta": round(f.beta, 4), "rmse": round(f.rmse, 5),
            "K* interval": f"{lo:.0f}..{hi:.0f}"}


def main() -> None:
    points = {p: v for p, v in errors_by_point(read_results(STUDY))[AVERAGE].items()
              if p[2] in (1000, 4000)}
    rows = [run(name, points) for name in ("baseline", "dptrain", "dogbox")]
    base, ours, _ = rows
    ratio = (base["point fit, s"] + base["bootstrap, s"]) / (ours["point fit, s"]
                                                             + ours["bootstrap, s"])
    same = all(base[k] == ours[k] for k in ("alpha", "beta", "rmse", "refits kept",
                                              "K* interval"))
    print(table(rows))
    print(f"baseline / dptrain CPU time = {ratio:.2f} (target > 1); the same point fit, refits "
          f"and interval: {same}")
    path = save("predict_fit", {"data": str(STUDY.relative_to(STUDY.parents[1])),
                                "set": AVERAGE, "fitted_sizes": [1000, 4000], "target": 16000,
                                "samples": SAMPLES, "rows": rows, "ratio": ratio,
                                "same_fits": same, "target_ratio": "> 1, the same fits"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
