"""Training throughput with the real loader against the same loop fed from memory, one run.

    .venv/bin/python benchmarks/train_step.py   # CPU: target loader run >= 0.9 of the memory run
    python benchmarks/train_step.py --arch resnet18 --res 176 --batch-size 256 --steps 240 \\
        --images 20000 --variant hw_decoder_load=1.0     # GPU: target >= 0.95
    .venv/bin/python benchmarks/train_step.py --arch smallcnn --res 16 --images 3000 \\
        --epochs 16 --variant pixel_cache=off   # decoding-bound: the whole cached run, fill
                                  # included, target >= 0.8 of the memory-fed steady rate

Every run calls the real `dptrain.training.train.train` (--amp auto: bf16 where the hardware has it,
else fp32 on a CPU; channels_last, SGD) on generated ImageNet-like JPEGs (500x375, ~110 KB);
the only difference is where the batches come from: (a) the DALI loader, decoding while the
model trains; (b) uint8 batches decoded beforehand by the same loader and replayed from memory
(on the device): the model's own ceiling. Throughput is the steady state (the mean of the
metrics lines after the first, which holds the pipeline start-up) and the whole run's mean.

The default loader run uses the default `--pixel-cache auto` (on the CPU: the host pixel
cache, filled at the start of the run, inside its wall time); `--variant pixel_cache=off`
streams.
"run img/s" is the whole run (the cache's fill included), "steady img/s" the mean of the
metrics lines after the first. `--epochs` runs whole epochs instead of `--steps`.

`--variant` (repeatable) adds loader-fed runs with other settings, each against the same
memory-fed run: `key=value[,key=value]` with keys decode, hw_decoder_load, workers, prefetch,
pixel_cache, pixel_cache_side.
`--profile DIR` also writes a torch.profiler trace of a short loader-fed run and prints the
busy share of each CUDA stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, imagenet_like, save, table  # noqa: E402
from loader import shards  # noqa: E402

import dptrain.training.train as T  # noqa: E402
from dptrain.common.options import RENAMED  # noqa: E402
from dptrain.common.runfolder import RunFolder  # noqa: E402
from dptrain.training.config import make_config  # noqa: E402
from dptrain.training.device import resolve_amp  # noqa: E402

LOG = 10


class MemoryLoader:
    """Replays batches decoded by the real loader; the Loader's interface."""

    def __init__(self, real):
        self.res, self.device = real.res, real.device
        self.threads = real.threads
        self.batches = [(x.clone(), y.clone()) for x, y in real]
        real.close()

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def stage_ms(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def run(cfg, out: Path, name: str, make_loader=T.train_loader) -> dict:
    summary = T.train(cfg, out, progress=False, make_loader=make_loader)
    lines = RunFolder(out).read_metrics()
    steady = [x["images_per_s"] for x in lines[1:]]
    r = {"steady img/s": sum(steady) / len(steady), "run img/s": summary["images_per_s"],
         "data wait": summary["data_wait_fraction"], "cache": summary["pixel_cache"]["where"],
         "fill s": summary["pixel_cache"]["fill_s"] or 0.0,
         "loader threads": summary.get("loader_threads"),
         "loader ms/batch": summary.get("loader_ms_per_batch")}
    print(f"{name}: {json.dumps(r)}", flush=True)  # kept even if a time limit stops the rest
    return r


def parse_variant(text: str) -> dict:
    """'hw_decoder_load=0.65,decode=gpu' -> config overrides."""
    types = {"decode": str, "hw_decoder_load": float, "workers": int, "prefetch": int,
             "pixel_cache": str, "pixel_cache_side": int}
    overrides = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        key = RENAMED.get(key, key)  # cache=off from before the rename
        if key not in types:
            raise SystemExit(f"--variant: unknown key {key!r} ({', '.join(types)})")
        overrides[key] = types[key](value)
    return overrides


def profile(cfg, out: Path, trace_dir: Path) -> dict:
    """A short loader-fed run under torch.profiler: the trace, and the GPU's busy share."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                      else [])
    with torch.profiler.profile(activities=acts) as prof:
        T.train(cfg, out, progress=False)
    trace_dir.mkdir(parents=True, exist_ok=True)
    raw = trace_dir / "trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(str(raw) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()
    events = json.loads(gzip.open(str(raw) + ".gz").read())["traceEvents"]
    # Busy time per CUDA stream (kernels and copies), over the span of all of them.
    spans: dict[str, list] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            spans.setdefault(str(e.get("tid")), []).append((e["ts"], e["ts"] + e["dur"]))
    summary = {}
    if spans:
        t0 = min(s for v in spans.values() for s, _ in v)
        t1 = max(e for v in spans.values() for _, e in v)
        for stream, v in spans.items():
            summary[f"stream {stream} busy"] = sum(e - s for s, e in v) / (t1 - t0)
        summary["GPU span ms"] = (t1 - t0) / 1e3
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, help="whole epochs instead of --steps")
    ap.add_argument("--images", type=int, default=5000, help="JPEGs, in 50 or 100 classes")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--profile", type=Path, help="write a trace of a 40-step run here")
    ap.add_argument("--label", default="", help="a note saved with the results")
    args = ap.parse_args()
    arch, res, batch, steps = args.arch, args.res, args.batch_size, args.steps
    classes = 50 if args.images <= 5000 else 100
    data = shards(imagenet_like(classes, args.images // classes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_config("fast", data=str(data), arch=arch, res=res, batch_size=batch,
                      steps=None if args.epochs else steps, epochs=args.epochs, log_every=LOG,
                      device=device)
    variants = {"default": {}, **{v: parse_variant(v) for v in args.variant}}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        # The baseline first: the ratios need it.
        memory = run(dataclasses.replace(cfg, pixel_cache="off"), Path(tmp) / "memory", "memory",
                     lambda *a, **kw: MemoryLoader(T.train_loader(*a, **kw)))
        for name, overrides in variants.items():
            runs[name] = run(dataclasses.replace(cfg, **overrides),
                             Path(tmp) / f"loader-{len(runs)}", name)
        prof = profile(dataclasses.replace(cfg, steps=40),
                       Path(tmp) / "profile", args.profile) if args.profile else None
    ratios = {name: r["steady img/s"] / memory["steady img/s"] for name, r in runs.items()}
    # The whole loader-fed run (a cache's fill included) against the model's own rate.
    whole = {name: r["run img/s"] / memory["steady img/s"] for name, r in runs.items()}
    plain = lambda r: {k: v for k, v in r.items() if k != "loader ms/batch"}  # noqa: E731
    rows = [{"batches from": f"dptrain Loader ({name})", **plain(r), "ratio": ratios[name],
             "whole run ratio": whole[name]} for name, r in runs.items()]
    rows.append({"batches from": "memory", **plain(memory), "ratio": 1.0, "whole run ratio": "-"})
    stages = [{"loader": name, **r["loader ms/batch"]} for name, r in runs.items()]
    amp = resolve_amp("auto", device == "cuda")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
    print(f"{arch} at {res} px, batch {batch}, {steps} steps, {args.images:,} JPEGs, amp {amp}, "
          f"channels_last, {device} ({gpu}, {os.cpu_count()} cores)")
    print(table(rows))
    target = 0.95 if device == "cuda" else 0.9
    print(f"loader / memory = {ratios['default']:.2f} (target >= {target} on {device}); whole "
          f"run, cache fill included: {whole['default']:.2f}")
    print("the loader's feeder thread, ms per batch in each stage (queue full: time to spare):")
    print(table(stages))
    if prof:
        print(table([{"profile (40 steps, loader-fed)": k, "value": v} for k, v in prof.items()]))
    path = save("train_step", {"arch": arch, "res": res, "batch_size": batch, "steps": steps,
                               "images": args.images, "device": device, "amp": amp,
                               "label": args.label, "loader": runs["default"], "memory": memory,
                               "epochs": args.epochs,
                               "ratio_vs_memory": ratios["default"], "variants": runs,
                               "variant_ratios": ratios, "whole_run_ratios": whole,
                               "profile": prof,
                               "target_ratio": target})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
