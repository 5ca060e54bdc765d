"""`dptrain predict`: the best split of a budget from a sweep's fits, its intervals and warnings."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import TRUE, fake_sweep, grid_points, model, run_cli

from dptrain.study.report import write_report
from dptrain.study.theory import Fit, FitError, fit


def test_predict_command(tmp_path):
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), ks=(4, 10, 25, 63, 160))
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "20", "--json")
    out = json.loads(p.stdout)
    free = out["sets"]["a"]["free"]
    truth = Fit(**TRUE, tied=False, rmse=0, points=0).best_classes(64000)
    assert 0.6 * truth <= free["prediction"]["classes"] <= 1.6 * truth
    assert free["all_classes"]["classes"] == 1000 and out["failures"] == []
    a = out["sets"]["a"]  # recommended: what held out best on this sweep (16,000 from the rest)
    assert a["check"]["fit_sizes"] == [1000, 4000] and a["recommended"] == a["check"]["chosen"]
    assert a["interval"][0] <= a[a["recommended"]]["prediction"]["classes"] <= a["interval"][1]
    p = run_cli("predict", root, "--size", "16000", "--fit-sizes", "1000,4000",
                "--max-classes", "1000", "--max-per-class", "1300", "--bootstrap", "0")
    assert "measured best at N=16,000" in p.stdout and "ratio rule" in p.stdout
    # fitted on two budgets: checked on 4,000 from 1,000 alone, then recommended
    assert "held-out check: fitted on N = 1,000 alone, predicting N=4,000" in p.stdout
    rec = re.search(r"recommended: (free fit|tied fit|ratio rule): K=(\d+) n=(\d+)", p.stdout)
    if rec[1] != "ratio rule":
        own = re.search(rf"{rec[1]}.*?predicted best: K\*=(\d+) n\*=(\d+)", p.stdout, re.S)
        assert own.groups() == rec.groups()[1:]
    p = run_cli("predict", root, "--size", "16000", "--fit-sizes", "1000,4000", "--fit-near",
                "7", "--max-classes", "1000", "--max-per-class", "1300", "--bootstrap", "0")
    assert "within 7x of each budget's best K/n" in p.stdout
    assert "a: 6 points at N = [1000, 4000]" in p.stdout  # K/n 0.064 .. 26.6: 3 of 5 each
    # one budget of 3 points: neither fit is possible and predict says so; the ratio rule
    # still predicts, so the command succeeds (exit 1 is for a set with no prediction at all)
    small = fake_sweep(tmp_path / "small", sizes=(1000,), ks=(4, 10, 25))
    p = run_cli("predict", small, "--size", "4000", "--max-classes", "100",
                "--max-per-class", "500", check=False)
    assert p.returncode == 0 and "free fit: not possible: too few points" in p.stdout
    assert "tied fit: not possible: too few points" in p.stdout and "Traceback" not in p.stderr
    p = run_cli("predict", tmp_path, "--size", "10", check=False)
    assert p.returncode == 2 and "no results.csv" in p.stderr


def test_a_parameter_on_a_bound_is_flagged_in_predict_and_the_report(tmp_path):
    # The errors want a negative floor; c0 >= 0 stops it at 0: a limit, not an estimate.
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), params={**TRUE, "c0": -0.1})
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "0")
    assert "ON A BOUND: c0" in p.stdout
    assert "ON A BOUND: c0" in write_report(root).read_text()
    a = json.loads(run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                           "--max-per-class", "1300", "--bootstrap", "0", "--json").stdout)
    for name, e in a["sets"].items():  # a fit on a bound is never recommended silently
        if e["recommended"] in ("free", "tied"):
            assert "c0" in e["warning"] and "on a bound" in e["warning"]
    assert any(e["recommended"] in ("free", "tied") for e in a["sets"].values())
    assert "WARNING: its fit has c0 on a bound" in p.stdout


def test_one_budget_cannot_validate_and_names_the_budget_to_add(tmp_path):
    root = fake_sweep(tmp_path / "sw", sizes=(1000,), ks=(4, 8, 16, 32, 63, 125, 250))
    p = run_cli("predict", root, "--size", "16000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "30", "--suggest")
    assert "one budget fitted: no predictor can be validated" in p.stdout
    assert "recommended" not in p.stdout
    add = re.search(r"to tell them apart, add N=([\d,]+), where they predict free fit K=(\d+), "
                    r"tied fit K=(\d+), ratio rule K=(\d+)", p.stdout)
    assert add and 1000 < int(add[1].replace(",", "")) <= 16000
    ks = [int(k) for k in add.groups()[1:]]
    assert max(ks) >= 1.5 * min(ks) or add[1] == "16,000"  # they differ there, or nowhere before
    # --suggest: the splits that would tell, as a command that adds them to this sweep
    cmd = re.search(r"dptrain sweep --data DATA --suite SUITE --out (\S+) --points (\S+) "
                    r"--seeds 2", p.stdout)
    assert cmd and cmd[1] == str(root)
    for pair in cmd[2].split(","):
        k, n = map(int, pair.split(":"))
        assert k * n == pytest.approx(16000, rel=0.01)
    spec = json.loads((root / "sweep.json").read_text())  # a sweep's own data and options,
    spec.update(data="/d", suite="/s.toml",  # less an empty --log-to older sweeps recorded
                options=["--recipe", "synthetic", "--log-to", "()", "--steps", "400"],
                repeats=1)  # and its probes' repeats: the runs it adds are probed alike
    (root / "sweep.json").write_text(json.dumps(spec))
    p = run_cli("predict", root, "--size", "16000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "0", "--suggest")
    assert (f"dptrain sweep --data /d --suite /s.toml --out {root} --recipe synthetic "
            "--steps 400 --repeats 1 --points ") in p.stdout


def test_a_single_seed_still_gets_intervals_from_the_residuals_and_residuals_are_shown(tmp_path):
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), seeds=1)
    args = ["predict", root, "--size", "64000", "--max-classes", "1000", "--max-per-class",
            "1300", "--bootstrap", "30"]
    p = run_cli(*args)
    assert "residuals (measured - fit): N=1,000: 4x250 " in p.stdout
    assert "K* 95% interval" in p.stdout  # residuals carry the noise a second seed would show
    free = json.loads(run_cli(*args, "--json").stdout)["sets"]["a"]["free"]
    assert free["bootstrap_fits"] > 0 and free["intervals"]["classes"] is not None
    # a residual is the measured error less the fitted one, at its point
    f = Fit(**free["params"])
    with open(root / "results.csv") as fh:
        measured = {(int(r["K"]), int(r["n"])): float(r["error_mean"])
                    for r in csv.DictReader(fh) if r["dataset"] == "a"}
    for x in free["residuals"]:
        k, n = x["classes"], x["per_class"]
        assert x["residual"] == pytest.approx(measured[k, n] - float(f.err(k, n)), abs=1e-9)


def test_an_underdetermined_fit_is_refused_with_the_reason(tmp_path):
    # Errors that do not depend on K: the class term's exponent could be anything.
    flat_k = {**TRUE, "a": 0.0}
    with pytest.raises(FitError, match="underdetermined"):
        k, n = zip(*grid_points())
        fit(k, n, model(np.array(k), np.array(n), flat_k))
    root = fake_sweep(tmp_path / "sw", sizes=(1000, 4000, 16000), params=flat_k, noise=0)
    p = run_cli("predict", root, "--size", "64000", "--max-classes", "1000",
                "--max-per-class", "1300", "--bootstrap", "0", check=False)
    assert "free fit: not possible: " in p.stdout and "underdetermined" in p.stdout
    assert "Traceback" not in p.stderr
    # the ratio rule, which measures r* from the runs alone, still predicts: exit 0
    assert p.returncode == 0 and "ratio rule: r* measured" in p.stdout


def test_the_recommended_line_says_why_it_was_chosen():
    from dptrain.study.predict import _why

    # the study's average at 4,000 fitted on 1,000: the free fit scored best, the ratio rule
    # was within a seed std of it with one parameter, and so was recommended
    check = {"seed_std_points": 1.9, "rows": [{"method": "free", "gap_points": 1.8},
                                              {"method": "tied", "gap_points": 3.4},
                                              {"method": "ratio_rule", "gap_points": 3.4}]}
    assert _why(check, "free") == "it held out best on this sweep"
    assert _why(check, "ratio_rule") == ("it held out within a seed std (1.9 points) of the "
                                         "best, the free fit, with fewer parameters")


def test_exit_status_and_intervals_agree_with_what_predict_prints(tmp_path):
    """Exit 1 only when a set gets no prediction at all; no interval is quoted from a fit
    that failed; an estimate outside the interval beside it is said to be, with why."""
    common = ["--size", "16000", "--max-classes", "1000", "--max-per-class", "1300",
              "--bootstrap", "30"]
    # 3 points at one budget: only the ratio rule can be made (the fits need 5 and 6)
    three = fake_sweep(tmp_path / "three", sizes=(1000,), ks=(4, 10, 25), sets=("a",))
    p = run_cli("predict", three, *common)
    assert "the ratio rule gives K* = 100..100 (no interval: the free fit, whose bootstrap " \
           "gives it, was not possible)" in p.stdout
    assert "K* 95% interval" not in p.stdout and "not fitted (reasons above): a, free fit" \
        in p.stdout
    # 2 points: nothing at all can be predicted, and the exit status says so
    two = fake_sweep(tmp_path / "two", sizes=(1000,), ks=(4, 10), sets=("a",))
    p = run_cli("predict", two, *common, check=False)
    assert p.returncode == 1 and p.stdout.splitlines()[-1].startswith("no prediction for a:")
    # 8 points at two budgets: the ratio rule held out best; its K lies outside the free fit's
    # interval, and the line says so
    seven = fake_sweep(tmp_path / "seven", sizes=(1000, 4000), ks=(4, 10, 25, 63), sets=("a",))
    p = run_cli("predict", seven, *common)
    rec = next(x for x in p.stdout.splitlines() if x.startswith("  recommended:"))
    assert rec.startswith("  recommended: ratio rule: K=124 n=129") and "interval 84..100" in rec
    assert rec.endswith("; K=124 lies outside it: the ratio rule and the free fit disagree "
                        "beyond the interval's width")


def test_a_fitted_value_outside_its_interval_is_marked():
    from dptrain.study.theory import fit_line

    f = Fit(c0=0.567, a=1.0, alpha=0.5, b=1.0, beta=0.5, tied=True, rmse=0.01, points=7)
    line = fit_line(f, {"c0": (9.08e-16, 0.463), "a": (0.9, 1.1)})
    assert line.startswith("c0=0.567 [9.08e-16, 0.463]* a=1 [0.9, 1.1] alpha=0.5 ")
    assert line.endswith("; * c0 outside its interval: the bootstrap refits do not centre on "
                         "this fit (too few points for it to be stable)")
    assert "*" not in fit_line(f, {"c0": (0.5, 0.6)})


@pytest.mark.parametrize("sizes, ks", [((1000,), (4, 10)), ((1000,), (4, 10, 25)),
                                       ((1000, 4000), (4, 10)), ((1000, 4000), (4, 10, 25)),
                                       ((250, 1000, 4000), (4, 10, 25, 63))])
def test_the_sweeps_word_before_it_runs_agrees_with_what_predict_then_makes(tmp_path, sizes,
                                                                            ks):
    """`sweep` (and its --dry-run) tells from the grid alone which predictors predict will make
    and whether its held-out check can choose one: checked against predict on that grid."""
    from dptrain.study.calibrate import PREDICTORS, label
    from dptrain.study.predict import grid_line, predict_sweep
    from dptrain.study.results import read_results

    root = fake_sweep(tmp_path / "sw", sizes=sizes, ks=ks, sets=("a",))
    line = grid_line({(r["K"], r["n"], r["N"]) for r in read_results(root)})
    a = predict_sweep(root, 64000, max_classes=1000, max_per_class=1300, samples=0)["sets"]["a"]
    made = {m for m in PREDICTORS if "error" not in a[m]}
    said = re.match(r"for predict: (?:enough points for ([^;]+)|too few points for any)", line)
    assert said, line
    assert {m for m in PREDICTORS if said[1] and f"the {label(m)}" in said[1]} == made
    assert ("the held-out check predicts" in line) == (a["check"] is not None
                                                      and a["recommended"] is not None)
    if not made:
        assert "the ratio rule needs 3 values of --classes at one budget" in line
    if len(sizes) == 1:
        assert "add a smaller budget (--sizes)" in line


def test_the_recommendations_line_says_whose_interval_it_shows_and_where_k_falls():
    """Issue 36's held-out sweep: predict recommended the ratio rule's K = 171 beside the free
    fit's interval 72..500, middle half 211..500, which leaves that K out. The line says, in
    itself, why the free fit's interval is shown, and that K lies outside its middle half; a
    free-fit recommendation inside both says neither."""
    from dptrain.study.predict import _advice_lines

    e = {"interval": [72, 500], "quartiles": [211, 500], "recommended": "ratio_rule",
         "ratio_rule": {"prediction": {"classes": 171, "per_class": 94}}}
    line = _advice_lines(e, 16000)[0]
    assert line.startswith("  recommended: ratio rule: K=171 n=94")
    assert "K* 95% interval 72..500, middle half 211..500 (the free fit's bootstrap" in line
    assert ("shown for the ratio rule too: the one interval that held the held-out best split "
            "in 90% or more of the built-in study's checks (its own held fewer)") in line
    assert line.endswith("; K=171 lies in it but outside its middle half: the ratio rule and "
                         "the free fit lean apart")
    e = {**e, "recommended": "free", "free": {"prediction": {"classes": 300, "per_class": 53}}}
    line = _advice_lines(e, 16000)[0]
    assert "shown for" not in line and "outside" not in line
