"""calibrate.py: each predictor's split, intervals that hold, the held-out choice of predictor,
and the leave-one-budget-out checks."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import TRUE, model

from dptrain.study.calibrate import (
    at_budget,
    draws,
    holdout_check,
    interval,
    leverage,
    pooled_std,
    predict_split,
)
from dptrain.study.theory import Fit, FitError, best_split, fit_points

# The coverage study's tooling lives in tools/ (only it and these tests use it).
_spec = importlib.util.spec_from_file_location(
    "interval_coverage", Path(__file__).resolve().parents[1] / "tools" / "interval_coverage.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
coverage, holds, k_samples, lobo_checks, near_best = (
    _tool.coverage, _tool.holds, _tool.k_samples, _tool.lobo_checks, _tool.near_best)

KS = (4, 10, 25, 63, 160, 400)


def noisy_points(rng, sizes=(1000, 4000), ks=KS, seeds=2, noise=0.004, params=TRUE) -> dict:
    return {(k, s // k, s): [float(model(k, s // k, params)) + rng.normal(0, noise)
                             for _ in range(seeds)]
            for s in sizes for k in ks if s // k >= 2}


def test_lobo_checks_are_extrapolation_from_all_and_from_one_and_interpolation():
    assert lobo_checks([16000, 1000, 4000]) == [((1000,), 4000), ((1000, 16000), 4000),
                                                ((1000, 4000), 16000), ((4000,), 16000)]
    assert lobo_checks([1000, 4000]) == [((1000,), 4000)]


def test_seed_draws_are_centred_on_the_truth_and_residual_draws_keep_the_fit():
    pts = noisy_points(np.random.default_rng(1), sizes=(1000, 4000, 16000), seeds=3)
    fits = [fit_points(p)[0] for p in draws(pts, "seeds", 20)]
    alphas = np.array([f.alpha for f in fits])  # noise 0.004 on errors of ~0.1-0.5:
    assert np.median(alphas) == pytest.approx(TRUE["alpha"], rel=0.2)  # centred on the truth
    assert 0 < np.percentile(alphas, 97.5) - np.percentile(alphas, 2.5) < 0.6 * TRUE["alpha"]
    f, keys = fit_points(pts)
    h = leverage(f, keys)
    assert 0 < h.min() and h.max() < 1 and h.sum() == pytest.approx(5, rel=1e-6)  # 5 parameters
    for p in draws(pts, "residuals", 3):  # the fit plus or minus each point's own residual,
        for key, r, hi in zip(keys, f.residuals, h):  # grown by its leverage
            assert abs(p[key][0] - float(f.err(key[0], key[1]))) == pytest.approx(
                abs(r) / (1 - hi), rel=1e-9)
    budgets = [{p[2] for p in d} for d in draws(pts, "budgets", 20)]
    assert {1000, 4000, 16000} in budgets and any(len(b) < 3 for b in budgets)
    one_seed = {p: v[:1] for p, v in pts.items()}
    assert k_samples(one_seed, 64000, "free", "seeds", samples=5) == []  # nothing to resample
    assert len(k_samples(one_seed, 64000, "free", "residuals", samples=5)) == 5


def test_intervals_cover_the_true_best_k_at_about_the_nominal_rate():
    # Errors from a model with known exponents (alpha 0.6, beta 0.4), 2 seeds per point,
    # fitted on N = 1,000 and 4,000: how often does each 95% interval hold the true K* of
    # N = 16,000 over 20 independent sweeps? (The interval predict prints is the free fit's
    # "budgets" draws, calibrate.INTERVAL.)
    truth = Fit(**TRUE, tied=False, rmse=0, points=0).best_classes(16000)
    held = {"residuals": 0, "budgets": 0, "seeds": 0}
    for draw in range(20):
        pts = noisy_points(np.random.default_rng(100 + draw), noise=0.006)
        for how in held:
            lo, hi = interval(k_samples(pts, 16000, "free", how, samples=60, seed=draw))
            held[how] += lo <= truth <= hi
    assert held["residuals"] >= 16 and held["budgets"] >= 17, held  # ~95%: 19 of 20
    assert held["seeds"] <= held["residuals"], held  # the seeds alone claim too much


def test_near_best_is_within_one_pooled_seed_std_and_coverage_counts_it():
    pts = {(10, 100, 1000): [0.30, 0.32], (20, 50, 1000): [0.305, 0.325],
           (40, 25, 1000): [0.34, 0.36], (5, 200, 1000): [0.40, 0.41]}
    assert pooled_std(pts, 1000) == pytest.approx(
        np.sqrt(np.mean([np.var(v, ddof=1) for v in pts.values()])))
    assert near_best(pts, 1000) == [10, 20]  # 0.315 is within 0.0128 of 0.31; 0.35 is not
    # a study on a grid fine enough (K in steps of sqrt 2) that its best split is near K*:
    # the free fit's intervals hold the held-out budgets' best
    fine = [round(4 * 2 ** (i / 2)) for i in range(15)]
    pts = noisy_points(np.random.default_rng(3), sizes=(1000, 4000, 16000), ks=fine,
                       noise=0.002)
    rows = coverage({"a": pts}, "residuals", "free", samples=40)
    assert [(r["fitted"], r["target"]) for r in rows] == [
        (list(f), t) for f, t in lobo_checks([1000, 4000, 16000])]
    assert sum(r["covered"] for r in rows) >= 3
    grid = [10, 20, 40, 80]  # an interval holds a near-best split, or lies beside one
    assert holds([15, 30], [20], grid) and not holds([15, 30], [40], grid)
    assert holds([22, 30], [20], grid) and holds([22, 30], [40], grid)
    assert not holds([22, 30], [80], grid) and not holds(None, [20], grid)


def test_holdout_check_scores_the_nearest_run_split_and_chooses_the_smallest_gap():
    pts = {(k, s // k, s): [float(model(k, s // k)) + d for d in (-0.001, 0.001)]
           for s in (1000, 4000, 16000) for k in KS if s // k >= 2}
    small = {p: v for p, v in pts.items() if p[2] < 16000}
    k = best_split(fit_points(small)[0], 16000)["classes"]
    c = holdout_check(pts)  # the exact split was not run: scored at the nearest run K
    free = next(r for r in c["rows"] if r["method"] == "free")
    assert not free["exact"] and free["classes"] == k
    near_k = min((p[0] for p in pts if p[2] == 16000), key=lambda x: abs(np.log(x / k)))
    assert free["scored"]["classes"] == near_k
    pts[(k, round(16000 / k), 16000)] = [float(model(k, round(16000 / k)))] * 2  # now it was
    c = holdout_check(pts)
    assert c["size"] == 16000 and c["fit_sizes"] == [1000, 4000]
    free = next(r for r in c["rows"] if r["method"] == "free")
    assert free["exact"] and (free["classes"], free["per_class"]) == (k, round(16000 / k))
    assert free["measured"][0] == pytest.approx(float(model(k, round(16000 / k))))
    assert free["gap_points"] == pytest.approx(100 * (free["measured"][0] - c["best"]["error"][0]))
    assert free["gap_points"] <= 0  # the prediction is the true optimum here: nothing beats it
    assert free["measured"][1] == 0 and c["best"]["error"][1] == pytest.approx(  # sample std,
        statistics.stdev(pts[c["best"]["classes"], c["best"]["per_class"], 16000]))  # as table
    gaps = {r["method"]: r["gap_points"] for r in c["rows"]}  # within a seed std of the best,
    fewest = {"ratio_rule": 1, "tied": 4, "free": 5}  # the fewest parameters
    near = [m for m, g in gaps.items() if g <= min(gaps.values()) + c["seed_std_points"]]
    assert c["chosen"] == min(near, key=fewest.get)
    two = holdout_check(small)  # two budgets: fitted on one, checked on the other
    assert two["fit_sizes"] == [1000] and two["size"] == 4000
    assert holdout_check({p: v for p, v in pts.items() if p[2] == 1000}) is None


def test_each_predictor_gives_a_split_and_the_ratio_rule_reads_the_runs():
    pts = noisy_points(np.random.default_rng(5), sizes=(1000, 4000, 16000), noise=0.001)
    truth = Fit(**TRUE, tied=False, rmse=0, points=0).best_classes(64000)
    free = predict_split(pts, 64000, "free")
    assert 0.7 * truth <= free["classes"] <= 1.4 * truth and free["fit"].points == len(pts)
    rule = predict_split(pts, 64000, "ratio_rule", {"max_classes": 100})
    assert rule["classes"] == 100 and rule["clipped"] and len(rule["measured"]) == 3


def test_a_prediction_moved_to_another_budget_is_the_prediction_made_there():
    """at_budget reuses the fit (or the measured ratio): it is the same at any budget, so the
    split equals a fresh prediction at that budget, limits included."""
    pts = noisy_points(np.random.default_rng(6), sizes=(1000, 4000))
    limits = {"max_classes": 100, "max_per_class": 1000}
    keys = ("size", "classes", "per_class", "clipped")
    clipped = 0
    for method in ("free", "tied", "ratio_rule"):
        pred = predict_split(pts, 16000, method, limits)
        for size in (2000, 8000, 64000):
            moved, fresh = at_budget(pred, size, limits), predict_split(pts, size, method, limits)
            assert {k: moved[k] for k in keys} == {k: fresh[k] for k in keys}, (method, size)
            clipped += moved["clipped"]
    assert clipped  # the limits were met on the way
    with pytest.raises(FitError):  # no split of 200,000 fits 100 classes of 1,000
        at_budget(predict_split(pts, 16000, "free", limits), 200_000, limits)
