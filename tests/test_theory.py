"""theory.py: the error model's fits, the optimal split and the measured best ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TRUE, grid_points, model

from dptrain.study.theory import (
    Fit,
    FitError,
    best_ratio_measured,
    best_split,
    fit,
    near_minimum,
    split_for_ratio,
)


def test_fit_recovers_known_parameters_from_noisy_data():
    rng = np.random.default_rng(0)
    pts = grid_points()
    k, n = np.array(pts).T
    f = fit(k, n, model(k, n) + rng.normal(0, 0.002, len(k)))
    for name, value in TRUE.items():
        assert getattr(f, name) == pytest.approx(value, rel=0.15), name
    assert f.rmse < 0.004 and not f.at_bounds


def test_tied_fit_and_invariant_ratio():
    p = dict(TRUE, beta=TRUE["alpha"])
    k, n = np.array(grid_points()).T
    f = fit(k, n, model(k, n, p), tied=True)
    assert f.alpha == f.beta == pytest.approx(0.6, rel=0.02)
    # alpha = beta: r* = (a/b)^(1/alpha) at every N, and K* = sqrt(r* N)
    r = (p["a"] / p["b"]) ** (1 / p["alpha"])
    for size in (1e3, 1e5, 1e7):
        assert f.best_ratio(size) == pytest.approx(r, rel=0.05)
        assert f.best_classes(size) == pytest.approx(math.sqrt(r * size), rel=0.03)


def test_best_split_matches_the_closed_form_and_respects_limits():
    f = Fit(**TRUE, tied=False, rmse=0.0, points=10)
    size = 50_000
    s = TRUE["alpha"] + TRUE["beta"]
    closed = ((TRUE["alpha"] * TRUE["a"] / (TRUE["beta"] * TRUE["b"])) ** (1 / s)
              * size ** (TRUE["beta"] / s))
    assert f.best_classes(size) == pytest.approx(closed)
    ks = np.arange(1, size + 1)
    brute = int(ks[np.argmin(model(ks, size / ks))])  # the minimum over every integer K
    s = best_split(f, size)
    assert abs(s["classes"] - brute) <= 1 and not s["clipped"]
    assert s["per_class"] == round(size / s["classes"])
    s = best_split(f, size, max_classes=50)  # too few classes: all of them
    assert s["classes"] == 50 and s["clipped"]
    s = best_split(f, size, max_per_class=20)  # too few images per class: more classes
    assert s["classes"] == 2500 and s["per_class"] == 20 and s["clipped"]
    with pytest.raises(FitError, match="no split"):
        best_split(f, size, max_classes=10, max_per_class=10)


def test_too_few_points_is_an_error_not_a_number():
    with pytest.raises(FitError, match="too few points"):
        fit([10, 20, 40, 80], [100, 50, 25, 12], [0.5, 0.4, 0.45, 0.5])
    with pytest.raises(FitError, match="too few points"):
        fit([10] * 6, [1, 2, 3, 4, 5, 6], [0.5] * 6)  # one K value


def test_measured_ratio_and_the_split_for_a_ratio():
    rng = np.random.default_rng(1)
    pts = {(k, n, size): list(model(k, n) + rng.normal(0, 0.003, 3))
           for size in (1000, 4000, 16000) for k, n in grid_points(sizes=(size,))}
    true = Fit(**TRUE, tied=False, rmse=0, points=0)
    for size in (1000, 4000, 16000):
        m = best_ratio_measured(pts, size)
        grid = {k / n: model(k, n) for k, n in grid_points(sizes=(size,))}
        assert m["best_measured_ratio"] == pytest.approx(min(grid, key=grid.get))  # the grid's
        # The parabola through the best and its neighbours: within 1.25x of the true r*
        # (one grid step is 6.3x), on 3 seeds of noise 0.003.
        assert not m["edge"] and 0.8 < m["ratio"] / true.best_ratio(size) < 1.25, m
    # An exact parabola in log(K/n) gives its own vertex; a best at the grid's edge is flagged.
    exact = {(k, n, 100): [(math.log(k / n) - math.log(3)) ** 2]
             for k, n in [(1, 100), (5, 20), (10, 10), (20, 5), (100, 1)]}
    assert best_ratio_measured(exact, 100)["ratio"] == pytest.approx(3)
    edge = {key: [-v[0]] for key, v in exact.items()}  # best at K/n = 0.01, the first ratio
    assert best_ratio_measured(edge, 100) == {"size": 100, "ratio": pytest.approx(0.01),
                                              "edge": True,
                                              "best_measured_ratio": pytest.approx(0.01)}
    assert split_for_ratio(4.0, 10_000)["classes"] == 200
    assert split_for_ratio(4.0, 10_000, max_classes=100)["clipped"]


def test_near_minimum_keeps_the_points_around_each_budgets_best():
    pts = {(2, 500, 1000): [0.5], (10, 100, 1000): [0.4], (32, 31, 1000): [0.3],  # best: K/n 1
           (100, 10, 1000): [0.35], (250, 4, 1000): [0.45],
           (16, 1000, 16000): [0.3], (126, 127, 16000): [0.2], (1000, 16, 16000): [0.25]}
    assert sorted(near_minimum(pts, 12)) == [(10, 100, 1000), (32, 31, 1000), (100, 10, 1000),
                                            (126, 127, 16000)]  # K/n within 12x of the best
    assert near_minimum(pts, 1e6) == pts
