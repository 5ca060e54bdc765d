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

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path

from ..common.environment import cores_for_this_process
from ..common.errors import DataError
from ..common.launch import child_env
from ..common.options import as_argv, option
from ..common.progress import bar as progress_bar
from ..common.progress import plural
from ..common.runfolder import RunFolder, SweepFolder, folder_lock, write_json
from ..common.tracking import BUDGET, SWEEP
from ..data.index import ShardIndex
from .grid import Point, feasible, grid
from .plan import dry_run_text
from .results import read_results, write_results


@dataclass(frozen=True)
class SweepOptions:
    """`dptrain sweep`'s own options (the training options are TrainConfig's)."""

    data: str = option(MISSING, "Shard set to pre-train on.", path="dir")
    suite: str = option(MISSING, "Downstream sets to probe every run on (TOML/JSON, as probe "
                        "--suite).", path="file")
    out: str = option(MISSING, "Sweep folder: runs/, results.csv, sweep.json, failures.json, "
                      "cache/ (the eval cache its runs share, unless --eval-cache).",
                      path="out")
    sizes: tuple = option((), "Budgets N, e.g. 64000,256000.", kind="ints")
    classes: tuple = option((), "K values per size (n = N / K, rounded).", kind="ints")
    ratios: tuple = option((), "K / n values per size.", kind="floats")
    points: tuple = option((), "Explicit K:n points, e.g. 100:64,400:16.", kind="pairs")
    seeds: int = option(3, "Seeds 0..S-1 per point.", low=1)
    repeats: int = option(5, "Probe repeats.", low=1)
    launcher: str = option("local", "local: one run per visible GPU (one at a time on a CPU); "
                           "slurm: one job per point through submitit (submitit-local: the same "
                           "path, run here).", choices=("local", "slurm", "submitit-local"))
    slurm_partition: str | None = option(None, "Slurm partition [the cluster's default].")
    slurm_time: int = option(240, "Slurm time limit per point, minutes.", low=1)
    slurm_cpus: int = option(16, "CPUs per job.", low=1)
    slurm_gpus_as: str = option("gpus-per-node", "How each job asks for its --gpus: "
                                "gpus-per-node (sbatch --gpus-per-node=[TYPE:]G) or gres "
                                "(--gres=gpu:[TYPE:]G, for clusters that count GPUs as generic "
                                "resources only); as the cluster's documentation says.",
                                choices=("gpus-per-node", "gres"))
    slurm_gpu_type: str | None = option(None, "GPU type in each job's request, e.g. a100 "
                                        "(--gpus-per-node=a100:G).")
    slurm_extra: tuple = option((), "Another sbatch option for every job, KEY=VALUE as in "
                                "sbatch --KEY=VALUE, or KEY for a flag: account=proj, qos=high, "
                                "constraint=ib, mem=64G, exclusive; repeat for more.",
                                multiple=True)
    dry_run: bool = option(False, "Run nothing: print every feasible point, the images its "
                           "pre-training processes and its estimated time (probing included), "
                           "and the sweep's total.")
    img_per_s: float | None = option(None, "With --dry-run: training throughput per GPU (or per "
                                     "CPU run) [3 training steps timed here, images from "
                                     "memory].", low=0, low_open=True)
    extract_img_per_s: float | None = option(None, "With --dry-run: feature extraction "
                                             "throughput of a probe [the model's forward "
                                             "pass timed here, images from memory].", low=0,
                                             low_open=True)
    plan_gpus: int | None = option(None, "With --dry-run: GPUs to plan for [the visible ones].",
                                   low=1)
    gpus: int = option(1, "GPUs per run (DDP through torchrun); a local sweep runs one run per "
                       "group of this many visible GPUs at a time. 0: no GPU (--launcher slurm "
                       "on a CPU partition).", low=0)


def run_sweep(o: SweepOptions, train_options: dict, *, progress: bool,
              log=print) -> tuple[str, list[dict]]:
    """`dptrain sweep`: the grid's feasible points run (with `dry_run`, planned) as one sweep;
    (the closing line, the failed runs). `train_options`: TrainConfig values given (None: the
    recipe's)."""
    import torch

    from ..probing.downstream import read_suite
    from ..training.config import TrainConfig, check_config, data_recipe, make_config
    from .predict import grid_line

    pairs = grid(sizes=o.sizes, classes=o.classes, ratios=o.ratios, points=o.points)
    recipe = train_options.get("recipe") or data_recipe(o.data)
    if recipe and not train_options.get("recipe"):  # the built-in data: as pretrain does
        log(f"{o.data} is the built-in synthetic data: --recipe {recipe} (give --recipe to "
            "choose another)")
        train_options = {**train_options, "recipe": recipe}
    given = as_argv(TrainConfig, train_options)
    cfg = make_config(**{**train_options, "recipe": recipe or "fast",
                         "data": str(Path(o.data).resolve())})
    # Under Slurm the runs have the GPUs their jobs ask for, whatever this machine has.
    check_config(cfg, max(1, o.gpus),
                 o.gpus > 0 if o.launcher == "slurm" else torch.cuda.is_available())
    if o.launcher == "slurm":
        if not shutil.which("sbatch"):
            raise DataError("--launcher slurm submits with Slurm's sbatch, which is not on PATH "
                            "here: run the sweep on the cluster's login node")
        slurm = slurm_parameters(o, cfg.device)
    else:
        if o.gpus == 0:
            raise DataError("--gpus 0 (no GPU per run) is for --launcher slurm on a CPU "
                            "partition; a local sweep runs on the visible GPUs, or on the CPU "
                            "with --device cpu")
        slurm = {"timeout_min": o.slurm_time, "cpus_per_task": o.slurm_cpus,
                 "gpus_per_node": o.gpus}
    datasets = [d[0] for d in read_suite(Path(o.suite))]
    index = ShardIndex.load(o.data)
    todo, skipped = feasible(index, pairs, list(range(o.seeds)), cfg.allow_fewer,
                             subset_seed=cfg.subset_seed)
    if not todo:
        for reason in skipped:
            log(f"skipped (infeasible) {reason}")
        raise DataError("no feasible point in the grid")
    try:  # with the points of an earlier call on this folder
        earlier = {(r["K"], r["n"], r["N"]) for r in read_results(o.out)}
    except DataError:
        earlier = set()
    log(grid_line({(p.classes, p.per_class, p.size) for p in todo} | earlier))
    for reason in skipped:
        log(f"skipped (infeasible) {reason}")
    if o.dry_run:
        return dry_run_text(todo, index, cfg, max(1, o.gpus), o.img_per_s, o.plan_gpus,
                            suite=o.suite,
                            repeats=o.repeats, extract_img_per_s=o.extract_img_per_s), []
    out = Path(o.out)
    spec, slots = prepare(cfg, suite=o.suite, out=out, repeats=o.repeats, gpus=o.gpus,
                          launcher=o.launcher, given=given, skipped=skipped)
    r = sweep(spec, todo, datasets, launcher=o.launcher, slots=slots, slurm=slurm, log=log,
              progress=progress)
    return (f"{out}: {plural(r['points'], 'point')}, {r['ran']} run now, {len(r['failed'])} "
            f"failed; results in {out / SweepFolder.RESULTS}"), r["failed"]


def slurm_parameters(o: SweepOptions, device: str) -> dict:
    """submitit's parameters for each point's job: its time, CPUs and partition, its GPUs asked
    for as the cluster names them (`--slurm-gpus-as`, `--slurm-gpu-type`; none for --gpus 0),
    and any other sbatch option (`--slurm-extra`)."""
    if o.gpus == 0 and device == "cuda":
        raise DataError("--gpus 0 asks Slurm for no GPU, but --device cuda needs one: give "
                        "--gpus 1 or more, or --device cpu")
    if o.gpus == 0 and o.slurm_gpu_type:
        raise DataError(f"--slurm-gpu-type {o.slurm_gpu_type} with --gpus 0: no GPU is asked "
                        "for; give --gpus 1 or more, or leave out --slurm-gpu-type")
    extra = {}
    for item in o.slurm_extra:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or (eq and not value):
            raise DataError(f"--slurm-extra {item!r}: expected KEY=VALUE (sbatch --KEY=VALUE), "
                            "e.g. account=proj, or KEY for a flag, e.g. exclusive")
        extra[key.replace("-", "_")] = value if eq else True
    gpus = f"{o.slurm_gpu_type}:{o.gpus}" if o.slurm_gpu_type else str(o.gpus)
    if o.gpus and o.slurm_gpus_as == "gres":
        extra.setdefault("gres", f"gpu:{gpus}")
    elif o.gpus:
        extra.setdefault("gpus_per_node", gpus)
    params = {"timeout_min": o.slurm_time, "cpus_per_task": o.slurm_cpus,
              "slurm_additional_parameters": extra}
    if o.slurm_partition:
        params["slurm_partition"] = o.slurm_partition
    return params


@dataclass(frozen=True)
class SweepSpec:
    """What every point of a sweep shares; SWEEP/sweep.json records it."""

    data: str
    suite: str
    out: str
    repeats: int
    recipe: str
    budget: str  # "fixed steps: ..." or "fixed epochs: ..."
    config: dict  # the resolved pretrain config every point starts from (SWEEP/pretrain.json)
    options: list[str]  # the pretrain options as given, for the report
    gpus: int = 1  # per run
    probe_args: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def config_file(self) -> Path:
        return SweepFolder(self.out) / SweepFolder.CONFIG


def prepare(cfg, *, suite: str, out: Path, repeats: int, gpus: int, launcher: str,
            given: list[str], skipped: list[str]) -> tuple[SweepSpec, list | None]:
    """The spec of a sweep, and the device slots of a local one: one run per GPU (or per group
    of `gpus`), one at a time on a CPU. Local runs share this machine's cores between them
    unless --workers was given."""
    slots = device_slots(gpus) if launcher == "local" and cfg.device != "cpu" else None
    probe_args = ["--device", cfg.device] if cfg.device != "auto" else []
    # One eval cache for the sweep: every run's validation and probes decode each
    # downstream set once between them.
    eval_cache = "off" if cfg.pixel_cache == "off" else \
        cfg.eval_cache or str(out.resolve() / SweepFolder.CACHE)
    cfg = replace(cfg, eval_cache=eval_cache)
    probe_args += ["--eval-cache", eval_cache]
    for kind in cfg.log_to:  # the probes' results go where the runs' numbers went
        probe_args += ["--log-to", kind]
    if launcher == "local" and cfg.workers is None:
        threads = cores_for_this_process(share=len(slots or [None]) * gpus)
        cfg = replace(cfg, workers=threads)
        probe_args += ["--workers", str(threads * gpus)]
    budget = (f"fixed steps: {cfg.steps} per run" if cfg.steps else
              f"fixed epochs: {cfg.epochs} per run (steps grow with N)")
    spec = SweepSpec(data=cfg.data, suite=str(Path(suite).resolve()), out=str(out.resolve()),
                     repeats=repeats, recipe=cfg.recipe, budget=budget, config=asdict(cfg),
                     options=given, gpus=gpus, probe_args=probe_args, skipped=skipped)
    return spec, slots


def point_commands(point: Point, spec: SweepSpec) -> list[list[str]]:
    """The two commands of one point: what a user would run by hand. The pretrain options
    come resolved, in the sweep's config file: the children parse nothing again."""
    run = str(SweepFolder(spec.out).run(point.name).path)
    dptrain = [sys.executable, "-m", "dptrain"]
    return [[*dptrain, "pretrain", "--config", str(spec.config_file), "--classes",
             str(point.classes), "--per-class", str(point.per_class), "--seed", str(point.seed),
             "--out", run, "--no-progress", *(["--gpus", str(spec.gpus)] if spec.gpus > 1
                                              else [])],
            [*dptrain, "probe", run, "--suite", spec.suite, "--repeats", str(spec.repeats),
             *spec.probe_args]]


def run_point(point: Point, spec: SweepSpec, device: str | None = None) -> dict:
    """Run one point's commands in child processes (on `device`: CUDA_VISIBLE_DEVICES);
    its output goes to RUN/sweep.log. Never raises for a failed run: returns its error."""
    run = SweepFolder(spec.out).run(point.name)
    run.path.mkdir(parents=True, exist_ok=True)
    # Tracking backends group the points by sweep and tag each with its budget N.
    env = {**os.environ, SWEEP: Path(spec.out).resolve().name, BUDGET: str(point.size)}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    t0 = time.perf_counter()
    with open(run / RunFolder.LOG, "a") as log:
        for cmd in point_commands(point, spec):
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            returncode = run_child(cmd, log, child_env(env))
            if returncode != 0:
                with open(run / RunFolder.LOG, errors="replace") as f:
                    f.seek(start)
                    lines = [x for x in f.read().splitlines() if x.strip()]
                error = f"{cmd[3]} exited {returncode}: {lines[-1] if lines else '(no output)'}"
                return {"run": point.name, "status": "failed", "error": error,
                        "seconds": time.perf_counter() - t0, "device": device}
    return {"run": point.name, "status": "done", "error": None,
            "seconds": time.perf_counter() - t0, "device": device}


STOP_GRACE_S = 120  # for a child asked to stop: a run finishes its step and saves a checkpoint


def run_child(cmd: list[str], log, env: dict) -> int:
    """Run `cmd` to its end, its output into `log` (not a pipe: a child's last words outlive a
    sweep killed first); its exit status. Stopped meanwhile (Ctrl-C, or submitit's requeue
    on preemption, both exceptions here), this process asks the child to stop as well
    (SIGTERM: a run saves a checkpoint at its next step) and waits for it before going."""
    with subprocess.Popen(cmd, stdout=log, stderr=log, env=env) as p:
        try:
            return p.wait()
        except BaseException:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
            raise


class PointJob:
    """`run_point` as a submitit job. Checkpointable: when Slurm is about to preempt the job or
    end it at its time limit (SIGUSR2, submitit's --signal), submitit calls `checkpoint` and
    requeues the job, `run_child` stops the point's run with a checkpoint, and the requeued job
    resumes it."""

    def __call__(self, point: Point, spec: SweepSpec) -> dict:
        # Slurm ends a job with SIGTERM to all its processes (scancel, scontrol requeue, the end
        # of a preemption's grace time or of the time limit); the point's run saves a
        # checkpoint. The job then leaves no result (submitit writes none for SystemExit), so a
        # requeued job runs the point again and it resumes, and a job ended for good is
        # reported by its Slurm state, not as a run that failed.
        signal.signal(signal.SIGTERM, _job_ended)
        return run_point(point, spec)

    def checkpoint(self, point: Point, spec: SweepSpec):
        import submitit

        return submitit.helpers.DelayedSubmission(self, point, spec)


def _job_ended(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


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


# Slurm's states of a job that will not run again; a requeued job is PENDING.
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}
POLL_S = 5.0
# A job Slurm says has ended but whose result file is not there (yet: a shared file system
# shows a new file late) is reported as ended without a result after this long.
RESULT_GRACE_S = 15.0


def submit_slurm(points: list[Point], spec: SweepSpec, *, cluster: str = "slurm",
                 slurm: dict | None = None, done=lambda point, result: None,
                 log=print) -> list[dict]:
    """One submitit job per point (cluster "local": submitit's local executor, for tests),
    watched until each has a result: `done(point, result)` as each ends. A job that ends
    without one (cancelled, out of time, its node lost) is a failed point naming its Slurm
    state. The states come from squeue, not from submitit's sacct, which clusters without
    accounting (slurmdbd) lack: there submitit never sees a job end."""
    import submitit

    executor = submitit.AutoExecutor(folder=SweepFolder(spec.out) / SweepFolder.SUBMITIT,
                                     cluster=cluster)
    executor.update_parameters(**(slurm or {}))
    held = held_jobs(executor.folder) if cluster == "slurm" else {}
    jobs, new = {}, []
    for p in points:
        if job_name(spec, p) in held:  # from an earlier call, stopped meanwhile (Ctrl-C)
            from submitit.slurm.slurm import SlurmJob

            job = SlurmJob(folder=executor.folder, job_id=held[job_name(spec, p)])
            log(f"{p.name}: its job {job.job_id} from an earlier call is still in Slurm: "
                "waiting for it instead of submitting the point again")
        else:
            job = submit(executor, p, spec, slurm or {})
            new.append(job.job_id)
        jobs[job] = p
    if new:
        log(f"submitted {plural(len(new), 'job')} ({', '.join(new)}), waiting for them; "
            f"their logs: {executor.folder}")
    try:
        return _wait(jobs, cluster, done)
    except KeyboardInterrupt:  # the jobs are Slurm's: they go on without this process
        running = [j.job_id for j in jobs if not has_result(j)]
        if cluster == "slurm" and running:
            log(f"the jobs still to end keep running in Slurm; scancel {' '.join(running)} "
                "stops them (each point saves a checkpoint); run the same command again once "
                "they end")
        raise


def _wait(jobs: dict, cluster: str, done) -> list[dict]:
    """Each job's result, `done(point, result)` called as each ends."""
    results, ended_at = {}, {}
    while len(results) < len(jobs):
        states = job_states() if cluster == "slurm" else None
        for j, p in jobs.items():
            if j in results:
                continue
            if has_result(j) or (cluster != "slurm" and j.done()):  # locally: process gone
                r = job_result(j, p)
            elif states is not None and states.get(j.job_id, ("gone",))[0] in ENDED | {"gone"}:
                since = ended_at.setdefault(j, time.monotonic())
                if time.monotonic() - since < RESULT_GRACE_S:
                    continue
                state = states.get(j.job_id, ("no longer listed by squeue",))[0]
                r = {"run": p.name, "status": "failed", "device": None, "seconds": None,
                     "job": j.job_id,
                     "error": f"job {j.job_id} ended {state} without a result (cancelled, out "
                              f"of time, or its node lost); its log: {j.paths.stderr}"}
            else:
                ended_at.pop(j, None)  # requeued: running or pending again
                continue
            results[j] = r
            done(p, r)
        if len(results) < len(jobs):
            time.sleep(POLL_S)
    return [results[j] for j in jobs]


def submit(executor, point: Point, spec: SweepSpec, slurm: dict):
    """Submit one point's job; sbatch's refusal is a DataError naming the option to change."""
    import contextlib
    import io

    from submitit.core.utils import FailedJobError

    stderr = io.StringIO()  # submitit prints sbatch's refusal, which the error says
    executor.update_parameters(name=job_name(spec, point))
    try:
        with contextlib.redirect_stderr(stderr):
            return executor.submit(PointJob(), point, spec)
    except FailedJobError as e:
        raise DataError(sbatch_refusal(str(e), slurm)) from None


def job_name(spec: SweepSpec, point: Point) -> str:
    """A point's job is named as its sweep and itself, for squeue and scancel."""
    return f"{Path(spec.out).name}.{point.name}"


def held_jobs(folder: Path) -> dict[str, str]:
    """This sweep's jobs that Slurm still runs or will run (submitted through `folder`): job
    name -> id. A rerun waits for them: a second job of a point would find its run folder
    held by the first."""
    states = job_states() or {}
    return {name: job for job, (state, name) in states.items()
            if state not in ENDED and (folder / f"{job}_submitted.pkl").exists()}


# sbatch's refusals, and the option of `dptrain sweep` to change for each.
REFUSALS = {
    "generic resource": "--gpus (0 for a CPU partition), --slurm-gpus-as or --slurm-gpu-type",
    "gres": "--gpus (0 for a CPU partition), --slurm-gpus-as or --slurm-gpu-type",
    "gpu": "--gpus (0 for a CPU partition), --slurm-gpus-as or --slurm-gpu-type",
    "partition": "--slurm-partition",
    "time limit": "--slurm-time",
    "--time": "--slurm-time",
    "processors": "--slurm-cpus",
    "cpus": "--slurm-cpus",
    "node configuration": "--slurm-cpus or --gpus",
}


def sbatch_refusal(stderr: str, slurm: dict) -> str:
    """One line for sbatch's refusal of a job: its reason and the option to change."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x.removeprefix("sbatch: error: ") for x in lines if "error" in x.lower()]
    reason = "; ".join(dict.fromkeys(errors)) or (lines[-1] if lines else "no reason given")
    change = next((opt for key, opt in REFUSALS.items() if key in reason.lower()), None)
    if change is None and slurm.get("slurm_additional_parameters"):
        change = "--slurm-extra"
    return (f"sbatch refused the job: {reason}; change "
            f"{change or 'the --slurm-* options'} for this cluster")


def job_states() -> dict[str, tuple[str, str]] | None:
    """Slurm's state and name of each of this user's jobs it still lists (finished ones for
    MinJobAge, 5 minutes by default), from squeue: job id -> (state, name)."""
    import getpass

    p = subprocess.run(["squeue", f"--user={getpass.getuser()}", "--noheader", "--states=all",
                        "--format=%i|%T|%j"], capture_output=True, text=True)
    if p.returncode != 0:  # the controller not answering for a moment: nothing is known
        return None
    rows = [line.strip().split("|", 2) for line in p.stdout.splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3}


def has_result(job) -> bool:
    """Whether the job wrote its result file. (submitit's `done` asks sacct too: not here.)"""
    folder = job.paths.folder
    try:  # as submitit does: on a shared file system, refresh the folder's cached listing
        folder.chmod(folder.stat().st_mode)
    except OSError:
        pass
    return job.paths.result_pickle.exists()


def job_result(job, point: Point) -> dict:
    """A finished job's result: the point's own, or the job's failure as one line."""
    try:
        return {**job.result(), "job": job.job_id}
    except Exception as e:  # the job's Python failed (its traceback is in its log)
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt): ", x)]
        return {"run": point.name, "status": "failed", "device": None, "seconds": None,
                "job": job.job_id,
                "error": f"job {job.job_id}: {(raised or lines or [type(e).__name__])[-1]}; "
                         f"its log: {job.paths.stderr}"}


def refuse_other_options(old: dict, spec: SweepSpec) -> None:
    """A sweep folder holds runs of one set of options: a call with options that change what
    a run computes or how it is probed would add runs unlike the earlier ones and rewrite
    sweep.json over them (the report would state a budget they never trained). Options that
    change only speed (config.SPEED_ONLY) may differ."""
    from ..training.config import SPEED_ONLY

    if not old:
        return
    # what a sweep from before --subset-seed and --order ran with
    was, now = {"subset_seed": None, "order": "shuffled", **old.get("config", {})}, spec.config
    differ = [(f"--{k.replace('_', '-')}", was.get(k), now.get(k))
              for k in sorted(set(was) & set(now))  # a key an older dptrain lacked: unknown
              if k not in SPEED_ONLY and was[k] != now[k]]
    differ += [(f"--{k}", old.get(k), getattr(spec, k)) for k in ("repeats", "suite")
               if old.get(k) is not None and old.get(k) != getattr(spec, k)]
    if differ:
        shown = ", ".join(f"{flag} {a} (now {b})" for flag, a, b in differ[:4])
        raise DataError(f"{spec.out} holds a sweep run with other options: {shown}"
                        f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}; its "
                        "runs would be mislabelled: give the sweep's own options (sweep.json), "
                        "or another --out")


def sweep(spec: SweepSpec, points: list[Point], datasets: list[str], *,
          launcher: str = "local", slots: list | None = None, slurm: dict | None = None,
          log=print, progress: bool = False) -> dict:
    """Run the points not finished yet, holding SWEEP; write pretrain.json, sweep.json,
    failures.json and results.csv."""
    with folder_lock(spec.out, "sweep"):
        out = Path(spec.out)
        folder = SweepFolder(out)
        refuse_other_options(folder.read_spec(), spec)
        write_json(spec.config_file, spec.config)
        # Every point ever run here keeps its budget N: a later call may add points (a predicted
        # split, say) without relabelling the earlier ones.
        known = folder.sizes()
        known.update({p.name: p.size for p in points})
        write_json(folder / SweepFolder.SPEC,
                   {**asdict(spec), "points": [{"run": r, "N": n} for r, n in known.items()]})
        todo = [p for p in points if not folder.run(p.name).finished(datasets)]
        log(f"{plural(len(points), 'point')}, {len(points) - len(todo)} finished already, "
            f"{len(todo)} to run")
        lock = threading.Lock()
        bar = progress_bar(total=len(todo), unit="point", desc="sweep", enabled=progress)
        failed = 0

        def done(point: Point, r: dict) -> dict:
            nonlocal failed
            where = f" on GPU {r['device']}" if r.get("device") is not None else \
                f" (job {r['job']})" if r.get("job") else ""
            took = f" in {r['seconds']:.0f} s" if r.get("seconds") is not None else ""
            with lock:
                bar.write(f"{point.name}: {r['status']}{where}{took}"
                          + (f": {r['error']}" if r["error"] else ""), file=sys.stderr)
                write_results(out)  # after every point: a partial sweep is readable
                failed += r["status"] != "done"
                bar.set_postfix_str(f"last {point.name}, {failed} failed", refresh=False)
                bar.update(1)  # with the ETA from the points so far
            return r

        with bar:
            if launcher == "local":
                results = schedule(todo, slots or [None],
                                   lambda point, slot: done(point, run_point(point, spec, slot)))
            else:
                results = submit_slurm(todo, spec, cluster="local" if launcher == "submitit-local"
                                       else "slurm", slurm=slurm, done=done, log=log)
        failures = [r for r in results if r["status"] != "done"]
        write_json(folder / SweepFolder.FAILURES, failures)
        write_results(out)
        return {"points": len(points), "ran": len(todo), "failed": failures}
