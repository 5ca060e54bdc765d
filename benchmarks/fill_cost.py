"""Where a pixel cache's fill time goes on the CPU: each part of filling it, alone, and the
filling epoch itself with the parts removed one at a time, against the streaming loader.

    .venv/bin/python benchmarks/fill_cost.py     # explains loader.py's fill / (1) ratio

The 5,000 500x375 JPEGs of benchmarks/loader.py, res 224, batches of 64, all cores.
Per image, on one core: DALI's whole-image decode (run on all cores, divided back), the
shrink to the default stored side (torch's uint8 antialiased bilinear, what the cache uses;
PIL's bilinear for reference), the first touch of fresh cache memory, a store into touched
memory, and a crop + resize to 224 from the cache. Then the loader's filling epoch: as it
runs by default (448 px), with the cache's memory touched beforehand, stored whole (a side
of 512 px, no shrink), and both; and a streaming epoch (after a warm-up one) as the baseline.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import imagenet_like, save, table  # noqa: E402
from loader import BATCH, RES, shards  # noqa: E402

from dptrain.common.environment import cores_for_this_process  # noqa: E402
from dptrain.data.index import ShardIndex  # noqa: E402
from dptrain.data.subset import select  # noqa: E402
from dptrain.loading.loader import Loader  # noqa: E402
from dptrain.loading.pixelcache import cache_side, prepare  # noqa: E402
from dptrain.loading.transforms import fit, resize  # noqa: E402

SAMPLE = 300  # images for the per-part timings


def per_image(f, n: int) -> float:
    """ms per call of f(i), i in 0..n-1."""
    t = time.perf_counter()
    for i in range(n):
        f(i)
    return 1e3 * (time.perf_counter() - t) / n


def dali_decode_ms(files: list[Path]) -> float:
    """CPU ms per image of DALI's whole-image decode on all cores (the fill's decoder)."""
    from nvidia.dali import fn, pipeline_def, types

    data = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
    steps = len(data) // BATCH

    @pipeline_def(batch_size=BATCH, num_threads=cores_for_this_process(), device_id=None)
    def pipe():
        jpegs = fn.external_source(source=lambda i: data[(i.iteration % steps) * BATCH:][:BATCH],
                                   batch=True, batch_info=True)
        return fn.decoders.image(jpegs, output_type=types.RGB, device="cpu")

    p = pipe()
    p.build()
    for _ in range(3):
        p.run()
    t = time.perf_counter()
    for _ in range(steps):
        p.run()
    return 1e3 * (time.perf_counter() - t) * cores_for_this_process() / (steps * BATCH)


def parts(files: list[Path], side: int) -> dict[str, float]:
    torch.set_num_threads(1)
    data = [f.read_bytes() for f in files[:SAMPLE]]
    whole = [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))) for b in data]
    h, w = whole[0].shape[:2]
    small = [fit(im, side) for im in whole]
    sh, sw = small[0].shape[:2]
    pil = [Image.fromarray(im.numpy()) for im in whole]
    cache = torch.empty((SAMPLE * sh, sw, 3), dtype=torch.uint8)
    store = lambda i: cache[i * sh:(i + 1) * sh].copy_(small[i])  # noqa: E731
    rng = np.random.default_rng(0)
    boxes = [(rng.integers(sh // 4, sh), rng.integers(sw // 4, sw)) for _ in range(SAMPLE)]
    out = {"DALI whole decode (all cores, per core)": dali_decode_ms(files[:1024]),
           f"shrink {w}x{h} -> {sw}x{sh}, torch": per_image(lambda i: fit(whole[i], side), SAMPLE),
           f"shrink {w}x{h} -> {sw}x{sh}, PIL": per_image(
               lambda i: pil[i].resize((sw, sh), Image.BILINEAR), SAMPLE),
           "store, first touch": per_image(store, SAMPLE),
           "store, touched memory": per_image(store, SAMPLE),
           f"crop + resize {RES} + flip": per_image(
               lambda i: resize([cache[i * sh:i * sh + boxes[i][0], :boxes[i][1]]], RES,
                                flips=np.array([i % 2 == 1])), SAMPLE)}
    torch.set_num_threads(cores_for_this_process())
    return out


def epoch_rate(subset, side: int | None, pretouch: bool = False) -> float:
    """img/s of the loader's filling epoch (`side`), or of a streaming epoch after a warm-up."""
    cache = None
    if side is not None:
        cache, _ = prepare(subset, mode="host", side=side, seed=0, rank=0, world=1,
                           device=torch.device("cpu"), threads=None)
        if pretouch:
            cache.pixels.fill_(0)
    loader = Loader(subset, batch_size=BATCH, train=True, res=RES, device="cpu", source=cache)
    try:
        if cache is None:
            sum(len(labels) for _, labels in loader)  # warm-up
        t, n = time.perf_counter(), 0
        for _, labels in loader:
            n += len(labels)
            if cache is not None and cache.full:
                break
        return n / (time.perf_counter() - t)
    finally:
        loader.close()


def main() -> None:
    src = imagenet_like()
    files = sorted(src.rglob("*.JPEG"))
    side = cache_side(RES)
    costs = parts(files, side)
    print(table([{"part (ms per image, one core)": k, "ms": v} for k, v in costs.items()]))
    subset = select(ShardIndex.load(shards(src)))
    streaming = epoch_rate(subset, None)
    rates = {"streaming epoch": streaming,
             f"filling epoch, {side} px (default)": epoch_rate(subset, side),
             f"filling epoch, {side} px, memory touched first": epoch_rate(subset, side, True),
             "filling epoch, stored whole (512 px)": epoch_rate(subset, 512),
             "filling epoch, stored whole, memory touched first": epoch_rate(subset, 512, True)}
    rows = [{"epoch": k, "img/s": v, "vs streaming": v / streaming} for k, v in rates.items()]
    print(table(rows))
    path = save("fill_cost", {"images": len(files), "res": RES, "batch_size": BATCH,
                              "side": side, "part_ms_per_image": costs, "img_per_s": rates,
                              "ratio_vs_streaming": {k: v / streaming for k, v in rates.items()},
                              "targets": {"fill_vs_streaming": 0.8}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
