"""`dptrain sweep`: the paper's grid. Each point (K, n, seed) is one `dptrain pretrain` run and
its `dptrain probe` on a suite, in SWEEP/runs/K{K}-n{n}-s{seed}/.

    dptrain sweep --data shards/imagenet-train --suite probes.toml --out sweeps/a \
        --sizes 64000,256000 --ratios 0.25,1,4,16 --seeds 3

Points run as the same commands a user would type, in child processes: one per visible GPU at
a time (CUDA_VISIBLE_DEVICES per child), one at a time on a CPU machine, or one Slurm job each
through submitit. A crash in one run is recorded and the sweep goes on. The sweep reads only
run folders, so running the same command again skips finished points, resumes interrupted
ones and retries failed ones. SWEEP/results.csv has one row per (run, downstream set).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .index import ShardIndex
from .shards import write_atomic
from .subset import select, steps_per_epoch

RESULTS = "results.csv"
COLUMNS = ("run", "K", "n", "N", "seed", "dataset", "top1_mean", "top1_std", "error_mean",
           "train_loss", "train_top1", "val_top1", "steps", "epochs", "pretrain_s", "probe_s",
           "images_per_s", "device")


@dataclass(frozen=True)
class Point:
    classes: int
    per_class: int
    seed: int
    size: int  # the budget N it belongs to (K n can differ from N by the rounding of n)

    @property
    def name(self) -> str:
        return f"K{self.classes}-n{self.per_class}-s{self.seed}"


def grid(*, sizes: list[int] = (), classes: list[int] = (), ratios: list[float] = (),
         points: list[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """(K, n, N) triples: each size N with each K (n = N / K, rounded) or each ratio
    r = K / n (K = sqrt(r N)), plus explicit points (N = K n); in order, without repeats."""
    if (classes or ratios) and not sizes:
        raise DataError("--classes and --ratios need --sizes")
    if sizes and not (classes or ratios):
        raise DataError("--sizes needs --classes or --ratios")
    if not (sizes or points):
        raise DataError("no grid: give --sizes with --classes or --ratios, or --points K:n,...")
    out = []
    for size in sizes:
        for k in classes:
            out.append((k, max(1, round(size / k)), size))
        for r in ratios:
            k = max(1, round(math.sqrt(r * size)))
            out.append((k, max(1, round(size / k)), size))
    out += [(k, n, k * n) for k, n in points]
    return list(dict.fromkeys(out))


def feasible(index: ShardIndex, triples: list[tuple[int, int, int]], seeds: list[int],
             allow_fewer: bool = False) -> tuple[list[Point], list[str]]:
    """The points the shard set can hold, and a reason for each one it cannot."""
    ok, skipped = [], []
    for k, n, size in triples:
        for seed in seeds:
            try:
                select(index, k, n, seed=seed, allow_fewer=allow_fewer)
            except DataError as e:
                skipped.append(f"K={k} n={n} seed={seed}: {e}")
                continue
            ok.append(Point(k, n, seed, size))
    return ok, skipped


BENCH_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def measured_throughput(arch: str, res: int, device: str,
                        results: Path = BENCH_RESULTS) -> tuple[float, str] | None:
    """The loader-fed steady img/s of the newest train_step benchmark of this architecture,
    resolution and device (benchmarks/results/train_step-*.json), and its file name."""
    for path in sorted(results.glob("train_step-*.json"), reverse=True):
        try:
            r = json.loads(path.read_text())
            if (r["arch"], r["res"], r["device"]) == (arch, res, device):
                return float(r["loader"]["steady img/s"]), path.name
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def plan(points: list[Point], index: ShardIndex, cfg, *, slots: int, gpus_per_run: int = 1,
         img_per_s: float | None = None) -> dict:
    """What a sweep would cost, before running it: the images each run's pre-training
    processes (as `train` counts its steps) and, from a throughput per GPU (or per CPU run),
    each run's wall time and the sweep's, with the scheduler's order (each point to the
    first free slot) on `slots` runs at a time. Probing is not counted."""
    import heapq

    runs = []
    for p in points:
        samples = len(select(index, p.classes, p.per_class, seed=p.seed,
                             allow_fewer=cfg.allow_fewer))
        per_epoch = steps_per_epoch(samples, cfg.batch_size // gpus_per_run, gpus_per_run)
        steps = cfg.steps or cfg.epochs * per_epoch
        images = steps * cfg.batch_size
        seconds = images / (img_per_s * gpus_per_run) if img_per_s else None
        runs.append({"run": p.name, "K": p.classes, "n": p.per_class, "N": p.size,
                     "seed": p.seed, "samples": samples, "steps": steps, "images": images,
                     "seconds": seconds})
    total = None
    if img_per_s:
        free = [0.0] * slots
        for r in runs:
            heapq.heappush(free, heapq.heappop(free) + r["seconds"])
        total = max(free)
    return {"runs": runs, "images": sum(r["images"] for r in runs), "seconds": total,
            "slots": slots, "gpus_per_run": gpus_per_run, "img_per_s": img_per_s}


def finished(run: Path, datasets: list[str]) -> bool:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return set(datasets) <= set(summary.get("probe", {}))


def point_commands(point: Point, spec: dict) -> list[list[str]]:
    """The two commands of one point: what a user would run by hand."""
    run = str(Path(spec["out"]) / "runs" / point.name)
    dptrain = [sys.executable, "-m", "dptrain"]
    return [[*dptrain, "pretrain", "--data", spec["data"], "--classes", str(point.classes),
             "--per-class", str(point.per_class), "--seed", str(point.seed), "--out", run,
             "--no-progress", *spec["pretrain_args"]],
            [*dptrain, "probe", run, "--suite", spec["suite"], "--repeats",
             str(spec["repeats"]), *spec["probe_args"]]]


def run_point(point: Point, spec: dict, device: str | None = None) -> dict:
    """Run one point's commands in child processes (on `device`: CUDA_VISIBLE_DEVICES);
    its output goes to RUN/sweep.log. Never raises for a failed run: returns its error."""
    run = Path(spec["out"]) / "runs" / point.name
    run.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    t0 = time.perf_counter()
    with open(run / "sweep.log", "a") as log:
        for cmd in point_commands(point, spec):
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
            log.write(p.stderr)
            if p.returncode != 0:
                lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
                error = f"{cmd[3]} exited {p.returncode}: {lines[-1] if lines else '(no output)'}"
                return {"run": point.name, "status": "failed", "error": error,
                        "seconds": time.perf_counter() - t0, "device": device}
    return {"run": point.name, "status": "done", "error": None,
            "seconds": time.perf_counter() - t0, "device": device}


def share_of_cores(runs: int, gpus_per_run: int = 1) -> int:
    """DALI threads for each process when `runs` runs of `gpus_per_run` ranks share this
    machine: its cores split evenly, so no pipeline starves another."""
    return max(1, len(os.sched_getaffinity(0)) // (runs * gpus_per_run))


def device_slots(gpus_per_run: int = 1) -> list[str | None]:
    """Visible GPUs, grouped per run ("0", "1", ... or "0,1" for 2-GPU runs); [None] on CPU."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    if gpus_per_run > len(ids):
        raise DataError(f"--gpus {gpus_per_run} per run, but {len(ids)} GPU(s) are visible")
    return [",".join(ids[i:i + gpus_per_run])
            for i in range(0, len(ids) - gpus_per_run + 1, gpus_per_run)]


def schedule(points: list[Point], slots: list, run) -> list[dict]:
    """Run `run(point, slot)` for every point, at most one per slot at a time, each slot
    busy as long as points remain."""
    free: queue.Queue = queue.Queue()
    for s in slots:
        free.put(s)

    def job(point: Point) -> dict:
        slot = free.get()
        try:
            return run(point, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(len(slots)) as pool:
        return list(pool.map(job, points))


def submit_slurm(points: list[Point], spec: dict, *, cluster: str = "slurm",
                 slurm: dict | None = None) -> list[dict]:
    """One submitit job per point (cluster "local": submitit's local executor, for tests)."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(spec["out"]) / "submitit", cluster=cluster)
    executor.update_parameters(**(slurm or {}))
    jobs = [executor.submit(run_point, p, spec) for p in points]
    results = []
    for p, j in zip(points, jobs):
        try:
            results.append(j.result())
        except Exception as e:  # a job that died (time limit, node failure): record it
            results.append({"run": p.name, "status": "failed", "device": None, "seconds": None,
                            "error": f"job {j.job_id}: {type(e).__name__}: {str(e)[-300:]}"})
    return results


def collect(out: Path) -> list[dict]:
    """Rows of results.csv, read from the run folders (and each run's N from sweep.json)."""
    sizes = {}
    if (out / "sweep.json").is_file():
        sizes = {p["run"]: p["N"] for p in json.loads((out / "sweep.json").read_text())["points"]}
    rows = []
    for run in sorted((out / "runs").glob("K*-n*-s*")):
        try:
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() \
            else {"datasets": {}}
        k, n = config["config"]["classes"], config["config"]["per_class"]
        for name, r in sorted(summary.get("probe", {}).items()):
            p = probe["datasets"].get(name, {})
            rows.append({"run": run.name, "K": k, "n": n, "N": sizes.get(run.name, k * n),
                         "seed": config["config"]["seed"], "dataset": name,
                         "top1_mean": r["top1_mean"], "top1_std": r["top1_std"],
                         "error_mean": r["error_mean"], "train_loss": summary["train_loss"],
                         "train_top1": summary["train_top1_last_epoch"],
                         "val_top1": summary["val_top1"], "steps": summary["steps"],
                         "epochs": summary["epochs"], "pretrain_s": summary["wall_s"],
                         "probe_s": p.get("feature_seconds", 0) + p.get("probe_seconds", 0),
                         "images_per_s": summary["images_per_s"], "device": summary["device"]})
    return rows


def write_results(out: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(collect(out))
    path = out / RESULTS
    write_atomic(path, buf.getvalue().encode())
    return path


def read_results(out: Path) -> list[dict]:
    path = Path(out) / RESULTS
    if not path.is_file():
        raise DataError(f"{out} has no {RESULTS}: is it a dptrain sweep folder?")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path} lists no finished run yet: run or finish the sweep first")
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        for key, kind in (*((k, int) for k in ("K", "n", "N", "seed", "steps", "epochs")),
                          *((k, float) for k in ("top1_mean", "top1_std", "error_mean"))):
            try:
                r[key] = kind(r[key])
            except (TypeError, ValueError):
                raise DataError(f"{path}, line {line}, column {key}: {r.get(key)!r} is not "
                                f"{'an integer' if kind is int else 'a number'}") from None
    return rows


def sweep(spec: dict, points: list[Point], datasets: list[str], *, launcher: str = "local",
          slots: list | None = None, slurm: dict | None = None, log=print) -> dict:
    """Run the points not finished yet; write sweep.json, failures.json and results.csv."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    # Every point ever run here keeps its budget N: a later call may add points (a predicted
    # split, say) without relabelling the earlier ones.
    known = {}
    if (out / "sweep.json").is_file():
        known = {p["run"]: p["N"] for p in json.loads((out / "sweep.json").read_text())["points"]}
    known.update({p.name: p.size for p in points})
    write_atomic(out / "sweep.json", json.dumps(
        {**spec, "points": [{"run": r, "N": n} for r, n in known.items()]}, indent=1).encode())
    todo = [p for p in points if not finished(out / "runs" / p.name, datasets)]
    log(f"{len(points)} points, {len(points) - len(todo)} finished already, {len(todo)} to run")
    if launcher == "local":
        slots = slots or [None]
        lock = threading.Lock()

        def run(point: Point, slot) -> dict:
            r = run_point(point, spec, slot)
            where = f" on GPU {slot}" if slot is not None else ""
            with lock:
                log(f"{point.name}: {r['status']}{where} in {r['seconds']:.0f} s"
                    + (f": {r['error']}" if r["error"] else ""))
                write_results(out)  # after every point: a partial sweep is readable
            return r

        results = schedule(todo, slots, run)
    else:
        results = submit_slurm(todo, spec, cluster="local" if launcher == "submitit-local"
                               else "slurm", slurm=slurm)
    failures = [r for r in results if r["status"] != "done"]
    write_atomic(out / "failures.json", json.dumps(failures, indent=1).encode())
    write_results(out)
    return {"points": len(points), "ran": len(todo), "failed": failures}


AVERAGE = "average"  # the mean over downstream sets, per run


def errors_by_point(rows: list[dict]) -> dict[str, dict[tuple[int, int, int], list[float]]]:
    """{downstream set or AVERAGE: {(K, n, N): [error of each seed]}} from results.csv rows.
    AVERAGE covers the runs probed on every set."""
    by_set: dict[str, dict[tuple[int, int, int], dict[int, float]]] = {}
    for r in rows:
        by_set.setdefault(r["dataset"], {}).setdefault((r["K"], r["n"], r["N"]), {})[r["seed"]] = \
            r["error_mean"]
    names = sorted(by_set)
    out = {name: {p: list(s.values()) for p, s in sorted(pts.items())}
           for name, pts in by_set.items()}
    average: dict[tuple[int, int, int], list[float]] = {}
    for p in sorted({p for pts in by_set.values() for p in pts}):
        seeds = set.intersection(*(set(by_set[n].get(p, {})) for n in names))
        if seeds:
            average[p] = [sum(by_set[n][p][s] for n in names) / len(names) for s in sorted(seeds)]
    if len(names) > 1:
        out[AVERAGE] = average
    return out


def best_per_size(points: dict[tuple[int, int, int], list[float]]) -> dict[int, tuple]:
    """The (K, n, N) of lowest mean error at each budget N."""
    best: dict[int, tuple] = {}
    for p, errs in points.items():
        size = p[2]
        if size not in best or statistics.mean(errs) < statistics.mean(points[best[size]]):
            best[size] = p
    return best
