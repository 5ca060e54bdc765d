"""Fuzz every input dptrain reads (issue 33): what `dptrain shard` accepts, the loader
decodes, and nothing else crashes anything.

    python tools/fuzz.py images --cases 10000   # atheris (libFuzzer) through shard's per-file path
    python tools/fuzz.py files --cases 2000     # Hypothesis mutations of each record file
    python tools/fuzz.py replay                 # every input in tests/fuzz_regressions

Images: libFuzzer, coverage-guided on Pillow's and dptrain's Python code, mutates a seed corpus
of real images (every JPEG kind PIL writes, PNG, WebP, truncated files, tests' bad_inputs())
and each input goes through `shards.write_class`, what `dptrain shard` does to one file. Each
is written, converted or skipped with a reason; a crash, a hang (> 10 s) or an exception is a
finding. Everything accepted is then sharded and decoded by the loader's three paths (DALI's
region decode for training, its whole-image decode for the pixel cache, the eval path).

Files: Hypothesis draws mutations (structure-aware, and raw bytes) of index.json, samples.npy,
a shard tar's headers, config.json, checkpoint.pt, a suite TOML, results.csv and sweep.json;
each lands in an otherwise valid shard set, run folder or sweep folder and the commands that
read it run (click's runner, in a worker process that a crash or a hang only restarts). Each
must exit 0 or refuse with one `Error:` line (exit 1 or 2; verify and predict print their own
verdict), with no traceback and nothing written unless it succeeded. A finding is shrunk by
Hypothesis and saved as a regression input.

Results: one JSON (--out, default docs/fuzz/campaign.json), a section per part.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import pickle
import platform
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
DEFAULT_OUT = ROOT / "docs" / "fuzz" / "campaign.json"
FINDINGS = Path("/tmp/fuzz_findings.md")


def _conftest():
    """tests/conftest.py, for bad_inputs() and fake_sweep(): one source of test inputs."""
    spec = importlib.util.spec_from_file_location("dptrain_tests_conftest",
                                                  ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    """Where and when a campaign ran."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dptrain"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores", "python":
            platform.python_version(), "date": datetime.now(timezone.utc).isoformat(
                timespec="seconds"), "commit": commit + (" (dptrain/ modified)" if dirty else "")}


def normalise(reason: str) -> str:
    """A skip reason or an error with its numbers and paths taken out, to count by kind."""
    reason = re.sub(r"/[^\s:,()']+", "PATH", reason)
    return re.sub(r"\d+", "N", reason)[:160]


def save_results(out: Path, part: str, section: dict) -> None:
    """Write one part's section into the campaign's JSON, keeping the other parts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc[part] = section
    out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def note_finding(text: str) -> None:
    with open(FINDINGS, "a") as f:
        f.write(text.rstrip() + "\n\n")


# ---------------------------------------------------------------------------------------------
# Images: the seed corpus, the libFuzzer target, the decode check.

def seed_images() -> tuple[dict[str, bytes], list[str]]:
    """Real images of every kind `dptrain shard` meets, made here with PIL: (name -> bytes,
    notes on kinds PIL cannot write)."""
    import numpy as np
    from PIL import Image

    from dptrain.data import imagenet_like

    tex = imagenet_like.texture(0)
    base = Image.open(io.BytesIO(imagenet_like.jpeg(tex, 0, 1, 2, width=48, height=32)))
    base.load()
    rgb = base.convert("RGB")

    def enc(im, fmt="JPEG", **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    seeds: dict[str, bytes] = {}
    for prog in (False, True):
        kind = "progressive" if prog else "baseline"
        for name, sub in (("444", 0), ("422", 1), ("420", 2)):
            seeds[f"{kind}-{name}.jpg"] = enc(rgb, subsampling=sub, progressive=prog, quality=85)
        seeds[f"{kind}-grey.jpg"] = enc(rgb.convert("L"), progressive=prog)
        seeds[f"{kind}-cmyk.jpg"] = enc(rgb.convert("CMYK"), progressive=prog)
        seeds[f"{kind}-optimized-q10.jpg"] = enc(rgb, progressive=prog, optimize=True, quality=10)
    seeds["baseline-q100.jpg"] = enc(rgb, quality=100, subsampling=0)
    seeds["restart-markers.jpg"] = enc(rgb, restart_marker_blocks=2)
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        seeds[f"exif-orientation-{orientation}.jpg"] = enc(rgb, exif=exif.tobytes())
    seeds["tall-odd-size.jpg"] = enc(rgb.resize((17, 61)))
    seeds["rgb.png"] = enc(rgb, "PNG")
    seeds["rgba.png"] = enc(rgb.convert("RGBA"), "PNG")
    seeds["palette.png"] = enc(rgb.convert("P"), "PNG")
    seeds["grey16.png"] = enc(Image.fromarray(
        (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)), "PNG")
    seeds["lossy.webp"] = enc(rgb, "WEBP", quality=70)
    seeds["lossless.webp"] = enc(rgb, "WEBP", lossless=True)
    seeds["alpha.webp"] = enc(rgb.convert("RGBA"), "WEBP")
    seeds["rgb.bmp"] = enc(rgb, "BMP")
    seeds["rgb.gif"] = enc(rgb, "GIF")
    seeds["rgb.tiff"] = enc(rgb, "TIFF")
    good = seeds["baseline-420.jpg"]
    seeds["truncated-half.jpg"] = good[: len(good) // 2]
    seeds["truncated-no-eoi.jpg"] = good[:-2]
    seeds["truncated-headers.jpg"] = good[:200]
    seeds["trailing-garbage.jpg"] = good + b"\x00garbage" * 8
    eoi = good.rfind(b"\xff\xd9")
    seeds["bytes-before-eoi.jpg"] = good[:eoi] + b"\x12\x34" + good[eoi:]
    for name, (data, _fate) in _conftest().bad_inputs().items():
        seeds[f"bad_inputs-{name}"] = data
    notes = ["4:1:1 subsampling: PIL's JPEG encoder cannot write it (it falls back to 4:2:0)"]
    return seeds, notes


JPEG_DICT = [b"\xff\xd8", b"\xff\xd9", b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3",
             b"\xff\xc4", b"\xff\xc9", b"\xff\xcc", b"\xff\xda", b"\xff\xdb", b"\xff\xdd",
             b"\xff\xe0", b"\xff\xe1", b"\xff\xe2", b"\xff\xee", b"\xff\xfe", b"\xff\x00",
             b"\xff\xff", b"\xff\xd0", b"Exif\x00\x00", b"MM\x00\x2a", b"II\x2a\x00",
             b"\x01\x12", b"JFIF\x00", b"Adobe", b"ICC_PROFILE\x00", b"\x89PNG\r\n\x1a\n",
             b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tRNS", b"RIFF", b"WEBP", b"VP8 ",
             b"VP8L", b"VP8X", b"ALPH", b"GIF89a", b"BM", b"\x00\x00\xff\xff", b"\x7f\xff"]


def _dict_file(path: Path) -> Path:
    path.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n'
                            for token in JPEG_DICT))
    return path


def image_case(data: bytes, scratch: Path) -> dict:
    """What `dptrain shard` does to one input file (shards.write_class: store_image, the tar
    writer, the class's manifest), and its fate: written (copied), converted, skipped with a
    reason, or a traceback (anything the writer lets through, which would stop shard)."""
    from dptrain.data.shards import ShardOptions, write_class
    from dptrain.data.sources import Item

    t0 = time.perf_counter()
    try:
        m = write_class(scratch, 0, [Item("case.jpg", data=bytes(data))], ShardOptions())
        if m["skipped"]:
            fate = {"outcome": "skipped", "reason": m["skipped"][0][1]}
        elif m["converted"]:
            fate = {"outcome": "converted", "reason": m["converted"][0][1]}
        else:
            fate = {"outcome": "written"}
    except Exception as e:
        fate = {"outcome": "traceback", "reason": f"{type(e).__name__}: {e}"[:300],
                "traceback": traceback.format_exc()[-3000:]}
    finally:
        for p in scratch.iterdir():
            p.unlink()
    fate["ms"] = round(1e3 * (time.perf_counter() - t0), 2)
    return fate


def atheris_child(args) -> None:
    """libFuzzer's loop in this process (it exits when done or at a crash, a hang or an
    out-of-memory): every input's fate appended to --log, accepted inputs kept in --accepted."""
    import atheris

    with atheris.instrument_imports(include=["PIL", "dptrain"]):
        import PIL.Image  # noqa: F401
        import PIL.JpegImagePlugin  # noqa: F401
        import PIL.PngImagePlugin  # noqa: F401
        import PIL.WebPImagePlugin  # noqa: F401

        import dptrain.data.images  # noqa: F401
        import dptrain.data.shards  # noqa: F401
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-scratch-", dir="/dev/shm"))
    log = open(args.log, "a", buffering=1)
    accepted = Path(args.accepted)
    accepted.mkdir(parents=True, exist_ok=True)

    def one(data: bytes) -> None:
        sha = hashlib.sha1(data).hexdigest()
        fate = image_case(data, scratch)
        fate["sha1"], fate["bytes"] = sha, len(data)
        log.write(json.dumps(fate) + "\n")
        if fate["outcome"] in ("written", "converted"):
            (accepted / f"{sha}.jpg").write_bytes(data)
        elif fate["outcome"] == "traceback":
            (Path(args.artifacts) / f"traceback-{sha}").write_bytes(data)

    argv = [sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}", "-timeout=10",
            "-rss_limit_mb=6144", "-max_len=65536", f"-dict={args.dict}",
            f"-artifact_prefix={args.artifacts}/", "-print_final_stats=1",
            *([args.minimize, "-minimize_crash=1", f"-exact_artifact_path={args.minimized}",
               "-max_total_time=120"] if args.minimize else [args.corpus, args.seeds])]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def run_image_fuzzer(work: Path, cases: int, seed: int, workers: int) -> dict:
    """libFuzzer children, restarted after each crash, hang or out-of-memory until `cases`
    inputs have run; returns the fates, the findings and where the accepted inputs are."""
    seeds, notes = seed_images()
    seed_dir = work / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (seed_dir / name).write_bytes(data)
    artifacts, accepted = work / "artifacts", work / "accepted"
    artifacts.mkdir(exist_ok=True)
    dict_path = _dict_file(work / "jpeg.dict")
    findings, started = [], time.time()
    share = [cases // workers + (i < cases % workers) for i in range(workers)]
    jobs = []
    for w in range(workers):
        corpus = work / f"corpus-{w}"
        corpus.mkdir(exist_ok=True)
        jobs.append({"w": w, "log": work / f"log-{w}.jsonl", "target": share[w],
                     "corpus": corpus, "restarts": 0, "proc": None})

    def logged(job) -> int:
        return sum(1 for _ in open(job["log"])) if job["log"].is_file() else 0

    def start(job) -> None:
        left = job["target"] - logged(job)
        job["before"] = set(os.listdir(artifacts))
        job["stderr"] = open(work / f"stderr-{job['w']}-{job['restarts']}.txt", "w")
        job["proc"] = subprocess.Popen(
            [sys.executable, __file__, "_atheris", "--runs", str(left),
             "--seed", str(seed * 1000 + job["w"] * 100 + job["restarts"]),
             "--log", str(job["log"]), "--accepted", str(accepted), "--artifacts",
             str(artifacts), "--dict", str(dict_path), "--corpus", str(job["corpus"]),
             "--seeds", str(seed_dir)],
            stdout=job["stderr"], stderr=subprocess.STDOUT, cwd=work,
            preexec_fn=lambda: os.nice(10))

    for job in jobs:
        if job["target"]:
            start(job)
    while any(j["proc"] is not None for j in jobs):
        time.sleep(0.5)
        for job in jobs:
            p = job["proc"]
            if p is None or p.poll() is None:
                continue
            job["stderr"].close()
            new = sorted(set(os.listdir(artifacts)) - job["before"])
            crashes = [a for a in new if not a.startswith("traceback-")]
            for a in crashes:
                kind = a.split("-", 1)[0]  # crash-, timeout-, oom-, leak-, slow-unit-
                findings.append({"kind": {"timeout": "hang"}.get(kind, kind), "artifact": a,
                                 "exit": p.returncode, "worker": job["w"]})
            if p.returncode != 0 and not crashes:
                tail = (work / f"stderr-{job['w']}-{job['restarts']}.txt").read_text()[-2000:]
                findings.append({"kind": "died", "exit": p.returncode, "worker": job["w"],
                                 "output": tail})
            job["proc"] = None
            if logged(job) < job["target"] and job["restarts"] < 50:
                if p.returncode == 0 and not crashes:  # libFuzzer ran its -runs: a count off
                    continue
                job["restarts"] += 1
                start(job)
    fates = []
    for job in jobs:
        if job["log"].is_file():
            fates += [json.loads(line) for line in open(job["log"]) if line.strip()]
    return {"fates": fates[:cases], "findings": findings,
            "accepted": accepted, "notes": notes, "seeds": sorted(seeds),
            "fuzz_s": round(time.time() - started, 1), "artifacts": artifacts}


def decode_samples(shard_set: Path, path: str, positions=None) -> dict:
    """Decode every sample (or `positions`) of a shard set through one loader path: "train"
    (DALI's region decode, --pixel-cache off), "cache" (its whole-image decode filling a pixel
    cache) or "eval"; a failing batch is bisected down to its samples."""
    import numpy as np
    import torch

    from dptrain.data.index import ShardIndex
    from dptrain.data.subset import select
    from dptrain.loading import pixelcache
    from dptrain.loading.loader import Loader

    subset = select(ShardIndex.load(shard_set))
    positions = np.arange(len(subset)) if positions is None else positions

    def run(pos: np.ndarray) -> None:
        part = subset.take(pos)
        cache = None
        if path == "cache":
            cache, _ = pixelcache.prepare(part, mode="host", side=64, seed=0, rank=0, world=1,
                                          device=torch.device("cpu"), threads=1)
            assert cache is not None
        loader = Loader(part, batch_size=min(32, len(pos)), train=path != "eval", res=32,
                        device="cpu", drop_last=False, threads=1, source=cache)
        try:
            for _images, _labels in loader:
                pass
        finally:
            loader.close()

    failed = []

    def bisect(pos: np.ndarray) -> None:
        try:
            run(pos)
        except Exception as e:
            if len(pos) == 1:
                row = subset.index.samples[subset.rows[pos[0]]]
                tar = subset.index.tar_paths[row["tar"]]
                with open(tar, "rb") as f:
                    f.seek(int(row["offset"]) - 512)
                    key = f.read(100).split(b"\0")[0].decode(errors="replace")
                failed.append({"position": int(pos[0]), "key": key,
                               "error": f"{type(e).__name__}: {e}"[:400]})
                return
            half = len(pos) // 2
            bisect(pos[:half])
            bisect(pos[half:])

    bisect(positions)
    return {"samples": int(len(positions)), "failed": failed}


def _decode_child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    positions = np.load(args.positions) if args.positions else None
    Path(args.result).write_text(json.dumps(decode_samples(Path(args.set), args.path,
                                                           positions)))


def shard(src: Path, out: Path, *args: str) -> None:
    """`dptrain shard SRC OUT` in a process of its own: its writer forks worker processes,
    which a process running DALI's or torch's threads (a test's) must not do."""
    subprocess.run([sys.executable, "-m", "dptrain", "shard", str(src), str(out), "--workers",
                    "1", "--no-progress", *args], check=True, capture_output=True)


def decode_all(work: Path, accepted: Path, in_process: bool = False) -> dict:
    """Shard every accepted input again (`dptrain shard`), check it is accepted again, and
    decode the set through the loader's three paths, each in a child process (a crash there is
    counted; its half is retried to find the sample), or here with `in_process`."""
    from dptrain.data.index import ShardIndex

    files = sorted(accepted.glob("*.jpg"))
    src = work / "decode-src"
    shutil.rmtree(src, ignore_errors=True)
    per_class = 250
    for i, f in enumerate(files):
        d = src / f"class_{i // per_class:03d}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(f, d / f.name)
    out = work / "decode-set"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    shard(src, out)
    index = ShardIndex.load(out)
    refused_again = [{"input": s["input"], "reason": s["reason"]} for s in index.meta["skipped"]]
    result = {"inputs": len(files), "sharded": index.meta["num_samples"],
              "refused_when_sharded_again": refused_again, "shard_s": round(time.time() - t0, 1)}
    for path in ("train", "cache", "eval"):
        t0 = time.time()
        result[path] = {**decode_samples(out, path), "crashes": [], "tracebacks": []} \
            if in_process else _decode_path(work, out, path, None)
        result[path]["seconds"] = round(time.time() - t0, 1)
    return result


def _decode_path(work: Path, shard_set: Path, path: str, positions) -> dict:
    import numpy as np

    res_file = work / f"decode-{path}.json"
    cmd = [sys.executable, __file__, "_decode", str(shard_set), path, "--result", str(res_file)]
    if positions is not None:
        pos_file = work / f"decode-{path}-positions.npy"
        np.save(pos_file, positions)
        cmd += ["--positions", str(pos_file)]
    res_file.unlink(missing_ok=True)
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: os.nice(10))
    if p.returncode == 0:
        return {**json.loads(res_file.read_text()), "crashes": [], "tracebacks": []}
    if p.returncode > 0:  # an exception outside the decode (a harness bug, or a refusal)
        return {"samples": 0, "failed": [], "crashes": [], "tracebacks": [p.stderr[-3000:]]}
    # killed by a signal: find the sample in halves, each in a process of its own
    from dptrain.data.index import ShardIndex
    from dptrain.data.subset import select

    if positions is None:
        positions = np.arange(len(select(ShardIndex.load(shard_set))))
    if len(positions) == 1:
        return {"samples": 1, "failed": [], "tracebacks": [],
                "crashes": [{"position": int(positions[0]), "signal": -p.returncode,
                             "output": p.stderr[-1500:]}]}
    half = len(positions) // 2
    a = _decode_path(work, shard_set, path, positions[:half])
    b = _decode_path(work, shard_set, path, positions[half:])
    return {k: a[k] + b[k] for k in ("samples", "failed", "crashes", "tracebacks")}


def images_campaign(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="dptrain-fuzz-images-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fuzz = run_image_fuzzer(work, args.cases, args.seed, args.workers)
    fates = fuzz["fates"]
    outcomes = Counter(f["outcome"] for f in fates)
    reasons = {o: dict(Counter(normalise(f["reason"]) for f in fates if f["outcome"] == o)
                       .most_common()) for o in ("skipped", "converted", "traceback")}
    tracebacks = [f for f in fates if f["outcome"] == "traceback"]
    decode = decode_all(work, fuzz["accepted"]) if not args.no_decode else None
    findings = fuzz["findings"]
    for f in findings:
        if f["kind"] in ("crash", "hang", "oom"):
            f["minimized"] = minimize_image(work, fuzz["artifacts"] / f["artifact"])
    slowest = max(fates, key=lambda f: f["ms"], default=None)
    section = {
        **machine(), "seconds": round(time.time() - t0, 1), "fuzz_seconds": fuzz["fuzz_s"],
        "workers": args.workers, "seed": args.seed, "cases": len(fates),
        "seed_corpus": fuzz["seeds"], "seed_notes": fuzz["notes"],
        "counts": {"written": outcomes["written"], "converted": outcomes["converted"],
                   "skipped": outcomes["skipped"], "tracebacks": outcomes["traceback"],
                   "crashes": sum(f["kind"] in ("crash", "oom", "died") for f in findings),
                   "hangs": sum(f["kind"] == "hang" for f in findings)},
        "skipped_by_reason": reasons["skipped"], "converted_by_reason": reasons["converted"],
        "tracebacks": [{k: f[k] for k in ("reason", "sha1")} for f in tracebacks[:20]],
        "slowest_case_ms": slowest and slowest["ms"],
        "unique_accepted_inputs": len(list(fuzz["accepted"].glob("*.jpg"))),
        "findings": findings, "decode": decode, "work": str(work)}
    if decode:
        section["counts"]["decode_failures"] = {
            p: len(decode[p]["failed"]) + len(decode[p]["crashes"]) + len(decode[p]["tracebacks"])
            for p in ("train", "cache", "eval")}
    for f in findings:
        note_finding(f"images: {f['kind']} in the shard path: {f}")
    for p in ("train", "cache", "eval"):
        for fail in (decode or {}).get(p, {}).get("failed", []) + \
                (decode or {}).get(p, {}).get("crashes", []):
            note_finding(f"images: the loader's {p} path could not decode an accepted input: "
                         f"{fail} (input: {fuzz['accepted']}/{fail.get('key', '?')[6:]}.jpg)")
    return section


def minimize_image(work: Path, artifact: Path) -> str | None:
    """libFuzzer's -minimize_crash on a crash, hang or out-of-memory input."""
    out = work / f"minimized-{artifact.name}"
    subprocess.run([sys.executable, __file__, "_atheris", "--minimize", str(artifact),
                    "--minimized", str(out), "--runs", "5000", "--log", str(work / "min.jsonl"),
                    "--accepted", str(work / "min-accepted"), "--artifacts",
                    str(work / "min-artifacts"), "--dict", str(_dict_file(work / "jpeg.dict"))],
                   capture_output=True, cwd=work)
    return str(out) if out.is_file() else None


# ---------------------------------------------------------------------------------------------
# Structured files: the fixtures, the mutations (Hypothesis), the worker that runs commands.

PRETRAIN = ["--arch", "smallcnn", "--res", "32", "--batch-size", "4", "--device", "cpu",
            "--epochs", "1", "--no-progress", "--workers", "1", "--pixel-cache", "off",
            "--classes", "3", "--per-class", "4", "--log-every", "1"]
PROBE = ["--repeats", "1", "--no-progress", "--workers", "1", "--device", "cpu"]

# predict with limits given (every fit made), and with the limits of the sweep's shard set
# (sweep.json's "data": 3 classes of 4 images, so its fits fail: exit 1, its own verdict)
PREDICT = [["predict", "sweep", "--size", "16000", "--bootstrap", "0", "--max-classes", "1000",
            "--max-per-class", "1000", "--suggest"],
           ["predict", "sweep", "--size", "4000", "--bootstrap", "0"]]
# kind -> (the file, relative to the case folder, and the commands that read it)
KINDS = {
    "index.json": ("sets/train/index.json", [["info", "sets/train"], ["verify", "sets/train"]]),
    "samples.npy": ("sets/train/samples.npy",
                    [["info", "sets/train"], ["verify", "sets/train"]]),
    "tar headers": ("sets/train/00000-000.tar", [["verify", "sets/train"]]),
    "config.json": ("run/config.json",
                    [["pretrain", "--data", "sets/train", *PRETRAIN, "--out", "run"],
                     ["probe", "run", "--suite", "suite.toml", *PROBE]]),
    "checkpoint.pt": ("run/checkpoint.pt",
                      [["pretrain", "--data", "sets/train", *PRETRAIN, "--out", "run"],
                       ["probe", "run", "--suite", "suite.toml", *PROBE]]),
    "suite TOML": ("suite.toml", [["probe", "run", "--suite", "suite.toml", *PROBE]]),
    "results.csv": ("sweep/results.csv", [["report", "sweep"], PREDICT[0]]),
    "sweep.json": ("sweep/sweep.json", [["report", "sweep"], *PREDICT]),
}
# Commands whose failure is a verdict of their own (several lines, exit 1), not one Error line.
VERDICTS = {"verify": 1, "predict": 1}


def build_fixtures(root: Path) -> Path:
    """A valid shard set (3 classes x 4 images) and its test split, a run pre-trained on it
    with its checkpoint at the last step (no summary yet: `pretrain` resumes it, `probe`
    probes it), a suite TOML, and a made-up sweep folder (conftest.fake_sweep)."""
    from dptrain.data import imagenet_like

    root.mkdir(parents=True, exist_ok=True)
    tex = imagenet_like.texture(0)
    for split, n in (("train", 4), ("test", 3)):
        for c in range(3):
            d = root / "src" / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"img_{c}_{i}.JPEG").write_bytes(imagenet_like.jpeg(
                    tex, 0 if split == "train" else 1, c, i, width=40, height=32))
    shard(root / "src/train", root / "sets/train")
    shard(root / "src/test", root / "sets/test", "--classes-from", str(root / "sets/train"))
    shutil.rmtree(root / "src")
    (root / "suite.toml").write_text('[[dataset]]\nname = "t"\ndata = "sets/train"\n'
                                     'test_data = "sets/test"\n')
    subprocess.run([sys.executable, "-m", "dptrain", "pretrain", "--data", "sets/train",
                    *PRETRAIN, "--out", "run"], cwd=root, check=True, capture_output=True)
    (root / "run" / "summary.json").unlink()  # a run killed after its last checkpoint
    _conftest().fake_sweep(root / "sweep", sets=("a",))
    spec = json.loads((root / "sweep/sweep.json").read_text())
    spec["data"] = str(root / "sets/train")
    (root / "sweep/sweep.json").write_text(json.dumps(spec, indent=1))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def run_commands(case_dir: Path, commands: list[list[str]]) -> list[dict]:
    """Each command in `case_dir` through click's runner, as `dptrain` runs it: its exit
    status, its stderr's last lines, whether it raised, and whether it wrote anything."""
    from click.testing import CliRunner

    from dptrain.cli import main

    results = []
    for cmd in commands:
        before = tree_bytes(case_dir)
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, cmd)
        seconds = time.perf_counter() - t0
        after = tree_bytes(case_dir)
        changed = sorted(k for k in before.keys() | after.keys()
                         if before.get(k) != after.get(k))
        exc = r.exception if r.exception is not None and \
            not isinstance(r.exception, SystemExit) else None
        results.append({"command": cmd[0], "exit": r.exit_code, "stderr": r.stderr[-2000:],
                        "stdout": r.stdout[-500:], "changed": changed, "s": round(seconds, 3),
                        "traceback": "".join(traceback.format_exception(exc))[-4000:]
                        if exc else None})
    return results


def judge(result: dict) -> str:
    """A command's outcome: ok, refused (exit 1 or 2, one Error line and no traceback,
    nothing written), or a finding: traceback, wrote_on_refusal, bad_error, other_exit."""
    if result["traceback"]:
        return "traceback"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    if "Traceback" in result["stderr"]:
        return "traceback"
    if result["exit"] == 0:
        return "ok"
    if result["exit"] not in (1, 2):
        return "other_exit"
    if result["changed"]:
        return "wrote_on_refusal"
    errors = [line for line in lines if line.startswith("Error:")]
    if VERDICTS.get(result["command"]) == result["exit"] and not errors:
        return "refused"  # verify's DAMAGED lines; predict's failed fits
    if len(errors) == 1 and lines[-1] == errors[0]:
        return "refused"
    return "bad_error"


def worker_main(args) -> None:
    """A long-lived worker: reads cases (pickled, length-prefixed) from fd --inp, runs each
    in a fresh copy of the fixtures, answers on fd --outp."""
    import torch

    torch.set_num_threads(1)
    fixtures = Path(args.fixtures)
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-case-", dir="/dev/shm"))
    os.environ["XDG_CACHE_HOME"] = str(scratch / "xdg")
    inp, outp = os.fdopen(args.inp, "rb"), os.fdopen(args.outp, "wb")
    import dptrain.cli  # noqa: F401  (the imports a case would pay for, paid once)
    import dptrain.probing.probe  # noqa: F401
    import dptrain.study.report  # noqa: F401
    import dptrain.training.train  # noqa: F401
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        kind, files = pickle.loads(inp.read(struct.unpack(">I", head)[0]))
        case_dir = scratch / "case"
        shutil.rmtree(case_dir, ignore_errors=True)
        shutil.copytree(fixtures, case_dir, symlinks=True)
        for rel, data in files.items():
            (case_dir / rel).write_bytes(data)
        spec = json.loads((case_dir / "sweep/sweep.json").read_text()) \
            if kind != "sweep.json" else None
        if spec is not None:  # the fixture's sweep names its shard set: this case's copy
            spec["data"] = str(case_dir / "sets/train")
            (case_dir / "sweep/sweep.json").write_text(json.dumps(spec, indent=1))
        os.chdir(case_dir)
        results = run_commands(case_dir, KINDS[kind][1])
        os.chdir(scratch)
        answer = pickle.dumps(results)
        outp.write(struct.pack(">I", len(answer)) + answer)
        outp.flush()


class Worker:
    """A worker process and its pipes; `run` answers a case's command results, or a crash or
    a hang (the worker is then started again)."""

    def __init__(self, fixtures: Path, log: Path):
        self.fixtures, self.log, self.proc = fixtures, log, None

    def _start(self) -> None:
        req_r, self.req_w = os.pipe()
        self.ans_r, ans_w = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_worker", str(self.fixtures), "--inp", str(req_r),
             "--outp", str(ans_w)], pass_fds=(req_r, ans_w), env=env,
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.nice(10))
        os.close(req_r)
        os.close(ans_w)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            os.close(self.req_w)
            os.close(self.ans_r)
            self.proc = None

    def _read(self, n: int, deadline: float) -> bytes | None:
        data = b""
        while len(data) < n:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.ans_r], [], [], left)[0]:
                return None
            chunk = os.read(self.ans_r, n - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    def run(self, kind: str, files: dict[str, bytes], timeout: float) -> dict:
        if self.proc is None:
            self._start()
        msg = pickle.dumps((kind, files))
        try:
            os.write(self.req_w, struct.pack(">I", len(msg)) + msg)
        except BrokenPipeError:
            pass
        deadline = time.time() + timeout
        head = self._read(4, deadline)
        body = self._read(struct.unpack(">I", head)[0], deadline) if head else head
        if head and body:
            return {"results": pickle.loads(body)}
        if head is None or body is None:
            self.stop()
            return {"outcome": "hang"}
        code = self.proc.wait()
        self.stop()
        return {"outcome": "crash", "exit": code}


def classify(answer: dict, baseline: list[int] | None = None) -> tuple[str, list[str]]:
    """A case's outcome (the worst of its commands') and each command's; with the exit
    statuses of the unmutated fixtures (`baseline`), a command that ended as it does there
    (predict's exit-1 verdict on a set too small for its fits) is ok."""
    if "outcome" in answer:
        return answer["outcome"], [answer["outcome"]]
    each = [judge(r) for r in answer["results"]]
    if baseline:
        each = ["ok" if o == "refused" and r["exit"] == b else o
                for o, r, b in zip(each, answer["results"], baseline)]
    order = ["traceback", "wrote_on_refusal", "bad_error", "other_exit", "refused", "ok"]
    return min(each, key=order.index), each


# Mutations. Each kind's strategy draws a list of edits to its valid file; Hypothesis shrinks a
# finding to fewer, smaller edits.

def _strategies():
    from hypothesis import strategies as st

    pos = st.integers(0, 2**31)
    byte_op = st.one_of(
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("cut"), pos),
        st.tuples(st.just("copy"), pos, pos, st.integers(1, 64)))
    byte_ops = st.lists(byte_op, min_size=1, max_size=4)
    odd_text = st.sampled_from(["", ".", "..", "/", "nan", "inf", "-1", "0", "1e308", "sets",
                                "sets/train", "sets/test", "run", "suite.toml", "\x00", "é",
                                "a" * 300, "K4-n250-s0", "average"])
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                     st.floats(), st.text(max_size=12), odd_text)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3)
                         | st.dictionaries(st.text(max_size=8) | odd_text, c, max_size=3),
                         max_leaves=6)
    toml_leaf = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(),
                          st.text(max_size=12), odd_text)
    toml_value = st.recursive(toml_leaf, lambda c: st.lists(c, max_size=3)
                              | st.dictionaries(st.text(max_size=8) | odd_text, c, max_size=3),
                              max_leaves=6)

    def tree_ops(values):
        return st.lists(st.tuples(st.sampled_from(["replace", "delete", "add"]), pos, values,
                                  st.text(max_size=8) | odd_text), min_size=1, max_size=3)

    cell = st.one_of(odd_text, st.text(max_size=10), st.integers().map(str),
                     st.floats().map(repr), st.sampled_from(["NaN", "-inf", "1e-320", "9" * 40,
                                                             " 3", "3.5", "0x10", "1_000"]))
    csv_op = st.one_of(
        st.tuples(st.just("cell"), pos, pos, cell),
        st.tuples(st.just("delrow"), pos), st.tuples(st.just("duprow"), pos),
        st.tuples(st.just("delcol"), pos), st.tuples(st.just("header"), pos, cell))
    npy_field = st.tuples(st.just("field"), pos, st.sampled_from(
        ["label", "tar", "offset", "size", "height", "width"]),
        st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 70000),
                  st.sampled_from([0, -1, 511, 512, 2**31 - 1, 2**32])))
    npy_op = st.one_of(npy_field, st.tuples(st.just("delrow"), pos),
                       st.tuples(st.just("duprow"), pos),
                       st.tuples(st.just("dtype"), st.sampled_from(
                           ["<i8", "<i4", "<u2", "<f8", ">i4", "|u1"]), pos),
                       st.tuples(st.just("header"), pos, st.integers(0, 255)))
    tar_fields = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "size": (124, 12),
                  "mtime": (136, 12), "chksum": (148, 8), "type": (156, 1),
                  "linkname": (157, 100), "magic": (257, 6), "version": (263, 2),
                  "prefix": (345, 155)}
    tar_op = st.tuples(st.just("field"), pos, st.sampled_from(sorted(tar_fields)),
                       st.one_of(st.binary(max_size=12), st.integers(-9, 8**12).map(
                           lambda v: b"%011o\0" % v if v >= 0 else b"-%o" % -v),
                           st.sampled_from([b"", b"\0", b"5", b"2", b"x", b"L", b"K", b"g",
                                            b"../x.jpg", b"a.jpg", b"a.cls", b"7" * 12])),
                       st.booleans())
    tensor = st.builds(lambda shape, dtype: __import__("torch").zeros(shape, dtype=getattr(
        __import__("torch"), dtype)), st.lists(st.integers(0, 3), max_size=3),
        st.sampled_from(["float32", "int64", "uint8", "bool", "float16"]))
    ckpt_value = st.one_of(value, tensor)
    return {
        "bytes": byte_ops, "json": tree_ops(value), "toml": tree_ops(toml_value),
        "csv": st.lists(csv_op, min_size=1, max_size=4),
        "npy": st.lists(npy_op, min_size=1, max_size=3),
        "tar": st.lists(tar_op, min_size=1, max_size=3), "tar_fields": tar_fields,
        "ckpt": tree_ops(ckpt_value), "pkl": byte_ops}


def apply_bytes(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        n = max(1, len(b))
        at = op[1] % n
        if op[0] == "set" and b:
            b[at] = op[2]
        elif op[0] == "insert":
            b[at:at] = op[2]
        elif op[0] == "delete":
            del b[at:at + op[2]]
        elif op[0] == "cut":
            del b[at:]
        elif op[0] == "copy":
            src = op[2] % n
            b[at:at] = b[src:src + op[3]]
    return bytes(b)


def _paths(tree, here=()):
    yield here
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, here + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, here + (i,))


def apply_tree(tree, ops):
    """Replace, delete or add a value somewhere in a JSON-like tree."""
    import copy

    tree = copy.deepcopy(tree)
    for kind, at, value, key in ops:
        paths = list(_paths(tree))
        path = paths[at % len(paths)]
        if not path:
            if kind == "replace":
                tree = value
            continue
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        if kind == "replace":
            parent[path[-1]] = value
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[key] = value
        else:
            parent.insert(path[-1], value)
    return tree


def toml_dumps(doc) -> str:
    """TOML for a mutated tree: every value inline (a top level that is not a table is
    written as one key, which is itself a test of the reader)."""
    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v
                                                                     else repr(v))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        return '""'
    if not isinstance(doc, dict):
        doc = {"dataset": doc}
    return "".join(f"{json.dumps(k)} = {val(v)}\n" for k, v in doc.items())


def mutate(kind: str, fixtures: Path, data) -> dict[str, bytes]:
    """The files a case writes over its fixture copy, from a drawn mutation `data`
    (("bytes" | a structure-aware family, its edits))."""
    import numpy as np

    rel = KINDS[kind][0]
    original = (fixtures / rel).read_bytes()
    family, ops = data
    if family == "bytes":
        files = {rel: apply_bytes(original, ops)}
    elif family == "json":
        files = {rel: json.dumps(apply_tree(json.loads(original), ops), indent=1).encode()}
    elif family == "toml":
        import tomllib
        files = {rel: toml_dumps(apply_tree(tomllib.loads(original.decode()), ops)).encode()}
    elif family == "csv":
        rows = list(csv.reader(io.StringIO(original.decode())))
        for op in ops:
            if op[0] == "cell":
                r = rows[1 + op[1] % (len(rows) - 1)] if len(rows) > 1 else rows[0]
                if r:
                    r[op[2] % len(r)] = op[3]
            elif op[0] == "delrow" and len(rows) > 1:
                del rows[1 + op[1] % (len(rows) - 1)]
            elif op[0] == "duprow" and len(rows) > 1:
                rows.append(list(rows[1 + op[1] % (len(rows) - 1)]))
            elif op[0] == "delcol" and rows and rows[0]:
                c = op[1] % len(rows[0])
                rows = [r[:c] + r[c + 1:] for r in rows]
            elif op[0] == "header" and rows and rows[0]:
                rows[0][op[1] % len(rows[0])] = op[2]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        files = {rel: buf.getvalue().encode()}
    elif family == "npy":
        table = np.load(io.BytesIO(original))
        head = None
        for op in ops:
            if op[0] == "field" and len(table):
                f = table.dtype[op[2]]
                table[op[2]][op[1] % len(table)] = np.array(op[3]).astype(f)
            elif op[0] == "delrow" and len(table):
                table = np.delete(table, op[1] % len(table))
            elif op[0] == "duprow" and len(table):
                table = np.concatenate([table, table[op[1] % len(table):][:1]])
            elif op[0] == "dtype":
                names = table.dtype.names
                name = names[op[2] % len(names)]
                new = np.dtype([(n, op[1] if n == name else table.dtype[n]) for n in names])
                table = table.astype(new)
            elif op[0] == "header":
                head = op
        buf = io.BytesIO()
        np.save(buf, table)
        raw = buf.getvalue()
        if head is not None:  # a byte of the header's text
            at = 10 + head[1] % max(1, raw.find(b"\n") - 10)
            raw = raw[:at] + bytes([head[2]]) + raw[at + 1:]
        files = {rel: raw}
    elif family == "tar":
        b = bytearray(original)
        fields = _strategies_cache()["tar_fields"]
        headers = [o for o in range(0, len(b) - 1024, 512) if b[o + 257:o + 262] == b"ustar"]
        for _, at, name, value, fix in ops:
            h = headers[at % len(headers)]
            start, size = fields[name]
            piece = value[:size]
            b[h + start:h + start + size] = piece + bytes(size - len(piece))
            if fix and name != "chksum":
                b[h + 148:h + 156] = b" " * 8
                b[h + 148:h + 156] = b"%06o\0 " % sum(b[h:h + 512])
        files = {rel: bytes(b)}
    elif family == "ckpt":
        import torch
        ckpt = torch.load(io.BytesIO(original), weights_only=True)
        buf = io.BytesIO()
        torch.save(apply_tree(ckpt, ops), buf)
        files = {rel: buf.getvalue()}
    elif family == "pkl":  # the pickle inside the checkpoint's zip, rezipped whole
        zin = zipfile.ZipFile(io.BytesIO(original))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
            for item in zin.infolist():
                raw = zin.read(item)
                if item.filename.endswith("data.pkl"):
                    raw = apply_bytes(raw, ops)
                zout.writestr(item, raw)
        files = {rel: buf.getvalue()}
    else:
        raise ValueError(family)
    return _fix_hashes(kind, fixtures, files)


def _fix_hashes(kind: str, fixtures: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """A mutated samples.npy or tar with index.json's size and sha256 made to match, so that
    `verify` reads past its hash check into the table and the tar headers."""
    if kind not in ("samples.npy", "tar headers"):
        return files
    meta = json.loads((fixtures / "sets/train/index.json").read_text())
    rel, data = next(iter(files.items()))
    sha = hashlib.sha256(data).hexdigest()
    if kind == "samples.npy":
        meta["samples_sha256"] = sha
    else:
        tar = next(t for t in meta["tars"] if t["file"] == Path(rel).name)
        tar["sha256"], tar["bytes"] = sha, len(data)
    return {**files, "sets/train/index.json": json.dumps(meta, indent=1).encode()}


_CACHE: dict = {}


def _strategies_cache() -> dict:
    if not _CACHE:
        _CACHE.update(_strategies())
    return _CACHE


FAMILIES = {"index.json": ("json", "bytes"), "samples.npy": ("npy", "bytes"),
            "tar headers": ("tar", "bytes"), "config.json": ("json", "bytes"),
            "checkpoint.pt": ("ckpt", "pkl", "bytes"), "suite TOML": ("toml", "bytes"),
            "results.csv": ("csv", "bytes"), "sweep.json": ("json", "bytes")}


def kind_strategy(kind: str):
    from hypothesis import strategies as st

    s = _strategies_cache()
    return st.one_of(*[st.tuples(st.just(f), s[f]) for f in FAMILIES[kind]])


def fuzz_kind(kind: str, cases: int, seed: int, worker: Worker, fixtures: Path,
              timeout: float, found: dict, progress=None, shrink_s: float = 60) -> dict:
    """Run `cases` Hypothesis-drawn mutations of one kind; a new kind of finding stops the
    draw, Hypothesis shrinks it (each shrink step a case in the worker too), and drawing
    goes on with the next seed. Returns the counts."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    counts = Counter()
    per_command = Counter()
    examples = []
    state = {"n": 0, "shrinking": False, "last": None}

    # the unmutated fixtures: what each command does with them (no usage error, no finding,
    # or the harness is wrong)
    answer = worker.run(kind, {}, timeout)
    if classify(answer)[0] not in ("ok", "refused") or 2 in [
            r["exit"] for r in answer.get("results", [])]:
        raise SystemExit(f"{kind}: the fixtures fail {KINDS[kind][1]}: {answer}")
    baseline = [r["exit"] for r in answer["results"]]

    def one(data) -> None:
        if state["shrinking"] and time.time() > state["shrink_until"]:
            return  # shrunk enough: every later step passes, which ends the shrink
        files = mutate(kind, fixtures, data)
        answer = worker.run(kind, files, timeout)
        outcome, each = classify(answer, baseline)
        if state["shrinking"]:
            if outcome == state["want"][0] and _signature(answer) == state["want"][1]:
                state["last"] = (files, answer, data)
                _finding(outcome)
            return
        state["n"] += 1
        counts[outcome] += 1
        for r, o in zip(answer.get("results", []), each):
            per_command[f"{r['command']}: {o}" + (f" (exit {r['exit']})" if o == "refused"
                                                  else "")] += 1
        if progress:
            progress(kind, state["n"], outcome)
        if outcome in ("refused", "ok"):
            if len(examples) < 3 and outcome == "refused":
                err = [r["stderr"].strip().splitlines()[-1:] for r in answer["results"]
                       if r["exit"]]
                examples.append(err[0][0][:200] if err and err[0] else "")
            return
        sig = _signature(answer)
        found.setdefault((kind, outcome, sig), {"count": 0})
        found[(kind, outcome, sig)]["count"] += 1
        if found[(kind, outcome, sig)]["count"] == 1 and outcome == "hang":
            # every shrink step of a hang would wait out the timeout: kept as drawn
            found[(kind, outcome, sig)].update(minimal=files, answer=answer, drawn=repr(data))
        elif found[(kind, outcome, sig)]["count"] == 1:
            state.update(shrinking=True, want=(outcome, sig), last=(files, answer, data),
                         shrink_until=time.time() + shrink_s)
            _finding(outcome)

    round_ = 0
    while state["n"] < cases and round_ < 50:
        before = state["n"]
        state["shrinking"] = False

        @settings(max_examples=cases - state["n"], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=False,
                  phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False,
                  print_blob=False)
        @hseed(seed * 7919 + round_)
        @given(kind_strategy(kind))
        def test(data):
            if state["n"] < cases or state["shrinking"]:
                one(data)

        try:
            test()
        except Exception:
            if state["shrinking"]:  # the finding, shrunk (or flaky once the shrink was cut)
                files, answer, data = state["last"]
                key = (kind, state["want"][0], state["want"][1])
                found[key].update(minimal=files, answer=answer, drawn=repr(data)[:2000])
                round_ += 1
                continue
            counts["harness_error"] += 1  # the harness itself: stop this kind, say so
            found[(kind, "harness_error", traceback.format_exc()[-300:])] = {
                "count": 1, "answer": {"harness": traceback.format_exc()[-3000:]}}
            break
        round_ += 1
        if state["n"] == before:
            break
    return {"cases": state["n"], "outcomes": dict(counts), "per_command": dict(per_command),
            "refusal_examples": examples}


def _finding(outcome: str) -> None:
    """One place that fails the drawn case: Hypothesis tells bugs apart by where they are
    raised."""
    raise AssertionError(outcome)


def _signature(answer: dict) -> str:
    """What makes two findings the same bug: the command, and the exception's type and where
    it was raised (or the crash's exit status)."""
    if "outcome" in answer:
        return f"{answer['outcome']} {answer.get('exit', '')}"
    for r in answer["results"]:
        tb = r["traceback"] or (r["stderr"] if "Traceback" in r["stderr"] else "")
        if tb:
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
            last = next((f for f in reversed(frames) if "/dptrain/" in f[0]), frames[-1]
                        if frames else ("?", "?", "?"))
            err = tb.strip().splitlines()[-1].split(":")[0]
            return f"{r['command']}: {err} at {Path(last[0]).name}:{last[2]}"
        if judge(r) not in ("ok", "refused"):
            return f"{r['command']}: {judge(r)} exit {r['exit']} {r['changed'][:3]}"
    return "?"


def save_regression(kind: str, outcome: str, files: dict[str, bytes], note: str) -> Path:
    """A shrunk finding as tests/fuzz_regressions/<kind>/<hash>/ with the files it writes
    over the fixtures and what it was."""
    digest = hashlib.sha1(pickle.dumps(sorted(files.items()))).hexdigest()[:10]
    d = REGRESSIONS / re.sub(r"\W+", "_", kind).strip("_") / f"{outcome}-{digest}"
    d.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (d / rel.replace("/", "__")).write_bytes(data)
    (d / "README").write_text(note.rstrip() + "\n")
    return d


# Seconds per case, measured (2-core AMD EPYC): how --workers splits the kinds between drivers.
COST = {"index.json": 0.05, "samples.npy": 0.05, "tar headers": 0.05, "config.json": 0.4,
        "checkpoint.pt": 0.6, "suite TOML": 0.15, "results.csv": 1.8, "sweep.json": 2.7}


def files_in_parallel(args, kinds: list[str]) -> dict:
    """--workers drivers, each a `files` campaign of its share of the kinds (by COST), merged."""
    work = Path(args.work or tempfile.mkdtemp(prefix="dptrain-fuzz-files-"))
    work.mkdir(parents=True, exist_ok=True)
    shares: list[list[str]] = [[] for _ in range(args.workers)]
    for kind in sorted(kinds, key=lambda k: -COST[k] * cases_of(args, k)):
        min(shares, key=lambda s: sum(COST[k] * cases_of(args, k) for k in s)).append(kind)
    t0, procs = time.time(), []
    for i, share in enumerate(filter(None, shares)):
        cmd = [sys.executable, __file__, "files", "--cases", str(args.cases), "--seed",
               str(args.seed), *(["--cases-of", args.cases_of] if args.cases_of else []),
               "--kinds", ",".join(share), "--timeout", str(args.timeout),
               "--work", str(work / f"driver-{i}"), "--out", str(work / f"part-{i}.json")]
        procs.append((subprocess.Popen(cmd + ["--save-regressions"] * args.save_regressions,
                                       stdout=open(work / f"driver-{i}.log", "w"),
                                       stderr=subprocess.STDOUT), work / f"part-{i}.json"))
    parts = []
    for p, out in procs:
        p.wait()
        parts.append(json.loads(out.read_text())["files"])
    total = Counter()
    for part in parts:
        total.update(part["outcomes"])
    return {**machine(), "seconds": round(time.time() - t0, 1), "seed": args.seed,
            "workers": args.workers,
            "cases_per_kind": {k: cases_of(args, k) for k in kinds}, "timeout_s": args.timeout,
            "outcomes": dict(total),
            "per_kind": {k: v for part in parts for k, v in part["per_kind"].items()},
            "findings": [f for part in parts for f in part["findings"]]}


def cases_of(args, kind: str) -> int:
    """--cases, or this kind's own count from --cases-of KIND=N,..."""
    given = dict(item.rsplit("=", 1) for item in args.cases_of.split(",")) \
        if args.cases_of else {}
    return int(given.get(kind, args.cases))


def files_campaign(args) -> dict:
    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    if args.workers > 1:
        return files_in_parallel(args, kinds)
    work = Path(args.work or tempfile.mkdtemp(prefix="dptrain-fuzz-files-"))
    shutil.rmtree(work / "fixtures", ignore_errors=True)
    t0 = time.time()
    fixtures = build_fixtures(work / "fixtures")
    fixture_s = time.time() - t0
    found: dict = {}
    per_kind = {}
    worker = Worker(fixtures, work / "worker.log")
    last = [time.time()]

    def progress(kind, n, outcome):
        if time.time() - last[0] > 30:
            last[0] = time.time()
            print(f"{time.strftime('%H:%M:%S')} {kind}: {n} cases", flush=True)

    try:
        for kind in kinds:
            k0 = time.time()
            per_kind[kind] = fuzz_kind(kind, cases_of(args, kind), args.seed, worker, fixtures,
                                       args.timeout, found, progress)
            per_kind[kind]["seconds"] = round(time.time() - k0, 1)
            print(f"{kind}: {per_kind[kind]}", flush=True)
    finally:
        worker.stop()
    findings = []
    for (kind, outcome, sig), f in found.items():
        entry = {"kind": kind, "outcome": outcome, "signature": sig, "count": f["count"]}
        results = f.get("answer", {}).get("results", [])
        detail = next((r["traceback"] or r["stderr"] for r in results
                       if judge(r) not in ("ok", "refused")), json.dumps(f.get("answer"))[:3000])
        entry["detail"] = detail[-1500:]
        if "minimal" in f:
            entry["drawn"] = f["drawn"][:500]
        if "minimal" in f and args.save_regressions:
            entry["regression"] = str(save_regression(kind, outcome, f["minimal"], (
                f"{kind}: {outcome} ({sig}), shrunk by Hypothesis from: {f['drawn']}\n\n"
                f"{detail}")).relative_to(ROOT))
        findings.append(entry)
    total = Counter()
    for k in per_kind.values():
        total.update(k["outcomes"])
    return {**machine(), "seconds": round(time.time() - t0, 1),
            "fixtures_s": round(fixture_s, 1), "seed": args.seed, "workers": 1,
            "cases_per_kind": {k: cases_of(args, k) for k in kinds}, "timeout_s": args.timeout,
            "outcomes": dict(total), "per_kind": per_kind, "findings": findings}


# ---------------------------------------------------------------------------------------------
# Replaying the regression inputs (tests/test_fuzz.py)

def regression_cases(root: Path = REGRESSIONS) -> list[tuple[str, Path]]:
    """(kind, folder) of every saved structured-file regression input; images are files."""
    out = []
    for kind in KINDS:
        d = root / re.sub(r"\W+", "_", kind).strip("_")
        out += [(kind, p) for p in sorted(d.iterdir()) if p.is_dir()] if d.is_dir() else []
    return out


def regression_files(folder: Path) -> dict[str, bytes]:
    return {p.name.replace("__", "/"): p.read_bytes() for p in folder.iterdir()
            if p.name != "README"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("images", "files"):
        p = sub.add_parser(name)
        p.add_argument("--cases", type=int, default=10000 if name == "images" else 2000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=DEFAULT_OUT)
        p.add_argument("--work", help="scratch folder [a new one in $TMPDIR]")
        p.add_argument("--workers", type=int, default=1)
        if name == "images":
            p.add_argument("--no-decode", action="store_true")
        else:
            p.add_argument("--kinds", help=f"comma-separated, of: {', '.join(KINDS)}")
            p.add_argument("--cases-of", help="KIND=N,...: another count for these kinds")
            p.add_argument("--timeout", type=float, default=120)
            p.add_argument("--save-regressions", action="store_true",
                           help=f"write each finding, shrunk, under {REGRESSIONS}")
    a = sub.add_parser("_atheris")
    for opt in ("--log", "--accepted", "--artifacts", "--dict", "--corpus", "--seeds",
                "--minimize", "--minimized"):
        a.add_argument(opt)
    a.add_argument("--runs", type=int)
    a.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("_decode")
    d.add_argument("set")
    d.add_argument("path", choices=("train", "cache", "eval"))
    d.add_argument("--result")
    d.add_argument("--positions")
    w = sub.add_parser("_worker")
    w.add_argument("fixtures")
    w.add_argument("--inp", type=int)
    w.add_argument("--outp", type=int)
    args = ap.parse_args()
    if args.part == "_atheris":
        return atheris_child(args)
    if args.part == "_decode":
        return _decode_child(args)
    if args.part == "_worker":
        return worker_main(args)
    section = images_campaign(args) if args.part == "images" else files_campaign(args)
    save_results(args.out, args.part, section)
    print(json.dumps({k: v for k, v in section.items() if k not in ("per_kind", "decode")},
                     indent=1)[:3000])


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
