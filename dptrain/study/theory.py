"""The error model of the paper's two-step theory, err(K, n) = c0 + a K^-alpha + b n^-beta:
fit it to a sweep, find the best split of a budget N = K n, and predict it for a larger N
(`dptrain predict` and its rendering live in predict.py).

Minimising over K with n = N / K gives
    K* = (alpha a / (beta b))^(1 / (alpha + beta)) * N^(beta / (alpha + beta))
and the ratio r* = K* / n* is independent of N exactly when alpha = beta (then
K* = sqrt(r* N)). `fit(..., tied=True)` fits that special case (Zhang et al., NeurIPS 2023,
"On the Trade-off of Intra-/Inter-class Diversity for Supervised Pre-training").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..common.errors import DataError
from .results import best_per_size

PARAMS = ("c0", "a", "alpha", "b", "beta")
# Bounds keep the fit physical: errors and amplitudes >= 0, exponents in a range that a few
# octaves of K and n can tell apart.
_LOWER = {"c0": 0.0, "a": 0.0, "alpha": 0.01, "b": 0.0, "beta": 0.01}
_UPPER = {"c0": 1.0, "a": 1e3, "alpha": 4.0, "b": 1e3, "beta": 4.0}


class FitError(DataError):
    """Too few points, or a fit that did not converge: no number is made up."""


@dataclass(frozen=True)
class Fit:
    c0: float
    a: float
    alpha: float
    b: float
    beta: float
    tied: bool  # alpha = beta was imposed
    rmse: float
    points: int
    at_bounds: tuple[str, ...] = ()  # parameters that ended on a bound: treat with suspicion
    residuals: tuple[float, ...] = ()  # measured - fitted error, in the order of the points

    def err(self, k, n):
        return self.c0 + self.a * np.power(k, -self.alpha) + self.b * np.power(n, -self.beta)

    def best_classes(self, size: float) -> float:
        """K* for a budget N (unconstrained, real-valued)."""
        s = self.alpha + self.beta
        if self.a == 0 or self.b == 0:
            return math.inf if self.b == 0 else 0.0
        # in logs: a bootstrap's extreme fits overflow the power
        log_k = (math.log(self.alpha) + math.log(self.a) - math.log(self.beta)
                 - math.log(self.b) + self.beta * math.log(size)) / s
        return math.exp(log_k) if log_k < 700 else math.inf

    def best_ratio(self, size: float) -> float:
        """r* = K* / n* at a budget N."""
        k = self.best_classes(size)
        return k * k / size

    def as_dict(self) -> dict:
        return asdict(self)


def too_few_points(k, n, *, tied: bool = False) -> str | None:
    """Why points at these K and n cannot be fitted at all (None: they can be tried): one more
    distinct (K, n) than the fit has parameters, and two values of each. A sweep's plan asks
    this before any run (predict.grid_line)."""
    free = 4 if tied else 5
    distinct = len({(float(a), float(b)) for a, b in zip(k, n)})
    if distinct < free + 1 or len(set(k)) < 2 or len(set(n)) < 2:
        return (f"too few points to fit {free} parameters: {distinct} distinct (K, n) points "
                f"with {len(set(k))} K values and {len(set(n))} n values; need at least "
                f"{free + 1} points, 2 values of each")
    return None


def fit(k, n, err, *, tied: bool = False, start: Fit | None = None) -> Fit:
    """Least-squares fit of the model to mean errors at points (k, n); several starts, the
    best kept, or the one `start` (a fit of nearly the same errors: a bootstrap's refits,
    8x fewer solves). Raises FitError with the reason when it cannot be trusted.

    trf with the exact Jacobian: the fits of finite differences, 1.5x faster (predict's
    bootstraps are thousands of fits); dogbox, faster on clean data, stalled at 5,000 steps
    on some of the study's refits and lost them (benchmarks/predict_fit.py)."""
    from scipy.optimize import least_squares

    k, n, err = (np.asarray(v, dtype=float) for v in (k, n, err))
    short = too_few_points(k, n, tied=tied)
    if short:
        raise FitError(short)
    lk, ln = np.log(k), np.log(n)

    def unpack(p):
        return (p[0], p[1], p[2], p[3], p[2]) if tied else tuple(p)

    def residual(p):
        c0, a, alpha, b, beta = unpack(p)
        return c0 + a * np.exp(-alpha * lk) + b * np.exp(-beta * ln) - err

    def jacobian(p):  # exact, where finite differences took 5 residuals a step
        _, a, alpha, b, beta = unpack(p)
        ek, en = np.exp(-alpha * lk), np.exp(-beta * ln)
        d_alpha, d_beta = -a * lk * ek, -b * ln * en
        columns = [np.ones_like(ek), ek, d_alpha + d_beta if tied else d_alpha, en]
        return np.stack(columns if tied else [*columns, d_beta], axis=1)

    names = ("c0", "a", "alpha", "b") if tied else PARAMS
    lower, upper = [_LOWER[x] for x in names], [_UPPER[x] for x in names]
    best = None
    spread = max(float(err.max() - err.min()), 1e-3)
    starts = [{"c0": max(0.0, float(err.min()) - spread), "alpha": e0, "beta": e0,
               "a": share * 2 * spread * float(np.median(k)) ** e0,
               "b": (1 - share) * 2 * spread * float(np.median(n)) ** e0}
              for e0 in (0.25, 0.5, 1.0, 2.0) for share in (0.25, 0.75)]
    for x in [start.as_dict()] if start else starts:
        x0 = np.clip([x[name] for name in names], lower, upper)
        try:
            r = least_squares(residual, x0, jac=jacobian, bounds=(lower, upper), x_scale="jac",
                              max_nfev=5000)
        except ValueError:
            continue
        if r.status > 0 and (best is None or r.cost < best.cost):
            best = r
    if best is None or not np.all(np.isfinite(best.x)):
        raise FitError("the fit did not converge from any start")
    c0, a, alpha, b, beta = unpack(best.x)
    values = dict(zip(names, best.x))
    # A parameter the errors do not move at the solution (e.g. an exponent whose amplitude
    # went to 0) could take any value: the fit is underdetermined, and so is K*.
    sv = np.linalg.svd(best.jac, compute_uv=False)
    rank = int((sv > sv[0] * 1e-8).sum()) if sv[0] > 0 else 0
    if rank < len(names):
        found = ", ".join(f"{x}={values[x]:.3g}" for x in names)
        raise FitError(f"the fit is underdetermined: the points pin only {rank} of its "
                       f"{len(names)} parameters ({found})")
    at_bounds = tuple(x for x in names
                      if np.isclose(values[x], _LOWER[x], rtol=0, atol=1e-6)
                      or np.isclose(values[x], _UPPER[x], rtol=1e-4))
    rmse = float(np.sqrt(np.mean(best.fun ** 2)))
    return Fit(float(c0), float(a), float(alpha), float(b), float(beta), tied, rmse,
               len(err), at_bounds, tuple(float(-r) for r in best.fun))


def fit_points(points: dict[tuple, list[float]], *, tied: bool = False,
               start: Fit | None = None) -> tuple[Fit, list]:
    """The fit to mean errors at {(K, n, N): [error of each seed]}, and the points in the
    order of its residuals (by N, then K). `start`: as `fit`'s."""
    keys = sorted(points, key=lambda p: (p[2], p[0]))
    f = fit([p[0] for p in keys], [p[1] for p in keys],
            [float(np.mean(points[p])) for p in keys], tied=tied, start=start)
    return f, keys


def fit_line(f: Fit, intervals: dict | None = None) -> str:
    """The fitted parameters in one line, with 95% intervals when given; a parameter that
    ended on a bound is flagged: its value is a limit of the fit, not an estimate."""
    p, iv = f.as_dict(), intervals or {}
    outside = [k for k in PARAMS if iv.get(k) and not iv[k][0] <= p[k] <= iv[k][1]]
    values = " ".join(f"{k}={p[k]:.3g}" + (f" [{iv[k][0]:.3g}, {iv[k][1]:.3g}]" if iv.get(k)
                                            else "") + ("*" if k in outside else "")
                      for k in PARAMS)
    flag = (f"; ON A BOUND: {', '.join(f.at_bounds)} (a limit of the fit, not an estimate)"
            if f.at_bounds else "")
    if outside:
        flag += (f"; * {', '.join(outside)} outside its interval: the bootstrap refits do not "
                 "centre on this fit (too few points for it to be stable)")
    return f"{values}, rmse {f.rmse:.4f}{flag}"


def near_minimum(points: dict[tuple, list[float]], factor: float) -> dict[tuple, list[float]]:
    """The points whose K/n lies within `factor` of their budget's best measured K/n. A fit
    to them describes the error where the optimum is; the extremes (a handful of classes,
    or a handful of images per class) bend away from the model and would drag it."""
    best = best_per_size(points)
    out = {}
    for p, v in points.items():
        k0, n0, _ = best[p[2]]
        if abs(math.log(p[0] / p[1] * n0 / k0)) <= math.log(factor) + 1e-9:
            out[p] = v
    return out


def residual_line(keys: list[tuple], residuals) -> str:
    """Measured - fitted error per point, grouped by budget: where the model misses."""
    by_size: dict[int, list[str]] = {}
    for (k, n, size), x in zip(keys, residuals):
        by_size.setdefault(size, []).append(f"{k}x{n} {x:+.4f}")
    return "; ".join(f"N={s:,}: " + ", ".join(v) for s, v in by_size.items())


def class_limits(size: int, max_classes: int | None,
                  max_per_class: int | None) -> tuple[float, float]:
    """The range of K for a budget N: at most N and the classes available, at least 1 and
    enough classes that n = N / K fits in the images per class."""
    lo = max(1.0, size / max_per_class if max_per_class else 1.0)
    hi = min(float(size), float(max_classes) if max_classes else float(size))
    return lo, hi


def best_split(f: Fit, size: int, *, max_classes: int | None = None,
               max_per_class: int | None = None) -> dict:
    """The predicted best (K, n) for a budget N within the dataset's limits, as integers.

    The error along n = N / K is convex in log K, so the constrained optimum is the
    unconstrained one moved to the nearest limit; K is then rounded to the better neighbour.
    """
    lo, hi = class_limits(size, max_classes, max_per_class)
    if lo > hi:
        raise FitError(f"no split of N={size} fits the limits ({max_classes} classes of at most "
                       f"{max_per_class} images)")
    k_free = f.best_classes(size)
    k = min(max(k_free, lo), hi)
    cands = {c for c in (math.floor(k), math.ceil(k)) if lo - 1e-9 <= c <= hi + 1e-9} or {round(k)}
    k_int = min(cands, key=lambda c: float(f.err(c, size / c)))
    return {"size": size, "classes": int(k_int), "per_class": int(round(size / k_int)),
            "classes_unconstrained": k_free, "clipped": not lo <= k_free <= hi,
            "error": float(f.err(k_int, size / k_int))}


RATIOS_NEEDED = 3  # a parabola through the best measured K/n and its two neighbours


def best_ratio_measured(points: dict[tuple[int, int, int], list[float]], size: int) -> dict:
    """r* at one budget from the runs alone: a parabola through mean error against log(K/n)
    at the best measured point and its neighbours; its vertex if it lies between them, else
    the best measured ratio (flagged: the optimum may lie outside the grid)."""
    pts = sorted((math.log(k / n), float(np.mean(v))) for (k, n, s), v in points.items()
                 if s == size)
    if len(pts) < RATIOS_NEEDED:
        raise FitError(f"N={size}: {len(pts)} ratio(s) measured; the best ratio needs "
                       f"{RATIOS_NEEDED} or more")
    x, y = np.array(pts).T
    i = int(np.argmin(y))
    if 0 < i < len(x) - 1:
        c2, c1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
        if c2 > 0:
            return {"size": size, "ratio": float(math.exp(-c1 / (2 * c2))), "edge": False,
                    "best_measured_ratio": float(math.exp(x[i]))}
    return {"size": size, "ratio": float(math.exp(x[i])), "edge": True,
            "best_measured_ratio": float(math.exp(x[i]))}


def split_for_ratio(ratio: float, size: int, *, max_classes: int | None = None,
                    max_per_class: int | None = None) -> dict:
    """K = sqrt(r N), n = N / K (the paper's rule when r* is invariant), within the limits."""
    k = math.sqrt(ratio * size)
    lo, hi = class_limits(size, max_classes, max_per_class)
    kc = int(round(min(max(k, lo), hi)))
    return {"size": size, "classes": kc, "per_class": int(round(size / kc)),
            "classes_unconstrained": k, "clipped": not lo <= k <= hi}
