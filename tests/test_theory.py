"""The error model fit, the optimal split, the report and `dptrain predict` on made-up sweeps."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics

import numpy as np
import pytest

from conftest import run_cli
from dptrain.report import write_report
from dptrain.results import COLUMNS
from dptrain.theory import (Fit, FitError, best_ratio_measured, best_split, bootstrap, fit,
                            fit_points, holdout_check, near_minimum, split_for_ratio)

TRUE = dict(c0=0.15, a=0.9, alpha=0.6, b=0.7, beta=0.4)


def model(k, n, p=TRUE):
    return p["c0"] + p["a"] * np.power(k, -p["alpha"]) + p["b"] * np.power(n, -p["beta"])


def grid_points(sizes=(1000, 4000, 16000), ks=(4, 10, 25, 63, 160, 400)):
    return [(k, s // k) for s in sizes for k in ks if s // k >= 2]


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


def test_bootstrap_and_measured_ratio():
    rng = np.random.default_rng(1)
    pts = {(k, n, size): list(model(k, n) + rng.normal(0, 0.003, 3))
           for size in (1000, 4000, 16000) for k, n in grid_points(sizes=(size,))}
    fits = bootstrap(pts, samples=20)
    assert len(fits) >= 18
    alphas = np.array([f.alpha for f in fits])  # noise 0.003 on errors of ~0.1-0.5:
    assert np.median(alphas) == pytest.approx(TRUE["alpha"], rel=0.15)  # centred on the truth
    assert 0 < np.percentile(alphas, 97.5) - np.percentile(alphas, 2.5) < 0.5 * TRUE["alpha"]
    m = best_ratio_measured(pts, 4000)
    exact = Fit(**TRUE, tied=False, rmse=0, points=0).best_ratio(4000)
    assert m["best_measured_ratio"] / 6.3 <= exact <= m["best_measured_ratio"] * 6.3
    assert split_for_ratio(4.0, 10_000)["classes"] == 200
    assert split_for_ratio(4.0, 10_000, max_classes=100)["clipped"]


def fake_sweep(root, sizes=(1000, 4000), ks=(4, 10, 25, 63, 160), seeds=2, sets=("a", "b"),
               params=TRUE, noise=0.002):
    """A sweep folder whose results.csv comes from the model plus noise."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for s in sizes:
            for k in ks:
                n = s // k
                for seed in range(seeds):
                    for j, name in enumerate(sets):
                        err = float(model(k, n, params)) + 0.02 * j + rng.normal(0, noise)
                        w.writerow({c: 0 for c in COLUMNS} | {
                            "run": f"K{k}-n{n}-s{seed}", "K": k, "n": n,
                            "seed": seed, "dataset": name, "top1_mean": 1 - err, "N": s,
                            "top1_std": 0.01, "error_mean": err, "val_top1": ""})
    (root / "sweep.json").write_text(json.dumps({"budget": "fixed epochs: 1 per run",
                                                 "recipe": "synthetic", "pretrain_args": []}))
    return root


def test_report_writes_figures_and_table(tmp_path):
    root = fake_sweep(tmp_path / "sw")
    path = write_report(root)
    text = path.read_text()
    assert "fixed epochs" in text and "## Best split per budget" in text
    for name in ("a", "b", "average"):
        for kind in ("contour", "ratio"):
            png = root / "report" / f"{kind}-{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in text
    assert "## The prediction, checked" in text and "Needs 3 or more budgets" in text
    table = (root / "report" / "table.md").read_text().splitlines()
    assert len(table) == 2 + 10  # header, rule, one row per (K, n)
    assert "| 1,000 | 4 | 250 |" in table[2] and table[2].count("+-") == 3


def test_predict_command(tmp_path):
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), ks=(4, 10, 25, 63, 160))
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "20", "--json")
    out = json.loads(p.stdout)
    free = out["sets"]["a"]["free"]
    truth = Fit(**TRUE, tied=False, rmse=0, points=0).best_classes(64000)
    assert 0.6 * truth <= free["prediction"]["classes"] <= 1.6 * truth
    assert free["all_classes"]["classes"] == 1000 and out["failures"] == []
    assert out["sets"]["a"]["recommended"] == "tied"  # the alpha = beta fit, see RECOMMENDED
    p = run_cli("predict", root, "--size", "16000", "--fit-sizes", "1000,4000",
                "--max-classes", "1000", "--max-per-class", "1300", "--bootstrap", "0")
    assert "measured best at N=16,000" in p.stdout and "ratio rule" in p.stdout
    tied = re.search(r"tied fit \(alpha = beta\).*?predicted best: K\*=(\d+) n\*=(\d+)",
                     p.stdout, re.S)
    assert f"recommended: tied fit: K={tied[1]} n={tied[2]}" in p.stdout
    p = run_cli("predict", root, "--size", "16000", "--fit-sizes", "1000,4000", "--fit-near",
                "7", "--max-classes", "1000", "--max-per-class", "1300", "--bootstrap", "0")
    assert "within 7x of each budget's best K/n" in p.stdout
    assert "a: 6 points at N = [1000, 4000]" in p.stdout  # K/n 0.064 .. 26.6: 3 of 5 each
    # one budget of 3 points: no fit is possible, and predict says so with exit status 1
    small = fake_sweep(tmp_path / "small", sizes=(1000,), ks=(4, 10, 25))
    p = run_cli("predict", small, "--size", "4000", "--max-classes", "100",
                "--max-per-class", "500", check=False)
    assert p.returncode == 1 and "too few points" in p.stdout and "Traceback" not in p.stderr
    p = run_cli("predict", tmp_path, "--size", "10", check=False)
    assert p.returncode == 2 and "no results.csv" in p.stderr


def test_a_bad_field_in_results_csv_names_the_row_and_column(tmp_path):
    root = fake_sweep(tmp_path / "sw")
    lines = (root / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index("seed")] = ""  # a hand-merged file, say
    lines[3] = ",".join(cells)
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    for cmd in (["report", root], ["predict", root, "--size", "100"]):
        p = run_cli(*cmd, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert "results.csv, line 4, column seed: '' is not an integer" in p.stderr


def test_empty_sweep_is_a_clear_error(tmp_path):
    (tmp_path / "results.csv").write_text(",".join(COLUMNS) + "\n")
    for cmd in (["report", tmp_path], ["predict", tmp_path, "--size", "100"]):
        p = run_cli(*cmd, check=False)
        assert p.returncode == 2 and "no finished run" in p.stderr and "Traceback" not in p.stderr


def test_a_parameter_on_a_bound_is_flagged_in_predict_and_the_report(tmp_path):
    # The errors want a negative floor; c0 >= 0 stops it at 0: a limit, not an estimate.
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), params={**TRUE, "c0": -0.1})
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "0")
    assert "ON A BOUND: c0" in p.stdout
    assert "ON A BOUND: c0" in write_report(root).read_text()


def test_a_single_seed_gives_no_interval_and_residuals_are_shown(tmp_path):
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), seeds=1)
    args = ["predict", root, "--size", "64000", "--max-classes", "1000", "--max-per-class",
            "1300", "--bootstrap", "50"]
    p = run_cli(*args)
    assert "no 95% intervals: a single seed" in p.stdout and "interval" not in \
        p.stdout.replace("no 95% intervals", "")
    assert "residuals (measured - fit): N=1,000: 4x250 " in p.stdout
    free = json.loads(run_cli(*args, "--json").stdout)["sets"]["a"]["free"]
    assert free["bootstrap_fits"] == 0 and free["intervals"]["classes"] is None
    # a residual is the measured error less the fitted one, at its point
    f = Fit(**free["params"])
    with open(root / "results.csv") as fh:
        measured = {(int(r["K"]), int(r["n"])): float(r["error_mean"])
                    for r in csv.DictReader(fh) if r["dataset"] == "a"}
    for x in free["residuals"]:
        k, n = x["classes"], x["per_class"]
        assert x["residual"] == pytest.approx(measured[k, n] - float(f.err(k, n)), abs=1e-9)


def test_an_underdetermined_fit_exits_1_with_the_reason(tmp_path):
    # Errors that do not depend on K: the class term's exponent could be anything.
    flat_k = {**TRUE, "a": 0.0}
    with pytest.raises(FitError, match="underdetermined"):
        k, n = zip(*grid_points())
        fit(k, n, model(np.array(k), np.array(n), flat_k))
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), params=flat_k, noise=0)
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "0", check=False)
    assert p.returncode == 1 and "underdetermined" in p.stdout and "Traceback" not in p.stderr


def test_near_minimum_keeps_the_points_around_each_budgets_best():
    pts = {(2, 500, 1000): [0.5], (10, 100, 1000): [0.4], (32, 31, 1000): [0.3],  # best: K/n 1
           (100, 10, 1000): [0.35], (250, 4, 1000): [0.45],
           (16, 1000, 16000): [0.3], (126, 127, 16000): [0.2], (1000, 16, 16000): [0.25]}
    assert sorted(near_minimum(pts, 12)) == [(10, 100, 1000), (32, 31, 1000), (100, 10, 1000),
                                            (126, 127, 16000)]  # K/n within 12x of the best
    assert near_minimum(pts, 1e6) == pts


def test_holdout_check_predicts_the_largest_budget_and_reads_its_runs():
    pts = {(k, s // k, s): [float(model(k, s // k)) + d for d in (-0.001, 0.001)]
           for s in (1000, 4000, 16000) for k in (4, 10, 25, 63, 160, 400) if s // k >= 2}
    small = {p: v for p, v in pts.items() if p[2] < 16000}
    k = best_split(fit_points(small)[0], 16000)["classes"]
    pts[(k, round(16000 / k), 16000)] = [float(model(k, round(16000 / k)))] * 2  # it was run
    c = holdout_check(pts)
    assert c["size"] == 16000 and c["fit_sizes"] == [1000, 4000]
    free = next(r for r in c["rows"] if r["method"] == "free")
    assert (free["classes"], free["per_class"]) == (k, round(16000 / k))
    assert free["measured"][0] == pytest.approx(float(model(k, round(16000 / k))))
    assert free["gap_points"] == pytest.approx(100 * (free["measured"][0] - c["best"]["error"][0]))
    assert free["gap_points"] <= 0  # the prediction is the true optimum here: nothing beats it
    assert free["measured"][1] == 0 and c["best"]["error"][1] == pytest.approx(  # sample std,
        statistics.stdev(pts[c["best"]["classes"], c["best"]["per_class"], 16000]))  # as table
    assert holdout_check({p: v for p, v in pts.items() if p[2] < 16000}) is None  # 2 budgets
