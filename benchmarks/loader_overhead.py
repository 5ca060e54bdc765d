"""The loader's fixed cost per batch, on the training thread: what a GPU run pays per step.

    .venv/bin/python benchmarks/loader_overhead.py   # target: <= 1 ms per batch of 256

16x16 JPEGs at res 16, so that decoding costs next to nothing and what is left is the per-batch
machinery: reading 256 samples, feeding DALI, taking its outputs, making torch tensors. Train
transform, batches of 256, 10,000 JPEGs, all cores, two epochs after a warm-up one. Measured:
CPU time of the consuming (training) thread inside the loader's iteration (time.thread_time
around each next()), and wall time per batch. Baseline in the same run: what DALI's docs show,
the same reads in an external_source callback and the same crops, resized and flipped in the
pipeline, consumed through DALI's own PyTorch iterator (DALIGenericIterator), all of which
runs on the consuming thread.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, save, table  # noqa: E402
from loader import shards  # noqa: E402

from dptrain.data.imagenet_like import write_image_folder  # noqa: E402
from dptrain.data.index import ShardIndex  # noqa: E402
from dptrain.data.subset import epoch_order, select  # noqa: E402
from dptrain.loading.loader import Loader  # noqa: E402

RES, BATCH, EPOCHS = 16, 256, 2


def measure(batches_of_epoch) -> dict:
    """Training-thread CPU ms and wall ms per batch over EPOCHS epochs after a warm-up."""
    cpu = wall = 0.0
    n = 0
    for epoch in range(EPOCHS + 1):
        it = batches_of_epoch()
        while True:
            t, c = time.perf_counter(), time.thread_time()
            try:
                next(it)
            except StopIteration:
                break
            if epoch:
                cpu += time.thread_time() - c
                wall += time.perf_counter() - t
                n += 1
    return {"train-thread CPU ms/batch": 1e3 * cpu / n, "wall ms/batch": 1e3 * wall / n}


def dali_iterator(subset) -> dict:
    """DALI's documented pattern: callback reads + DALIGenericIterator, all on this thread."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    rows = subset.index.samples[subset.rows]
    paths = subset.index.tar_paths
    fds = {t: os.open(paths[t], os.O_RDONLY) for t in np.unique(rows["tar"]).tolist()}
    steps = len(subset) // BATCH

    def source(info):
        if info.iteration >= steps:
            raise StopIteration
        order = epoch_order(len(subset), seed=0, epoch=info.epoch_idx)
        batch = order[info.iteration * BATCH:(info.iteration + 1) * BATCH]
        jpegs = [np.frombuffer(os.pread(fds[int(r["tar"])], int(r["size"]), int(r["offset"])),
                               np.uint8) for r in rows[batch]]
        return jpegs, subset.labels[batch]

    @pipeline_def(batch_size=BATCH, num_threads=len(os.sched_getaffinity(0)), device_id=None,
                  seed=0)
    def pipe():
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                           batch_info=True, dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, size=[RES, RES])
        return fn.flip(images, horizontal=fn.random.coin_flip()), labels

    it = DALIGenericIterator([pipe()], ["images", "labels"], auto_reset=True)
    return measure(lambda: iter(it))


def main() -> None:
    src = write_image_folder(DATA / "tiny-16x16", 40, 250, width=16, height=16)
    subset = select(ShardIndex.load(shards(src)))
    loader = Loader(subset, batch_size=BATCH, train=True, res=RES)
    ours = measure(lambda: iter(loader))
    loader.close()
    ref = dali_iterator(subset)
    ratio = ours["train-thread CPU ms/batch"] / ref["train-thread CPU ms/batch"]
    print(f"{len(subset):,} JPEGs of 16x16, res {RES}, batch {BATCH}, train transform, "
          f"{len(os.sched_getaffinity(0))} cores, CPU decode (torch {torch.__version__})")
    print(table([{"loader": "dptrain Loader (feeder thread)", **ours},
                 {"loader": "DALI callback + DALIGenericIterator", **ref}]))
    print(f"dptrain's training-thread cost: {ours['train-thread CPU ms/batch']:.3f} ms per batch "
          f"(target <= 1), {ratio:.3f}x the DALI iterator's")
    path = save("loader_overhead", {"images": len(subset), "res": RES, "batch_size": BATCH,
                                    "epochs": EPOCHS, "dptrain": ours, "dali_iterator": ref,
                                    "ratio_cpu_vs_dali_iterator": ratio,
                                    "target_ms": 1.0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
