"""`dptrain` under a real Slurm (Debian's slurmctld and slurmd on this machine, started by
tools/slurm_cluster.sh): a sweep's points as jobs, preemption and requeues, a time limit's
signal, failed and cancelled jobs, torchrun through srun. `make test-slurm` runs these; they
skip, saying why, where Slurm cannot run (no root, or no Slurm and no apt-get to install it).
The cluster has no accounting (slurmdbd): the sweep follows its jobs with squeue."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import DPTRAIN, FAST, one_line_error, run_cli, run_here, synthetic_data
from test_faults import zero_sample

from dptrain.data.index import ShardIndex
from dptrain.data.subset import select

pytestmark = pytest.mark.slurm

CLUSTER = Path(__file__).resolve().parents[1] / "tools" / "slurm_cluster.sh"
SPEEDS = {"pretrain_s", "probe_s", "images_per_s"}  # results.csv's columns that time things


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster with a `low` partition (the default) and a `high` one whose jobs
    preempt it; client commands and dptrain reach it through SLURM_CONF."""
    # Not under pytest's own temporary folder: munge's socket must be reachable by user munge.
    state = Path(tempfile.mkdtemp(prefix="dptrain-slurm-"))
    p = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True)
    if p.returncode == 3:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"no Slurm here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run([str(CLUSTER), "stop", str(state)], check=True)
        os.environ.pop("SLURM_CONF")
        if before is not None:
            os.environ["SLURM_CONF"] = before
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The built-in data, small: an 8-class x 40-image pool and one 3-class task."""
    return synthetic_data(tmp_path_factory.mktemp("syn"), 8, 40)


def sweep_args(data, suite, out, points: str, epochs: int = 1, *more) -> list:
    return ["sweep", "--data", data, "--suite", suite, "--out", out, "--points", points,
            "--recipe", "synthetic", "--epochs", epochs, "--batch-size", 8, "--seeds", 1,
            "--repeats", 1, "--log-every", 1, "--device", "cpu", "--no-progress", *more]


SLURM = ["--launcher", "slurm", "--gpus", 0, "--slurm-time", 30]


def start(*args) -> subprocess.Popen:
    """`dptrain ARGS` running in the background, as a user's terminal runs it."""
    return subprocess.Popen([*DPTRAIN, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(what, timeout: float = 180, step: float = 0.5):
    deadline = time.time() + timeout
    while not (value := what()):
        assert time.time() < deadline, f"waited {timeout} s for {what.__doc__ or what}"
        time.sleep(step)
    return value


def jobs_named(name: str, states: str = "all") -> list[str]:
    """The ids of the jobs called `name` in `states`, from squeue."""
    return subprocess.run(["squeue", "--noheader", f"--states={states}", f"--name={name}",
                           "--format=%i"], capture_output=True, text=True,
                          check=True).stdout.split()


def job_of(name: str) -> str | None:
    """The id of the running job called `name`."""
    return next(iter(jobs_named(name, "running")), None)


def job_field(job: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         check=True).stdout
    return next(x.split("=", 1)[1] for x in out.split() if x.startswith(f"{key}="))


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return [{k: v for k, v in r.items() if k not in SPEEDS} for r in csv.DictReader(f)]


def metrics(run: Path) -> list[dict]:
    """A run's metrics rows without what measures its speed (as test_faults compares)."""
    from test_faults import SPEEDS as RUN_SPEEDS

    return [{k: v for k, v in json.loads(x).items() if k not in RUN_SPEEDS}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_a_sweep_under_slurm_records_what_a_local_sweep_records(cluster, synthetic, tmp_path):
    data, suite = synthetic
    points = "2:8,4:4"
    p = run_cli(*sweep_args(data, suite, tmp_path / "slurm", points), *SLURM,
                "--slurm-cpus", 1)
    assert "2 points, 2 run now, 0 failed" in p.stdout
    jobs = [line.split("(job ")[1].split(")")[0] for line in p.stderr.splitlines()
            if ": done (job " in line]
    assert len(set(jobs)) == 2  # a job per point, and each ran in Slurm to its end
    assert all(job_field(j, "JobState") == "COMPLETED" for j in jobs)
    assert {job_field(j, "JobName") for j in jobs} == {"slurm.K2-n8-s0", "slurm.K4-n4-s0"}
    run_here(*sweep_args(data, suite, tmp_path / "local", points), check=True)
    got, local = rows(tmp_path / "slurm"), rows(tmp_path / "local")
    assert len(got) == 2 and got == local


def test_sbatch_refusals_and_impossible_gpu_counts_are_one_line(cluster, synthetic, tmp_path):
    """Against Slurm on a node without GPUs: each job's GPU is refused by sbatch, named as
    the options to change; --gpus 0 is for Slurm (a CPU partition), not a local sweep."""
    data, suite = synthetic
    args = sweep_args(data, suite, tmp_path / "sw", "2:8")
    one_line_error(run_here(*args, "--launcher", "slurm"),
                   "sbatch refused the job: Invalid generic resource (gres) specification",
                   "--gpus (0 for a CPU partition), --slurm-gpus-as or --slurm-gpu-type")
    one_line_error(run_here(*args, "--launcher", "slurm", "--slurm-gpus-as", "gres",
                            "--slurm-gpu-type", "a100"), "Invalid generic resource")
    one_line_error(run_here(*args, *SLURM, "--slurm-partition", "nope"),
                   "invalid partition specified: nope", "change --slurm-partition")
    one_line_error(run_here(*args, "--gpus", 0), "--gpus 0 (no GPU per run) is for --launcher "
                   "slurm", "--device cpu")
    one_line_error(run_here(*args, *SLURM, "--slurm-extra", "account="), "--slurm-extra",
                   "KEY=VALUE")
    assert jobs_named("sw.K2-n8-s0") == []  # nothing was submitted


def test_a_preempted_and_a_requeued_point_resume_with_the_records_of_a_run_never_stopped(
        cluster, synthetic, tmp_path):
    """The point's job is preempted by a job of the higher partition, then requeued by
    `scontrol requeue`: each time its run saves a checkpoint and the requeued job resumes it.
    It ends with the weights and metrics rows of the same run never interrupted."""
    data, suite = synthetic
    out = tmp_path / "sw"
    run = out / "runs" / "K8-n40-s0"
    sweep = start(*sweep_args(data, suite, out, "8:40", 3), *SLURM, "--slurm-cpus", 2)
    log = run / "sweep.log"

    def training(since: int = 0):
        """the run training beyond row `since`"""
        return (run / "metrics.jsonl").is_file() and \
            len((run / "metrics.jsonl").read_text().splitlines()) > since + 3

    def stops() -> list[str]:
        return [x for x in log.read_text().splitlines() if "checkpoint saved" in x] \
            if log.is_file() else []

    wait_for(training)
    job = job_of("sw.K8-n40-s0")
    # A 1-CPU job of the high partition needs one of the 2 CPUs the point's job holds.
    subprocess.run(["sbatch", "--partition=high", "--cpus-per-task=1", f"--chdir={tmp_path}",
                    "--wrap", "sleep 1"], check=True, capture_output=True)
    wait_for(lambda: len(stops()) == 1, 120)
    wait_for(lambda: training(int(stops()[0].split("stopped at step ")[1].split()[0])), 120)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: len(stops()) == 2, 120)
    said, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err
    assert "K8-n40-s0: done (job " in err and "1 point, 1 run now, 0 failed" in said
    assert "(SIGUSR2); checkpoint saved" in stops()[0]  # preempted: submitit's --signal
    assert "(SIGTERM); checkpoint saved" in stops()[1]  # requeued: the job's end
    assert job_field(job, "Restarts") == "2"
    ref = tmp_path / "ref"
    run_cli("pretrain", "--config", out / "pretrain.json", "--classes", 8, "--per-class", 40,
            "--seed", 0, "--out", ref, "--no-progress")
    assert metrics(run) == metrics(ref)
    assert same_weights(run, ref)


def test_the_readme_recipe_for_a_time_limit_saves_and_the_resubmitted_job_resumes(
        cluster, synthetic, tmp_path):
    """`sbatch --signal=B:TERM@N` with `exec dptrain pretrain ...`: the run gets SIGTERM N s
    before its time limit (up to 30 s earlier: slurmctld looks every 30 s), saves a checkpoint
    and exits; the same script submitted again resumes the run and finishes it. The test
    brings the first job's limit near once it trains (`scontrol update TimeLimit=1`: the
    signal is then due at once, and comes at slurmctld's next look, within 30 s), and the run
    is long enough to outlast that on a fast CPU (96 epochs: ~55 s at 530 img/s with
    AVX-512 BF16, where 24 epochs once ended first)."""
    data, _ = synthetic
    out = tmp_path / "run"
    script = tmp_path / "pretrain.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --time=10 --signal=B:TERM@100 --cpus-per-task=2 --output={tmp_path}/%j.out\n"
        f"exec {sys.executable} -m dptrain pretrain --data {data} --classes 8 --per-class 40 "
        f"--epochs 96 --out {out} {' '.join(FAST)} --recipe synthetic\n")

    def submit(*options) -> str:
        return subprocess.run(["sbatch", "--parsable", *options, str(script)],
                              capture_output=True, text=True, cwd=tmp_path,
                              timeout=1200).stdout.split(";")[0].strip()

    job = submit()
    wait_for(lambda: (out / "metrics.jsonl").is_file() and
             len((out / "metrics.jsonl").read_text().splitlines()) >= 2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True)
    wait_for(lambda: job_field(job, "JobState") not in ("RUNNING", "COMPLETING"), 120)
    said = (tmp_path / f"{job}.out").read_text()
    # Stopped by its signal before the limit: the run's own exit, not Slurm's kill (TIMEOUT).
    assert "(SIGTERM); checkpoint saved: run the same command to resume" in said, said
    assert job_field(job, "JobState") == "FAILED" and job_field(job, "ExitCode") == "143:0"
    stopped = int(said.split("stopped at step ")[1].split()[0])
    assert stopped == torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    job = submit("--wait", "--time=20")  # time to finish, on a busy machine too
    said = (tmp_path / f"{job}.out").read_text()
    assert job_field(job, "JobState") == "COMPLETED", said
    assert f"{out}: 1,920 steps" in said  # 96 epochs of 20 batches
    assert json.loads((out / "summary.json").read_text())["steps"] == 1920 and 0 < stopped < 1920


def test_a_failed_point_a_stopped_sweep_and_a_cancelled_job(cluster, synthetic, tmp_path):
    """A point whose data is damaged fails (one line in failures.json). Ctrl-C stops the
    waiting sweep and leaves its jobs to Slurm, naming the scancel that would stop them; the
    same command again waits for the job still running instead of submitting its point
    twice. That job, cancelled with scancel, is reported with its Slurm state; the other point
    finishes and the sweep ends."""
    src, suite = synthetic
    data = tmp_path / "pool"
    shutil.copytree(src, data)
    index = ShardIndex.load(data)
    # Class order is a prefix per seed: K=4 holds 2 classes the K=2 points never read.
    damaged = next(int(r) for r in select(index, 4, 20).rows
                   if r not in set(select(index, 2, 40).rows))
    zero_sample(data, damaged)
    # 300 epochs: K2-n40 trains for minutes, so Ctrl-C and scancel find its job running even
    # on a fast CPU (30 epochs, 8 s with AVX-512 BF16, once ended first); it never finishes.
    args = [*sweep_args(data, suite, tmp_path / "sw", "2:8,4:20,2:40", 300), *SLURM,
            "--slurm-cpus", 1]
    sweep = start(*args)
    cancelled = wait_for(lambda: (tmp_path / "sw/runs/K2-n40-s0/metrics.jsonl").is_file()
                         and job_of("sw.K2-n40-s0"), 180)
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and "interrupted" in err, err
    assert cancelled in err.split("scancel ")[1].split(" stops them")[0].split(), err
    assert job_of("sw.K2-n40-s0") == cancelled  # still training
    again = start(*args)
    # It submits the failed point again once it has taken up the job still running.
    wait_for(lambda: len(jobs_named("sw.K4-n20-s0")) == 2, 60)
    subprocess.run(["scancel", cancelled], check=True)
    _, err = again.communicate(timeout=180)
    assert again.returncode == 1, err
    assert f"K2-n40-s0: its job {cancelled} from an earlier call is still in Slurm" in err
    assert jobs_named("sw.K2-n40-s0") == [cancelled]
    failures = {f["run"]: f for f in json.loads((tmp_path / "sw/failures.json").read_text())}
    assert sorted(failures) == ["K2-n40-s0", "K4-n20-s0"]
    assert "not a JPEG" in failures["K4-n20-s0"]["error"]
    assert "dptrain verify" in failures["K4-n20-s0"]["error"]
    assert f"job {cancelled} ended CANCELLED without a result" in failures["K2-n40-s0"]["error"]
    assert all("\n" not in f["error"] for f in failures.values())
    assert [r["run"] for r in rows(tmp_path / "sw")] == ["K2-n8-s0"]
    # Its run saved a checkpoint where the job was cancelled.
    assert "(SIGTERM); checkpoint saved" in (tmp_path / "sw/runs/K2-n40-s0/sweep.log").read_text()
    assert f"failed K2-n40-s0: job {cancelled} ended CANCELLED" in err and "Traceback" not in err


def test_torchrun_through_srun_ends_with_the_weights_of_a_local_two_process_run(
        cluster, synthetic, tmp_path):
    """The README's multi-node recipe on one node: srun starts one torchrun, which starts 2
    processes (gloo, rendezvous at the job's first node)."""
    data, _ = synthetic
    run = ["-m", "dptrain", "pretrain", "--data", data, "--classes", 4, "--per-class", 16,
           "--epochs", 2, *FAST[:-2]]  # no --workers: each process's share of the cores
    local = tmp_path / "local"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", *map(str, run), "--out", str(local)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "slurm"
    script = tmp_path / "ddp.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=1 --ntasks-per-node=1 --cpus-per-task=2 --output={tmp_path}/%j.out\n"
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        f"srun {sys.executable} -m torch.distributed.run --nnodes=1 --nproc_per_node=2 "
        f'--rdzv_backend=c10d --rdzv_endpoint="$head:{port}" --rdzv_id="$SLURM_JOB_ID" '
        f"{' '.join(map(str, run))} --out {out}\n")
    p = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True,
                       text=True, cwd=tmp_path)
    job = p.stdout.strip().split(";")[0]
    said = (tmp_path / f"{job}.out").read_text()
    assert p.returncode == 0, said[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8  # 64 images, 16 per step
    assert said.count(f"{out}: 8 steps") == 1  # one summary, from rank 0
    assert same_weights(out, local)
