"""`dptrain predict`: the best split of a budget N for every downstream set of a sweep, from
the theory's fits (theory.py) and the ratio rule, with bootstrap intervals, the limits the
shard set puts on K and n, and which predictor to trust.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass
from pathlib import Path

import numpy as np

from .index import ShardIndex
from .options import option
from .results import best_per_size, errors_by_point, read_results
from .runfolder import SweepFolder
from .theory import (
    PARAMS,
    Fit,
    FitError,
    best_ratio_measured,
    best_split,
    bootstrap,
    fit_line,
    fit_points,
    near_minimum,
    residual_line,
    split_for_ratio,
)

# The predictor `predict` recommends, and the fallbacks when it cannot be made. From the held-out
# budget of the built-in study (docs/synthetic.md): fitted on N = 1,000 and 4,000, the alpha = beta
# fit's split measured 0.5 points from the best at N = 16,000, the ratio rule's 1.0, the free fit's
# 1.8; with two exponents the free fit's K* 95% interval was 4x as wide (131..248 vs 118..147).
RECOMMENDED = ("tied", "ratio_rule", "free")
WHY_RECOMMENDED = "it held out best on the built-in study, docs/synthetic.md"



def _interval(values: list[float]) -> list[float] | None:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] \
        if values else None


def data_limits(sweep_dir, max_classes: int | None = None,
                max_per_class: int | None = None) -> dict:
    """The classes and images per class a split may use: as given, else the sweep's shard
    set's (its classes with images, its smallest class); None where neither is known (a
    sweep folder copied without its data)."""
    data = SweepFolder(sweep_dir).read_spec().get("data")
    if (max_classes is None or max_per_class is None) and data and Path(data).is_dir():
        counts = ShardIndex.load(data).counts
        counts = counts[counts > 0]
        max_classes = max_classes or len(counts)
        max_per_class = max_per_class or int(counts.min())
    return {"max_classes": max_classes, "max_per_class": max_per_class}


@dataclass(frozen=True)
class PredictOptions:
    """`dptrain predict`'s options."""

    size: int = option(MISSING, "The budget N to predict the best split for.", low=1)
    fit_sizes: tuple = option((), "Fit only the points of these budgets [all], e.g. the small "
                              "ones, to check the prediction against the sweep's own runs at "
                              "--size.", kind="ints")
    max_classes: int | None = option(None, "Classes available [the sweep's shard set].", low=1)
    max_per_class: int | None = option(None, "Images per class available [the smallest class "
                                       "of the shard set].", low=1)
    samples: int = option(200, "Bootstrap fits over seeds for the uncertainty (0: none).",
                          low=0, flag="--bootstrap")
    near: float | None = option(None, "Fit only the points whose K/n is within this factor of "
                                "their budget's best measured K/n [all points].", low=1,
                                flag="--fit-near")


def predict_sweep(sweep_dir, size: int, *, fit_sizes: list[int] = (),
                  max_classes: int | None = None, max_per_class: int | None = None,
                  samples: int = 200, near: float | None = None) -> dict:
    """`dptrain predict`: fits and predictions for every downstream set of a sweep and their
    average. Fits that cannot be made are listed in "failures", with no numbers."""
    limits = data_limits(sweep_dir, max_classes, max_per_class)
    max_classes, max_per_class = limits["max_classes"], limits["max_per_class"]
    out = {"size": size, "fit_sizes": sorted(fit_sizes) or "all", "limits": limits, "sets": {},
           "near": near, "failures": []}
    for name, points in errors_by_point(read_results(sweep_dir)).items():
        fitted = {p: v for p, v in points.items() if not fit_sizes or p[2] in fit_sizes}
        if near:
            fitted = near_minimum(fitted, near)
        sizes = sorted({p[2] for p in fitted})
        entry: dict = {"points": len(fitted), "sizes": sizes}
        measured = best_per_size(points).get(size)
        if measured:
            entry["measured_best_at_size"] = {"classes": measured[0], "per_class": measured[1],
                                              "error": float(np.mean(points[measured]))}
        single = sum(len(v) < 2 for v in fitted.values())
        for tied in (False, True):
            label = "tied" if tied else "free"
            try:
                f, keys = fit_points(fitted, tied=tied)
                pred = best_split(f, size, **limits)
            except FitError as e:
                entry[label] = {"error": str(e)}
                out["failures"].append(f"{name}, {label} fit: {e}")
                continue
            # Resampling one seed per point gives the same fit every time: a zero-width
            # interval that would claim certainty the runs do not have.
            boots = bootstrap(fitted, tied=tied, samples=samples) if samples and not single \
                else []
            r = {"params": f.as_dict(), "ratio_at": {str(s): f.best_ratio(s) for s in sizes},
                 "prediction": pred, "bootstrap_fits": len(boots),
                 "single_seed_points": single,
                 "intervals": {p: _interval([getattr(b, p) for b in boots]) for p in PARAMS},
                 "residuals": [{"classes": p[0], "per_class": p[1], "size": p[2],
                                "residual": x} for p, x in zip(keys, f.residuals)]}
            r["intervals"]["classes"] = _interval(
                [best_split(b, size, **limits)["classes"] for b in boots])
            if max_classes:
                k = min(max_classes, size)
                r["all_classes"] = {"classes": k, "per_class": round(size / k),
                                    "error": float(f.err(k, size / k)),
                                    "feasible": not max_per_class or size / k <= max_per_class}
            entry[label] = r
        ratios = []
        for s in sizes:
            try:
                ratios.append(best_ratio_measured(fitted, s))
            except FitError:
                pass
        if ratios:
            r_star = float(np.exp(np.mean([math.log(x["ratio"]) for x in ratios])))
            entry["ratio_rule"] = {"measured": ratios, "ratio": r_star,
                                   "prediction": split_for_ratio(r_star, size, **limits)}
        entry["recommended"] = next((m for m in RECOMMENDED if "prediction" in entry.get(m, {})),
                                    None)
        out["sets"][name] = entry
    return out


def render(out: dict) -> str:
    """The predict result as text."""
    near = (f", within {out['near']:g}x of each budget's best K/n" if out.get("near") else "")
    lines = [f"prediction for N={out['size']:,} from the points of N in {out['fit_sizes']}"
             f"{near}; limits: {out['limits']['max_classes']} classes, "
             f"{out['limits']['max_per_class']} images per class"]
    for name, e in out["sets"].items():
        lines.append(f"\n{name}: {e['points']} points at N = {e['sizes']}")
        for label in ("free", "tied"):
            r = e.get(label)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"  {label} fit: not possible: {r['error']}")
                continue
            pred = r["prediction"]
            f = Fit(**r["params"])
            lines.append(f"  {label} fit{' (alpha = beta)' if label == 'tied' else ''}: "
                         + fit_line(f, r["intervals"]))
            if not r["bootstrap_fits"]:
                lines.append("    no 95% intervals: " + (
                    f"a single seed at {r['single_seed_points']} of {e['points']} points "
                    "(run --seeds 2 or more)" if r["single_seed_points"] else "--bootstrap 0"))
            lines.append("    residuals (measured - fit): " + residual_line(
                [(x["classes"], x["per_class"], x["size"]) for x in r["residuals"]],
                [x["residual"] for x in r["residuals"]]))
            lines.append("    r* = K*/n* at measured N: " + ", ".join(
                f"N={int(s):,}: {v:.3g}" for s, v in r["ratio_at"].items()))
            ci = r["intervals"].get("classes")
            lines.append(f"    predicted best: K*={pred['classes']} n*={pred['per_class']} "
                         f"error {pred['error']:.4f}"
                         + (f" (K* 95% interval {ci[0]:.0f}..{ci[1]:.0f})" if ci else "")
                         + (" [clipped to the limits]" if pred["clipped"] else ""))
            if "all_classes" in r:
                a = r["all_classes"]
                lines.append(f"    all classes: K={a['classes']} n={a['per_class']} predicted "
                             f"error {a['error']:.4f}" + ("" if a["feasible"] else
                                                         " (not feasible: too few images)"))
        if "ratio_rule" in e:
            rr = e["ratio_rule"]
            pr = rr["prediction"]
            lines.append("  ratio rule: r* measured " + ", ".join(
                f"N={m['size']:,}: {m['ratio']:.3g}" + (" (grid edge)" if m["edge"] else "")
                for m in rr["measured"]) + f" -> K = sqrt(r* N) = {pr['classes']}, "
                f"n = {pr['per_class']}" + (" [clipped]" if pr["clipped"] else ""))
        if e.get("recommended"):
            m = e["recommended"]
            pr = e[m]["prediction"]
            lines.append(f"  recommended: {m.replace('_', ' ')}"
                         f"{' fit' if m != 'ratio_rule' else ''}: K={pr['classes']} "
                         f"n={pr['per_class']} ({WHY_RECOMMENDED})")
        if "measured_best_at_size" in e:
            m = e["measured_best_at_size"]
            lines.append(f"  measured best at N={out['size']:,}: K={m['classes']} "
                         f"n={m['per_class']} error {m['error']:.4f}")
    if out["failures"]:
        lines.append("\nnot fitted (reasons above): "
                     + "; ".join(f.split(":")[0] for f in out["failures"]))
    return "\n".join(lines)
