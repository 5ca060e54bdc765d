"""`dptrain pretrain`: a run end to end, learning, resume after kill -9, DDP, bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FAST,
    interrupt,
    make_imagefolder,
    make_shard_set,
    run_cli,
    run_here,
    under_old_names,
)

from dptrain.common.runfolder import RunFolder
from dptrain.data.index import ShardIndex
from dptrain.data.shards import shard_dataset
from dptrain.data.subset import select
from dptrain.training.config import make_config
from dptrain.training.train import lr_at, res_at, train_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texture) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("train"), texture, 6, 24, (48, 40))


def test_run_end_to_end_writes_every_file(shards, tmp_path):
    """On the default model, resnet18 (the other tests train smallcnn: faster on the CPU)."""
    out = tmp_path / "run"
    fast = [*FAST, "--arch", "resnet18"]
    p = run_cli("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 2,
                "--out", out, *fast)
    assert "8 steps, 2 epochs" in p.stdout  # 64 images / 16 per step, twice
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["classes"] == 4 and config["subset"]["num_samples"] == 64
    assert len(config["subset"]["class_names"]) == 4 and config["total_steps"] == 8
    lines = RunFolder(out).read_metrics()
    assert [x["step"] for x in lines] == [2, 4, 6, 8]
    assert all(k in lines[0] for k in ("epoch", "loss", "lr", "images_per_s", "data_wait"))
    epochs = RunFolder(out).read_metrics("epoch")  # a row at each epoch's end
    assert [(x["step"], x["epoch"], x["images"]) for x in epochs] == [(4, 0, 64), (8, 1, 64)]
    assert all(0 <= x["top1"] <= 1 and x["epoch_s"] > 0 for x in epochs)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["num_classes"] == 4
    assert ckpt["model"]["fc.weight"].shape[0] == 4  # the classifier has K outputs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["device"] == "cpu"
    assert 0 <= summary["data_wait_fraction"] <= 1
    # A finished run is not retrained; other options are refused; --overwrite restarts.
    assert "finished already" in run_cli("pretrain", "--data", shards, "--classes", 4,
                                         "--per-class", 16, "--epochs", 2, "--out", out,
                                         *fast).stdout
    p = run_here("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 3,
                 "--out", out, *fast)
    assert p.returncode == 2 and "epochs" in p.stderr and "--overwrite" in p.stderr
    run_cli("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 3,
            "--out", out, *fast, "--overwrite")
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_loss_decreases_and_val_top1(shards, tmp_path, texture):
    # Held-out images of the same classes, sharded with the train split's class ids.
    val_src = make_imagefolder(tmp_path / "val", texture, classes=6, per_class=24,
                               size=(48, 40), bad=False)
    for p in val_src.rglob("*.JPEG"):  # other images of the same classes: indexes 100+
        c, i = map(int, p.stem.split("_")[1:])
        from dptrain.data.imagenet_like import jpeg as imagenet_like_jpeg
        p.write_bytes(imagenet_like_jpeg(texture, 0, c, 100 + i, width=48, height=40))
    shard_dataset(val_src, tmp_path / "valshards", classes_from=shards, progress=False)
    out = tmp_path / "run"
    # lr 0.05 without warm-up spiked the loss in fp32 too and diverged in bf16 on some CPUs;
    # 0.01 with one warm-up epoch learns on every seed and precision tried (issue 20).
    run_here("pretrain", "--data", shards, "--classes", 4, "--per-class", 24, "--epochs", 8,
             "--recipe", "paper", "--lr", "0.01", "--warmup-epochs", "1",
             "--val-data", tmp_path / "valshards", "--out", out, *FAST, check=True)
    losses = [x["loss"] for x in RunFolder(out).read_metrics()]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] > 0.5  # chance is 0.25


def test_kill_9_and_resume_has_the_same_steps(shards, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(shards), "--classes", "6", "--per-class", "24",
            "--epochs", "6", "--out", str(out), *FAST]
    interrupt(args, (out / "checkpoint.pt").exists)
    assert not (out / "summary.json").exists(), "finished before the kill"
    done = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < done < 54
    run_here(*args, check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 * (144 // 16) == 54  # as many as an uninterrupted run
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 54


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    momenta = {f"momentum {k}": v["momentum_buffer"] for k, v in ckpt["optimizer"]["state"].items()}
    return {**ckpt["model"], **momenta}


def test_resume_after_kill_9_is_exact(shards, tmp_path):
    """Killed at three points and resumed, a run ends with the uninterrupted run's weights,
    bit for bit (CPU): the data order and every crop and flip depend only on (seed, epoch,
    step), and the checkpoint holds the optimiser and the RNG. The reference streams; the
    others train from the pixel cache (images stored whole), but for one killed at once."""
    def args(out, cache="host"):
        return ["pretrain", "--data", shards, "--classes", 6, "--per-class", 24, "--epochs", 4,
                "--out", out, *FAST, "--pixel-cache", cache]

    run_here(*args(tmp_path / "ref", cache="off"), check=True)  # a process only where killed
    reference = _weights(tmp_path / "ref")
    run_here(*args(tmp_path / "again"), check=True)  # two uninterrupted runs agree to the bit
    assert all(torch.equal(v, _weights(tmp_path / "again")[k]) for k, v in reference.items())
    ready = {  # when to kill: at once (nothing saved yet), mid-epoch 2, and mid-epoch 3 with a
        "start": lambda out: (out / "config.json").exists(),  # half-written checkpoint left
        "mid-epoch": lambda out: (out / "checkpoint.pt").exists(),
        "during a write": lambda out: (out / "checkpoint.pt").exists() and torch.load(
            out / "checkpoint.pt", weights_only=True)["epoch"] >= 2}
    for name, when in ready.items():
        out = tmp_path / name
        cache = "off" if name == "start" else "host"
        interrupt(args(out, cache), lambda: _safe(when, out))
        assert not (out / "summary.json").exists(), f"{name}: finished before the kill"
        if name == "during a write":  # what a kill inside torch.save leaves beside the last one
            (out / "checkpoint.pt.999999999.partial").write_bytes(b"PK\x03\x04 cut short")
        run_here(*args(out, cache), check=True)
        assert not list(out.glob("*.partial"))
        assert json.loads((out / "summary.json").read_text())["pixel_cache"]["where"] == cache
        got = _weights(out)
        assert got.keys() == reference.keys()
        assert all(torch.equal(v, got[k]) for k, v in reference.items()), name


def _safe(when, out) -> bool:
    try:
        return when(out)
    except Exception:  # a checkpoint being replaced as we read it
        return False


def test_a_run_recorded_under_the_old_cache_names_resumes_and_reports(shards, tmp_path):
    """A run folder written before each cache had one name (config.json's and the
    checkpoint's cache, cache_side and cache_dir; summary.json's "cache") resumes under
    today's names bit for bit, as the same run: its pixel cache's side, which changes the
    crops, compares equal under either name. Finished, it is not retrained, and reports."""
    def args(out):
        return ["pretrain", "--data", shards, "--classes", 6, "--per-class", 24, "--epochs", 3,
                "--out", out, *FAST, "--pixel-cache", "host", "--pixel-cache-side", 32,
                "--eval-cache", tmp_path / "pixels"]

    run_here(*args(tmp_path / "ref"), check=True)
    reference = _weights(tmp_path / "ref")
    old = tmp_path / "old"
    interrupt(args(old), lambda: _safe(lambda out: (out / "checkpoint.pt").exists(), old))
    assert not (old / "summary.json").exists(), "finished before the kill"
    assert under_old_names(old) == ["checkpoint.pt", "config.json"]
    assert json.loads((old / "config.json").read_text())["config"]["cache_side"] == 32
    p = run_here(*args(old), check=True)
    assert "resuming" in p.stderr and "is finished already" not in p.stdout
    assert all(torch.equal(v, _weights(old)[k]) for k, v in reference.items())
    assert json.loads((old / "config.json").read_text())["config"]["pixel_cache_side"] == 32

    assert under_old_names(old) == ["checkpoint.pt", "config.json", "summary.json"]
    assert json.loads((old / "summary.json").read_text())["cache"]["side"] == 32
    mtime = (old / "checkpoint.pt").stat().st_mtime_ns
    assert "is finished already" in run_here(*args(old), check=True).stdout
    assert (old / "checkpoint.pt").stat().st_mtime_ns == mtime  # not retrained
    assert RunFolder(old).read_summary()["pixel_cache"]["where"] == "host"
    assert run_here("report", old, check=True).stdout.startswith("no probe yet")
    assert (old / "report" / "curves.png").is_file()


def test_ddp_two_processes_gloo_on_one_node_and_on_two(shards, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "dptrain", "pretrain", "--data", str(shards),
                        "--classes", "4", "--per-class", "16", "--epochs", "2", "--out", str(out),
                        *FAST[:-2]], capture_output=True, text=True, timeout=300)  # no --workers
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8  # 64 images, 16 per step
    assert p.stdout.count(f"{out}: 8 steps") == 1  # the summary from rank 0 only
    # Two processes on one machine: each DALI pipeline gets half of the cores, not all of them.
    assert summary["loader_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    cache = summary["pixel_cache"]
    assert cache["where"] == "host" and cache["images"] == 32  # its half

    # The same run as two "nodes" of one process each, rendezvous on localhost, each node its
    # own torchrun and process tree: the same weights, and each node's cores for its process.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes_out = tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for 2 local processes
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
         "dptrain", "pretrain", "--data", str(shards), "--classes", "4", "--per-class", "16",
         "--epochs", "2", "--out", str(nodes_out), *FAST[:-2]], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        for rank in range(2)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [e[-3000:] for _, e in outputs]
    got, reference = _weights(nodes_out), _weights(out)
    assert got.keys() == reference.keys()
    assert all(torch.equal(v, got[k]) for k, v in reference.items())
    nodes_summary = json.loads((nodes_out / "summary.json").read_text())
    assert nodes_summary["world_size"] == 2 and nodes_summary["steps"] == 8
    assert nodes_summary["loader_threads"] == len(os.sched_getaffinity(0))  # one per node
    assert sum(o.count(f"{nodes_out}: 8 steps") for o, _ in outputs) == 1  # rank 0 only


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="2 GPUs here: --gpus 2 would run")
def test_gpus_beyond_the_visible_ones_are_refused(shards, tmp_path):
    p = run_here("pretrain", "--gpus", 2, "--data", shards, "--classes", 4, "--per-class", 16,
                 "--epochs", 1, "--out", tmp_path / "run", *FAST)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--gpus 2, but" in p.stderr and "GPU(s) are visible here" in p.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_and_progressive_resolution():
    assert lr_at(0, 100, 10, 1.0, "linear") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, "linear") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(10, 100, 0, 1.0, "cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.1)))
    cfg = make_config("fast")
    # 160 -> 192 px interpolated over the epochs, rounded to 32 px as FFCV does: 177 -> 192
    assert [res_at(e, 16, cfg) for e in (0, 7, 8, 15)] == [160, 160, 192, 192]
    assert make_config("fast", res=128).min_res is None
    assert make_config("fast", batch_size=256).lr == pytest.approx(0.5)


def test_bad_options_are_one_line_errors(shards, tmp_path):
    def err(*args):
        p = run_here("pretrain", "--data", shards, "--out", tmp_path / "r", *FAST, *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        return p.stderr

    assert "allowed: 1..6" in err("--classes", "7")
    assert "allowed 1..24" in err("--classes", "3", "--per-class", "25")
    assert "unknown --arch 'resnet19'" in err("--arch", "resnet19")
    assert "does not exist" in err("--data", tmp_path / "nowhere")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err("--device", "cuda")
        assert "--amp fp16 needs a GPU" in err("--amp", "fp16")
        assert "or gpu on a GPU run" in err("--decode", "gpu")
    assert "0<=x<=1" in err("--hw-decoder-load", "1.5")
    assert "x>=1" in err("--prefetch", "0")
    assert "no full batch of 512" in err("--classes", "2", "--per-class", "10",
                                         "--batch-size", "512")
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_a_damaged_checkpoint_is_a_one_line_error_on_resume(shards, tmp_path, damage):
    out = tmp_path / "run"
    args = ["pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 1,
            "--out", out, *FAST]
    run_here(*args, check=True)
    (out / "summary.json").unlink()  # as if killed after its last checkpoint: it resumes
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000] if damage == "truncated" else b"junk" * 100)
    p = run_here(*args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "cannot resume" in p.stderr and "checkpoint.pt" in p.stderr
    assert "--overwrite" in p.stderr and len(p.stderr.strip().splitlines()) <= 2
    assert "weights_only" not in p.stderr  # never the advice to turn the safe loader off
    run_here(*args, "--overwrite", check=True)  # and the way out works
    assert (out / "summary.json").is_file()


def test_non_finite_loss_stops_the_run(shards, tmp_path):
    out = tmp_path / "run"
    p = run_cli("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 2,
                "--lr", "1e12", "--amp", "off", "--out", out, *FAST, check=False)
    assert p.returncode == 1 and "non-finite" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()


def test_logged_loss_is_the_mean_over_its_window(shards, tmp_path):
    """A log window that spans an epoch end averages exactly its own steps."""
    per_step, windowed = tmp_path / "a", tmp_path / "b"
    common = ["--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 3, *FAST]
    run_here("pretrain", *common, "--out", per_step, "--log-every", 1, check=True)
    run_here("pretrain", *common, "--out", windowed, "--log-every", 3, check=True)  # 4 a epoch
    losses = {m["step"]: m["loss"] for m in RunFolder(per_step).read_metrics()}
    lines = RunFolder(windowed).read_metrics()
    assert [m["step"] for m in lines] == [3, 6, 9, 12]
    for m in lines:
        window = [losses[s] for s in range(m["step"] - 2, m["step"] + 1)]
        assert m["loss"] == pytest.approx(sum(window) / 3, rel=1e-4)
    # an epoch's row: the mean of its own 4 steps, whatever the log window
    for run in (per_step, windowed):
        epochs = RunFolder(run).read_metrics("epoch")
        assert [m["step"] for m in epochs] == [4, 8, 12]
        for m in epochs:
            own = [losses[s] for s in range(m["step"] - 3, m["step"] + 1)]
            assert m["loss"] == pytest.approx(sum(own) / 4, rel=1e-4)


def test_a_short_run_logs_twenty_rows_unless_told_otherwise(shards, tmp_path):
    """--log-every's default is 50 steps, or fewer for a run under 1,000 steps: a 24-step run
    logs every step (24 // 20 = 1), where 50 would have logged its last step alone."""
    i = FAST.index("--log-every")
    common = ["--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 6,
              *FAST[:i], *FAST[i + 2:]]
    run_here("pretrain", *common, "--out", tmp_path / "a", check=True)
    assert [m["step"] for m in RunFolder(tmp_path / "a").read_metrics()] == list(range(1, 25))
    run_here("pretrain", *common, "--out", tmp_path / "b", "--log-every", 50, check=True)
    assert [m["step"] for m in RunFolder(tmp_path / "b").read_metrics()] == [24]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_bf16_then_probe_on_gpu(shards, tmp_path):
    """The GPU path end to end: mixed decode, bf16 autocast, channels_last, then a GPU probe."""
    out = tmp_path / "run"
    gpu = ["--res", "32", "--batch-size", "16", "--device", "cuda", "--log-every", "2",
           "--no-progress"]
    run_cli("pretrain", "--data", shards, "--classes", 4, "--per-class", 16, "--epochs", 2,
            "--out", out, *gpu)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == torch.cuda.get_device_name(0) and summary["amp"] == "bf16"
    assert summary["steps"] == 8 and np.isfinite(summary["train_loss"])
    p = run_cli("probe", out, "--data", shards, "--test-data", shards, "--name", "self",
                "--repeats", 2, "--device", "cuda")
    assert "self" in p.stdout
    # The same checkpoint probed on the CPU: the GPU's eval images and features must be the
    # CPU's within bf16 rounding, so the two top-1 agree (garbage pixels on the GPU would
    # give chance, 0.25, beside the CPU's).
    run_cli("probe", out, "--data", shards, "--test-data", shards, "--name", "self-cpu",
            "--repeats", 2, "--device", "cpu")
    top1 = {k: v["top1_mean"] for k, v in
            json.loads((out / "probe.json").read_text())["datasets"].items()}
    assert top1["self-cpu"] > 0.4 and abs(top1["self"] - top1["self-cpu"]) <= 0.1, top1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_steps_never_make_the_host_wait(shards):
    """Between log lines the loop only queues work on the GPU: no copy or read that waits for
    the device, so the host runs ahead and a late batch or a slow launch costs no GPU time.
    (Moving the normalisation constants to the GPU every step once made it wait twice.)"""
    from dptrain.training.meter import Meter
    from dptrain.training.train import build, train_step

    cfg = make_config("fast", data=str(shards), batch_size=16, res=32, device="cuda")
    device = torch.device("cuda")
    subset = select(ShardIndex.load(shards), 4, 16, seed=0)
    model, optimizer, autocast, scaler = build(cfg, subset.num_classes, "bf16", device)
    meter = Meter(device, 1)
    loader = train_loader(subset, cfg, 32, "cuda", 0, 1)
    with torch.cuda.stream(torch.cuda.Stream()):
        for i, (images, labels) in enumerate(meter.batches(loader)):
            # the first step (cuDNN's set-up, the allocator's first blocks) may wait
            torch.cuda.set_sync_debug_mode("error" if i else "default")
            loss, logits = train_step(model, optimizer, autocast, scaler, images, labels, cfg)
            meter.step(loss, logits, labels)
        torch.cuda.set_sync_debug_mode("default")
    loader.close()
    assert meter.window_steps == len(loader) == 4


def test_gpus_relaunch_torchrun_with_the_resolved_config(shards, tmp_path, monkeypatch):
    """--gpus G runs the same run under torchrun from its resolved config file: the ranks parse
    no option again (os.execv is caught here; no GPU is needed)."""
    from dataclasses import asdict

    from dptrain.training.config import PretrainOptions, load_config
    from dptrain.training.train import pretrain_run

    class Launched(Exception):
        pass

    def execv(path, argv):
        raise Launched(argv)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = make_config("synthetic", data=str(shards), classes=4, per_class=16)
    with pytest.raises(Launched) as launched:
        pretrain_run(cfg, PretrainOptions(out=str(tmp_path / "run"), gpus=2), progress=False)
    argv = launched.value.args[0]
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    at = argv.index("--config")
    assert argv[at - 3:at] == ["-m", "dptrain", "pretrain"]
    assert argv[at + 2:] == ["--out", str(tmp_path / "run"), "--no-progress"]
    assert json.loads(Path(argv[at + 1]).read_text()) == json.loads(json.dumps(asdict(cfg)))
    assert load_config(argv[at + 1]) == cfg  # the run, as resolved


def test_a_resume_with_another_optimizer_is_refused(shards, tmp_path):
    args = ["pretrain", "--data", shards, "--classes", 2, "--per-class", 16, "--epochs", 1,
            "--out", tmp_path / "run", *FAST]
    run_here(*args, check=True)
    p = run_here(*args, "--optimizer", "adam")
    assert p.returncode == 2 and "optimizer" in p.stderr and "--overwrite" in p.stderr
    assert "Traceback" not in p.stderr


def test_options_that_do_not_fit_the_data_are_said_on_the_first_lines(shards, tmp_path):
    """A recipe's ImageNet defaults on small images: upsampled crops and a run that is all
    warm-up are warned about before anything trains; options that fit say nothing."""
    base = ["pretrain", "--data", shards, "--classes", 6, "--per-class", 24, "--arch",
            "smallcnn", "--batch-size", 16, "--device", "cpu", "--no-progress"]
    p = run_here(*base, "--res", 64, "--epochs", 2, "--out", tmp_path / "a", check=True)
    first = p.stderr.splitlines()[:2]
    assert first[0].startswith("WARNING: --res 64 is above most images' shorter side (median "
                               "40 px): every crop is upsampled; --res 40"), p.stderr
    assert first[1] == ("WARNING: the whole run is warm-up (2 warm-up epochs, 18 steps in all): "
                        "the learning rate only rises; fewer --warmup-epochs or more --epochs")
    p = run_here(*base, "--res", 32, "--epochs", 3, "--out", tmp_path / "b", check=True)
    assert "WARNING" not in p.stderr


def test_subset_seed_draws_the_subset_and_seed_the_training(shards, tmp_path):
    """--subset-seed chooses the classes and images alone: a run with --subset-seed 3
    --seed 0 trains on the subset of --seed 3, and --seed still draws its training (its
    weights are not those of --seed 3 on that very subset)."""
    def run(out, *extra):
        run_here("pretrain", "--data", shards, "--classes", 3, "--per-class", 8, "--epochs", 1,
                 "--out", out, *FAST, *extra, check=True)
        return json.loads((out / "config.json").read_text())["subset"]

    apart = run(tmp_path / "apart", "--subset-seed", 3, "--seed", 0)
    assert apart == run(tmp_path / "s3", "--seed", 3) != run(tmp_path / "s0", "--seed", 0)
    assert apart["class_names"] == select(ShardIndex.load(shards), 3, 8, seed=3).class_names
    a, b = (_weights(tmp_path / d) for d in ("apart", "s3"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
