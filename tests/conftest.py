"""What the tests share: small datasets they build themselves (one bad input of every kind
included), running the `dptrain` command, interrupting it, and made-up sweeps."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from dptrain.data import imagenet_like
from dptrain.study.results import COLUMNS

DPTRAIN = [sys.executable, "-m", "dptrain"]

# Under pytest-xdist, each worker's share of the cores as torch threads, for its own tests and
# the `dptrain` processes they start (OMP_NUM_THREADS, inherited): two workers of two threads
# each on two cores kept four spinning OpenMP threads on two cores, and the suite ran 1.4x
# longer (846 s against 620 s on a 2-core AMD EPYC).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# "cpu" always; "cuda" as a GPU test that skips cleanly without CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="session")
def texture() -> np.ndarray:
    return imagenet_like.texture(0)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(seed: int, w: int = 40, h: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header claiming another size (a decompression bomb)."""
    i = 2
    while jpeg[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack_from(">H", jpeg, i + 2)[0]
    out = bytearray(jpeg)
    struct.pack_into(">HH", out, i + 5, height, width)
    return bytes(out)


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, expected fate: 'copied', 'converted' or the skip reason's start)."""
    good = encode(rgb(1))
    cmyk = encode(rgb(2).convert("CMYK"))
    rgba = rgb(3).convert("RGBA")
    pal = rgb(4).convert("P")
    pal.info["transparency"] = 0
    grey16 = Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))
    return {
        "grey.jpg": (encode(rgb(5).convert("L")), "copied"),
        "png_named.JPEG": (encode(rgb(6), "PNG"), "converted"),
        "cmyk.jpg": (cmyk, "converted"),
        "alpha.png": (encode(rgba, "PNG"), "converted"),
        "palette.png": (encode(pal, "PNG"), "converted"),
        "grey16.png": (encode(grey16, "PNG"), "converted"),
        "truncated.jpg": (good[: len(good) // 2], "truncated JPEG"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 20, "not an image"),
        "bomb.jpg": (with_sof_size(good, 20000, 20000), "too many pixels"),
        "notes.txt": (b"readme", "not an image file name"),
    }


def rotated(texture: np.ndarray, orientation: int, c: int = 0, i: int = 0,
            size: tuple[int, int] = (100, 60)) -> bytes:
    """An ImageNet-like JPEG of `size` (as stored) that carries an EXIF orientation, as phone
    photos do: 5-8 show it with its sides swapped."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.open(io.BytesIO(imagenet_like.jpeg(texture, 0, c, i, width=size[0],
                                                      height=size[1])))
    return encode(stored, exif=exif.tobytes())


def damaged_jpegs(texture: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """JPEGs whose markers all check out but whose compressed data only a decoder finds
    damaged, each with the message libjpeg-turbo gives it and its fate at shard time:
    name -> (bytes, 'converted' or the skip reason's start)."""
    good = imagenet_like.jpeg(texture, 0, 1, 2, width=100, height=60)
    progressive = encode(Image.open(io.BytesIO(good)), progressive=True)
    dht = progressive.index(b"\xff\xc4", progressive.index(b"\xff\xda"))  # between scans
    n = len(good)
    return {  # PIL decodes the first (libjpeg's warning), neither decoder the other two
        "extraneous.jpg": (good[:-2] + bytes(40) + good[-2:], "converted"),
        "bogus_length.jpg": (progressive[:dht + 2] + b"\x00\x01" + progressive[dht + 4:],
                             "damaged JPEG: Bogus marker length"),
        "premature_end.jpg": (good[:n // 2] + bytes(range(256)) * 2 + good[n // 2 + 300:],
                              "damaged JPEG: Corrupt JPEG data: premature end of data segment"),
    }


def synthetic_data(root: Path, classes: int, per_class: int) -> tuple[Path, Path]:
    """The built-in data, small: a pool of 16 px images (root/pretrain) and one 3-class task
    of 6 train and 3 test images a class, with its suite file."""
    from dptrain.data.synthetic import Generator, write_pool, write_tasks

    gen = Generator(res=16)
    write_pool(root / "pretrain", classes, per_class, gen, progress=False)
    return root / "pretrain", write_tasks(root, (3,), train=6, test=3, gen=gen, progress=False)


def make_imagefolder(root: Path, texture: np.ndarray, classes: int = 4, per_class: int = 6,
                     size: tuple[int, int] = (64, 48), bad: bool = True) -> Path:
    """root/<class>/<file>: ImageNet-like JPEGs, plus the bad inputs in the first class."""
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"img_{c}_{i}.JPEG").write_bytes(
                imagenet_like.jpeg(texture, 0, c, i, width=size[0], height=size[1]))
    if bad:
        for name, (data, _) in bad_inputs().items():
            (root / "class_0" / name).write_bytes(data)
    return root


def make_shard_set(root: Path, texture: np.ndarray, classes: int, per_class: int,
                   size: tuple[int, int], classes_from: Path | None = None) -> Path:
    """Generated JPEGs in root/src, sharded into root/out (returned)."""
    from dptrain.data.shards import shard_dataset

    src = make_imagefolder(root / "src", texture, classes=classes, per_class=per_class,
                           size=size, bad=False)
    shard_dataset(src, root / "out", classes_from=classes_from, progress=False)
    return root / "out"


def _checked(p: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and p.returncode != 0:
        raise AssertionError(f"{p.args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def run_cli(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return _checked(subprocess.run([*DPTRAIN, *map(str, args)], capture_output=True, text=True,
                                   **kw), check)


def run_here(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`dptrain ARGS` in this process: the same click command and error handling as `run_cli`,
    without a new process's ~5 s of start-up (torch, the import of its compiler that the first
    optimiser triggers, DALI). For a command that is not to be interrupted: a signal needs a
    process of its own. With `check`, a failure raises as in `run_cli`. A crash is returned as
    the process would print it, traceback and all."""
    from click.testing import CliRunner

    from dptrain.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return _checked(subprocess.CompletedProcess(args, r.exit_code, r.stdout, err), check)


def one_line_error(p: subprocess.CompletedProcess, *needles: str, status: int = 2) -> None:
    """`p` exited with `status` (2: bad input, as click's usage errors; 1: a run that could
    not finish) and said why in one "Error:" line, its last, holding every needle; no
    traceback."""
    assert p.returncode == status, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    assert all(n in errors[0] for n in needles), errors[0]


def interrupt(args, ready: Callable[[], bool], sig: int = signal.SIGKILL, *, delay: float = 0.0,
              group: bool = False, timeout: float = 300) -> tuple[int, str]:
    """Start `dptrain ARGS`, wait until `ready()` (or until it ends, or `timeout` s), wait
    `delay` s more, and send `sig`: to the process, or with `group` to its whole process group
    as a terminal's Ctrl-C does. Returns its exit status and stderr."""
    # SIGINT as in a terminal: a background job (cmd &) would start it ignored.
    proc = subprocess.Popen([*DPTRAIN, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=group,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:  # one that ended already is left to the caller's assertions
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes), to compare whole outputs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# A pretrain small and quick enough for a test, on the CPU: smallcnn, which also spares the
# process torchvision's import (~2 s); test_train runs the default resnet18 end to end.
FAST = ["--arch", "smallcnn", "--res", "32", "--batch-size", "16", "--device", "cpu",
        "--log-every", "2", "--no-progress", "--workers", "2"]


def under_old_names(folder: Path) -> list[str]:
    """Rewrite the records of a run or sweep folder as dptrain wrote them before each cache
    had one name (options.RENAMED, new -> old): the config of config.json, checkpoint.pt,
    pretrain.json and sweep.json, sweep.json's recorded flags, summary.json's "pixel_cache";
    and before --subset-seed and --order (their fields dropped where unset). Returns the files
    rewritten."""
    from dptrain.common.options import RENAMED

    old = {new: was for was, new in RENAMED.items()}
    flags = {f"--{k.replace('_', '-')}": f"--{v.replace('_', '-')}" for k, v in old.items()}
    back = lambda d: {old.get(k, k): v for k, v in d.items()  # noqa: E731
                      if not (k == "subset_seed" and v is None or k == "order" and v ==
                              "shuffled")}
    done = []
    for path in sorted(folder.rglob("*")):
        if path.name in ("config.json", "sweep.json"):
            record = json.loads(path.read_text())
            record["config"] = back(record["config"])
            for key in ("options", "probe_args"):
                if key in record:
                    record[key] = [flags.get(a, a) for a in record[key]]
        elif path.name in ("pretrain.json", "summary.json"):
            record = back(json.loads(path.read_text()))
        elif path.name == "checkpoint.pt":
            ckpt = torch.load(path, weights_only=True)
            torch.save({**ckpt, "config": back(ckpt["config"])}, path)
            done.append(path.name)
            continue
        else:
            continue
        path.write_text(json.dumps(record, indent=1))
        done.append(path.name)
    return done


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Eval caches of the tests' runs and probes (the default --eval-cache) go to a folder of
    the test session's, never the user's ~/.cache; subprocesses inherit it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture
def folder(tmp_path, texture) -> Path:
    return make_imagefolder(tmp_path / "src", texture)


# A two-step error model and a sweep folder made from it (theory, predict, report).
TRUE = dict(c0=0.15, a=0.9, alpha=0.6, b=0.7, beta=0.4)


def model(k, n, p=TRUE):
    return p["c0"] + p["a"] * np.power(k, -p["alpha"]) + p["b"] * np.power(n, -p["beta"])


def fake_sweep(root, sizes=(1000, 4000), ks=(4, 10, 25, 63, 160), seeds=2, sets=("a", "b"),
               params=TRUE, noise=0.002):
    """A sweep folder whose results.csv comes from the model plus noise."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for s in sizes:
            for k in ks:
                n = s // k
                for seed in range(seeds):
                    for j, name in enumerate(sets):
                        err = float(model(k, n, params)) + 0.02 * j + rng.normal(0, noise)
                        w.writerow({c: 0 for c in COLUMNS} | {
                            "run": f"K{k}-n{n}-s{seed}", "K": k, "n": n,
                            "seed": seed, "dataset": name, "top1_mean": 1 - err, "N": s,
                            "top1_std": 0.01, "error_mean": err, "val_top1": ""})
    (root / "sweep.json").write_text(json.dumps({"budget": "fixed epochs: 1 per run",
                                                 "recipe": "synthetic", "pretrain_args": []}))
    return root


def grid_points(sizes=(1000, 4000, 16000), ks=(4, 10, 25, 63, 160, 400)):
    return [(k, s // k) for s in sizes for k in ks if s // k >= 2]
