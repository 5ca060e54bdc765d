"""`dptrain shard` in copy mode against `tar -cf` of the same folder, in one run.

    .venv/bin/python benchmarks/shard_write.py     # target: dptrain/tar >= 0.8 with both cores
    .venv/bin/python benchmarks/shard_write.py --modes warm --repeats 3   # a shorter run

Input: 20,000 generated ImageNet-like JPEGs (500x375, ~110 KB) in 100 class folders, 2.1 GB.
The issue asks for at least 5,000; at that size Python's ~0.2 s start-up alone is half of
tar's time, which says nothing about sharding ImageNet's 140 GB. Start-up is reported on its own
line (a no-op rerun).

Two cache states, each with its own tar baseline:
- cold: page cache dropped before every command (needs root), so the inputs come from disk,
  as ImageNet's 140 GB must (it does not fit in RAM);
- warm: inputs in the page cache, so both commands are CPU-bound: the worst case for dptrain,
  which also checks every JPEG's structure, sha256-hashes every byte (the index records each
  tar's hash) and writes two indexes. "read + sha256, 1 core" shows what the hashing alone costs.
Both are whole commands run as subprocesses (start-up included), alternated, after a sync;
the median of the repeats is reported.

The cost of durability: each mode also runs `dptrain shard` with os.fsync replaced by a no-op
in that process only (the tars and index then reach the disk later, at the kernel's leisure),
so "fsync on / fsync off" is the price of the shard set being on disk when the command
returns. "+ sync" rows time the command followed by sync(1): the time until the data is
durable either way.

The cost of the decode check: `dptrain shard` decodes every JPEG with the loader's decoder
by default (`--check decode`, issue 33); "--check header" rows run the marker walk alone, as
the default was before.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, imagenet_like, save, table  # noqa: E402

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    try:
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], cold: bool) -> float:
    os.sync()  # no dirty pages left from the last run: its writeback is not this run's cost
    if cold:
        drop_caches()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def no_fsync(dptrain: str) -> list[str]:
    """`dptrain` run with os.fsync a no-op: the same command without its durability."""
    code = ("import os, sys; os.fsync = lambda fd: None; sys.argv[0] = 'dptrain'; "
            "from dptrain.cli import main; main()")
    return [sys.executable, "-c", code]


def timed_sync(cmd: list[str], cold: bool) -> float:
    """The command and then sync(1): the time until what it wrote is on disk."""
    return timed(["sh", "-c", '"$@" >/dev/null && sync', "sh", *cmd], cold)


def hash_floor(files: list[Path]) -> float:
    """One core reading and sha256-hashing every input: the hashing dptrain cannot skip."""
    t = time.perf_counter()
    for p in files:
        hashlib.sha256(p.read_bytes()).digest()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="cold,warm", help="cache states: cold,warm")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each (default: 3 cold, 5 warm)")
    args = ap.parse_args()
    src = imagenet_like(100, 200)
    files = sorted(src.rglob("*.JPEG"))
    nbytes = sum(p.stat().st_size for p in files)
    dptrain = str(Path(sys.executable).with_name("dptrain"))
    can_drop = os.sync() or drop_caches()
    modes = {m: args.repeats or {"cold": 3, "warm": 5}[m] for m in args.modes.split(",")
             if m == "warm" or can_drop}
    work = Path(tempfile.mkdtemp(dir=DATA))  # same file system as the inputs
    times: dict[str, list[float]] = {}
    try:
        for mode, repeats in modes.items():
            cold = mode == "cold"
            for r in range(repeats):
                out, tar = work / f"shards{r}", work / f"{r}.tar"
                times.setdefault(f"tar -cf ({mode})", []).append(
                    timed(["tar", "-cf", str(tar), "-C", str(src), "."], cold))
                shard = ["shard", str(src), str(out), "--no-progress"]
                times.setdefault(f"dptrain shard ({mode})", []).append(
                    timed([dptrain, *shard], cold))
                shutil.rmtree(out)
                times.setdefault(f"dptrain shard --check header ({mode})", []).append(
                    timed([dptrain, *shard, "--check", "header"], cold))
                shutil.rmtree(out)
                times.setdefault(f"dptrain shard, fsync off ({mode})", []).append(
                    timed(no_fsync(dptrain) + shard, cold))
                shutil.rmtree(out)
                times.setdefault(f"dptrain shard + sync ({mode})", []).append(
                    timed_sync([dptrain, *shard], cold))
                shutil.rmtree(out)
                times.setdefault(f"dptrain shard, fsync off + sync ({mode})", []).append(
                    timed_sync(no_fsync(dptrain) + shard, cold))
                if not cold:
                    times.setdefault("dptrain shard, no-op rerun", []).append(
                        timed([dptrain, "shard", str(src), str(out), "--no-progress"], False))
                    times.setdefault("read + sha256, 1 core (warm)", []).append(hash_floor(files))
                shutil.rmtree(out)
                os.unlink(tar)
    finally:
        shutil.rmtree(work)

    rows, ratios, fsync_cost = [], {}, {}
    for name, ts in times.items():
        t = statistics.median(ts)
        noop = "no-op" in name
        rows.append({"method": name, "seconds": t, "img/s": "-" if noop else len(files) / t,
                     "MB/s": "-" if noop else nbytes / 1e6 / t})
    decode_cost = {}
    for mode in modes:
        ratios[mode] = (statistics.median(times[f"tar -cf ({mode})"])
                        / statistics.median(times[f"dptrain shard ({mode})"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        decode_cost[mode] = med[f"dptrain shard ({mode})"] / med[
            f"dptrain shard --check header ({mode})"]
        fsync_cost[mode] = {
            "command": med[f"dptrain shard ({mode})"] / med[f"dptrain shard, fsync off ({mode})"],
            "command + sync": (med[f"dptrain shard + sync ({mode})"]
                               / med[f"dptrain shard, fsync off + sync ({mode})"])}
    print(f"{len(files):,} JPEGs, {nbytes / 1e6:,.0f} MB, {os.cpu_count()} cores; median of "
          + ", ".join(f"{n} {m}" for m, n in modes.items()) + " runs")
    print(table(rows))
    for mode, ratio in ratios.items():
        print(f"dptrain / tar, {mode} cache = {ratio:.2f} (target >= 0.8)")
    for mode, cost in decode_cost.items():
        print(f"--check decode / header, {mode} cache: {cost:.2f} (the decode check's cost)")
    for mode, cost in fsync_cost.items():
        print(f"fsync on / off, {mode} cache: command {cost['command']:.2f}, "
              f"command + sync {cost['command + sync']:.2f} (target: within the noise)")
    if not can_drop:
        print("cold cache not measured: writing /proc/sys/vm/drop_caches needs root")
    path = save("shard_write", {"images": len(files), "bytes": nbytes, "repeats": modes,
                                "times_s": times, "rows": rows, "ratio_vs_tar": ratios,
                                "fsync_on_over_off": fsync_cost,
                                "check_decode_over_header": decode_cost,
                                "target_ratio": 0.8})
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
