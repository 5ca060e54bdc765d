"""Training throughput with the real loader against the same loop fed from memory, one run.

    .venv/bin/python benchmarks/train_step.py   # target: loader run >= 0.9 of the memory run
    python benchmarks/train_step.py --arch resnet50 --res 224 --batch-size 256  # on a GPU

Both runs call the real `dptrain.train.train` (ResNet-18, 128 px, batch 64, --amp auto:
bf16 where the hardware has it, else fp32 on a CPU; channels_last, SGD) on 5,000 ImageNet-like
JPEGs; the only difference is where the batches come from: (a) the DALI loader, decoding
while the model trains (on the CPU both share the same two cores); (b) uint8 batches decoded
beforehand by the same loader and replayed from memory: the model's own ceiling. Throughput
is the steady state (the mean of the metrics lines after the first, which holds the pipeline
start-up) and the whole run's mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, imagenet_like, save, table  # noqa: E402
from loader import shards  # noqa: E402

import dptrain.train as T  # noqa: E402

LOG = 10


class MemoryLoader:
    """Replays batches decoded by the real loader; same interface as dptrain.loader.Loader."""

    def __init__(self, real):
        self.res, self.device = real.res, real.device
        self.batches = [(x.clone(), y.clone()) for x, y in real]
        real.close()

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def close(self) -> None:
        pass


def run(cfg, out: Path) -> dict:
    summary = T.train(cfg, out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [x["images_per_s"] for x in lines[1:]]
    return {"steady img/s": sum(steady) / len(steady), "run img/s": summary["images_per_s"],
            "data wait": summary["data_wait_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    arch, res, batch, steps = args.arch, args.res, args.batch_size, args.steps
    data = shards(imagenet_like(50, 100))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = T.make_config("fast", data=str(data), arch=arch, res=res, batch_size=batch,
                        steps=steps, log_every=LOG, device=device)
    real_loader = T.train_loader
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        a = run(cfg, Path(tmp) / "loader")
        T.train_loader = lambda *args, **kw: MemoryLoader(real_loader(*args, **kw))
        try:
            b = run(cfg, Path(tmp) / "memory")
        finally:
            T.train_loader = real_loader
    ratio = a["steady img/s"] / b["steady img/s"]
    rows = [{"batches from": "dptrain Loader (DALI)", **a}, {"batches from": "memory", **b}]
    amp = T.resolve_amp("auto", device == "cuda")
    print(f"{arch} at {res} px, batch {batch}, {steps} steps, amp {amp}, channels_last, "
          f"{device} ({os.cpu_count()} cores)")
    print(table(rows))
    target = 0.95 if device == "cuda" else 0.9
    print(f"loader / memory = {ratio:.2f} (target >= {target} on {device})")
    path = save("train_step", {"arch": arch, "res": res, "batch_size": batch, "steps": steps,
                               "device": device, "amp": amp, "loader": a, "memory": b,
                               "ratio_vs_memory": ratio, "target_ratio": target})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
