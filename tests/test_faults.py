"""Faults as users meet them: damaged data on every path, two writers, signals, a killed sweep,
failed writes, unreadable records. Each ends in one clear line, nothing is served stale, and
running the same command again goes on from what was finished."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import torch
from conftest import (
    DPTRAIN,
    interrupt,
    make_imagefolder,
    make_shard_set,
    one_line_error,
    run_cli,
    run_here,
    tree_bytes,
)

from dptrain.common.errors import DataError
from dptrain.common.runfolder import RunFolder, folder_lock
from dptrain.data import imagenet_like
from dptrain.data.index import ShardIndex, sha256_file

FAST = [*conftest.FAST, "--recipe", "synthetic"]
SPEEDS = {"wall_s", "images_per_s", "data_wait_fraction", "data_wait", "epoch_s",
          "loader_ms_per_batch", "loader_threads", "pixel_cache"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, texture) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    train = make_shard_set(root / "train", texture, 6, 24, (48, 40))
    down = make_shard_set(root / "down", texture, 3, 10, (48, 40))
    test = make_shard_set(root / "test", texture, 3, 4, (48, 40), classes_from=down)
    return {"train": train, "down": down, "test": test}


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def records(run: Path) -> tuple[list[dict], dict]:
    """A run's metrics rows and summary without what measures its speed."""
    rows = [{k: v for k, v in json.loads(x).items() if k not in SPEEDS}
            for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items()
               if k not in SPEEDS}
    return rows, summary


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def pretrain_args(data: Path, out: Path, epochs: int = 6) -> list:
    return ["pretrain", "--data", data, "--classes", 6, "--per-class", 24, "--epochs", epochs,
            "--out", out, *FAST]


# -- damaged data ----------------------------------------------------------------------------

def zero_sample(root: Path, row: int = 3) -> tuple[Path, int]:
    """Overwrite one JPEG of a shard set with zeros, its length kept."""
    index = ShardIndex.load(root)
    r = index.samples[row]
    tar = index.tar_paths[r["tar"]]
    data = bytearray(tar.read_bytes())
    data[r["offset"]:r["offset"] + r["size"]] = bytes(int(r["size"]))
    tar.write_bytes(bytes(data))
    return tar, int(r["offset"])


@pytest.mark.parametrize("cache", ["host", "off"])
def test_a_zeroed_jpeg_in_training_data_names_shard_key_and_verify(sets, tmp_path, cache):
    data = copy_set(sets["train"], tmp_path / "train")
    tar, offset = zero_sample(data)
    p = run_cli(*pretrain_args(data, tmp_path / "run", 1), "--pixel-cache", cache, check=False)
    one_line_error(p, f"{tar.name}: sample at offset {offset} (key ", "is not a JPEG",
                   "dptrain verify")


def test_a_zeroed_jpeg_in_validation_or_probe_data_is_refused(sets, tmp_path):
    run = tmp_path / "run"
    run_here(*pretrain_args(sets["train"], run, 1), check=True)
    val = copy_set(sets["train"], tmp_path / "val")
    zero_sample(val)
    p = run_cli(*pretrain_args(sets["train"], tmp_path / "v", 1), "--val-data", val,
                "--pixel-cache", "off", check=False)  # decoded (with a cache: keyed, as below)
    one_line_error(p, val.name, "is not a JPEG", "dptrain verify")
    # Probing: every cache is keyed on what the data is, so a damaged set is never served
    # from one, and with no cache at all its decoder names the sample.
    down = copy_set(sets["down"], tmp_path / "down")
    probe = ["probe", run, "--data", down, "--test-data", sets["test"], "--repeats", 1,
             "--no-progress"]
    run_here(*probe, check=True)
    tar, offset = zero_sample(down)
    one_line_error(run_here(*probe), "changed since the set was sharded",
                   "dptrain verify")
    # The decoder's own refusal, for a damaged set whose index was made to agree with it
    # (a set the caches' keys cannot tell from a good one): it names tar, offset and key.
    meta = json.loads((down / "index.json").read_text())
    meta["tars"][ShardIndex.load(down).samples[3]["tar"]]["sha256"] = sha256_file(tar)
    (down / "index.json").write_text(json.dumps(meta))
    one_line_error(run_cli(*probe, "--eval-cache", "off", "--feature-cache", tmp_path / "f2",
                           check=False),
                   f"{tar.name}: sample at offset {offset} (key ", "is not a JPEG",
                   "dptrain verify")


def test_a_truncated_tar_is_named_on_every_path(sets, reference, tmp_path):
    data = copy_set(sets["train"], tmp_path / "train")
    tar = ShardIndex.load(data).tar_paths[2]
    tar.write_bytes(tar.read_bytes()[:-3000])
    one_line_error(run_cli(*pretrain_args(data, tmp_path / "run", 1), check=False),
                   tar.name, "cut short", "dptrain verify")
    one_line_error(run_cli(*pretrain_args(sets["train"], tmp_path / "v", 1), "--val-data", data,
                           "--pixel-cache", "off", check=False),
                   tar.name, "cut short", "dptrain verify")
    one_line_error(run_here("probe", reference, "--data", data, "--test-data", data,
                            "--repeats", 1, "--no-progress"),
                   tar.name, "changed since", "dptrain verify")  # refused before any write


# -- one writer per folder -------------------------------------------------------------------

def test_a_second_writer_is_refused_with_who_holds_the_folder(sets, reference, tmp_path,
                                                             texture):
    run = tmp_path / "run"
    args = pretrain_args(sets["train"], run, 40)
    first = subprocess.Popen([*DPTRAIN, *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        p = run_here(*args)
        one_line_error(p, f"another dptrain pretrain (pid {first.pid}) is writing {run}")
        p = run_here("probe", run, "--data", sets["down"], "--test-data", sets["test"])
        one_line_error(p, f"another dptrain pretrain (pid {first.pid}) is writing")
    finally:
        first.kill()
        first.communicate()
    # The kernel released the dead holder's lock: the folder can be written again.
    with folder_lock(run, "pretrain"):
        pass
    # shard and sweep folders alike (held here by this process)
    out = tmp_path / "set"
    with folder_lock(out, "shard"):
        p = run_cli("shard", sets["train"].parent / "src", out, "--no-progress", check=False)
        one_line_error(p, "another dptrain", f"is writing {out}")
    p = run_cli("shard", sets["train"].parent / "src", out, "--no-progress")
    assert "written" in p.stdout  # an empty OUT holding only the lock file is not foreign
    probe = ["probe", reference, "--data", sets["down"], "--test-data", sets["test"],
             "--repeats", 1, "--no-progress"]
    with folder_lock(reference, "probe"):  # a finished run another probe is writing into
        one_line_error(run_here(*probe), f"(pid {os.getpid()}) is writing {reference}",
                       "run dptrain probe again")
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[[dataset]]\nname = "d"\ndata = "{sets["down"]}"\n'
                     f'test_data = "{sets["test"]}"\n')
    sweep = tmp_path / "sweep"
    with folder_lock(sweep, "sweep"):
        one_line_error(run_here("sweep", "--data", sets["train"], "--suite", suite, "--out",
                                sweep, "--points", "6:24", *FAST, "--epochs", 1),
                       f"(pid {os.getpid()}) is writing {sweep}", "run dptrain sweep again")
    assert not (sweep / "runs").exists()


# -- signals ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(sets, tmp_path_factory) -> Path:
    """An uninterrupted run: 6 epochs of 9 steps, a metrics row every 2 steps (so a log
    window spans each epoch's end, where checkpoints are)."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    run_here(*pretrain_args(sets["train"], ref), check=True)
    return ref


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_records_the_same(sets, reference,
                                                                         tmp_path, sig):
    """SIGTERM (Slurm before preemption) and Ctrl-C stop the run at the next step with a
    checkpoint there, mid-epoch; the resumed run ends with the uninterrupted run's weights,
    metrics rows and summary (speeds aside)."""
    ref, out = reference, tmp_path / "run"
    started = lambda: (out / "metrics.jsonl").is_file() and \
        len(RunFolder(out).read_metrics()) >= 7  # noqa: E731
    status, err = interrupt(pretrain_args(sets["train"], out), started, sig,
                            group=sig == signal.SIGINT)
    assert status == 128 + sig, err
    last = err.strip().splitlines()[-1]
    assert f"({signal.Signals(sig).name}); checkpoint saved: run the same command to " \
           "resume" in last and "Traceback" not in err
    stopped = int(last.split("stopped at step ")[1].split()[0])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == stopped and 14 <= stopped < 54
    if sig == signal.SIGINT:
        return  # the rest is the same for both
    # Unfinished: a probe says so, unless asked to probe it as it is.
    probe = ["probe", out, "--data", sets["down"], "--test-data", sets["test"], "--repeats", 1,
             "--no-progress"]
    one_line_error(run_here(*probe), f"step {stopped} of 54", "--allow-unfinished")
    run_here(*probe, "--allow-unfinished", check=True)
    run_here(*pretrain_args(sets["train"], out), check=True)
    assert records(out) == records(ref)
    assert all(torch.equal(v, weights(out)[k]) for k, v in weights(ref).items())


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_changes_nothing():
    """The first SIGINT or SIGTERM asks the loop to stop after its step (`stopping.StopOnSignal`
    records it); a second Ctrl-C ends the process at once, by the signal, while a repeated
    SIGTERM (a dying sweep's threads may each send one) is only recorded again."""
    script = ("import os, signal, sys\n"
              "from dptrain.training.stopping import StopOnSignal\n"
              "sig = getattr(signal, sys.argv[1])\n"
              "with StopOnSignal() as stop:\n"
              "    os.kill(os.getpid(), sig)\n"
              "    print('asked', stop.signal == sig, flush=True)\n"
              "    os.kill(os.getpid(), sig)\n"
              "    print('still here', flush=True)\n")
    for name, status, said in (("SIGINT", -signal.SIGINT, "asked True\n"),
                               ("SIGTERM", 0, "asked True\nstill here\n")):
        p = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True,
                           timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_DFL))
        assert (p.returncode, p.stdout) == (status, said), (name, p.returncode, p.stderr)


def test_kill_9_mid_epoch_resumes_with_the_records_of_an_uninterrupted_run(sets, reference,
                                                                          tmp_path):
    """Rows logged after the last checkpoint by the process that died are dropped, and the
    log window and the epoch's accuracy in progress come back from the checkpoint."""
    out = tmp_path / "run"
    mid = lambda: (out / "checkpoint.pt").is_file() and \
        len(RunFolder(out).read_metrics()) >= 7  # noqa: E731
    interrupt(pretrain_args(sets["train"], out), mid)
    assert not (out / "summary.json").exists()
    rows = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] > torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    run_here(*pretrain_args(sets["train"], out), check=True)
    assert records(out) == records(reference)


def test_a_killed_sweep_takes_its_runs_with_it(tmp_path):
    """kill -9 of a sweep: its pretrain child is told (SIGTERM), saves a checkpoint, exits
    and lets go of its run folder, so a rerun never trains a point twice at once."""
    from dptrain.data.synthetic import Generator, write_pool, write_tasks

    gen = Generator(res=16)
    write_pool(tmp_path / "pool", 4, 40, gen, progress=False)
    suite = write_tasks(tmp_path, (2,), train=4, test=2, gen=gen, progress=False)
    out = tmp_path / "sw"
    args = ["sweep", "--data", tmp_path / "pool", "--suite", suite, "--out", out, "--points",
            "4:40", "--recipe", "synthetic", "--epochs", "4", "--batch-size", "8", "--seeds",
            "1", "--repeats", "1", "--log-every", "1", "--device", "cpu", "--no-progress"]
    run = out / "runs" / "K4-n40-s0"
    interrupt(args, lambda: (run / "checkpoint.pt").is_file())
    deadline = time.time() + 60
    while "checkpoint saved" not in (run / "sweep.log").read_text():  # its last words
        assert time.time() < deadline, "the sweep's pretrain child was not stopped"
        time.sleep(0.2)
    assert "(SIGTERM); checkpoint saved" in (run / "sweep.log").read_text()
    while True:  # it exits as it says so: then its run folder is free
        try:
            with folder_lock(run, "pretrain"):
                break
        except DataError:  # still held
            assert time.time() < deadline, "the sweep's pretrain child kept its run folder"
            time.sleep(0.1)
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 80
    r = run_here(*args, check=True)
    assert "1 to run" in r.stderr and json.loads((run / "summary.json").read_text())["steps"] \
        == 80
    assert f"resuming {run} from step {step} of 80" in (run / "sweep.log").read_text()


# -- failed writes and unreadable records ----------------------------------------------------

def limited(args: list, max_bytes: int) -> subprocess.CompletedProcess:
    """`dptrain ARGS` unable to write a file larger than max_bytes (EFBIG, as a full disk
    fails a write)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run([*DPTRAIN, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit)


def test_a_failed_write_is_one_line_and_a_rerun_resumes(sets, tmp_path, texture):
    """A write fails after part of the work was finished: the finished part is kept and the
    rerun goes on from it (shard: the finished classes' tars untouched, the set byte-identical
    to an uninterrupted one's)."""
    src = tmp_path / "src"
    make_imagefolder(src, texture, classes=5, per_class=6, size=(48, 40), bad=False)
    big = src / "z_big"  # the last class: its tar alone is past the limit
    big.mkdir()
    for i in range(6):
        (big / f"b{i}.jpg").write_bytes(imagenet_like.jpeg(texture, 0, 9, i, width=400,
                                                           height=300))
    out, whole = tmp_path / "set", tmp_path / "whole"
    args = ["--no-progress", "--workers", "1"]  # one class after another, in label order
    p = limited(["shard", src, out, *args], 100_000)
    one_line_error(p, "cannot write", "File too large", "run the same command again",
                   status=1)
    finished = sorted(out.glob("*.tar"))
    assert [t.name[:5] for t in finished] == ["00000", "00001", "00002", "00003", "00004"]
    assert not (out / "index.json").exists() and not list(out.glob("*.partial"))
    inodes = [t.stat().st_ino for t in finished]
    run_here("shard", src, out, *args, check=True)
    assert [t.stat().st_ino for t in finished] == inodes  # kept, not written again
    run_here("shard", src, whole, *args, check=True)
    assert tree_bytes(out) == tree_bytes(whole)


def test_a_failed_checkpoint_write_keeps_the_epochs_before_it(sets, reference, tmp_path,
                                                             monkeypatch):
    """The disk fills at the third epoch's checkpoint: one line, the second epoch's
    checkpoint kept, and the rerun ends with the records and weights of an uninterrupted run."""
    import errno

    from dptrain.common import runfolder

    run, real, saved = tmp_path / "run", runfolder.write_atomic, []

    def full_at_the_third(path, data):
        if Path(path).name == "checkpoint.pt":
            saved.append(1)
            if len(saved) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(runfolder, "write_atomic", full_at_the_third)
    one_line_error(run_here(*pretrain_args(sets["train"], run)), "cannot write",
                   "No space left on device", "run the same command again", status=1)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 18  # 2 epochs of 9
    monkeypatch.undo()
    from dptrain.training import train

    steps, step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: steps.append(1) or step(*a))
    r = run_here(*pretrain_args(sets["train"], run), check=True)
    assert len(steps) == 54 - 18  # resumed, not started over, and its first line says so
    assert r.stderr.splitlines()[0] == f"resuming {run} from step 18 of 54"
    assert records(run) == records(reference)
    assert all(torch.equal(v, weights(run)[k]) for k, v in weights(reference).items())


def test_unreadable_run_records_are_refused_and_overwrite_clears_them(sets, tmp_path):
    run = tmp_path / "run"
    run_here(*pretrain_args(sets["train"], run, 1), check=True)
    (run / "summary.json").write_text("{ cut")
    one_line_error(run_here(*pretrain_args(sets["train"], run, 1)),
                   "summary.json is not readable JSON", "--overwrite")
    (run / "config.json").write_bytes(b"\x00" * 10)
    one_line_error(run_here(*pretrain_args(sets["train"], run, 1)),
                   "config.json is not readable JSON", "--overwrite")
    run_here(*pretrain_args(sets["train"], run, 1), "--overwrite", check=True)
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


def test_an_unknown_key_in_a_suite_is_named(sets, reference, tmp_path):
    run = reference  # refused before anything is written
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[[dataset]]\nname = "d"\ndata = "{sets["down"]}"\n'
                     f'test_data = "{sets["test"]}"\ntets = 3\n')
    one_line_error(run_here("probe", run, "--suite", suite),
                   "unknown key(s) tets", "name, data, test_data")
    suite.write_text(f'[[dataset]]\nname = "d"\ndata = "{sets["down"]}"\n'
                     f'test = "{sets["test"]}"\n')  # misspelt: test_data is missing
    one_line_error(run_here("probe", run, "--suite", suite), "unknown key(s) test",
                   "takes name, data, test_data (test_data missing)")


def test_resume_may_change_what_only_changes_speed(sets, reference, tmp_path):
    """Killed mid-run, resumed with other DALI threads, prefetch, caches (the pixel cache, the
    eval cache) and progress: the uninterrupted run's records and weights, bit for bit."""
    run = tmp_path / "run"
    interrupt(pretrain_args(sets["train"], run), lambda: (run / "checkpoint.pt").is_file())
    assert not (run / "summary.json").exists()  # killed before it finished
    assert 0 < torch.load(run / "checkpoint.pt", weights_only=True)["step"] < 54
    run_here(*pretrain_args(sets["train"], run), "--workers", "1", "--prefetch", "1",
             "--progress", "--pixel-cache", "off", "--eval-cache", tmp_path / "pixels", check=True)
    assert records(run) == records(reference)
    assert all(torch.equal(v, weights(run)[k]) for k, v in weights(reference).items())


# -- real-world images: EXIF rotations, damage that only a decoder sees ----------------------

@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory, texture) -> dict[str, Path]:
    """4 classes x 20 JPEGs of 100x60 px, half of them EXIF-rotated (orientation 6), class 0
    also with orientations 2-8: sharded as dptrain wrote them before shard decoded and rotated
    (the set `verify` flags), then with the damaged JPEGs added, as shard writes them now."""
    from conftest import damaged_jpegs, rotated

    from dptrain.data import images
    from dptrain.data.shards import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("phone")
    for c in range(4):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            (root / "src" / f"c{c}" / f"p{i}.jpg").write_bytes(rotated(texture, 6 if i % 2
                                                                        else 1, c, i))
    for o in range(2, 9):
        (root / "src" / "c0" / f"o{o}.jpg").write_bytes(rotated(texture, o, 0, 20 + o))
    mp = pytest.MonkeyPatch()
    mp.setattr(images, "_conversion_needed", lambda header: None)
    shard_dataset(root / "src", root / "old", options=ShardOptions(check="header"),
                  progress=False)
    mp.undo()
    for name, (data, _) in damaged_jpegs(texture).items():
        (root / "src" / "c0" / name).write_bytes(data)
    run_here("shard", root / "src", root / "new", "--no-progress", check=True)
    return {"new": root / "new", "old": root / "old"}


@pytest.mark.parametrize("cache", ["off", "host"])
def test_rotated_and_damaged_jpegs_are_stored_so_that_training_and_probes_run(
        phone_photos, tmp_path, cache):
    new = phone_photos["new"]
    meta = ShardIndex.load(new).meta
    assert meta["num_samples"] == 80 + 7 + 1  # the two undecodable ones skipped
    assert sum(c["action"].startswith("converted (EXIF orientation") for c in meta["converted"]) \
        == 4 * 10 + 7
    assert run_here("verify", new, check=True).stdout.startswith(f"{new}: OK")
    run = tmp_path / "run"
    run_here("pretrain", "--data", new, "--classes", 4, "--per-class", 20, "--epochs", 2,
             "--out", run, "--pixel-cache", cache, "--val-data", new, *FAST, check=True)
    assert json.loads((run / "summary.json").read_text())["val_top1"] >= 0
    probe = run_here("probe", run, "--data", new, "--test-data", new, "--repeats", 1,
                     "--no-progress", check=True)
    assert "top-1" in probe.stdout


@pytest.mark.parametrize("cache", ["off", "host"])
def test_a_set_written_before_the_decode_check_still_trains_and_verify_flags_it(
        phone_photos, tmp_path, cache):
    """The loader decodes the stored pixel grid (no EXIF rotation), so an old set's rotated
    JPEGs fit the index's sizes instead of failing a crop or the pixel cache; verify names
    each rotated sample."""
    old = phone_photos["old"]
    p = run_cli("verify", old, check=False)
    assert p.returncode == 1 and p.stderr.count("carries EXIF orientation") == 47
    run_here("pretrain", "--data", old, "--classes", 4, "--per-class", 18, "--epochs", 1,
             "--out", tmp_path / "run", "--pixel-cache", cache, *FAST, check=True)
