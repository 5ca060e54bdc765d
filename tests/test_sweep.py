"""`dptrain sweep`: the grid, the scheduler, a tiny real sweep with an interruption, and the
submitit path."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from dataclasses import asdict

import pytest
from conftest import interrupt, run_here, synthetic_data, under_old_names

from dptrain.common.errors import DataError
from dptrain.data.index import ShardIndex
from dptrain.data.synthetic import Generator, write_tasks
from dptrain.probing.downstream import read_suite
from dptrain.study.grid import Point, grid
from dptrain.study.sweep import SweepSpec, device_slots, schedule, sweep
from dptrain.training.config import make_config


def test_grid_sizes_ratios_and_points():
    assert grid(sizes=[1000], classes=[10, 30]) == [(10, 100, 1000), (30, 33, 1000)]
    assert grid(sizes=[400], ratios=[1, 4]) == [(20, 20, 400), (40, 10, 400)]
    assert grid(points=[(5, 7), (5, 7)]) == [(5, 7, 35)]
    for bad in (dict(sizes=[10]), dict(classes=[3]), {}):
        with pytest.raises(DataError):
            grid(**bad)


def test_scheduler_gives_each_concurrent_run_its_own_device():
    busy, seen, lock = set(), [], threading.Lock()

    def run(point, slot):
        with lock:
            assert slot not in busy  # no device runs two points at once
            busy.add(slot)
            seen.append(slot)
        time.sleep(0.05)
        with lock:
            busy.remove(slot)
        return point.name

    points = [Point(k, 1, 0, k) for k in range(1, 9)]
    assert schedule(points, ["0", "1", "2"], run) == [p.name for p in points]
    assert set(seen) == {"0", "1", "2"}  # every device was used


def test_device_slots_follow_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert device_slots() == ["2", "3", "5", "7"]
    assert device_slots(2) == ["2,3", "5,7"]
    with pytest.raises(DataError, match="5 per run"):
        device_slots(5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_slots() == [None]


def test_each_child_of_a_local_sweep_sees_only_its_own_gpu(tmp_path, monkeypatch):
    """A local sweep on 2 GPUs: every point's commands run as child processes whose
    CUDA_VISIBLE_DEVICES names the one GPU the scheduler gave that point, and no GPU holds
    two points' children at once. The children here record what they see (in place of
    pretrain and probe, which would need the GPUs)."""
    import sys

    import dptrain.study.sweep as sweep_module

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = tmp_path / "seen.jsonl"
    child = ("import json, os, sys, time; t = time.time(); time.sleep(0.2); "
             "open(sys.argv[1], 'a').write(json.dumps([sys.argv[2], "
             "os.environ.get('CUDA_VISIBLE_DEVICES'), t, time.time()]) + '\\n')")
    monkeypatch.setattr(sweep_module, "point_commands", lambda point, spec: [
        [sys.executable, "-c", child, str(seen), point.name]] * 2)  # as pretrain, then probe
    spec = SweepSpec(data="d", suite="s", out=str(tmp_path / "sw"), repeats=1,
                     recipe="synthetic", budget="fixed epochs", config={}, options=[])
    points = [Point(k, 4, 0, 4 * k) for k in range(1, 7)]
    r = sweep(spec, points, [], slots=["0", "1"], log=lambda m: None)
    assert r["failed"] == [] and r["ran"] == 6
    records = [json.loads(x) for x in seen.read_text().splitlines()]
    assert len(records) == 12 and {gpu for _, gpu, _, _ in records} == {"0", "1"}
    for name in {p.name for p in points}:  # a point's two commands, on the one GPU it got
        assert len({gpu for n, gpu, _, _ in records if n == name}) == 1
    for gpu in ("0", "1"):  # one child at a time on each GPU
        spans = sorted((t0, t1) for _, g, t0, t1 in records if g == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("syn"), 6, 12)


TINY = ["--recipe", "synthetic", "--epochs", "1", "--batch-size", "8", "--seeds", "1",
        "--repeats", "1", "--log-every", "1"]


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_resumes_after_interruption(tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    second = out / "runs" / "K4-n4-s0" / "sweep.log"
    interrupt(["sweep", "--data", data, "--suite", suite, "--out", out, "--points",
               "2:8,4:4,9:20", *TINY], second.exists, group=True)  # mid-way through point 2
    first = out / "runs" / "K2-n8-s0"
    assert (first / "summary.json").is_file()
    mtime = (first / "checkpoint.pt").stat().st_mtime_ns
    r = run_here("sweep", "--data", data, "--suite", suite, "--out", out,
                 "--points", "2:8,4:4,9:20", *TINY, check=True)
    assert "skipped (infeasible) K=9 n=20" in r.stderr  # 6 classes of 12 images
    assert "2 points, 1 finished already, 1 to run" in r.stderr
    assert (first / "checkpoint.pt").stat().st_mtime_ns == mtime  # not retrained
    got = rows(out)
    assert sorted((x["K"], x["n"], x["dataset"]) for x in got) == \
        [("2", "8", "synthetic-t1"), ("4", "4", "synthetic-t1")]
    for x in got:  # each row is its run's own probe result
        probe = json.loads((out / "runs" / x["run"] / "probe.json").read_text())
        mine = probe["datasets"][x["dataset"]]
        for column in ("top1_mean", "top1_std", "error_mean"):
            assert float(x[column]) == pytest.approx(mine[column]), column
        assert mine["top1_std"] != pytest.approx(mine["top1_mean"])  # two columns told apart
    # One run at a time on a CPU: each child gets all of this process's cores for DALI.
    cores = len(os.sched_getaffinity(0))
    commands = [x for x in (first / "sweep.log").read_text().splitlines() if x.startswith("$ ")]
    assert [c.split()[4] for c in commands] == ["pretrain", "probe"]  # "$ python -m dptrain"
    assert f"--workers {cores}" in commands[1]  # the probe's; pretrain's is in its config:
    assert json.loads((out / "pretrain.json").read_text())["workers"] == cores
    assert json.loads((first / "config.json").read_text())["config"]["workers"] == cores
    r = run_here("sweep", "--data", data, "--suite", suite, "--out", out,
                 "--points", "2:8,4:4", *TINY, check=True)
    assert "2 finished already, 0 to run" in r.stderr
    r = run_here("report", out, check=True)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "table.md").is_file()
    assert "- budget: fixed epochs: 1 per run (steps grow with N)" in \
        (out / "report" / "report.md").read_text()


def test_a_later_call_adds_points_and_keeps_the_earlier_budgets(tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    common = ["sweep", "--data", data, "--suite", suite, "--out", out, *TINY]
    # n = 8: K n = 32, its budget is 30
    run_here(*common, "--sizes", "30", "--classes", "4", check=True)
    run_here(*common, "--points", "2:8", check=True)  # e.g. a predicted split, added later
    assert sorted({(x["run"], x["N"]) for x in rows(out)}) == [("K2-n8-s0", "16"),
                                                               ("K4-n8-s0", "30")]


def test_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    # batch 16 > 2 x 4 images: the K=2, n=4 run fails, the K=4, n=4 one still runs
    r = run_here("sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:4,4:4",
                 *TINY[:4], "--batch-size", "16", *TINY[6:], check=False)
    assert r.returncode == 1 and "failed K2-n4-s0" in r.stderr and "no full batch" in r.stderr
    assert [x["run"] for x in rows(out)] == ["K4-n4-s0"]
    assert "K2-n4-s0" in (out / "failures.json").read_text()


def test_bad_sweep_options(tmp_path, synthetic):
    data, suite = synthetic
    for args, msg in ((["--sizes", "100"], "needs --classes or --ratios"),
                      (["--points", "3x4"], "K:n pairs"),
                      (["--points", "2:4", "--arch", "nope"], "unknown --arch"),
                      (["--points", "100:100"], "no feasible point")):
        r = run_here("sweep", "--data", data, "--suite", suite, "--out", tmp_path / "x", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_submitit_local_executor_path(tmp_path, synthetic):
    data, suite = synthetic
    cfg = make_config("synthetic", data=str(data), epochs=1, batch_size=8)
    spec = SweepSpec(data=str(data), suite=str(suite), out=str(tmp_path / "sw"), repeats=1,
                     recipe="synthetic", budget="fixed epochs", config=asdict(cfg), options=[])
    r = sweep(spec, [Point(3, 4, 0, 12)], ["synthetic-t1"], launcher="submitit-local",
              log=lambda m: None)
    assert r["failed"] == [] and r["ran"] == 1, r
    assert [x["run"] for x in rows(tmp_path / "sw")] == ["K3-n4-s0"]
    assert list((tmp_path / "sw" / "submitit").iterdir())  # the job went through submitit


def test_ctrl_c_stops_the_sweep_with_a_message(tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    log = out / "runs" / "K2-n8-s0" / "sweep.log"
    status, err = interrupt(["sweep", "--data", data, "--suite", suite, "--out", out,
                             "--points", "2:8", *TINY], log.exists, signal.SIGINT, group=True)
    assert status == 130 and "run the same command again" in err
    assert "Traceback" not in err


def test_dry_run_plans_images_and_time_without_running(tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    args = ["sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:8,4:4,9:20",
            "--recipe", "synthetic", "--epochs", "3", "--batch-size", "8", "--seeds", "2",
            "--dry-run", "--img-per-s", "16", "--extract-img-per-s", "1000"]
    p = run_here(*args, "--plan-gpus", "1")
    # By hand: K=2 x n=8 and K=4 x n=4 are 16 images each; 3 epochs of 16 // 8 = 2 steps of
    # 8 images = 48 images, 3 s at 16 img/s; 2 points x 2 seeds = 4 runs. Each run's probe
    # extracts every image of the suite's sets (their train and test splits).
    assert "skipped (infeasible) K=9 n=20" in p.stderr
    # before the plan, from the grid alone: what predict could make of it (test_predict)
    assert "for predict: too few points for any prediction (2 splits at 1 budget)" in p.stderr
    lines = p.stdout.splitlines()
    runs = [x.split() for x in lines if x.strip().startswith("K")]
    assert [r[0] for r in runs] == ["K2-n8-s0", "K2-n8-s1", "K4-n4-s0", "K4-n4-s1"]
    assert all(r[4] == "48" and r[5:7] == ["0.1", "min"] for r in runs)
    suite_images = sum(int(ShardIndex.load(d).counts.sum()) for _, *ds in read_suite(suite)
                       for d in ds)
    assert (f"4 runs, 192 images of pre-training and {4 * suite_images:,} of feature "
            "extraction") in p.stdout and "on 1 GPU(s), 1 run(s) at a time" in p.stdout
    assert "pre-training at 16 img/s per GPU, extraction at 1,000 img/s" in p.stdout
    assert "training: --img-per-s; extraction: --extract-img-per-s; measured here: the " \
        "solver" in p.stdout
    p = run_here(*args, "--plan-gpus", "2", "--steps", "10")  # fixed steps: 80 images a run
    assert "4 runs, 320 images" in p.stdout and "2 run(s) at a time" in p.stdout
    p = run_here(*args[:-4], "--device", "cpu")  # no rates given: a few steps timed here
    assert "training measured here: 3 steps of smallcnn at 32 px, batch 8" in p.stdout
    assert "smallcnn's forward at 32 px from memory on the cpu" in p.stdout
    assert "estimated wall time" in p.stdout
    p = run_here(*args[:-2], "--plan-gpus", "2", "--device", "cpu")
    assert "planning for 2 GPU(s) on a machine without one; give --img-per-s and " \
        "--extract-img-per-s" in p.stdout
    assert not out.exists()  # nothing was run or written


def test_plan_schedules_like_the_sweep(synthetic):
    from dptrain.data.index import ShardIndex
    from dptrain.study.plan import plan

    data, _ = synthetic
    cfg = make_config("synthetic", data=str(data), epochs=1, batch_size=8)
    pts = [Point(2, 8, s, 16) for s in range(3)] + [Point(6, 12, 0, 72)]
    p = plan(pts, ShardIndex.load(data), cfg, slots=2, img_per_s=8)
    assert [r["images"] for r in p["runs"]] == [16, 16, 16, 72]  # 2 and 9 steps of 8
    # in order, each to the first free slot: 2 s | 2 s, then 2 s on the first (4 s), then the
    # 9 s run on the second (2 + 9 = 11 s): the sweep ends at 11 s
    assert p["seconds"] == pytest.approx(11.0) and p["gpu_seconds"] == pytest.approx(15.0)
    # Probing adds to every run: 400 images at 200 img/s, 1 s of solver, two 0.5 s start-ups.
    p = plan(pts, ShardIndex.load(data), cfg, slots=2, img_per_s=8, probe_images=400,
             extract_img_per_s=200, solver_s=1.0, startup_s=0.5)
    assert [r["seconds"] for r in p["runs"]] == pytest.approx([6, 6, 6, 13])
    assert p["seconds"] == pytest.approx(19.0) and p["probe_images"] == 1600


def test_a_sweep_decodes_each_downstream_set_once_into_its_shared_cache(tmp_path, synthetic):
    """Two runs probed on a two-set suite: one results.csv row per (run, set), and SWEEP/cache
    holds each set's (train and test) eval pixels once, every class file written while the
    first run probed and none after."""
    data, _ = synthetic
    suite = write_tasks(tmp_path / "tasks", (3, 2), train=6, test=3, gen=Generator(res=16),
                        progress=False)
    out = tmp_path / "sw"
    run_here("sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:8,4:4",
             *TINY, check=True)
    assert sorted((x["run"], x["dataset"]) for x in rows(out)) == [
        ("K2-n8-s0", "synthetic-t1"), ("K2-n8-s0", "synthetic-t2"),
        ("K4-n4-s0", "synthetic-t1"), ("K4-n4-s0", "synthetic-t2")]
    entries = sorted(p for p in (out / "cache" / "eval").iterdir() if p.is_dir())
    assert len(entries) == 4  # t1 and t2, train and test, at the sweep's one resolution
    assert sorted(len(list(e.glob("*.npy"))) for e in entries) == [2, 2, 3, 3]  # their classes
    first_done = (out / "runs" / "K2-n8-s0" / "probe.json").stat().st_mtime_ns
    assert all(f.stat().st_mtime_ns <= first_done for e in entries for f in e.glob("*.npy"))


def test_a_rerun_retries_a_failed_point_and_clears_its_failure_and_reports_its_budget(
        tmp_path, synthetic):
    data, suite = synthetic
    out = tmp_path / "sw"
    args = ["sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:8", *TINY,
            "--steps", "3"]
    # The point's first attempt fails: its data cannot be read while the sweep runs it
    # (a sweep reads only its own index; the run opens the tars).
    tars = sorted(data.glob("*.tar"))
    hidden = [t.rename(t.with_suffix(".hidden")) for t in tars]
    try:
        r = run_here(*args)
    finally:
        for h, t in zip(hidden, tars):
            h.rename(t)
    assert r.returncode == 1 and "failed K2-n8-s0" in r.stderr
    assert "K2-n8-s0" in (out / "failures.json").read_text()
    r = run_here(*args, check=True)
    assert "1 to run" in r.stderr
    assert json.loads((out / "failures.json").read_text()) == []  # no failure left
    assert [x["run"] for x in rows(out)] == ["K2-n8-s0"]
    # The budget the report states is the one the run trained.
    assert json.loads((out / "runs" / "K2-n8-s0" / "summary.json").read_text())["steps"] == 3
    run_here("report", out, check=True)
    assert "- budget: fixed steps: 3 per run" in (out / "report" / "report.md").read_text()
    # The same folder with options that change what a run computes or how it is probed is
    # refused, and its record stays true; an option that changes only speed is not.
    record = (out / "sweep.json").read_bytes()
    r = run_here("sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:8",
                 "--recipe", "synthetic", "--epochs", "2", "--batch-size", "8", "--seeds", "1",
                 "--repeats", "2", "--log-every", "1", "--steps", "4")
    assert r.returncode == 2 and "holds a sweep run with other options: --epochs 1 (now 2), " \
        "--steps 3 (now 4), --repeats 1 (now 2)" in r.stderr, r.stderr
    assert (out / "sweep.json").read_bytes() == record
    r = run_here(*args, "--workers", "1", check=True)
    assert "1 finished already, 0 to run" in r.stderr


def test_a_sweep_recorded_under_the_old_cache_names_resumes_and_reports(tmp_path, synthetic):
    """A sweep folder written before each cache had one name (sweep.json's and pretrain.json's
    cache, cache_side, cache_dir, the flags sweep.json records, its runs' records) reads as
    today's: its report names today's flags, a call with another pixel cache side is refused
    naming it (so is --order keyed: its runs, from before --order, were shuffled), and the
    same options under their new names find the sweep finished. The old flag itself still
    works, saying its new name."""
    data, suite = synthetic
    out = tmp_path / "sw"
    args = ["sweep", "--data", data, "--suite", suite, "--out", out, "--points", "2:8", *TINY]
    r = run_here(*args, "--cache-side", 24, check=True)
    assert "note: --cache-side is now --pixel-cache-side (the old name still works)" in r.stderr
    assert json.loads((out / "pretrain.json").read_text())["pixel_cache_side"] == 24
    rewritten = under_old_names(out)
    assert {"sweep.json", "pretrain.json", "config.json", "summary.json"} <= set(rewritten)
    assert '"--cache-side"' in (out / "sweep.json").read_text()
    run_here("report", out, check=True)
    report = (out / "report" / "report.md").read_text()
    assert "--pixel-cache-side 24" in report and "--cache-side" not in report
    r = run_here(*args, "--pixel-cache-side", 32)
    assert r.returncode == 2 and "other options: --pixel-cache-side 24 (now 32)" in r.stderr
    r = run_here(*args, "--pixel-cache-side", 24, "--order", "keyed")  # its runs: shuffled
    assert r.returncode == 2 and "other options: --order shuffled (now keyed)" in r.stderr
    r = run_here(*args, "--pixel-cache-side", 24, "--pixel-cache", "off", check=True)  # speed
    assert "1 point, 1 finished already, 0 to run" in r.stderr
    assert json.loads((out / "sweep.json").read_text())["config"]["pixel_cache_side"] == 24


def test_a_sweep_on_the_built_in_data_gets_its_recipe(tmp_path, synthetic):
    """As pretrain: no --recipe on a set of the built-in data is --recipe synthetic, said
    first (with fast, resnet18 at batch 512, these points made no full batch)."""
    data, suite = synthetic
    p = run_here("sweep", "--data", data, "--suite", suite, "--out", tmp_path / "sw",
                 "--points", "2:8", "--epochs", "3", "--batch-size", "8", "--dry-run",
                 "--plan-gpus", "1", "--img-per-s", "16", "--extract-img-per-s", "1000",
                 check=True)
    assert p.stderr.startswith(f"{data} is the built-in synthetic data: --recipe synthetic")
    assert "K2-n8-s0" in p.stdout
    p = run_here("sweep", "--data", data, "--suite", suite, "--out", tmp_path / "sw",
                 "--points", "2:8", "--recipe", "fast", "--dry-run", "--plan-gpus", "1",
                 "--img-per-s", "16", "--extract-img-per-s", "1000")
    assert "built-in synthetic data" not in p.stderr and "no full batch of 512" in p.stderr
