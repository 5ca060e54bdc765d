"""`dptrain sweep --dry-run`'s estimate against the same sweep run for real, in one run.

    .venv/bin/python benchmarks/dry_run.py     # target: estimate / measured within 0.7..1.3

The built-in synthetic data (a 40-class x 60-image pool and the three downstream tasks), a
grid of 2 points x 2 seeds with the synthetic recipe for 4 epochs, on this CPU: first the dry
run (which times its own training steps, forward passes, solver and start-up here), then the
sweep itself; the measured figure is the sweep command's whole wall time. A timing check, so
a benchmark and not a test (the machines are noisy; compare the ratio).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, save, table  # noqa: E402

GRID = ["--points", "20:60,40:30", "--seeds", "2", "--recipe", "synthetic", "--epochs", "4",
        "--device", "cpu", "--no-progress"]


def main() -> None:
    dptrain = [sys.executable, "-m", "dptrain"]
    data = DATA / "synthetic-40x60"
    if not (data / "suite.toml").is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools"
                                            / "make_shards.py"), "--out", str(data),
                        "--classes", "40", "--per-class", "60", "--task-train", "60",
                        "--task-test", "30", "--no-progress"], check=True)
    work = Path(tempfile.mkdtemp(dir=DATA))
    try:
        args = ["sweep", "--data", str(data / "pretrain"), "--suite", str(data / "suite.toml"),
                "--out", str(work / "sweep"), "--eval-cache", str(work / "cache"), *GRID]
        t = time.perf_counter()
        dry = subprocess.run([*dptrain, *args, "--dry-run"], capture_output=True, text=True,
                             check=True).stdout
        dry_s = time.perf_counter() - t
        estimate = float(re.search(r"estimated wall time: [\d.]+ h \(([\d,]+) s\)",
                                   dry).group(1).replace(",", ""))
        t = time.perf_counter()
        subprocess.run([*dptrain, *args], capture_output=True, text=True, check=True)
        measured = time.perf_counter() - t
    finally:
        shutil.rmtree(work)
    ratio = estimate / measured
    print(dry)
    print(table([{"what": "dry run's estimate", "seconds": estimate},
                 {"what": "the sweep, measured", "seconds": measured},
                 {"what": "the dry run itself", "seconds": dry_s}]))
    print(f"estimate / measured = {ratio:.2f} (target 0.7..1.3)")
    path = save("dry_run", {"grid": GRID, "estimate_s": estimate, "measured_s": measured,
                            "dry_run_s": dry_s, "ratio": ratio, "target": [0.7, 1.3],
                            "dry_run_output": dry})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
