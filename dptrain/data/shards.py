"""Write a class-indexed shard set: `dptrain shard SRC OUT` (format: see `dptrain.data.index`).

    dptrain shard /data/imagenet/train shards/imagenet-train

From disk it runs as fast as `tar -cf` of the same folder (0.98-1.22x, 2 cores); from the page
cache 0.55-0.63x, as it also sha256-hashes every byte (benchmarks/README.md).

Classes are written in parallel by worker processes, one class per task. Each class's tars
are written under temporary names and renamed when complete, then a per-class manifest is
saved in OUT/.progress; `index.json` is written last. A killed run restarts from its
manifests, and the result is byte-identical to an uninterrupted run: every byte depends only
on the inputs, the options and the seed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..common.environment import cores_for_this_process
from ..common.errors import DataError
from ..common.options import option
from ..common.progress import bar as progress_bar
from ..common.progress import plural
from ..common.runfolder import (
    LOCK,
    PARTIAL,
    atomic_path,
    folder_lock,
    must_replace,
    write_atomic,
    write_json,
)
from .images import DECODER, BadImage, store_image
from .index import (
    FORMAT_VERSION,
    INDEX_FILE,
    PROGRESS_DIR,
    SAMPLE_DTYPE,
    SAMPLES_FILE,
    ShardIndex,
    idx_name,
    sha256_file,
    tar_name,
)
from .sources import FORMATS, Item, Source, detect_format, open_source
from .verify import sizes_differ


@dataclass(frozen=True)
class ShardOptions:
    """How a shard set is written; the index records them (rerun with others: --overwrite)."""

    seed: int = option(0, "Seeds the stored order in each class.")
    shard_size: int = option(256 * 2**20, "MB per tar; a larger class is split over several "
                             "tars.", low=0.01, scale=2**20)
    max_side: int | None = option(None, "Re-encode images whose longer side exceeds this (px); "
                                  "default: copy all.", low=16)
    quality: int = option(90, "JPEG quality of re-encoded images.", low=1, high=100)
    check: str = option("decode", "decode: decode every image with the loader's decoder and "
                        "convert or skip what it complains about; header: only walk each JPEG's "
                        "markers (faster; damage inside a JPEG then shows in training).",
                        choices=("header", "decode"))
    max_pixels: int = option(100_000_000, "Skip larger images as decompression bombs.", low=1)


def _init_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if sys.platform == "linux":
        # Die with the main process (kill -9 included): an orphan still writing a class would
        # race the rerun that resumes it, and an idle one would wait on its task pipe forever.
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the main process died before prctl took effect
            os._exit(1)


JOB_FILE = "job.json"  # in PROGRESS_DIR: the options of the shard being written
_ZEROS = bytes(1024)
# A ustar header (as tarfile.USTAR_FORMAT writes it) of a regular file, mode 0644, owner 0:0,
# mtime 0: fixed metadata keeps the output reproducible. Name and size are filled in per member.
_TEMPLATE = bytearray(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT))
_TEMPLATE[0:100] = bytes(100)
_TEMPLATE[100:108] = b"0000644\0"
_TEMPLATE[136:148] = b"00000000000\0"
_TEMPLATE[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
_TEMPLATE[124:136] = bytes(12)  # size: filled in per member
_TEMPLATE_SUM = sum(_TEMPLATE)


def ustar_header(name: str, size: int) -> bytes:
    """Build a 512-byte tar header ~10x faster than tarfile (this runs twice per sample)."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0 : len(raw)] = raw
    header[124:136] = field
    chksum = _TEMPLATE_SUM + sum(raw) + sum(field)
    header[148:156] = b"%06o\0 " % chksum
    return bytes(header)


class TarWriter:
    """One WebDataset tar (`<key>.jpg` + `<key>.cls` per sample) and its wds2idx v1.2 index."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, []
        self.sha = hashlib.sha256()
        self.file = open(path.with_name(path.name + PARTIAL), "wb")

    def _write(self, piece: bytes | memoryview) -> None:
        self.file.write(piece)
        self.sha.update(piece)
        self.offset += len(piece)

    def add(self, key: str, jpg: bytes | memoryview, label: int) -> int:
        """Append one sample; returns the byte offset of its JPEG payload."""
        cls = b"%d" % label
        self._write(ustar_header(key + ".jpg", len(jpg)))
        jpg_at = self.offset
        self._write(jpg)  # written from the read buffer: the JPEG is never copied
        # The rest of the sample is small: one write and one hash update.
        self._write(_ZEROS[: -len(jpg) % 512] + ustar_header(key + ".cls", len(cls)) + cls
                    + _ZEROS[: -len(cls) % 512])
        cls_at = self.offset - 512  # a label is a few digits: its data is the last block
        self.lines.append(f"jpg {jpg_at} {len(jpg)} {key}.jpg cls {cls_at} {len(cls)} {key}.cls")
        return jpg_at

    def close(self) -> dict:
        self._write(_ZEROS)  # two zero blocks end a tar
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before its manifest says it is done
        self.file.close()
        idx = f"v1.2 {len(self.lines)}\n" + "".join(line + "\n" for line in self.lines)
        idx_path = self.path.with_name(idx_name(self.path.name))
        write_atomic(idx_path, idx.encode())
        os.replace(self.file.name, self.path)
        return {"file": self.path.name, "bytes": self.offset,
                "sha256": self.sha.hexdigest(),
                "idx_sha256": hashlib.sha256(idx.encode()).hexdigest(),
                "samples": len(self.lines)}

    def abort(self) -> None:
        try:
            self.file.close()  # flushes: on a full disk that fails again, and does not matter
        except OSError:
            pass
        Path(self.file.name).unlink(missing_ok=True)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_keys(label: int, items: list[Item]) -> list[str]:
    """Stable, unique keys from the inputs' file names ("00042_n01440764_10026").

    Only [A-Za-z0-9_-]: webdataset and DALI split a member name at its first dot.
    """
    stems = []
    for it in items:
        base = re.split(r"[/:]", it.name)[-1]
        stems.append(_UNSAFE.sub("_", os.path.splitext(base)[0]).strip("_")[:80] or "img")
    taken, keys = set(stems), []
    seen: set[str] = set()
    for s in stems:
        k, j = s, 1
        while k in seen or (k != s and k in taken):
            k, j = f"{s}-{j}", j + 1
        seen.add(k)
        keys.append(f"{label:05d}_{k}")
    return keys


def renamed(name: str, key: str) -> bool:
    """Whether an input's key is not its own file name: characters replaced, cut, made unique,
    or a name that climbed out of its folder ("../../x.jpg")."""
    parts = re.split(r"[/:]", name)
    return ".." in parts or key.split("_", 1)[1] != os.path.splitext(parts[-1])[0]


def _names_sha(items: list[Item]) -> str:
    return hashlib.sha1("\n".join(it.name for it in items).encode()).hexdigest()


def write_class(out: Path, label: int, items: list[Item], opts: ShardOptions,
                skipped: list[tuple[str, str]] = ()) -> dict:
    """Write one class's tars in a seeded random order; returns the class manifest.

    `skipped`: the class's files its source already passed over, kept in the manifest.
    """
    keys = sample_keys(label, items)
    order = np.random.default_rng([opts.seed, label]).permutation(len(items))
    tars, rows, converted, renames = [], [], [], []
    skipped = [list(s) for s in skipped]
    writer, part = None, 0
    buf = bytearray(16 << 20)  # larger inputs are read into a buffer of their own
    try:
        for i in order:
            item = items[i]
            try:
                stored = store_image(item.read_into(buf), max_side=opts.max_side,
                                     quality=opts.quality, check=opts.check,
                                     max_pixels=opts.max_pixels)
            except OSError as e:
                skipped.append([item.name, f"unreadable ({e.strerror or e})"])
                continue
            except BadImage as e:
                skipped.append([item.name, str(e)])
                continue
            if stored.action != "copied":
                converted.append([item.name, stored.action])
            need = 2048 + len(stored.data)  # the sample with both headers and padding, roughly
            if writer is not None and writer.offset and writer.offset + need > opts.shard_size:
                tars.append(writer.close())
                writer, part = None, part + 1
            if writer is None:
                writer = TarWriter(out / tar_name(label, part))
            offset = writer.add(keys[i], stored.data, label)
            rows.append([part, offset, len(stored.data), stored.height, stored.width])
            if renamed(item.name, keys[i]):
                renames.append([item.name, keys[i]])
        if writer is not None:
            tars.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return {"label": label, "inputs": len(items), "names_sha1": _names_sha(items), "tars": tars,
            "rows": rows, "skipped": skipped, "converted": converted, "renamed": renames}


def _job(source: Source, labels: Path | None, classes_from: Path | None, opts: ShardOptions,
         split: str | None) -> dict:
    """What must match for a rerun to continue, or be a no-op on, an existing OUT."""
    return {"format_version": FORMAT_VERSION, "source": source.identity,
            "source_format": source.format, "split": split, "source_encoding": source.encoding,
            "labels_file": str(labels.resolve()) if labels else None,
            "classes_from": str(classes_from.resolve()) if classes_from else None,
            "options": asdict(opts), "decoded_with": DECODER if opts.check == "decode" else None}


def _prepare_out(out: Path, job: dict, overwrite: bool) -> bool:
    """Check OUT against the job; returns True if OUT already holds this finished job."""
    old = None
    for marker in (out / INDEX_FILE, out / PROGRESS_DIR / JOB_FILE):
        if marker.is_file():
            try:
                old = json.loads(marker.read_text()).get("job")
            except ValueError:
                old = {}
            break
    ours = old is not None
    if out.is_dir() and not ours and any(p.name != LOCK for p in out.iterdir()):
        raise DataError(f"OUT {out} is not empty and is not a dptrain shard set: choose "
                        "another OUT")
    if must_replace(out, old, job, overwrite=overwrite, holds="a shard set"):
        _clear(out)
        return False
    if not (ours and (out / INDEX_FILE).is_file()):
        return False
    # Finished: but a tar cut short or deleted since must not pass as up to date.
    bad = sizes_differ(ShardIndex.load(out))
    if bad and overwrite:
        _clear(out)
        return False
    if bad:
        raise DataError(f"OUT {out} is finished but damaged ({', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: missing or not "
                        "the size recorded): add --overwrite to rebuild it; dptrain verify lists "
                        "every problem")
    return True


def _clear(out: Path) -> None:
    """Remove what dptrain shard wrote in OUT, and nothing else."""
    for p in out.iterdir():
        if p.name == PROGRESS_DIR:
            shutil.rmtree(p)
        elif p.suffix in (".tar", ".idx", PARTIAL) or p.name in (INDEX_FILE, SAMPLES_FILE):
            p.unlink()


def _load_manifests(progress: Path, out: Path) -> dict[int, dict]:
    done = {}
    for p in progress.glob("[0-9]*.json"):
        try:
            m = json.loads(p.read_text())
        except ValueError:
            continue  # written atomically, so only a foreign file can be unreadable
        if all((out / t["file"]).is_file() and (out / t["file"]).stat().st_size == t["bytes"]
               for t in m["tars"]):
            done[m["label"]] = m
    return done


def _assemble(out: Path, job: dict, class_names: list[str], manifests: dict[int, dict],
              scan_skipped: list[tuple[str, str]]) -> dict:
    tars, classes, tables = [], [], []
    skipped = [{"input": n, "reason": r} for n, r in scan_skipped]
    converted, renames = [], []
    for label, name in enumerate(class_names):
        m = manifests.get(label, {"tars": [], "rows": [], "skipped": [], "converted": []})
        first = len(tars)
        tars += [{**t, "label": label} for t in m["tars"]]
        rows = np.array(m["rows"], dtype=np.int64).reshape(-1, 5)
        table = np.zeros(len(rows), SAMPLE_DTYPE)
        table["label"], table["tar"] = label, first + rows[:, 0]
        table["offset"], table["size"] = rows[:, 1], rows[:, 2]
        table["height"], table["width"] = rows[:, 3], rows[:, 4]
        tables.append(table)
        classes.append({"id": label, "name": name, "count": len(rows),
                        "tars": [t["file"] for t in m["tars"]]})
        skipped += [{"input": n, "reason": r} for n, r in m["skipped"]]
        converted += [{"input": n, "action": a} for n, a in m["converted"]]
        renames += [{"input": n, "key": k} for n, k in m.get("renamed", [])]
    samples = np.concatenate(tables) if tables else np.zeros(0, SAMPLE_DTYPE)
    with atomic_path(out / SAMPLES_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, samples)
    meta = {"format_version": FORMAT_VERSION, "source": job["source"],
            "source_format": job["source_format"], "split": job["split"],
            "source_encoding": job["source_encoding"], "options": job["options"], "job": job,
            "num_classes": len(classes), "num_samples": int(len(samples)),
            "samples_file": SAMPLES_FILE, "samples_sha256": sha256_file(out / SAMPLES_FILE),
            "sample_dtype": SAMPLE_DTYPE.descr, "classes": classes, "tars": tars,
            "skipped": skipped, "converted": converted, "renamed": renames}
    write_json(out / INDEX_FILE, meta)  # last: marks it complete
    return meta


def shard_dataset(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto",
                  labels: str | os.PathLike | None = None,
                  classes_from: str | os.PathLike | None = None,
                  split: str | None = None, **kw) -> dict:
    """Shard SRC (its `split`, for a SRC holding several) into OUT, resuming a partial OUT;
    returns a summary of the run. `kw`: the options of `write_source`."""
    src, out = Path(src), Path(out)
    labels = Path(labels) if labels else None
    source = open_source(src, fmt, labels, split)
    if (FORMATS[source.format].files_under_src
            and out.resolve().is_relative_to(src.resolve())):
        raise DataError(f"OUT {out} is inside SRC {src}: its files would be read as inputs")
    return write_source(source, out, labels=labels, classes_from=classes_from, split=split, **kw)


def write_source(source: Source, out: str | os.PathLike, *,
                 classes_from: str | os.PathLike | None = None,
                 options: ShardOptions = ShardOptions(), workers: int | None = None,
                 overwrite: bool = False, progress: bool = True, labels: Path | None = None,
                 split: str | None = None) -> dict:
    """Write an opened source as a shard set in OUT: the one writer of files and generated
    images alike."""
    t0 = time.perf_counter()
    out = Path(out)
    classes_from = Path(classes_from) if classes_from else None
    if options.check not in ("header", "decode"):
        raise DataError(f"check must be 'header' or 'decode', not {options.check!r}")
    class_names = source.class_names
    if classes_from is not None:
        ref = ShardIndex.load(classes_from).class_names
        unknown = sorted(set(class_names) - set(ref))
        if unknown:
            raise DataError(f"{len(unknown)} class(es) of {source.path} are not in "
                            f"{classes_from} (e.g. {unknown[:3]}): --classes-from allows only "
                            "its classes")
        class_names = ref
    job = _job(source, labels, classes_from, options, split)
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} exists and is not a folder")
    with folder_lock(out, "shard"):  # the workers inherit it
        if _prepare_out(out, job, overwrite):
            meta = ShardIndex.load(out).meta
            return {**_totals(meta), "up_to_date": True, "seconds": time.perf_counter() - t0}
        progress_dir = out / PROGRESS_DIR
        progress_dir.mkdir(parents=True, exist_ok=True)
        write_json(progress_dir / JOB_FILE, {"job": job})
        return _shard(source, out, progress_dir, job, class_names, options, workers, progress, t0)


def _shard(source: Source, out: Path, progress_dir: Path, job: dict, class_names: list[str],
           options: ShardOptions, workers: int | None, progress: bool, t0: float) -> dict:
    """Write the classes not yet done (under OUT's lock), then assemble the index."""
    done = _load_manifests(progress_dir, out)
    label_of = {name: i for i, name in enumerate(class_names)}
    for name, items in source.items.items():  # a class whose inputs changed is redone
        if label_of[name] in done and done[label_of[name]]["names_sha1"] != _names_sha(items):
            del done[label_of[name]]
    todo = {n for n in source.class_names if label_of[n] not in done}
    this_run = {"images": 0, "inputs": 0, "bytes": 0}
    bar = progress_bar(total=source.num_inputs, unit="img", enabled=progress,
                       unit_scale=(source.num_inputs or 10**6) >= 10**5,  # 1.28M, but 34 is 34
                       desc="shard", initial=sum(m["inputs"] for m in done.values())
                       if source.num_inputs else 0)

    def finished(m: dict) -> None:
        write_atomic(progress_dir / f"{m['label']:05d}.json", json.dumps(m).encode())
        done[m["label"]] = m
        this_run["inputs"] += m["inputs"]
        this_run["images"] += len(m["rows"])
        this_run["bytes"] += sum(t["bytes"] for t in m["tars"])
        bar.update(m["inputs"])
        bar.set_postfix_str(f"{this_run['bytes'] / 1e6 / (time.perf_counter() - t0):.0f} MB/s",
                            refresh=False)

    # Processes, not threads: per-sample Python work and hashing scale ~1.5x better without
    # the GIL, and only item lists and manifests cross the process boundary (as FFCV's writer).
    # Workers ignore Ctrl-C; the main process stops submitting and lets running classes finish.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    workers = workers or cores_for_this_process()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        pending: set = set()
        try:
            for name, items, skipped in source.classes(todo):
                while len(pending) >= workers + 2:  # streamed classes are in memory: bound them
                    ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in ready:
                        finished(f.result())
                pending.add(pool.submit(write_class, out, label_of[name], items, options, skipped))
            for f in as_completed(pending):
                finished(f.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            raise
    bar.close()
    for p in out.glob("*" + PARTIAL):
        p.unlink()
    if not any(m["rows"] for m in done.values()):
        reasons = Counter(r for m in done.values() for _, r in m["skipped"])
        reasons.update(r for _, r in source.skipped)
        common = "; ".join(f"{n:,} {r}" for r, n in reasons.most_common(3))
        shutil.rmtree(progress_dir)  # nothing was written: OUT is as empty as it was
        raise DataError(f"no input of {source.path} could be stored ({common or 'no inputs'}): "
                        "a shard set needs at least one image")
    meta = _assemble(out, job, class_names, done, source.skipped)
    shutil.rmtree(progress_dir)
    seconds = time.perf_counter() - t0
    return {**_totals(meta), "up_to_date": False, "seconds": seconds,
            "this_run": {**this_run, "images_per_s": this_run["images"] / seconds,
                         "mb_per_s": this_run["bytes"] / 1e6 / seconds}}


def shard_source(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "auto",
                 labels: str | os.PathLike | None = None,
                 classes_from: str | os.PathLike | None = None,
                 **kw) -> list[tuple[Path, dict]]:
    """`dptrain shard`: one shard set in OUT, or OUT/train and OUT/test (with the train
    split's class ids) for a SRC holding both splits (CIFAR, train/ + test/ folders)."""
    src, out = Path(src), Path(out)
    if fmt == "auto" and src.exists():
        fmt = detect_format(src, Path(labels) if labels else None)
    if fmt not in FORMATS or not FORMATS[fmt].splits:  # "auto" where SRC is missing
        return [(out, shard_dataset(src, out, fmt=fmt, labels=labels,
                                    classes_from=classes_from, **kw))]
    if classes_from is not None or labels is not None:
        raise DataError(f"a {fmt} SRC holds its own train and test splits: --classes-from and "
                        "--labels do not apply (the train split defines the classes)")
    train = shard_dataset(src, out / "train", fmt=fmt, split="train", **kw)
    test = shard_dataset(src, out / "test", fmt=fmt, split="test", classes_from=out / "train",
                         **kw)
    return [(out / "train", train), (out / "test", test)]


def _totals(meta: dict) -> dict:
    reasons = dict(Counter(s["reason"] for s in meta["skipped"]))
    return {"source": meta["source"], "classes": meta["num_classes"],
            "written": meta["num_samples"], "converted": len(meta["converted"]),
            "renamed": len(meta.get("renamed", [])),
            "skipped": len(meta["skipped"]), "skipped_by_reason": reasons,
            "inputs": meta["num_samples"] + len(meta["skipped"]),
            "bytes": sum(t["bytes"] for t in meta["tars"])}


def render_results(results: list[tuple[Path, dict]]) -> str:
    """`dptrain shard`'s report: per output, what was written and skipped, and this run's speed."""
    lines = []
    for where, s in results:
        if s["up_to_date"]:
            lines.append(f"{where} is up to date: {plural(s['written'], 'image')} in "
                         f"{plural(s['classes'], 'class', 'classes')}")
            continue
        run = s["this_run"]
        lines.append(f"{where}: {plural(s['classes'], 'class', 'classes')}, "
                     f"{plural(s['inputs'], 'input')} seen, "
                     f"{s['written']:,} written, {s['converted']:,} converted, "
                     f"{s['skipped']:,} skipped"
                     + (f", {s['renamed']:,} renamed" if s["renamed"] else "")
                     + f", {s['bytes'] / 1e6:,.1f} MB")
        lines += [f"  skipped {n:,}: {reason}" for reason, n in
                  sorted(s["skipped_by_reason"].items(), key=lambda kv: -kv[1])]
        lines.append(f"this run: {plural(run['images'], 'image')} in {s['seconds']:.1f} s, "
                     f"{run['images_per_s']:,.0f} img/s, {run['mb_per_s']:,.0f} MB/s")
    return "\n".join(lines)
