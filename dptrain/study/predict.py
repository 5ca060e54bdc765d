"""`dptrain predict`: the best split of a budget N for every downstream set of a sweep, from
the theory's fits (theory.py) and the ratio rule, with intervals and the held-out check that
picks the predictor to trust (calibrate.py), the limits the shard set puts on K and n, and the
splits to run next.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import MISSING, dataclass
from pathlib import Path

import numpy as np

from ..common.options import option
from ..common.progress import plural
from ..common.runfolder import SweepFolder
from ..data.index import ShardIndex
from .calibrate import (
    INTERVAL,
    PARAMETERS,
    PREDICTORS,
    at_budget,
    bootstrap,
    holdout_check,
    interval,
    label,
    predict_split,
    shortfall,
)
from .noise import difference_sd, near_best_range, seeds_to_separate
from .results import (
    AVERAGE,
    TIE_SE,
    best_per_size,
    errors_by_point,
    errors_by_seed,
    read_results,
)
from .theory import (
    PARAMS,
    RATIOS_NEEDED,
    Fit,
    FitError,
    class_limits,
    fit_line,
    near_minimum,
    residual_line,
)

# What the pooled interval means, where `predict` prints it.
INTERVAL_SOURCE = ("the free fit's bootstrap over budgets and residuals: the model's doubt as "
                   "well as the seeds'; its coverage of held-out budgets: docs/synthetic.md")


def data_limits(sweep_dir, max_classes: int | None = None,
                max_per_class: int | None = None) -> dict:
    """The classes and images per class a split may use: as given, else the sweep's shard
    set's (its classes with images, its smallest class); None where neither is known (a
    sweep folder copied without its data)."""
    data = SweepFolder(sweep_dir).read_spec().get("data")
    if (max_classes is None or max_per_class is None) and data and _is_dir(data):
        counts = ShardIndex.load(data).counts
        counts = counts[counts > 0]
        max_classes = max_classes or len(counts)
        max_per_class = max_per_class or int(counts.min())
    return {"max_classes": max_classes, "max_per_class": max_per_class}


def _is_dir(path: str) -> bool:
    """Whether a recorded path is a folder here; a name the system cannot take (too long, a
    NUL) is not one."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


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
    samples: int = option(200, "Bootstrap fits per predictor for the intervals (0: none).",
                          low=0, flag="--bootstrap")
    near: float | None = option(None, "Fit only the points whose K/n is within this factor of "
                                "their budget's best measured K/n [all points].", low=1,
                                flag="--fit-near")
    suggest: bool = option(False, "Also name the splits of --size that would best confirm "
                           "the prediction (the recommended K* and the quartiles of its "
                           "interval's bootstrap), as a `dptrain sweep` command to copy.")


def _fit_entry(method: str, pred: dict, boots: list[dict], sizes: list[int],
               limits: dict, size: int) -> dict:
    """One fit's part of predict's result: parameters with their bootstrap intervals, r* at
    the fitted budgets, residuals, the prediction, and using all classes."""
    f: Fit = pred["fit"]
    r = {"params": f.as_dict(), "ratio_at": {str(s): f.best_ratio(s) for s in sizes},
         "prediction": {k: v for k, v in pred.items() if k not in ("fit", "keys")},
         "bootstrap_fits": len(boots),
         "intervals": {p: interval([getattr(b["fit"], p) for b in boots]) for p in PARAMS},
         "residuals": [{"classes": p[0], "per_class": p[1], "size": p[2], "residual": x}
                       for p, x in zip(pred["keys"], f.residuals)]}
    r["intervals"]["classes"] = interval([b["classes"] for b in boots])
    if limits["max_classes"]:
        k = min(limits["max_classes"], size)
        r["all_classes"] = {"classes": k, "per_class": round(size / k),
                            "error": float(f.err(k, size / k)),
                            "feasible": not limits["max_per_class"]
                            or size / k <= limits["max_per_class"]}
    return r


def separating_budget(preds: dict, fitted: int, size: int, limits: dict,
                      spread: float = 1.5) -> dict:
    """With one budget fitted: the budget to add that would tell the predictors apart, the
    smallest of 2x, 4x, ... the fitted one (up to `size`) where their K* differ by `spread`
    or more (a grid in steps of sqrt(2) in K tells such splits apart), with each one's K*
    there. `preds`: each predictor's `predict_split`, moved along the budgets unfitted."""
    candidates = [fitted * 2 ** i for i in range(1, 64) if fitted * 2 ** i < size] + [size]
    for n in candidates:  # the last is `size`: no later budget is asked for
        ks = {}
        for m, pred in preds.items():
            try:
                ks[m] = at_budget(pred, n, limits)["classes"]
            except FitError:
                pass
        if len(ks) > 1 and max(ks.values()) >= spread * min(ks.values()):
            break
    return {"size": n, "classes": ks}


def predict_sweep(sweep_dir, size: int, *, fit_sizes: list[int] = (),
                  max_classes: int | None = None, max_per_class: int | None = None,
                  samples: int = 200, near: float | None = None, suggest: bool = False) -> dict:
    """`dptrain predict`: each predictor's best split of `size` for every downstream set of a
    sweep and their average, the K* intervals (calibrate.INTERVAL), the held-out check that
    picks the predictor to trust, and with `suggest` the splits to run next. Fits that cannot
    be made are listed in "failures", with no numbers; sets no predictor could predict, in
    "unpredicted" (predict then exits 1)."""
    limits = data_limits(sweep_dir, max_classes, max_per_class)
    out = {"size": size, "fit_sizes": sorted(fit_sizes) or "all", "limits": limits, "sets": {},
           "near": near, "failures": [], "unpredicted": [], "interval": INTERVAL}
    rows = read_results(sweep_dir)
    by_set, by_seed = errors_by_point(rows), errors_by_seed(rows)
    for name, points in by_set.items():
        fitted = {p: v for p, v in points.items() if not fit_sizes or p[2] in fit_sizes}
        if near:
            fitted = near_minimum(fitted, near)
        sizes = sorted({p[2] for p in fitted})
        entry: dict = {"points": len(fitted), "sizes": sizes}
        measured = best_per_size(points).get(size)
        if measured:
            entry["measured_best_at_size"] = {"classes": measured[0], "per_class": measured[1],
                                              "error": float(np.mean(points[measured]))}
        drawn, preds, fits = {}, {}, {}  # each predictor's bootstrap K*s, its prediction, fits
        for method in PREDICTORS:
            try:
                pred = preds[method] = predict_split(fitted, size, method, limits)
            except FitError as e:
                entry[method] = {"error": str(e)}
                out["failures"].append(f"{name}, {label(method)}: {e}")
                continue
            boots = bootstrap(fitted, size, method, INTERVAL[1], limits=limits,
                              samples=samples)
            drawn[method] = [b["classes"] for b in boots]
            fits[method] = [pred.get("fit")] + [b.get("fit") for b in boots]
            if method == "ratio_rule":
                entry[method] = {"measured": pred["measured"], "ratio": pred["ratio"],
                                 "prediction": {k: v for k, v in pred.items()
                                                if k not in ("measured", "ratio")},
                                 "interval": interval([b["classes"] for b in boots])}
            else:
                entry[method] = _fit_entry(method, pred, boots, sizes, limits, size)
        # the printed interval (calibrate.INTERVAL): that fit's bootstrap, or none
        printed = drawn.get(INTERVAL[0], [])
        entry["interval"], entry["quartiles"] = interval(printed), interval(printed, 0.5)
        made = list(preds)
        entry.update(noise_entry({p: v for p, v in by_seed[name].items() if p[2] in sizes},
                                 fits, size, limits))
        if not made:
            out["unpredicted"].append(name)
        check = holdout_check(fitted, limits=limits) if len(sizes) > 1 else None
        entry["check"] = check
        chosen = check["chosen"] if check else None
        entry["recommended"] = chosen if chosen in made else None
        if entry["recommended"]:
            f = entry[chosen].get("params")
            entry["warning"] = (f"its fit has {', '.join(f['at_bounds'])} on a bound: a limit "
                                "of the fit, not an estimate; check the split before trusting "
                                "it") if f and f["at_bounds"] else None
        elif len(sizes) == 1 and made:
            ks = [entry[m]["prediction"]["classes"] for m in made]
            entry["unvalidated"] = {"spread": [min(ks), max(ks)],
                                    "add": separating_budget(preds, sizes[0], size, limits)}
        if suggest:
            entry["suggest"] = suggestions(entry, size, points, limits)
        out["sets"][name] = entry
    if suggest:
        seeds = max(len(v) for points in by_set.values() for v in points.values())
        out["command"] = sweep_command(sweep_dir, out, seeds)
    return out


def noise_entry(measured: dict, fits: dict, size: int, limits: dict) -> dict:
    """What the noise this sweep measured (`measured`: {(K, n, N): {seed: error}} of the fitted
    budgets) says at `size`: "power", the std of a per-seed difference between two splits and
    the seeds a split needs to tell a 1-point gap at TIE_SE standard errors; and "near_best",
    the K whose error the first curve-giving fit of `fits` (the free fit, else the tied)
    predicts within one standard error of such a difference (at the sweep's own seeds a
    point) of its best, with the 95% range of each end over that fit's bootstrap."""
    sd, df = difference_sd(measured)
    if not df:
        return {}
    seeds = int(np.median([len(v) for v in measured.values()]))
    out = {"power": {"sd_diff": sd, "df": df, "seeds": seeds_to_separate(sd)}}
    method = next((m for m in ("free", "tied") if fits.get(m)), None)
    if method is None:
        return out
    tolerance = sd / math.sqrt(seeds)
    lo, hi = class_limits(size, limits["max_classes"], limits["max_per_class"])
    ends = [near_best_range(f.err, size, tolerance, lo, hi) for f in fits[method]]
    out["near_best"] = {"method": method, "classes": list(ends[0]), "tolerance": tolerance,
                        "seeds": seeds, "low": interval([e[0] for e in ends[1:]]),
                        "high": interval([e[1] for e in ends[1:]])}
    return out


def suggestions(entry: dict, size: int, points: dict, limits: dict) -> list[list[int]]:
    """The splits of `size` that would best confirm the prediction: the recommended K* (or,
    unvalidated, each predictor's) and the ends of the middle half of the interval's bootstrap
    K* ("quartiles": whether the error is flat or rising on either side), within the limits,
    leaving out those already run. (The 95% ends are often the data's limits themselves.)"""
    pick = [entry["recommended"]] if entry.get("recommended") else PREDICTORS
    ks = [entry[m]["prediction"]["classes"] for m in pick if "prediction" in entry.get(m, {})]
    if entry.get("quartiles"):
        ks += [math.floor(entry["quartiles"][0]), math.ceil(entry["quartiles"][1])]
    lo, hi = class_limits(size, limits["max_classes"], limits["max_per_class"])
    run = {p[0] for p in points if p[2] == size}
    ks = sorted({min(max(k, math.ceil(lo)), math.floor(hi)) for k in ks} - run)
    return [[k, int(round(size / k))] for k in ks]


def grid_line(keys) -> str:
    """What `predict` can make of a sweep of these (K, n, N) points, said before any run:
    which predictors have the points they need (counted only: a fit can still fail on the
    errors, which predict then says), whether the held-out check can choose between them,
    and what to add to the grid where not."""
    keys = set(keys)
    sizes = sorted({p[2] for p in keys})
    made = [m for m in PREDICTORS if not shortfall(keys, m)]
    small = {p for p in keys if p[2] != sizes[-1]}
    checked = len(sizes) > 1 and any(not shortfall(small, m) for m in PREDICTORS)

    def the(methods):
        names = [f"the {label(m)}" for m in methods]
        return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)

    if not made:
        line = (f"for predict: too few points for any prediction ({plural(len(keys), 'split')} "
                f"at {plural(len(sizes), 'budget')}): the ratio rule needs {RATIOS_NEEDED} "
                f"values of --classes at one budget, the tied fit {PARAMETERS['tied'] + 1} "
                f"distinct splits, the free fit {PARAMETERS['free'] + 1}")
    else:
        missing = [m for m in PREDICTORS if m not in made]
        line = f"for predict: enough points for {the(made)}" + (
            f"; not for {the(missing)} ({shortfall(keys, missing[0])})" if missing else "")
    if checked:
        return line + (f"; the held-out check predicts N={sizes[-1]:,} from the smaller "
                       "budgets to choose the predictor")
    if len(sizes) == 1:
        return line + ("; no held-out check with one budget: add a smaller budget (--sizes) "
                       f"with {RATIOS_NEEDED} or more values of --classes, so that predict "
                       "can choose the predictor to trust")
    return line + (f"; no held-out check: the budgets below N={sizes[-1]:,} have too few points "
                   f"for any predictor: give one of them {RATIOS_NEEDED} or more values of "
                   "--classes")


def sweep_command(sweep_dir, out: dict, seeds: int) -> str | None:
    """`dptrain sweep` adding the suggested splits to this sweep folder, with its own data,
    suite and options (those the spec records; placeholders where it records none)."""
    sets = out["sets"]
    chosen = sets.get(AVERAGE) or next(iter(sets.values()), {})
    splits = chosen.get("suggest") or []
    if not splits:
        return None
    spec = SweepFolder(sweep_dir).read_spec()
    given = spec.get("options", [])
    # sweeps before 2026-11-30 recorded an empty --log-to as "--log-to ()"
    given = [a for i, a in enumerate(given) if a != "()" and given[i + 1:i + 2] != ["()"]]
    args = ["dptrain", "sweep", "--data", spec.get("data") or "DATA", "--suite",
            spec.get("suite") or "SUITE", "--out", str(Path(sweep_dir)),
            *given, *(["--repeats", str(spec["repeats"])] if spec.get("repeats") else []),
            "--points", ",".join(f"{k}:{n}" for k, n in splits), "--seeds", str(seeds)]
    return " ".join(shlex.quote(a) for a in args)


def render(out: dict) -> str:
    """The predict result as text: per set, each predictor's fit, the held-out check and the
    advice; then how to run the suggested splits and what could not be fitted."""
    near = (f", within {out['near']:g}x of each budget's best K/n" if out.get("near") else "")
    lines = [f"prediction for N={out['size']:,} from the points of N in {out['fit_sizes']}"
             f"{near}; limits: {out['limits']['max_classes']} classes, "
             f"{out['limits']['max_per_class']} images per class"]
    for name, e in out["sets"].items():
        lines.append(f"\n{name}: {plural(e['points'], 'point')} at N = {e['sizes']}")
        for method in ("free", "tied"):
            lines += _fit_lines(method, e.get(method))
        lines += _ratio_rule_lines(e.get("ratio_rule", {}))
        lines += _check_lines(e.get("check"))
        lines += _advice_lines(e, out["size"])
    if out.get("command"):
        lines.append(f"\nto run the suggested splits (from "
                     f"{'the average' if AVERAGE in out['sets'] else 'the first set'}):"
                     f"\n  {out['command']}")
    if out["failures"]:
        lines.append("\nnot fitted (reasons above): "
                     + "; ".join(f.split(":")[0] for f in out["failures"]))
    if out["unpredicted"]:
        lines.append(f"no prediction for {', '.join(out['unpredicted'])}: no predictor could be "
                     "fitted (more points or budgets: see the reasons above)")
    return "\n".join(lines)


def _fit_lines(method: str, r: dict | None) -> list[str]:
    """A fitted predictor (free or tied): its fit, residuals, ratios and predicted best."""
    if r is None:
        return []
    if "error" in r:
        return [f"  {label(method)}: not possible: {r['error']}"]
    pred = r["prediction"]
    f = Fit(**r["params"])
    lines = [f"  {label(method)}{' (alpha = beta)' if method == 'tied' else ''}: "
             + fit_line(f, r["intervals"])]
    lines.append("    residuals (measured - fit): " + residual_line(
        [(x["classes"], x["per_class"], x["size"]) for x in r["residuals"]],
        [x["residual"] for x in r["residuals"]]))
    lines.append("    r* = K*/n* at measured N: " + ", ".join(
        f"N={int(s):,}: {v:.3g}" for s, v in r["ratio_at"].items()))
    ci = r["intervals"].get("classes")
    lines.append(f"    predicted best: K*={pred['classes']} n*={pred['per_class']} "
                 f"error {pred['error']:.4f}"
                 + (f" (its own K* 95% interval {ci[0]:.0f}..{ci[1]:.0f}"
                    f"{_outside(pred['classes'], ci)})" if ci else "")
                 + (" [clipped to the limits]" if pred["clipped"] else ""))
    if "all_classes" in r:
        a = r["all_classes"]
        lines.append(f"    all classes: K={a['classes']} n={a['per_class']} predicted "
                     f"error {a['error']:.4f}" + ("" if a["feasible"] else
                                                 " (not feasible: too few images)"))
    return lines


def _ratio_rule_lines(rr: dict) -> list[str]:
    """The ratio rule: r* measured per budget, and the split it gives."""
    if "error" in rr:
        return [f"  ratio rule: not possible: {rr['error']}"]
    if not rr:
        return []
    pr = rr["prediction"]
    return ["  ratio rule: r* measured " + ", ".join(
        f"N={m['size']:,}: {m['ratio']:.3g}" + (" (grid edge)" if m["edge"] else "")
        for m in rr["measured"]) + f" -> K = sqrt(r* N) = {pr['classes']}, "
        f"n = {pr['per_class']}" + (" [clipped]" if pr["clipped"] else "")]


def _advice_lines(e: dict, size: int) -> list[str]:
    """What to do at N=`size`: the recommended split and its interval (or why none is
    recommended), the measured best there, and the splits to run to confirm."""
    lines = []
    ci = e.get("interval")
    q = e.get("quartiles")
    within = (f", K* 95% interval {ci[0]:.0f}..{ci[1]:.0f}, middle half {q[0]:.0f}..{q[1]:.0f}"
              f" ({INTERVAL_SOURCE})") if ci else (
        f" (no interval: the {label(INTERVAL[0])}, whose bootstrap gives it, was not "
        "possible)" if "error" in e.get(INTERVAL[0], {}) else " (no interval: --bootstrap 0)")
    if e.get("recommended"):
        m = e["recommended"]
        pr = e[m]["prediction"]
        other = m if m != INTERVAL[0] else None  # the interval is another predictor's
        lines.append(f"  recommended: {label(m)}: K={pr['classes']} n={pr['per_class']} "
                     f"({_why(e.get('check'), m)}){within}"
                     + (f"; shown for the {label(m)} too: the one interval that held the "
                        "held-out best split in 90% or more of the built-in study's checks "
                        "(its own held fewer)" if ci and other else "")
                     + (_outside(pr["classes"], ci, other, q) if ci else ""))
        if e.get("warning"):
            lines.append(f"  WARNING: {e['warning']}")
    elif e.get("check"):
        lines.append("  no recommendation: the held-out check could score no predictor")
    elif "unvalidated" in e:
        u = e["unvalidated"]
        add = u["add"]
        fitted = [label(m) for m in PREDICTORS if "prediction" in e.get(m, {})]
        who = ("the three give" if len(fitted) == 3 else
               f"the {' and the '.join(fitted)} give{'s' if len(fitted) == 1 else ''}")
        lines.append(f"  one budget fitted: no predictor can be validated; {who} "
                     f"K* = {u['spread'][0]}..{u['spread'][1]}{within}.")
        lines.append(f"  to tell them apart, add N={add['size']:,}, where they predict "
                     + ", ".join(f"{label(m)} K={k}" for m, k in add["classes"].items())
                     + ": run those splits, then predict again")
    lines += _noise_lines(e)
    if "measured_best_at_size" in e:
        m = e["measured_best_at_size"]
        lines.append(f"  measured best at N={size:,}: K={m['classes']} "
                     f"n={m['per_class']} error {m['error']:.4f}")
    if e.get("suggest") is not None:
        lines.append("  to confirm, run at N={:,}: ".format(size) + (", ".join(
            f"K={k} n={n}" for k, n in e["suggest"]) or "nothing new (all run already)"))
    return lines


def _noise_lines(e: dict) -> list[str]:
    """The near-best range and the power line (`noise_entry`)."""
    lines = []
    if "near_best" in e:
        nb = e["near_best"]
        ends = (f"; its ends' 95% intervals {nb['low'][0]:.0f}..{nb['low'][1]:.0f} and "
                f"{nb['high'][0]:.0f}..{nb['high'][1]:.0f}" if nb["low"] else "")
        lines.append(f"  near-best: K={nb['classes'][0]}..{nb['classes'][1]}, predicted by the "
                     f"{label(nb['method'])} within {100 * nb['tolerance']:.1f} points of its "
                     f"best (the standard error of two splits' difference at this sweep's "
                     f"{nb['seeds']} seeds a point): the runs cannot rank these{ends}")
    if "power" in e:
        pw = e["power"]
        lines.append(f"  to tell a 1-point gap at {TIE_SE:g} standard errors: {pw['seeds']} "
                     f"seeds a split (a per-seed difference of two splits varies by "
                     f"{100 * pw['sd_diff']:.1f} points here, pooled over {pw['df']} degrees "
                     "of freedom)")
    return lines


def _outside(k: float, ci, other: str | None = None, middle=None) -> str:
    """Why K lies outside the interval printed beside it (or its `middle` half), or nothing:
    its own fit's bootstrap, or (`other`: the predictor K is from) the interval's
    predictor's."""
    if ci[0] <= k <= ci[1]:
        if middle and not middle[0] <= k <= middle[1]:
            return (f"; K={k} lies in it but outside its middle half"
                    + (f": the {label(other)} and the {label(INTERVAL[0])} lean apart"
                       if other else ""))
        return ""
    if other:
        return (f"; K={k} lies outside it: the {label(other)} and the {label(INTERVAL[0])} "
                "disagree beyond the interval's width")
    return (f"; K={k} lies outside it: the bootstrap refits do not centre on this fit (too few "
            "points for it to be stable)")


def _why(check: dict | None, method: str) -> str:
    """Why `method` was recommended: the best held-out score, or the one-standard-error rule."""
    scored = [r for r in (check or {}).get("rows", []) if "gap_points" in r]
    best = min(scored, key=lambda r: r["gap_points"], default=None)
    mine = next((r for r in scored if r["method"] == method), None)
    if best is None or mine is None or mine["gap_points"] <= best["gap_points"]:
        return "it held out best on this sweep"
    return (f"it held out within a seed std ({check['seed_std_points']:.1f} points) of the "
            f"best, the {label(best['method'])}, with fewer parameters")


def _check_lines(check: dict | None) -> list[str]:
    """The held-out check as predict prints it."""
    if not check:
        return []
    fitted = ", ".join(f"{s:,}" for s in check["fit_sizes"])
    b = check["best"]
    lines = [f"  held-out check: fitted on N = {fitted} alone, predicting N={check['size']:,} "
             f"(measured best K={b['classes']} n={b['per_class']} error {b['error'][0]:.4f}; "
             f"seed std {check['seed_std_points']:.1f} points):"]
    for r in check["rows"]:
        if "error" in r:
            lines.append(f"    {label(r['method'])}: not possible: {r['error']}")
            continue
        sc = r["scored"]
        at = "" if r["exact"] else f", scored at the nearest run split K={sc['classes']}"
        lines.append(f"    {label(r['method'])}: K={r['classes']} n={r['per_class']}{at}: "
                     f"{r['gap_points']:+.1f} points from the best"
                     + (f" (fit ON A BOUND: {', '.join(r['at_bounds'])})"
                        if r["at_bounds"] else ""))
    return lines
