"""Loader throughput: dptrain's DALI loader against what users write, and against decode alone.

    .venv/bin/python benchmarks/loader.py     # targets: (1)/(2) >= 1.5, (1)/(3) >= 0.8

5,000 generated ImageNet-like JPEGs (500x375, ~110 KB), page cache warm, all cores, measured
in one run, each over two full epochs after a warm-up epoch (with a GPU: 20,000 JPEGs in
batches of 256, so an epoch lasts long enough to time; target there >= 10,000 img/s for (1)):
(1) dptrain: `Loader(train=True, res=224)`, uint8 NHWC batches of 64 (CPU-only DALI without
    a GPU; the device the batches land on is the machine's);
(2) torchvision ImageFolder + DataLoader (one worker process per core, persistent) +
    RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, batches of 64;
(3) decode only: PIL (libjpeg-turbo) full decode of every file, one thread per core, no
    transform: the limit of a loader that decodes whole images on these cores.
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
    run_epoch()  # warm-up: start-up, worker processes, caches
    t = time.perf_counter()
    n = sum(run_epoch() for _ in range(EPOCHS))
    return n / (time.perf_counter() - t)


def dptrain_loader(out: Path, device: str) -> float:
    from dptrain.index import ShardIndex
    from dptrain.loader import Loader
    from dptrain.subset import select

    loader = Loader(select(ShardIndex.load(out)), batch_size=BATCH, train=True, res=RES,
                    device=device)

    def epoch() -> int:
        n = 0
        for images, labels in loader:
            n += len(labels)
        if device == "cuda":
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
    rates = {"(1) dptrain Loader, DALI " + ("mixed" if device == "cuda" else "CPU"):
             dptrain_loader(out, device),
             "(2) torchvision ImageFolder + DataLoader": torchvision_loader(src),
             "(3) PIL decode only": decode_only(src)}
    names = list(rates)
    r12, r13 = rates[names[0]] / rates[names[1]], rates[names[0]] / rates[names[2]]
    rows = [{"loader": k, "img/s": v} for k, v in rates.items()]
    print(f"{CLASSES * PER_CLASS:,} JPEGs of 500x375, batch {BATCH}, {os.cpu_count()} cores, "
          f"device {device}, mean over {EPOCHS} epochs after a warm-up")
    print(table(rows))
    print(f"(1)/(2) = {r12:.2f} (target >= 1.5); (1)/(3) = {r13:.2f} (target >= 0.8)")
    if GPU:
        print(f"(1) on the GPU: {rates[names[0]]:,.0f} img/s (target >= 10,000 on one H100)")
    path = save("loader", {"images": CLASSES * PER_CLASS, "batch_size": BATCH, "res": RES,
                           "device": device,
                           "epochs": EPOCHS, "img_per_s": rates, "ratio_vs_torchvision": r12,
                           "ratio_vs_decode_only": r13, "targets": {"vs_torchvision": 1.5,
                                                                    "vs_decode_only": 0.8}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
