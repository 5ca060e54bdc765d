"""Where a point's noise comes from, and what it takes to tell two splits apart.

A measured error is one draw of three kinds of chance: the subset (which classes and images:
`--subset-seed`), the training (init, data order, augmentation: `--seed`) and the test set
(which images the probe is scored on). The test set is fixed by the suite, so its share never
shows between the runs of a sweep, yet it stands between a measured error and the split's own;
and each image's chance of being right differs between trainings, so a larger test set also
quiets the run-to-run spread (Jordan 2023, "Calibrated chaos"). docs/noise-budget.md has the
budget of the built-in data, measured with these functions.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from .results import TIE_SE


def bootstrap_se(correct: np.ndarray, draws: int = 4000, seed: int = 0) -> float:
    """The standard error a probe's top-1 owes to its test set alone: the std of top-1 over
    resamples of the test images (with replacement; the probe's repeats of an image resampled
    together). `correct`: repeats x test images, booleans. Resampled as counts of the images'
    distinct scores (0, 1/R, .., 1 over R repeats): exact, and as fast for 50,000 images."""
    per_image = np.asarray(correct, dtype=float).reshape(-1, np.shape(correct)[-1]).mean(0)
    values, counts = np.unique(per_image, return_counts=True)
    n = len(per_image)
    drawn = np.random.default_rng(seed).multinomial(n, counts / n, size=draws)
    return float((drawn @ values / n).std(ddof=1))


def binomial_se(top1: float, images: int) -> float:
    """The floor of `bootstrap_se`: one coin per image, sqrt(p (1 - p) / n)."""
    return math.sqrt(top1 * (1 - top1) / images)


def independent_share(correct: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The share of the run-to-run variance of top-1 on a fixed test set that independent
    chance per image would give: `correct` is runs x test images (each run's correctness, its
    repeats averaged), top-1 the `weights`-weighted sum over images (the mean by default; an
    average over sets weights each set's images by 1 / (sets x its images)). The images'
    variances between runs, times their weights squared, summed, over the variance of the
    runs' top-1. Near 1: the spread between trainings is the test set's size speaking, and a
    test set k times larger cuts it k times; near 0: the runs differ as wholes."""
    correct = np.asarray(correct, dtype=float)
    if weights is None:
        weights = np.full(correct.shape[1], 1 / correct.shape[1])
    total = (correct @ weights).var(ddof=1)
    per_image = (correct.var(0, ddof=1) * weights ** 2).sum()
    return float(per_image / total) if total > 0 else math.nan


def pooled_variance(groups: list[list[float]]) -> tuple[float, int]:
    """The within-group variance pooled over groups of 2 or more values, and its degrees of
    freedom: (nan, 0) without any."""
    parts = [(statistics.variance(g), len(g) - 1) for g in groups if len(g) > 1]
    df = sum(d for _, d in parts)
    return (sum(v * d for v, d in parts) / df, df) if df else (math.nan, 0)


def variance_interval(variance: float, df: int, level: float = 0.95) -> tuple[float, float]:
    """The chi-square interval of a variance estimated with `df` degrees of freedom."""
    from scipy.stats import chi2

    tail = (1 - level) / 2
    return df * variance / chi2.ppf(1 - tail, df), df * variance / chi2.ppf(tail, df)


def difference_sd(points: dict[tuple[int, int, int], dict[int, float]]) -> tuple[float, int]:
    """The std of a per-seed difference between two splits of one budget, pooled over every
    pair of splits that share 2 or more seeds ({(K, n, N): {seed: error}}, as
    results.errors_by_seed gives): what a sweep measured of the noise of a comparison,
    pairing by seed included. (nan, 0) where no two splits share seeds."""
    keys = sorted(points)
    diffs = []
    for i, p in enumerate(keys):
        for q in keys[i + 1:]:
            shared = sorted(set(points[p]) & set(points[q]))
            if p[2] == q[2] and len(shared) > 1:
                diffs.append([points[p][s] - points[q][s] for s in shared])
    var, df = pooled_variance(diffs)
    return math.sqrt(var) if df else math.nan, df


def seeds_to_separate(sd_diff: float, gap: float = 0.01, z: float = TIE_SE) -> int:
    """Seeds each of two splits needs for a `gap` between them to lie `z` standard errors out,
    a per-seed difference having std `sd_diff`: the smallest m with z sd_diff / sqrt(m) <= gap
    (at least 2, the fewest that measure a spread)."""
    return max(2, math.ceil((z * sd_diff / gap) ** 2))


def near_best_range(err, size: int, tolerance: float, lo: float, hi: float) -> tuple[int, int]:
    """The K in [lo, hi] (whole numbers) whose error `err(K, size / K)` lies within
    `tolerance` of the least there: an interval, the error being convex in log K along a
    budget (theory.best_split)."""
    ks = np.unique(np.geomspace(max(1.0, lo), hi, 4000).round().clip(math.ceil(lo),
                                                                     math.floor(hi)))
    e = np.asarray(err(ks, size / ks), dtype=float)
    inside = ks[e <= e.min() + tolerance]
    return int(inside.min()), int(inside.max())
