"""The command line as users meet it: errors, kill -9 and resume, no-op reruns, info."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import DPTRAIN, interrupt, make_imagefolder, one_line_error, run_cli, tree_bytes

from dptrain.data.index import ShardIndex


def test_the_old_cache_flags_still_work_and_say_their_new_names(tmp_path):
    """--cache, --cache-side and --cache-dir, from before each cache had one name, still work
    where they did (pretrain, sweep, probe, `dptrain cache`; a user's scripts and the flags
    older sweeps recorded), each use saying its new name in one line; --help shows only the
    new ones, and an old flag with its new one is a usage error."""
    from dptrain.cli import main

    p = run_cli("pretrain", "--cache", "off", "--cache-side", 48, "--cache-dir", tmp_path / "e",
                "--print-config")
    cfg = json.loads(p.stdout)
    assert (cfg["pixel_cache"], cfg["pixel_cache_side"], cfg["eval_cache"]) == \
        ("off", 48, str(tmp_path / "e"))
    assert not {"cache", "cache_side", "cache_dir"} & set(cfg)
    assert p.stderr.splitlines() == [
        f"note: {old} is now {new} (the old name still works)" for old, new in
        [("--cache", "--pixel-cache"), ("--cache-side", "--pixel-cache-side"),
         ("--cache-dir", "--eval-cache")]]
    one_line_error(run_cli("pretrain", "--cache", "off", "--pixel-cache", "host",
                           "--print-config", check=False),
                   "--cache is the old name of --pixel-cache: give one of them")
    suite = tmp_path / "suite.toml"
    suite.write_text("")
    required = {"sweep": ["--data", tmp_path, "--suite", suite, "--out", tmp_path / "o"],
                "probe": [tmp_path], "cache": [], "pretrain": []}
    for cmd, args in required.items():
        old = ["--cache-dir", tmp_path / "e"] + (["--cache", "host", "--cache-side", 48]
                                                 if cmd in ("pretrain", "sweep") else [])
        params = main.commands[cmd].make_context(cmd, [str(a) for a in args + old]).params
        assert params["eval_cache"] in (str(tmp_path / "e"), tmp_path / "e"), cmd
        if cmd in ("pretrain", "sweep"):
            assert (params["pixel_cache"], params["pixel_cache_side"]) == ("host", 48)
        assert "--cache" not in run_cli(cmd, "--help").stdout, cmd  # --pixel-cache etc. only


def test_help_for_every_command():
    import click

    from dptrain.cli import main

    top = run_cli("--help").stdout
    commands = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.strip()]
    assert sorted(commands) == sorted(main.commands) == [
        "cache", "info", "predict", "pretrain", "probe", "report", "shard", "sweep", "verify"]
    for cmd in commands:
        p = run_cli(cmd, "--help")
        assert p.stdout.startswith(f"Usage: python -m dptrain {cmd} ") and \
            len(p.stdout.splitlines()) > 5, p.stdout
        silent = [o.opts[0] for o in main.commands[cmd].params
                  if isinstance(o, click.Option) and not o.help]
        assert not silent, (cmd, silent)  # every option says what it does
        # one style of defaults, click's "[default: ...]", also for one said in words
        own = [o.opts[0] for o in main.commands[cmd].params
               if isinstance(o, click.Option) and re.search(r"\]\.?$", o.help or "")]
        assert not own and "[default: (" not in p.stdout, (cmd, own)
    text = " ".join(run_cli("pretrain", "--help").stdout.split())
    assert ("--seed INTEGER Subset choice (unless --subset-seed), data order, init and "
            "augmentation. [default: 0]") in text
    assert "--subset-seed INTEGER RANGE Seed of the subset's choice alone" in text
    assert "one subset. [default: --seed; x>=0]" in text
    assert "K: number of classes. [default: all; x>=1]" in text


def test_the_command_line_starts_without_torch():
    """--help and usage errors stay fast: the options are declared in modules without torch."""
    code = "import sys, dptrain.cli; print(sorted(m for m in ('torch', 'nvidia.dali', 'scipy') " \
           "if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]", p.stdout


def test_bad_usage_one_line_errors(tmp_path, folder, texture):
    one_line_error(run_cli("shard", tmp_path / "nope", tmp_path / "o", check=False),
                   "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli("shard", empty, tmp_path / "o", check=False), "holds no images")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes((folder / "class_1" / "img_1_0.JPEG").read_bytes())
    one_line_error(run_cli("shard", flat, tmp_path / "o", check=False), "--labels")
    one_line_error(run_cli("shard", folder, tmp_path / "o", "--format", "zip", check=False),
                   "zip")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(run_cli("shard", folder, a_file / "sub", check=False), "cannot write")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    one_line_error(run_cli("shard", folder, foreign, check=False), "not a dptrain shard set")
    assert (foreign / "thesis.tex").read_text() == "keep me"
    one_line_error(run_cli("shard", folder, folder / "out", check=False), "inside SRC")
    one_line_error(run_cli("info", folder, check=False), "not a dptrain shard set")
    one_image = folder / "class_1" / "img_1_0.JPEG"
    one_line_error(run_cli("shard", one_image, tmp_path / "o", check=False),
                   "not an uncompressed tar")
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tf:
        tf.add(one_image, arcname="a.jpg")
    one_line_error(run_cli("shard", tmp_path / "x.tar.gz", tmp_path / "o", check=False),
                   "not an uncompressed tar")
    unfinished = tmp_path / "unfinished"
    (unfinished / ".progress").mkdir(parents=True)
    one_line_error(run_cli("info", unfinished, check=False), "run the dptrain shard command")
    one_line_error(run_cli("shard", folder, tmp_path / "o", "--quality", "0", check=False),
                   "--quality")
    # probe's feature cache is --feature-cache: --cache (pretrain's old --pixel-cache) is no
    # folder name
    one_line_error(run_cli("probe", tmp_path, "--cache", "off", cwd=tmp_path, check=False),
                   "No such option '--cache'", "'--feature-cache'")
    assert not (tmp_path / "off").exists()


def test_rerun_is_noop_and_other_options_refused(tmp_path, folder):
    out = tmp_path / "out"
    run_cli("shard", folder, out, "--no-progress")
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    p = run_cli("shard", folder, out, "--no-progress")
    assert "up to date" in p.stdout
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    one_line_error(run_cli("shard", folder, out, "--seed", "3", check=False),
                   "--overwrite", "options")
    run_cli("shard", folder, out, "--seed", "3", "--overwrite", "--no-progress")
    assert ShardIndex.load(out).meta["options"]["seed"] == 3


def test_summary_and_info(tmp_path, folder):
    out = tmp_path / "out"
    p = run_cli("shard", folder, out, "--no-progress")
    assert "4 classes, 35 inputs seen, 30 written, 5 converted, 5 skipped" in p.stdout
    assert "skipped 1: truncated JPEG (no end-of-image marker)" in p.stdout
    assert "img/s" in p.stdout and "MB/s" in p.stdout
    info = json.loads(run_cli("info", out, "--json").stdout)
    assert info["num_classes"] == 4 and info["num_samples"] == 30
    assert info["per_class"] == [12, 6, 6, 6] and info["skipped"] == 5
    assert info["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    text = run_cli("info", out).stdout
    assert "classes   4" in text and "6/6/12" in text


@pytest.fixture
def big_folder(tmp_path, texture) -> Path:
    # Large enough (~50 MB, decode-checked, one worker) that a run lasts about a second.
    return make_imagefolder(tmp_path / "big", texture, classes=12, per_class=40,
                            size=(500, 375), bad=False)


SLOW = ["--no-progress", "--check", "decode", "--workers", "1", "--shard-size", "1"]


def test_kill_9_and_resume_is_byte_identical(tmp_path, big_folder):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_cli("shard", big_folder, ref, *SLOW)
    rng = random.Random(0)
    kills = 0
    started = (out / ".progress").exists
    finished_one = lambda: any((out / ".progress").glob("0*.json"))  # noqa: E731
    for i in range(5):  # kill -9 at random points, each run resuming the last
        # Every other kill waits for a finished class, so that one is resumed however busy
        # the machine is (under load, 0.4 s after the start may be before any class ends).
        interrupt(["shard", big_folder, out, *SLOW], finished_one if i % 2 else started,
                  delay=rng.uniform(0.0, 0.4))
        kills += not (out / "index.json").exists()
    assert kills >= 2  # it really was interrupted mid-run, more than once
    resumed = list((out / ".progress").glob("0*.json"))  # classes the last run will not redo
    assert resumed, "no class finished before the kills: nothing to resume"
    run_cli("shard", big_folder, out, *SLOW)
    assert tree_bytes(out) == tree_bytes(ref)
    assert "OK" in run_cli("verify", out).stdout


def test_ctrl_c_then_rerun(tmp_path, big_folder):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_cli("shard", big_folder, ref, *SLOW)
    status, err = interrupt(["shard", big_folder, out, *SLOW],
                            lambda: any((out / ".progress").glob("0*.json")), signal.SIGINT)
    assert status == 130 and "run the same command again" in err
    assert "Traceback" not in err and not (out / "index.json").exists()
    p = run_cli("shard", big_folder, out, *SLOW)
    assert "this run" in p.stdout
    assert tree_bytes(out) == tree_bytes(ref)


def test_second_writer_is_refused(tmp_path, big_folder):
    out = tmp_path / "out"
    proc = subprocess.Popen([*DPTRAIN, "shard", str(big_folder), str(out), *SLOW])
    deadline = time.time() + 120
    try:
        while not (out / ".progress" / "job.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the first shard never began"
            time.sleep(0.005)
        one_line_error(run_cli("shard", big_folder, out, *SLOW, check=False),
                       "another dptrain shard")
    finally:
        proc.wait()
    assert proc.returncode == 0


def test_shard_rerun_notices_a_truncated_tar(tmp_path, folder):
    out = tmp_path / "out"
    run_cli("shard", folder, out, "--no-progress")
    reference = tree_bytes(out)
    tar = sorted(out.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-512])
    p = run_cli("shard", folder, out, "--no-progress", check=False)
    assert p.returncode == 2 and "up to date" not in p.stdout
    assert f"finished but damaged ({tar.name}" in p.stderr and "--overwrite" in p.stderr
    run_cli("shard", folder, out, "--no-progress", "--overwrite")
    assert tree_bytes(out) == reference  # rebuilt, byte for byte


def test_progress_in_a_log_is_whole_lines(tmp_path, folder):
    started = time.monotonic()
    p = run_cli("shard", folder, tmp_path / "out")  # stderr is a pipe here, as in a log file
    took = time.monotonic() - started  # however long a loaded machine makes it
    lines = p.stderr.splitlines()
    assert "\r" not in p.stderr and lines and "100%" in lines[-1], p.stderr
    assert len(lines) <= 2 + took // 10  # the start, the end, and one line per 10 s between
