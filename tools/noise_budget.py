"""Where the noise of a sweep's points comes from, and what a larger test set does to it.

    tools/noise_budget.py SWEEP --fixed-subset ROW_SWEEP [--json OUT.json]

SWEEP: a sweep whose seeds draw subset and training together (the default: --subset-seed
follows --seed), several splits of one budget; ROW_SWEEP: one of its splits rerun with
--subset-seed fixed, so that only the training varies. Both probed on a suite whose sets come
in two test sizes, named PREFIX-tK (docs/noise-budget.md: synthetic-t1.. with 50 test images a
class, test500-t1.. with 500, the same train images). Prints, per test size:

1. the noise budget of one point's average error: the subset's share (the variance between
   SWEEP's seeds, pooled over its splits, less the fixed-subset variance), the training's (the
   fixed-subset variance; of it, the probe's choice of L2 between its repeats), and the test
   set's (each run's bootstrap over test images, and the binomial floor);
2. the standard error of the difference between two splits at SWEEP's seeds, paired by seed and
   not, for every pair of its splits: what the larger test set changes at the same runs;
3. the seeds a split needs to tell a 1-point gap at 2 standard errors: the formula of
   `dptrain predict` on SWEEP's own runs, and a resampling check (seeds drawn with
   replacement; the smallest count whose std of a paired mean difference is <= 0.5 points).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dptrain.common.runfolder import RunFolder, SweepFolder  # noqa: E402
from dptrain.probing.logreg import unpack_correct  # noqa: E402
from dptrain.study.noise import (  # noqa: E402
    binomial_se,
    bootstrap_se,
    difference_sd,
    independent_share,
    pooled_variance,
    seeds_to_separate,
    variance_interval,
)
from dptrain.study.results import TIE_SE, errors_by_seed, read_results  # noqa: E402

SET = re.compile(r"^(?P<prefix>.+)-t(?P<task>\d+)$")


def runs_of(sweep: Path) -> dict[tuple, dict]:
    """{(K, n, subset seed, seed): probe.json's datasets} of a sweep's finished runs."""
    out = {}
    for run in sorted((Path(sweep) / SweepFolder.RUNS).iterdir()):
        probe = RunFolder(run).read_probe().get("datasets")
        config = RunFolder(run).read_config()
        if not probe or not config:
            continue
        seed = config["config"]["seed"]
        key = (config["subset"]["classes"], config["subset"]["per_class"],
               config["subset"].get("seed", seed), seed)
        out[key] = probe
    return out


def sets_of(probe: dict, prefix: str) -> list[dict]:
    """probe.json's results of the sets named PREFIX-tK."""
    return [v for k, v in probe.items() if SET.match(k) and SET.match(k)["prefix"] == prefix]


def errors_by_split(runs: dict, prefix: str) -> dict[tuple, dict[int, float]]:
    """{(K, n): {seed: average error over the prefix's sets}} of `runs_of`'s runs."""
    return {s: {k[3]: average(p, prefix) for k, p in runs.items() if k[:2] == s}
            for s in sorted({k[:2] for k in runs})}


def paired(errs: dict) -> list[tuple[tuple, tuple, list[float]]]:
    """(a, b, per-seed differences a - b over their shared seeds) for every pair of splits of
    `errors_by_split`."""
    return [(a, b, [errs[a][s] - errs[b][s] for s in sorted(set(errs[a]) & set(errs[b]))])
            for a, b in itertools.combinations(errs, 2)]


def average(probe: dict, prefix: str) -> float:
    """The error averaged over a prefix's sets, as results.csv's "average" is."""
    sets = sets_of(probe, prefix)
    return statistics.mean(v["error_mean"] for v in sets)


def test_variance(probe: dict, prefix: str) -> tuple[float, float]:
    """(bootstrap, binomial) variance of the average error that its test sets alone give: the
    sets are scored on separate images, so the average's is the mean of theirs / sets."""
    sets = sets_of(probe, prefix)
    boot = [bootstrap_se(np.stack([unpack_correct(r["test_correct"], v["test_samples"])
                                   for r in v["repeats"]])) ** 2 for v in sets]
    binom = [binomial_se(v["top1_mean"], v["test_samples"]) ** 2 for v in sets]
    return sum(boot) / len(sets) ** 2, sum(binom) / len(sets) ** 2


def repeat_variance(probe: dict, prefix: str) -> float:
    """The variance of the average error that the probe's repeats (their validation splits,
    hence their L2) add to one run: each set's repeat variance / repeats."""
    sets = sets_of(probe, prefix)
    return sum(statistics.variance([r["test_top1"] for r in v["repeats"]]) / len(v["repeats"])
               for v in sets) / len(sets) ** 2


def image_share(runs: dict, prefix: str) -> float:
    """`noise.independent_share` of the runs of one split: the part of their spread that
    independent chance per test image explains, pooled over the prefix's sets by summing the
    per-image variances and the runs' variances."""
    names = sorted(k for k in next(iter(runs.values())) if SET.match(k)
                   and SET.match(k)["prefix"] == prefix)
    mats = []
    for name in names:
        rows = []
        for probe in runs.values():
            v = probe[name]
            rows.append(np.stack([unpack_correct(r["test_correct"], v["test_samples"])
                                  for r in v["repeats"]]).mean(0))
        mats.append(np.stack(rows))
    weights = np.concatenate([np.full(m.shape[1], 1 / (len(mats) * m.shape[1])) for m in mats])
    return independent_share(np.concatenate(mats, 1), weights)


def budget(diag: dict, row: dict, prefix: str) -> dict:
    """The noise budget of one point's average error (see the module's docstring)."""
    errs = errors_by_split(diag, prefix)
    by_split = [list(v.values()) for v in errs.values()]
    v_both, df_both = pooled_variance(by_split)
    v_train, df_train = pooled_variance([[average(p, prefix) for p in row.values()]])
    boot, binom = zip(*(test_variance(p, prefix) for p in [*diag.values(), *row.values()]))
    v_test, v_floor = statistics.mean(boot), statistics.mean(binom)
    v_repeat = statistics.mean(repeat_variance(p, prefix) for p in [*diag.values(),
                                                                     *row.values()])
    v_subset = v_both - v_train
    total = v_both + v_test
    fixed = sorted({k[:2] for k in row})
    share = image_share({k: p for k, p in diag.items() if k[:2] == fixed[0]}, prefix)
    return {"prefix": prefix, "points_seeds": {f"{k}x{n}": len(g) for (k, n), g in
                                               zip(errs, by_split)},
            "fixed_subset_split": f"{fixed[0][0]}x{fixed[0][1]}", "fixed_subset_runs": len(row),
            "var_subset_and_training": v_both, "df_subset_and_training": df_both,
            "ci_subset_and_training": variance_interval(v_both, df_both),
            "var_training": v_train, "df_training": df_train,
            "ci_training": variance_interval(v_train, df_train),
            "var_subset": v_subset, "var_probe_repeats": v_repeat,
            "var_test_bootstrap": v_test, "var_test_binomial": v_floor, "var_total": total,
            "share_subset": v_subset / total, "share_training": v_train / total,
            "share_test": v_test / total, "independent_image_share": share}


def differences(diag: dict, prefix: str) -> list[dict]:
    """Every pair of splits: the mean difference of their average errors and its standard
    error at their shared seeds, paired and unpaired (Welch)."""
    errs = errors_by_split(diag, prefix)
    out = []
    for a, b, d in paired(errs):
        unpaired = math.sqrt(statistics.variance(errs[a].values()) / len(errs[a])
                             + statistics.variance(errs[b].values()) / len(errs[b]))
        out.append({"a": f"{a[0]}x{a[1]}", "b": f"{b[0]}x{b[1]}", "seeds": len(d),
                    "diff": statistics.mean(d), "se_paired": statistics.stdev(d)
                    / math.sqrt(len(d)), "se_unpaired": unpaired,
                    "sd_paired": statistics.stdev(d)})
    return out


def resampled_seeds(diag: dict, prefix: str, draws: int = 2000, seed: int = 0) -> int:
    """The resampling check of the power line: for m = 2, 3, .., the std, over draws of m
    seeds with replacement (the same seeds for both splits: paired), of the mean difference of
    every pair of splits, pooled over pairs; the smallest m where TIE_SE times it is <= 1
    point."""
    rng = np.random.default_rng(seed)
    diffs = [np.array(d) for _, _, d in paired(errors_by_split(diag, prefix))]
    for m in itertools.count(2):
        var = statistics.mean(float(d[rng.integers(0, len(d), (draws, m))].mean(1).var())
                              for d in diffs)
        if TIE_SE * math.sqrt(var) <= 0.01 or m > 5000:
            return m


def render(out: dict) -> str:
    lines = []
    for b in out["budgets"]:
        p = lambda v: f"{100 * math.sqrt(max(v, 0)):.2f}"  # noqa: E731
        ci = lambda c: f"{p(c[0])}..{p(c[1])}"  # noqa: E731
        lines += [f"\n## {b['prefix']}: the average error's noise, std in points "
                  f"(share of the variance)",
                  "| part | std | share | how |", "|---|---|---|---|",
                  f"| subset drawn | {p(b['var_subset'])} | {b['share_subset']:.0%} | "
                  "seeds' variance less the fixed-subset variance |",
                  f"| training at a fixed subset | {p(b['var_training'])} "
                  f"(95% {ci(b['ci_training'])}) | {b['share_training']:.0%} | "
                  f"{b['fixed_subset_runs']} seeds of {b['fixed_subset_split']} |",
                  f"| of which the probe's L2 choice | {p(b['var_probe_repeats'])} | "
                  f"{b['var_probe_repeats'] / b['var_total']:.0%} | repeats' variance / "
                  "repeats |",
                  f"| test set sampled | {p(b['var_test_bootstrap'])} (binomial floor "
                  f"{p(b['var_test_binomial'])}) | {b['share_test']:.0%} | bootstrap over "
                  "test images, every run |",
                  f"| all (subset + training + test) | {p(b['var_total'])} | 100% | |",
                  f"seeds' spread (subset and training drawn together): "
                  f"{p(b['var_subset_and_training'])} points (95% "
                  f"{ci(b['ci_subset_and_training'])}, {b['df_subset_and_training']} degrees "
                  f"of freedom); independent chance per test image explains "
                  f"{b['independent_image_share']:.0%} of {b['fixed_subset_split']}'s spread "
                  "between its seeds"]
    lines += ["\n## The standard error of a split difference, at the same runs",
              "| a - b | seeds | " + " | ".join(
                  f"{x} diff | {x} se paired | {x} se unpaired" for x in out["prefixes"])
              + " | paired se after/before |", "|" + "---|" * (3 + 3 * len(out["prefixes"]))]
    before, after = (out["differences"][x] for x in out["prefixes"])
    for d0, d1 in zip(before, after):
        lines.append(f"| {d0['a']} - {d0['b']} | {d0['seeds']} | " + " | ".join(
            f"{100 * d['diff']:+.2f} | {100 * d['se_paired']:.2f} | {100 * d['se_unpaired']:.2f}"
            for d in (d0, d1)) + f" | {d1['se_paired'] / d0['se_paired']:.2f} |")
    rms = {x: math.sqrt(statistics.mean(d["se_paired"] ** 2 for d in out["differences"][x]))
           for x in out["prefixes"]}
    lines.append("pooled (root mean square) paired se: " + ", ".join(
        f"{x} {100 * v:.2f}" for x, v in rms.items())
        + f"; after/before {rms[out['prefixes'][1]] / rms[out['prefixes'][0]]:.2f}")
    lines.append("\n## Seeds a split needs to tell a 1-point gap at 2 standard errors")
    for x in out["prefixes"]:
        s = out["seeds"][x]
        lines.append(f"- {x}: {s['formula']} by predict's formula (per-seed difference std "
                     f"{100 * s['sd_diff']:.2f} points), {s['resampled']} by resampling the "
                     "runs")
    return "\n".join(lines)


def designs_table(designs: list[tuple[str, dict, str]]) -> tuple[list[dict], str]:
    """The pooled standard error of a split difference under each design (name, runs,
    prefix), over the pairs of the splits every design ran: root mean square of the pairs'
    paired se, and of their unpaired se, each against the first design's."""
    common = set.intersection(*({k[:2] for k in runs} for _, runs, _ in designs))
    rows = []
    for name, runs, prefix in designs:
        diffs = differences({k: p for k, p in runs.items() if k[:2] in common}, prefix)
        rows.append({"design": name, "pairs": len(diffs), "seeds": min(d["seeds"] for d in diffs),
                     **{f"{x}_{kind}": math.sqrt(statistics.mean(d[f"{x}_{kind}"] ** 2
                                                                 for d in diffs))
                        for x in ("se", "sd") for kind in ("paired", "unpaired")
                        if f"{x}_{kind}" in diffs[0]},
                     "pairs_detail": diffs})
    base = rows[0]["se_paired"]
    lines = [f"\n## A split difference's standard error by design ({len(common)} splits, "
             f"{rows[0]['pairs']} pairs, {rows[0]['seeds']} seeds, root mean square over the "
             "pairs)", "| design | se paired | se unpaired | paired se / the first's |",
             "|---|---|---|---|"]
    lines += [f"| {r['design']} | {100 * r['se_paired']:.2f} | {100 * r['se_unpaired']:.2f} | "
              f"{r['se_paired'] / base:.2f} |" for r in rows]
    return rows, "\n".join(lines)


@click.command()
@click.argument("sweep", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fixed-subset", "row", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A sweep of one of SWEEP's splits with --subset-seed fixed.")
@click.option("--prefixes", default="synthetic,test500", show_default=True,
              help="The two test sizes' set prefixes, before first.")
@click.option("--keyed", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A sweep of some of SWEEP's splits with --order keyed: the designs compared.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
def main(sweep: Path, row: Path, prefixes: str, keyed: Path | None,
         json_out: Path | None) -> None:
    """Where the noise of SWEEP's points comes from (see the module's docstring)."""
    diag = {k: p for k, p in runs_of(sweep).items() if k[2] == k[3]}
    fixed = runs_of(row)
    names = prefixes.split(",")
    by_seed = errors_by_seed(read_results(sweep))
    out = {"sweep": str(sweep), "fixed_subset": str(row), "prefixes": names,
           "budgets": [budget(diag, fixed, x) for x in names],
           "differences": {x: differences(diag, x) for x in names}, "seeds": {}}
    for x in names:
        sets = [k for k in by_seed if SET.match(k) and SET.match(k)["prefix"] == x]
        points = {}
        for p in by_seed[sets[0]]:
            points[p] = {s: statistics.mean(by_seed[n][p][s] for n in sets)
                         for s in by_seed[sets[0]][p]}
        sd, _ = difference_sd(points)
        out["seeds"][x] = {"sd_diff": sd, "formula": seeds_to_separate(sd),
                           "resampled": resampled_seeds(diag, x)}
    text = render(out)
    if keyed:
        keyed_runs = runs_of(keyed)
        size = {"synthetic": "50", "test500": "500"}  # the built-in suite's two test sets
        designs = [(f"{order} order, {size.get(x, x)} test images a class", runs, x)
                   for order, runs in (("shuffled", diag), ("keyed", keyed_runs)) for x in names
                   if any(SET.match(k) and SET.match(k)["prefix"] == x
                          for k in next(iter(runs.values())))]
        out["designs"], table = designs_table(designs)
        text += "\n" + table
    print(text)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
