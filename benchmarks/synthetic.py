"""Generating the built-in synthetic data straight into shards, against the JPEG-encoding floor.

    .venv/bin/python benchmarks/synthetic.py    # target: >= 1,000 img/s at 64x64 on 2 cores

(1) `dptrain.data.synthetic.write_pool`: 10,000 images (100 classes x 100) of 64x64 px rendered,
JPEG-encoded and written through the shard writer (worker processes, tars, idx, sha256, index),
all cores; (2) the floor in the same run: encoding 10,000 ready-made 64x64 arrays as JPEG with
the same PIL call on the same number of processes (no rendering, no writing). Also 32x32, the
default size.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

from dptrain.data.synthetic import Generator, write_pool  # noqa: E402

CLASSES, PER_CLASS = 100, 100


def _encode(args: tuple[int, int]) -> int:
    res, count = args
    rng = np.random.default_rng(res)
    pixels = rng.integers(0, 255, (16, res, res, 3), dtype=np.uint8)
    total = 0
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(pixels[i % 16]).save(buf, "JPEG", quality=90, subsampling=0)
        total += buf.tell()
    return total


def encode_floor(res: int, images: int, workers: int) -> float:
    with ProcessPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(_encode, [(res, images // workers)] * workers))
        return time.perf_counter() - t0


def main() -> None:
    workers = os.cpu_count() or 1
    rows = []
    for res in (64, 32):
        tmp = Path(tempfile.mkdtemp(prefix="dptrain-bench-"))
        try:
            t0 = time.perf_counter()
            write_pool(tmp / "pool", CLASSES, PER_CLASS, Generator(res=res), progress=False)
            ours = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp)
        floor = encode_floor(res, CLASSES * PER_CLASS, workers)
        n = CLASSES * PER_CLASS
        rows.append({"res": res, "images": n, "dptrain_s": ours, "dptrain_img_s": n / ours,
                     "encode_only_img_s": n / floor, "ratio_vs_encode_only": floor / ours,
                     "target_img_s": 1000 if res == 64 else None,
                     "met": (n / ours >= 1000) if res == 64 else None})
    print(table(rows))
    print(f"wrote {save('synthetic', {'workers': workers, 'rows': rows})}")


if __name__ == "__main__":
    main()
