"""What a sweep would cost before it runs (`sweep --dry-run`): the images each run's
pre-training processes, and from throughputs given or timed here, each run's pre-training and
probing time and the sweep's wall time in the scheduler's order.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..data.index import ShardIndex
from ..data.subset import select
from .grid import Point


def plan(points: list[Point], index: ShardIndex, cfg, *, slots: int, gpus_per_run: int = 1,
         img_per_s: float | None = None, probe_images: int = 0,
         extract_img_per_s: float | None = None, solver_s: float = 0.0,
         startup_s: float = 0.0) -> dict:
    """What a sweep would cost, before running it: the images each run's pre-training
    processes (as `train` counts its steps) and, from a throughput per GPU (or per CPU run),
    each run's wall time and the sweep's, with the scheduler's order (each point to the
    first free slot) on `slots` runs at a time. A run's probing: `probe_images` (every
    downstream set's train and test images) at `extract_img_per_s` on one GPU, `solver_s` of
    probe solver, and `startup_s` for each of its two commands."""
    import heapq

    from ..training.train import plan_steps

    runs = []
    probe_s = (probe_images / extract_img_per_s if extract_img_per_s else 0.0) + solver_s
    for p in points:
        samples = len(select(index, p.classes, p.per_class, seed=p.seed,
                             allow_fewer=cfg.allow_fewer))
        steps = plan_steps(cfg, samples, gpus_per_run).total_steps
        images = steps * cfg.batch_size
        pretrain_s = images / (img_per_s * gpus_per_run) if img_per_s else None
        seconds = None if pretrain_s is None else pretrain_s + probe_s + 2 * startup_s
        runs.append({"run": p.name, "K": p.classes, "n": p.per_class, "N": p.size,
                     "seed": p.seed, "samples": samples, "steps": steps, "images": images,
                     "pretrain_s": pretrain_s, "probe_s": probe_s, "seconds": seconds})
    total = None
    if img_per_s:
        free = [0.0] * slots
        for r in runs:
            heapq.heappush(free, heapq.heappop(free) + r["seconds"])
        total = max(free)
    busy = sum(r["seconds"] for r in runs) * gpus_per_run if img_per_s else None
    return {"runs": runs, "images": sum(r["images"] for r in runs), "seconds": total,
            "gpu_seconds": busy, "probe_images": probe_images * len(runs), "slots": slots,
            "gpus_per_run": gpus_per_run, "img_per_s": img_per_s}


def probe_cost(suite: str, cfg, repeats: int, device: str, extraction: bool = True) -> dict:
    """One run's probing, measured here: every downstream set's images, the backbone's
    forward rate (`probe.measure_extraction`; unless not `extraction`) and one solver repeat
    per set of features of its shape (`logreg.measure_solver`), times `repeats`; and a
    command's start-up (importing torch and DALI)."""
    from ..probing.downstream import read_suite
    from ..probing.logreg import EVALUATIONS_PER_REPEAT, measure_solver
    from ..probing.probe import measure_extraction

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dptrain.training.train, dptrain.probing.probe"],
                   check=True)
    startup = time.perf_counter() - t
    sets = []
    for name, train, test in read_suite(Path(suite)):
        counts = ShardIndex.load(train).counts
        sets.append((name, int(counts.sum()), int(ShardIndex.load(test).counts.sum()),
                     int((counts > 0).sum())))
    res = cfg.eval_res or cfg.res
    rate, dim = measure_extraction(cfg.arch, res, 10, device)
    solver = sum(measure_solver(n_train, n_test, dim, k) for _, n_train, n_test, k in sets)
    forward = f"{cfg.arch}'s forward at {res} px from memory on the {device}, " \
        if extraction else ""
    return {"images": sum(s[1] + s[2] for s in sets),
            "extract_img_per_s": rate if extraction else None,
            "solver_s": repeats * solver, "startup_s": startup, "sets": len(sets),
            "source": f"measured here: {forward}the solver's L-BFGS steps on {len(sets)} "
                      f"set(s) of random {dim}-d features of their shapes on the CPU, planned "
                      f"at {EVALUATIONS_PER_REPEAT:,} evaluations per repeat (the most counted "
                      f"on trained features) x {repeats} repeats, a command's start-up "
                      f"{startup:.1f} s"}


def dry_run_text(points: list[Point], index: ShardIndex, cfg, gpus_per_run: int,
                 img_per_s: float | None, plan_gpus: int | None, *, suite: str, repeats: int,
                 extract_img_per_s: float | None = None) -> str:
    """`sweep --dry-run`: `plan`'s table and totals on the visible GPUs (or `plan_gpus`),
    from `img_per_s` and `extract_img_per_s` or a few steps timed here, probing included."""
    import torch

    from ..training.train import measure_img_per_s

    # What needs no timing first: a point too small for a batch is refused before any model
    # is built and timed (a plan with no rates runs the same checks).
    plan(points, index, cfg, slots=1, gpus_per_run=gpus_per_run)
    visible = torch.cuda.device_count()
    gpus = plan_gpus or visible
    here = "cuda" if gpus else "cpu"
    measurable = bool(visible) or not gpus  # this machine is the kind planned for
    sources = []
    if img_per_s is not None:
        sources.append("training: --img-per-s")
    elif measurable:
        batch = cfg.batch_size // gpus_per_run
        img_per_s = measure_img_per_s(cfg, len(index.counts), batch, here)
        sources.append(f"training measured here: 3 steps of {cfg.arch} at {cfg.res} px, batch "
                       f"{batch}, from memory")
    probing = probe_cost(suite, cfg, repeats, here if measurable else "cpu",
                         extraction=extract_img_per_s is None and measurable)
    if extract_img_per_s is not None:
        probing["extract_img_per_s"] = extract_img_per_s
        sources.append("extraction: --extract-img-per-s")
    sources.append(probing["source"])
    if probing["extract_img_per_s"] is None:
        img_per_s = None  # no estimate without both rates
    slots = max(1, gpus // gpus_per_run) if gpus else 1
    p = plan(points, index, cfg, slots=slots, gpus_per_run=gpus_per_run, img_per_s=img_per_s,
             probe_images=probing["images"], extract_img_per_s=probing["extract_img_per_s"],
             solver_s=probing["solver_s"], startup_s=probing["startup_s"])
    lines = [f"{'run':>18s} {'K':>6s} {'n':>6s} {'N':>9s} {'images':>12s} {'pretrain':>10s} "
             f"{'probe':>9s}"]
    for r in p["runs"]:
        t, pr = (f"{r['pretrain_s'] / 60:.1f} min", f"{r['probe_s'] / 60:.1f} min") \
            if r["seconds"] is not None else ("-", "-")
        lines.append(f"{r['run']:>18s} {r['K']:6d} {r['n']:6d} {r['N']:9,d} "
                     f"{r['images']:12,d} {t:>10s} {pr:>9s}")
    where = (f"{gpus} GPU(s), {slots} run(s) at a time, {gpus_per_run} GPU(s) each" if gpus
             else "this CPU, one run at a time")
    lines.append(f"{len(p['runs'])} runs, {p['images']:,} images of pre-training and "
                 f"{p['probe_images']:,} of feature extraction ({probing['sets']} downstream "
                 f"set(s) per run), on {where}")
    if p["seconds"] is None:
        lines.append(f"no throughput: planning for {gpus} GPU(s) on a machine without one; give "
                     "--img-per-s and --extract-img-per-s to estimate the time")
    else:
        per = "GPU" if gpus else "run"
        lines.append(f"estimated wall time: {p['seconds'] / 3600:.2f} h ({p['seconds']:,.0f} s); "
                     f"{p['gpu_seconds'] / 3600:.2f} {per}-hours in all, pre-training at "
                     f"{img_per_s:,.0f} img/s per {per}, extraction at "
                     f"{probing['extract_img_per_s']:,.0f} img/s, probe solver "
                     f"{probing['solver_s']:.0f} s and start-ups {2 * probing['startup_s']:.0f} s "
                     "per run")
        lines.append("  (" + "; ".join(sources) + ")")
    return "\n".join(lines)
