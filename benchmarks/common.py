"""What every benchmark shares: the generated ImageNet-like data, machine facts, the result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from dptrain.data.imagenet_like import write_image_folder

BENCH = Path(__file__).resolve().parent
DATA = BENCH / ".data"  # generated inputs, reused between runs (git-ignored)
RESULTS = BENCH / "results"


def imagenet_like(num_classes: int = 50, per_class: int = 100) -> Path:
    """A class-folder tree of 500x375 quality-90 JPEGs (~110 KB each), made once."""
    return write_image_folder(DATA / f"imagenet-like-{num_classes}x{per_class}", num_classes,
                              per_class)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version()}


def commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree elsewhere names its commit itself
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, text=True,
                             capture_output=True, check=True).stdout.strip()
        # Results themselves do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", f":(top,exclude){RESULTS.relative_to(BENCH.parent)}"],
                               cwd=BENCH, text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(name: str, figures: dict) -> Path:
    """Write benchmarks/results/<name>-<timestamp>.json with the machine, date and commit."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {"benchmark": name, "date": now.isoformat(timespec="seconds"), "commit": commit(),
              "machine": machine(), **figures}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def table(rows: list[dict]) -> str:
    """A Markdown table of dicts: a column per key of any of them ("-" where a row lacks it)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
