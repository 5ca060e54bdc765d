"""Loader throughput: dptrain's DALI loader against what users write, and against decode alone.

    .venv/bin/python benchmarks/loader.py     # targets: (1)/(2) >= 1.5, (1)/(3) >= 0.8 (CPU);
                                              # (1)/(4) >= 1.0 on a GPU; (5)/(1) >= 3 and
                                              # fill / (1) >= 0.8 (CPU)

5,000 generated ImageNet-like JPEGs (500x375, ~110 KB), page cache warm, all cores, measured
in one run, each over two full epochs after a warm-up epoch (with a GPU: 20,000 JPEGs in
batches of 256, so an epoch lasts long enough to time):
(1) dptrain: `Loader(train=True, res=224)`, uint8 NHWC batches of 64 (CPU-only DALI without
    a GPU; the device the batches land on is the machine's); also its training-thread CPU time
    per batch (time.thread_time inside the iteration) and the wait for each epoch's first
    batch against the median wait between batches;
(2) torchvision ImageFolder + DataLoader (one worker process per core, persistent) +
    RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, batches of 64;
(3) decode only: PIL (libjpeg-turbo) full decode of every file, one thread per core, no
    transform: the limit of a loader that decodes whole images on these cores;
(4) a hand-written DALI pipeline over the same tars: fn.readers.webdataset with their .idx
    files (random_shuffle, initial_fill 4096), fused decode + random crop (mixed on a GPU),
    resize to 224, flip, one thread per core, prefetch 2, images only, through DALI's own
    PyTorch iterator. A speed reference, not a correct loader: on class-sorted shards its
    shuffle buffer gives near-single-class batches;
(5) dptrain's Loader from its pixel cache (`--pixel-cache auto`: host memory on a CPU, the GPU on a
    GPU; the default stored side): the same batches as (1) where the images are stored whole,
    with no JPEG decoded after the first epoch. That first epoch fills the cache (each batch
    decoded whole, shrunk to the stored side, stored, then cropped): timed on its own, against
    (1)'s epochs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, imagenet_like, save, table  # noqa: E402

RES, EPOCHS = 224, 2
GPU = torch.cuda.is_available()
BATCH, CLASSES, PER_CLASS = (256, 100, 200) if GPU else (64, 50, 100)


def shards(src: Path) -> Path:
    out = DATA / f"shards-{src.name}"
    subprocess.run([sys.executable, "-m", "dptrain", "shard", str(src), str(out),
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return out


def timed_epochs(run_epoch) -> float:
    """img/s over EPOCHS epochs of `run_epoch() -> images`, after one warm-up epoch."""
    run_epoch()  # warm-up: start-up, worker processes, caches
    t = time.perf_counter()
    n = sum(run_epoch() for _ in range(EPOCHS))
    return n / (time.perf_counter() - t)


def dptrain_loader(out: Path, device: str, cached: bool = False) -> tuple[float, dict]:
    """img/s, and the training thread's share: CPU ms per batch, epoch-start waits. With
    `cached`, from a pixel cache filled first (its fill rate is in the costs)."""
    from dptrain.data.index import ShardIndex
    from dptrain.data.subset import select
    from dptrain.loading.loader import Loader
    from dptrain.loading.pixelcache import cache_side, prepare

    subset = select(ShardIndex.load(out))
    cache, record = None, None
    if cached:
        cache, record = prepare(subset, mode="auto", side=cache_side(RES), seed=0, rank=0,
                                world=1, device=torch.device(device), threads=None)
    loader = Loader(subset, batch_size=BATCH, train=True, res=RES, device=device, source=cache)
    cpu, waits, first = [], [], []

    def epoch() -> int:
        n = 0
        batches = iter(loader)
        while True:
            t, c = time.perf_counter(), time.thread_time()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            cpu.append(time.thread_time() - c)
            (first if n == 0 else waits).append(time.perf_counter() - t)
            n += len(labels)
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    t = time.perf_counter()
    first_rate = epoch() / (time.perf_counter() - t)  # with a cache: the epoch that fills it
    rate = timed_epochs(epoch)
    loader.close()
    steady = sorted(waits[len(waits) // 2:])  # after the first epoch and the warm-up one
    timed = cpu[len(cpu) // 2:]
    return rate, {"main-thread CPU ms/batch": 1e3 * sum(timed) / len(timed),
                  "median wait ms": 1e3 * steady[len(steady) // 2],
                  "epoch-start wait ms": [1e3 * x for x in first[2:]],
                  "first epoch img/s": first_rate,
                  **({"cache": record.filled(cache).__dict__} if record else {})}


def dali_webdataset(out: Path, device: str) -> float:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from dptrain.data.index import ShardIndex, idx_name

    index = ShardIndex.load(out)
    gpu = device == "cuda"

    @pipeline_def(batch_size=BATCH, num_threads=os.cpu_count(), prefetch_queue_depth=2,
                  device_id=0 if gpu else None, seed=0)
    def pipe():
        jpegs = fn.readers.webdataset(
            paths=[str(p) for p in index.tar_paths], ext=["jpg"], random_shuffle=True,
            initial_fill=4096, name="reader",
            index_paths=[str(p.with_name(idx_name(p.name))) for p in index.tar_paths])
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu",
                                               output_type=types.RGB)
        images = fn.resize(images, size=[RES, RES])
        return fn.flip(images, horizontal=fn.random.coin_flip())

    it = DALIGenericIterator([pipe()], ["images"], reader_name="reader", auto_reset=True)

    def epoch() -> int:
        n = sum(len(b[0]["images"]) for b in it)
        if gpu:
            torch.cuda.synchronize()
        return n

    return timed_epochs(epoch)


def torchvision_loader(src: Path) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(RES), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(src), tf), batch_size=BATCH,
                                         shuffle=True, num_workers=os.cpu_count(),
                                         persistent_workers=True, drop_last=True)
    return timed_epochs(lambda: sum(len(y) for _, y in loader))


def decode_only(src: Path) -> float:
    from PIL import Image

    files = sorted(src.rglob("*.JPEG"))

    def decode(p: Path) -> None:
        Image.open(io.BytesIO(p.read_bytes())).load()  # PIL releases the GIL while decoding

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return timed_epochs(lambda: sum(1 for _ in pool.map(decode, files)))


def main() -> None:
    torch.set_num_threads(os.cpu_count())
    src = imagenet_like(CLASSES, PER_CLASS)
    out = shards(src)
    device = "cuda" if GPU else "cpu"
    ours, costs = dptrain_loader(out, device)
    print(f"(1): {ours:,.0f} img/s, {costs}", flush=True)  # kept if a time limit stops the rest
    rates = {"(1) dptrain Loader, DALI " + ("mixed" if GPU else "CPU"): ours}
    cached, cache_costs = dptrain_loader(out, device, cached=True)
    fill = cache_costs["first epoch img/s"]
    print(f"(5): {cached:,.0f} img/s; the first epoch (the fill) {fill:,.0f} img/s, "
          f"{cache_costs}", flush=True)
    for name, measure in [("(4) hand-written DALI webdataset pipeline",
                           lambda: dali_webdataset(out, device)),
                          ("(2) torchvision ImageFolder + DataLoader",
                           lambda: torchvision_loader(src)),
                          ("(3) PIL decode only", lambda: decode_only(src))]:
        rates[name] = measure()
        print(f"{name}: {rates[name]:,.0f} img/s", flush=True)
    rates = {k: rates[k] for k in sorted(rates)}
    names = list(rates)
    r12, r13, r14 = (ours / rates[n] for n in names[1:])
    where, side = cache_costs["cache"]["where"], cache_costs["cache"]["side"]
    rates[f"(5) dptrain Loader from its pixel cache ({where}), epochs after the first"] = cached
    rates[f"(5) its first epoch, which fills it (images shrunk to <= {side} px)"] = fill
    r51, fill1 = cached / ours, fill / ours
    rows = [{"loader": k, "img/s": v} for k, v in rates.items()]
    print(f"{CLASSES * PER_CLASS:,} JPEGs of 500x375, batch {BATCH}, {os.cpu_count()} cores, "
          f"device {device} ({torch.cuda.get_device_name(0) if GPU else 'no GPU'}), mean over "
          f"{EPOCHS} epochs after a warm-up")
    print(table(rows))
    print(f"(1)/(2) = {r12:.2f} (target >= 1.5); (1)/(3) = {r13:.2f} (target >= 0.8); "
          f"(1)/(4) = {r14:.2f} (target >= 1.0 on a GPU)")
    print(f"(5)/(1) = {r51:.2f} (target >= 3 on the CPU); its first epoch/(1) = {fill1:.2f} "
          "(target >= 0.8)")
    epoch_starts = ", ".join(f"{x:.1f}" for x in costs["epoch-start wait ms"])
    print(f"(1) training-thread CPU per batch: {costs['main-thread CPU ms/batch']:.2f} ms; wait "
          f"for a batch: median {costs['median wait ms']:.1f} ms, at epoch starts "
          f"{epoch_starts} ms")
    path = save("loader", {"images": CLASSES * PER_CLASS, "batch_size": BATCH, "res": RES,
                           "device": device, "epochs": EPOCHS, "img_per_s": rates,
                           "ratio_vs_torchvision": r12, "ratio_vs_decode_only": r13,
                           "ratio_vs_dali_webdataset": r14, "dptrain_costs": costs,
                           "cached_vs_streaming": r51, "fill_vs_streaming": fill1,
                           "cached_costs": cache_costs,
                           "targets": {"vs_torchvision": 1.5, "vs_decode_only": 0.8,
                                       "vs_dali_webdataset_gpu": 1.0, "cached_vs_streaming": 3.0,
                                       "fill_vs_streaming": 0.8}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
