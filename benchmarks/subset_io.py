"""Bytes read to stream a subset, and the cost of selecting one on an ImageNet-sized index.

    .venv/bin/python benchmarks/subset_io.py   # targets: read/subset <= 1.01; load+select < 0.5 s

1. A 10-class x 50-image subset of 5,000 ImageNet-like JPEGs in 50 classes, one epoch, in one
   run: dptrain's Loader (memory-mapped tars, each sample's pages requested); the reader it
   had before (one os.pread per sample, with the kernel's readahead); and what users do
   today, webdataset streaming every shard and keeping the subset's samples. Bytes are what
   the process made the storage read (read_bytes in /proc/self/io), with every tar evicted
   from the page cache first (posix_fadvise DONTNEED), divided by the subset's JPEG bytes.
   Storage is read in pages, so the tar headers between a class's JPEGs are read too (~1.5 KB
   a sample); rchar (bytes copied by read calls) no longer applies, as mapped pages are not
   read by calls.
2. Loading a 1.28 M-sample, 1,000-class index (index.json + samples.npy, the shape of
   ImageNet's) and selecting 500 classes x 256 images, in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, imagenet_like, save, table  # noqa: E402

K, N = 10, 50


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def evict(paths) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold(subset, read_epoch) -> tuple[int, float]:
    """Storage bytes and seconds of `read_epoch()`, every tar evicted first."""
    evict(subset.index.tar_paths)
    before, t = read_bytes(), time.perf_counter()
    read_epoch()
    return read_bytes() - before, time.perf_counter() - t


def shards(src: Path) -> Path:
    out = DATA / f"shards-{src.name}"
    subprocess.run([sys.executable, "-m", "dptrain", "shard", str(src), str(out),
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return out


def stream_dptrain(subset) -> tuple[int, float]:
    from dptrain.loading.loader import Loader

    warm = Loader(subset, batch_size=50, train=False, res=64, threads=2)
    sum(len(labels) for _, labels in warm)  # imports and the pipeline build read files too
    warm.close()
    loader = Loader(subset, batch_size=50, train=False, res=64, threads=2)

    def epoch() -> None:
        assert sum(len(labels) for _, labels in loader) == len(subset)
        loader.close()  # no reading ahead into a next epoch

    return cold(subset, epoch)


def pread_each(subset) -> tuple[int, float]:
    """The reader dptrain had before: one positioned read per sample, the bytes only."""
    table_ = subset.index.samples[subset.rows]
    paths = subset.index.tar_paths
    fds = {t: os.open(paths[t], os.O_RDONLY) for t in np.unique(table_["tar"]).tolist()}

    def epoch() -> None:
        for r in table_:
            os.pread(fds[int(r["tar"])], int(r["size"]), int(r["offset"]))

    result = cold(subset, epoch)
    for fd in fds.values():
        os.close(fd)
    return result


def stream_webdataset(subset) -> tuple[int, float]:
    import webdataset as wds

    wanted = set(subset.classes.tolist())
    urls = [str(p) for p in subset.index.tar_paths]
    for _ in wds.WebDataset(urls[:1], shardshuffle=False):  # warm-up, as for dptrain
        pass

    def epoch() -> None:
        per_class: dict[int, int] = {}
        for sample in wds.WebDataset(urls, shardshuffle=False):
            label = int(sample["cls"])
            if label in wanted and per_class.get(label, 0) < N:  # the first n of each class
                per_class[label] = per_class.get(label, 0) + 1
        assert sum(per_class.values()) == len(subset)

    return cold(subset, epoch)


def fake_imagenet_index(root: Path) -> Path:
    """index.json + samples.npy shaped like ImageNet's: 1,000 classes of 732..1,300 images."""
    from dptrain.data.index import FORMAT_VERSION, SAMPLE_DTYPE, sha256_file

    if (root / "index.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    counts = np.random.default_rng(0).integers(732, 1301, 1000)
    samples = np.zeros(int(counts.sum()), SAMPLE_DTYPE)
    samples["label"] = np.repeat(np.arange(1000), counts)
    samples["tar"] = samples["label"] * 2
    samples["size"] = 110_000
    np.save(root / "samples.npy", samples)
    meta = {"format_version": FORMAT_VERSION, "num_samples": len(samples),
            "samples_sha256": sha256_file(root / "samples.npy"),
            "classes": [{"id": c, "name": f"n{c:08d}", "count": int(n),
                         "tars": [f"{c:05d}-000.tar", f"{c:05d}-001.tar"]}
                        for c, n in enumerate(counts)],
            "tars": [{"file": f"{c:05d}-{p:03d}.tar", "bytes": 0, "sha256": "0" * 64}
                     for c in range(1000) for p in range(2)],
            "skipped": [], "converted": [], "options": {"seed": 0}}
    (root / "index.json").write_text(json.dumps(meta, indent=1))
    return root


SELECT = """
import time, sys
t = time.perf_counter()
from dptrain.data.index import ShardIndex
from dptrain.data.subset import select
t_import = time.perf_counter()
s = select(ShardIndex.load(sys.argv[1]), 500, 256, seed=0)
t_done = time.perf_counter()
assert len(s) == 500 * 256
print(t_done - t_import, t_import - t)
"""


def main() -> None:
    from dptrain.data.index import ShardIndex
    from dptrain.data.subset import select

    out = shards(imagenet_like(50, 100))
    subset = select(ShardIndex.load(out), K, N, seed=0)
    wanted = subset.nbytes
    measured = {"dptrain Loader (memory-mapped, pages requested)": stream_dptrain(subset),
                "one os.pread per sample (dptrain before)": pread_each(subset),
                "webdataset, stream all + filter": stream_webdataset(subset)}
    rows = [{"method": k, "bytes read": b, "read / subset bytes": b / wanted, "seconds": t}
            for k, (b, t) in measured.items()]
    if rows[-1]["bytes read"] == 0:
        raise SystemExit("read_bytes stayed 0: this file system does not account storage reads")
    index_dir = fake_imagenet_index(DATA / "fake-imagenet-index")
    timings = [subprocess.run([sys.executable, "-c", SELECT, str(index_dir)], check=True,
                              capture_output=True, text=True).stdout.split() for _ in range(3)]
    load_select = float(np.median([float(t[0]) for t in timings]))
    imports = float(np.median([float(t[1]) for t in timings]))
    print(f"subset {K} classes x {N} images = {wanted / 1e6:.1f} MB of "
          f"{sum(t['bytes'] for t in subset.index.meta['tars']) / 1e6:.0f} MB of shards")
    print(table(rows))
    print(f"dptrain read / subset bytes = {rows[0]['read / subset bytes']:.4f} (target <= 1.01); "
          f"one pread per sample: {rows[1]['read / subset bytes']:.2f}; "
          f"webdataset: {rows[2]['read / subset bytes']:.1f}")
    print(f"1.28 M-sample index: load + select 500 x 256 = {load_select:.3f} s "
          f"(target < 0.5 s; importing dptrain: {imports:.2f} s more)")
    index_samples = json.loads((index_dir / "index.json").read_text())["num_samples"]
    path = save("subset_io", {"subset": {"classes": K, "per_class": N, "bytes": wanted},
                              "rows": rows, "index_samples": index_samples,
                              "load_select_s": load_select, "import_s": imports,
                              "targets": {"read_ratio": 1.01, "load_select_s": 0.5}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
