"""study/noise.py and predict's near-best range and power line: where a point's noise comes
from and what it takes to tell two splits apart, checked on data whose noise is known."""

from __future__ import annotations

import json
import math

import numpy as np
from conftest import TRUE, fake_sweep, run_cli

from dptrain.probing.logreg import linear_probe, pack_correct, unpack_correct
from dptrain.study.noise import (
    binomial_se,
    bootstrap_se,
    difference_sd,
    independent_share,
    near_best_range,
    seeds_to_separate,
)
from dptrain.study.theory import Fit


def test_the_test_sets_bootstrap_is_the_binomial_one_for_one_repeat_and_less_for_agreeing_ones():
    rng = np.random.default_rng(0)
    right = rng.random(5000) < 0.7
    se = bootstrap_se(right[None])
    assert abs(se / binomial_se(right.mean(), 5000) - 1) < 0.05
    # three repeats that agree on every image are one repeat; repeats that disagree on some
    # images average them, and the images vary less
    assert abs(bootstrap_se(np.stack([right] * 3)) / se - 1) < 0.05
    mixed = np.stack([right, right, rng.random(5000) < 0.7])
    assert bootstrap_se(mixed) < 0.95 * se


def test_the_probe_records_which_test_images_it_got_right():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    r = linear_probe(x[:200], y[:200], x[200:], y[200:], repeats=2, l2_grid=np.array([1.0]))
    for rep in r["repeats"]:
        correct = unpack_correct(rep["test_correct"], r["test_samples"])
        assert correct.shape == (100,) and correct.mean() == rep["test_top1"]
    bits = rng.random(13) < 0.5  # not a whole number of bytes
    assert (unpack_correct(pack_correct(bits), 13) == bits).all()


def test_independent_chance_per_image_is_told_from_runs_that_differ_as_wholes():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.2, 0.9, 2000)  # each image's chance of being right
    coins = rng.random((40, 2000)) < p  # 40 runs, each image its own coin
    assert 0.8 < independent_share(coins) < 1.25
    # runs that are right on the same images but shifted as wholes: the images explain little
    level = rng.normal(0, 0.05, (40, 1))
    wholes = rng.random(2000) < np.clip(p + level, 0, 1)
    assert independent_share(wholes) < 0.3
    # weights: a set of 1,000 images given the weight of one of 100 images counts 10x less
    w = np.r_[np.full(1000, 0.5 / 1000), np.full(1000, 0.5 / 1000)]
    assert abs(independent_share(coins, w) - independent_share(coins)) < 1e-9


def test_a_difference_between_splits_loses_what_their_seeds_share():
    rng = np.random.default_rng(3)
    shift = rng.normal(0, 0.03, 50)  # a seed's draw, shared by every split
    points = {(k, 100 // k, 100): {s: 0.3 + 0.001 * k + shift[s] + rng.normal(0, 0.01)
                                   for s in range(50)} for k in (2, 4, 5, 10)}
    sd, df = difference_sd(points)
    assert df == 6 * 49 and 0.9 * math.sqrt(2) * 0.01 < sd < 1.1 * math.sqrt(2) * 0.01
    # two budgets never pair, nor one seed
    assert difference_sd({(2, 50, 100): {0: 0.1, 1: 0.2}, (2, 25, 50): {0: 0.1, 1: 0.3}})[1] == 0
    # 2 standard errors of sd / sqrt(m) within a 1-point gap: m >= (2 sd / 0.01)^2
    assert seeds_to_separate(0.02) == 16 and seeds_to_separate(0.0251) == 26
    assert seeds_to_separate(0.001) == 2


def test_the_near_best_range_of_a_known_curve():
    # error = 0.2 + 0.01 (ln K - ln 100)^2 along the budget: within 0.0025 of the least for
    # |ln K - ln 100| <= 0.5, K = 61..164
    def err(k, n):
        return 0.2 + 0.01 * (np.log(k) - math.log(100)) ** 2

    assert near_best_range(err, 10000, 0.0025, 1, 10000) == (61, 164)
    assert near_best_range(err, 10000, 0.0025, 80, 120) == (80, 120)  # the limits bound it
    assert near_best_range(err, 10000, 0.0, 1, 10000) == (100, 100)


def test_predicts_power_line_and_near_best_range_follow_the_sweeps_noise(tmp_path):
    """A sweep of known noise: each set's error has seed std `noise`, independent between the
    2 sets, so the average's per-seed difference of two splits has std `noise`; predict's seed
    count is (2 noise / 1 point)^2 and its near-best range holds the true best K and narrows
    as the noise falls."""
    truth = Fit(**TRUE, tied=False, rmse=0, points=0).best_classes(16000)
    ranges = {}
    for noise in (0.02, 0.002):
        root = fake_sweep(tmp_path / f"n{noise}", sizes=(1000, 4000), ks=(4, 10, 25, 63, 160),
                          seeds=8, noise=noise)
        p = run_cli("predict", root, "--size", "16000", "--max-classes", "1000",
                    "--max-per-class", "1300", "--bootstrap", "20", "--json")
        avg = json.loads(p.stdout)["sets"]["average"]
        assert avg["power"]["df"] == 2 * 10 * 7  # 10 pairs of splits a budget, 8 seeds
        assert 0.85 * noise < avg["power"]["sd_diff"] < 1.15 * noise
        assert avg["power"]["seeds"] == seeds_to_separate(avg["power"]["sd_diff"])
        lo, hi = ranges[noise] = avg["near_best"]["classes"]
        assert lo <= truth <= hi and avg["near_best"]["seeds"] == 8
        assert avg["near_best"]["low"][0] <= lo <= avg["near_best"]["low"][1]
        text = run_cli("predict", root, "--size", "16000", "--max-classes", "1000",
                       "--max-per-class", "1300", "--bootstrap", "20").stdout
        assert f"near-best: K={lo}..{hi}, predicted by the free fit" in text
        assert f"to tell a 1-point gap at 2 standard errors: {avg['power']['seeds']} seeds" \
            in text
    assert 11 <= json.loads(run_cli(  # (2 x 0.02 / 0.01)^2 = 16
        "predict", tmp_path / "n0.02", "--size", "16000", "--bootstrap", "0", "--json",
        "--max-classes", "1000", "--max-per-class", "1300").stdout)["sets"]["average"][
        "power"]["seeds"] <= 22
    (wide_lo, wide_hi), (lo, hi) = ranges[0.02], ranges[0.002]
    assert wide_lo < lo and hi < wide_hi
