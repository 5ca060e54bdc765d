"""How far to trust a predicted split: each predictor's best K for a budget, K* intervals that
carry the model's doubt as well as the seeds', the predictor chosen on a held-out budget of the
user's own sweep, and the leave-one-budget-out checks that chose the interval.

The predictors are the free fit of err(K, n) = c0 + a K^-alpha + b n^-beta, the alpha = beta
fit, and the ratio rule K* = sqrt(r* N) with r* measured at the fitted budgets (theory.py).
`points` everywhere: {(K, n, N): [error of each seed]}.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .results import best_per_size, mean_std
from .theory import (
    RATIOS_NEEDED,
    FitError,
    best_ratio_measured,
    best_split,
    fit_points,
    near_minimum,
    split_for_ratio,
    too_few_points,
)

PREDICTORS = ("free", "tied", "ratio_rule")
PARAMETERS = {"ratio_rule": 1, "tied": 4, "free": 5}  # r*; c0, a, b, alpha = beta; and beta
# The K* interval `predict` prints: the free fit's "budgets" draws (see `draws`), the narrowest
# interval that held the held-out best split in 90% or more of the leave-one-budget-out checks
# of the built-in study (docs/synthetic.md, "How far to trust a prediction";
# tools/interval_coverage.py reruns them, with the other ways of drawing it).
INTERVAL = ("free", "budgets")


def label(method: str) -> str:
    return {"free": "free fit", "tied": "tied fit", "ratio_rule": "ratio rule"}[method]


def shortfall(keys, method: str) -> str | None:
    """Why `predict_split` cannot be made from points at these (K, n, N), whatever their errors
    (None: it can be tried; a fit may still fail on the errors): what a plan can tell before
    any run."""
    keys = set(keys)
    if method == "ratio_rule":
        if max(Counter(p[2] for p in keys).values(), default=0) < RATIOS_NEEDED:
            return f"no budget has the {RATIOS_NEEDED} ratios the measured best ratio needs"
        return None
    return too_few_points([p[0] for p in keys], [p[1] for p in keys], tied=method == "tied")


def predict_split(points: dict, size: int, method: str, limits: dict | None = None,
                  start=None) -> dict:
    """One predictor's best split of the budget `size`: {"classes", "per_class", ...} with the
    fit ("fit", "keys") or the measured ratios ("ratio", "measured"). FitError when it cannot
    be made. `start`: a fit to start from (theory.fit's)."""
    limits = limits or {}
    if method == "ratio_rule":
        ratios = []
        for s in sorted({p[2] for p in points}):
            try:
                ratios.append(best_ratio_measured(points, s))
            except FitError:
                pass
        if not ratios:
            raise FitError(shortfall(points, method))
        r = float(np.exp(np.mean([math.log(x["ratio"]) for x in ratios])))
        return {**split_for_ratio(r, size, **limits), "ratio": r, "measured": ratios}
    f, keys = fit_points(points, tied=method == "tied", start=start)
    return {**best_split(f, size, **limits), "fit": f, "keys": keys}


def at_budget(pred: dict, size: int, limits: dict | None = None) -> dict:
    """`predict_split`'s prediction for another budget, without fitting again: neither the
    fit nor the measured ratio depends on the budget. FitError when no split of `size` fits
    the limits."""
    limits = limits or {}
    split = best_split(pred["fit"], size, **limits) if "fit" in pred else \
        split_for_ratio(pred["ratio"], size, **limits)
    return {**pred, **split}


def draws(points: dict, how: str, samples: int, seed: int = 0, tied: bool = False):
    """Resampled versions of `points` for a bootstrap.

    "seeds": at each point the seeds are drawn with replacement (the doubt the seeds allow;
    one seed per point gives nothing). "residuals": a wild bootstrap: each point's mean error
    is the fit's value plus its residual times a random sign, so that what the model misses
    (the form, exponents that trade off) moves the fit as much as the seeds do. "budgets": as
    "residuals", fitted on the budgets drawn with replacement, so that budgets which disagree
    about the trend widen the interval. The residuals are those of the free fit (also for the
    ratio rule), or of the alpha = beta fit when `tied`, each divided by 1 - its leverage: a
    fit bends towards its points, most towards those at the grid's ends, whose residuals
    would otherwise understate their errors (HC3, MacKinnon & White 1985; sqrt(1 - leverage),
    HC2, held the true K* of simulated sweeps in 27 of 30 against HC3's 29)."""
    rng = np.random.default_rng(seed)
    keys = sorted(points)
    if how == "seeds":
        for _ in range(samples):
            yield {k: [float(np.mean(rng.choice(points[k], len(points[k]))))] for k in keys}
        return
    f, order = fit_points(points, tied=tied)
    fitted = dict(zip(order, f.err(np.array([k[0] for k in order]),
                                   np.array([k[1] for k in order]))))
    residual = dict(zip(order, np.asarray(f.residuals) / (1 - leverage(f, order))))
    by_size = sorted({k[2] for k in keys})
    for _ in range(samples):
        signs = rng.choice([-1.0, 1.0], len(keys))
        drawn = {k: [float(fitted[k] + s * residual[k])] for k, s in zip(keys, signs)}
        if how == "budgets" and len(by_size) > 1:  # and the budgets drawn with replacement
            chosen = set(rng.choice(by_size, len(by_size)))
            drawn = {k: v for k, v in drawn.items() if k[2] in chosen}
        yield drawn


def bootstrap(points: dict, size: int, method: str, how: str, *, limits: dict | None = None,
              samples: int = 200, seed: int = 0) -> list[dict]:
    """`method`'s prediction (`predict_split`) for each of `samples` resamplings of the points
    (`draws`), each refit from the fit to the points themselves. Draws whose fit fails are
    left out; none when the points cannot be fitted."""
    if samples < 1 or how == "seeds" and all(len(v) < 2 for v in points.values()):
        return []
    try:
        start = None if method == "ratio_rule" else \
            fit_points(points, tied=method == "tied")[0]
        resampled = list(draws(points, how, samples, seed, tied=method == "tied"))
    except FitError:
        return []
    out = []
    for p in resampled:
        try:
            out.append(predict_split(p, size, method, limits, start=start))
        except FitError:
            continue
    return out


def leverage(f, keys: list[tuple]) -> np.ndarray:
    """Each point's leverage on the fit, diag(J (J^T J)^+ J^T) with J the derivatives of the
    model's error at the points by its free parameters; at most 0.99."""
    k = np.array([p[0] for p in keys], float)
    n = np.array([p[1] for p in keys], float)
    tk, tn = np.power(k, -f.alpha), np.power(n, -f.beta)
    d_alpha, d_beta = -f.a * np.log(k) * tk, -f.b * np.log(n) * tn
    cols = [np.ones_like(k), tk, tn] + ([d_alpha + d_beta] if f.tied else [d_alpha, d_beta])
    j = np.stack(cols, 1)
    h = np.einsum("ij,jk,ik->i", j, np.linalg.pinv(j.T @ j), j)
    return np.clip(h, 0.0, 0.99)


def interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """The central `level` range of bootstrap values; None without any."""
    if not values:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def pooled_std(points: dict, size: int) -> float:
    """The seed-to-seed std of one point at a budget, pooled over its points (the std of a
    single point's two seeds is itself too noisy to judge by)."""
    var = [np.var(v, ddof=1) for p, v in points.items() if p[2] == size and len(v) > 1]
    return float(np.sqrt(np.mean(var))) if var else 0.0


def nearest_measured(points: dict, size: int, classes: int) -> tuple:
    """The split measured at a budget whose K is nearest `classes` (in log K)."""
    at = [p for p in points if p[2] == size]
    return min(at, key=lambda p: (abs(math.log(p[0] / classes)), p[0]))


def holdout_check(points: dict, *, near: float | None = None,
                  limits: dict | None = None) -> dict | None:
    """The predictors checked on the sweep itself: fit every budget but the largest, predict
    the largest's best split with each, and score each by the measured error of its split
    there, or of the measured split nearest it in K (a grid rarely holds the exact split).
    "chosen": of the predictors whose split lost at most one seed std (`pooled_std`) more than
    the best one's, the one with the fewest parameters. None with fewer than 2 budgets."""
    sizes = sorted({p[2] for p in points})
    if len(sizes) < 2:
        return None
    size = sizes[-1]
    small = {p: v for p, v in points.items() if p[2] != size}
    if near:
        small = near_minimum(small, near)
    bk, bn, _ = best_per_size(points)[size]
    best = float(np.mean(points[bk, bn, size]))
    rows = []
    for method in PREDICTORS:
        try:
            pred = predict_split(small, size, method, limits)
        except FitError as e:
            rows.append({"method": method, "error": str(e)})
            continue
        k, f = pred["classes"], pred.get("fit")
        run = nearest_measured(points, size, k)
        mean = float(np.mean(points[run]))
        rows.append({"method": method, "classes": k, "per_class": int(round(size / k)),
                     "exact": run[0] == k, "scored": {"classes": run[0], "per_class": run[1]},
                     "measured": mean_std(points[run]), "gap_points": 100 * (mean - best),
                     "at_bounds": list(f.at_bounds) if f else []})
    scored = [r for r in rows if "gap_points" in r]
    std = 100 * pooled_std(points, size)
    chosen = None
    if scored:  # the one-standard-error rule (Breiman et al. 1984): within a seed std of the
        # best gap the check cannot rank them, so the fewest parameters win
        top = min(r["gap_points"] for r in scored)
        chosen = min((r for r in scored if r["gap_points"] <= top + std),
                     key=lambda r: (PARAMETERS[r["method"]], r["gap_points"]))
    return {"size": size, "fit_sizes": sizes[:-1], "near": near, "rows": rows,
            "chosen": chosen["method"] if chosen else None,
            "best": {"classes": bk, "per_class": bn, "error": mean_std(points[bk, bn, size])},
            "seed_std_points": std}
