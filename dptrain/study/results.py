"""A sweep's results: SWEEP/results.csv, one row per (run, downstream set), collected from the
run folders; and the numbers `report` and `theory` read from it (errors per point and seed,
the best split per budget).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from ..common.errors import DataError
from ..common.runfolder import SweepFolder, write_atomic

COLUMNS = ("run", "K", "n", "N", "seed", "subset_seed", "dataset", "top1_mean", "top1_std",
           "error_mean", "train_loss", "train_top1", "val_top1", "steps", "epochs", "pretrain_s",
           "probe_s", "images_per_s", "device")


def collect(out: Path) -> list[dict]:
    """Rows of results.csv, read from the run folders (and each run's N from the sweep's
    spec)."""
    sweep = SweepFolder(out)
    sizes = sweep.sizes()
    rows = []
    for run in sweep.runs():
        try:
            summary, config = run.read_summary(), run.read_config()
        except DataError:
            continue
        if summary is None or config is None:
            continue
        probe = run.read_probe() or {"datasets": {}}
        k, n = config["config"]["classes"], config["config"]["per_class"]
        for name, r in sorted(summary.get("probe", {}).items()):
            p = probe["datasets"].get(name, {})
            rows.append({"run": run.name, "K": k, "n": n, "N": sizes.get(run.name, k * n),
                         "seed": config["config"]["seed"],
                         "subset_seed": config["subset"].get("seed", config["config"]["seed"]),
                         "dataset": name,
                         "top1_mean": r["top1_mean"], "top1_std": r["top1_std"],
                         "error_mean": r["error_mean"], "train_loss": summary["train_loss"],
                         "train_top1": summary["train_top1_last_epoch"],
                         "val_top1": summary["val_top1"], "steps": summary["steps"],
                         "epochs": summary["epochs"], "pretrain_s": summary["wall_s"],
                         "probe_s": p.get("feature_seconds", 0) + p.get("probe_seconds", 0),
                         "images_per_s": summary["images_per_s"], "device": summary["device"]})
    return rows


def write_results(out: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(collect(out))
    path = out / SweepFolder.RESULTS
    write_atomic(path, buf.getvalue().encode())
    return path


def read_results(out: Path) -> list[dict]:
    path = Path(out) / SweepFolder.RESULTS
    if not path.is_file():
        raise DataError(f"{out} has no {SweepFolder.RESULTS}: is it a dptrain sweep folder?")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    missing = [c for c in ("run", "dataset", *NUMBERS) if c not in header]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: a dptrain sweep "
                        f"writes {', '.join(COLUMNS)}")
    if not rows:
        raise DataError(f"{path} lists no finished run yet: run or finish the sweep first")
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        for key in ("run", "dataset"):
            if not r[key]:
                raise DataError(f"{path}, line {line}, column {key}: empty")
        for key, (kind, low) in NUMBERS.items():
            try:
                r[key] = kind(r[key])
                if not math.isfinite(r[key]) or (low is not None and r[key] < low):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise DataError(f"{path}, line {line}, column {key}: {r.get(key)!r} is not "
                                f"{'an integer' if kind is int else 'a number'}"
                                f"{f' of at least {low}' if low is not None else ''}") from None
    return rows


# results.csv's columns that are numbers: their type and least value (None: any finite one)
NUMBERS = {"K": (int, 1), "n": (int, 1), "N": (int, 1), "seed": (int, 0), "steps": (int, 0),
           "epochs": (int, 0), "top1_mean": (float, None), "top1_std": (float, 0),
           "error_mean": (float, None)}


AVERAGE = "average"  # the mean over downstream sets, per run


def errors_by_seed(rows: list[dict]) -> dict[str, dict[tuple[int, int, int], dict[int, float]]]:
    """{downstream set or AVERAGE: {(K, n, N): {seed: error}}} from results.csv rows.
    AVERAGE covers the runs probed on every set (none where no run was)."""
    by_set: dict[str, dict[tuple[int, int, int], dict[int, float]]] = {}
    for r in rows:
        by_set.setdefault(r["dataset"], {}).setdefault((r["K"], r["n"], r["N"]), {})[r["seed"]] = \
            r["error_mean"]
    names = sorted(by_set)
    out = {name: dict(sorted(pts.items())) for name, pts in by_set.items()}
    average: dict[tuple[int, int, int], dict[int, float]] = {}
    for p in sorted({p for pts in by_set.values() for p in pts}):
        seeds = set.intersection(*(set(by_set[n].get(p, {})) for n in names))
        if seeds:
            average[p] = {s: sum(by_set[n][p][s] for n in names) / len(names)
                          for s in sorted(seeds)}
    if len(names) > 1 and average:
        out[AVERAGE] = average
    return out


def errors_by_point(rows: list[dict]) -> dict[str, dict[tuple[int, int, int], list[float]]]:
    """{downstream set or AVERAGE: {(K, n, N): [error of each seed]}} (`errors_by_seed`)."""
    return {name: {p: list(s.values()) for p, s in pts.items()}
            for name, pts in errors_by_seed(rows).items()}


TIE_SE = 2.0  # standard errors that tell a gap, many seeds on (predict's power line)


def t_bound(df: float, level: float = 0.95) -> float:
    """How many standard errors a difference must exceed to be told apart at `level`
    (two-sided), its se having `df` degrees of freedom: Student's t (3.18 at 3, 2.0 near 60),
    since few seeds measure their own spread loosely."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def versus_best(points: dict[tuple[int, int, int], dict[int, float]],
                size: int) -> dict[tuple[int, int, int], dict]:
    """Each split of budget `size` against the best one (lowest mean error): `diff`, its mean
    error minus the best's; `se`, the standard error of that difference; `paired`, the number
    of seeds it is paired over; `bound`, the standard errors a difference must exceed to be
    told apart (`t_bound` on the se's degrees of freedom); and `tied`, whether the runs cannot
    tell it from the best (diff <= bound x se; None where no se can be had).

    Splits run on the same seeds are paired (a sweep's seed s of every split shares its
    seed's draws where the splits allow): the se is the std of the per-seed differences over
    the shared seeds / sqrt(their number), which removes what the seeds share, with one
    degree of freedom fewer than seeds. With fewer than 2 shared seeds, Welch's unpaired se
    from each split's own seeds (and Welch-Satterthwaite's degrees of freedom); with one seed
    each, none."""
    at = {p: v for p, v in points.items() if p[2] == size}
    best = min(at, key=lambda p: statistics.mean(at[p].values()))
    out = {}
    for p, v in at.items():
        diff = statistics.mean(v.values()) - statistics.mean(at[best].values())
        shared = sorted(set(v) & set(at[best]))
        se, paired, df = None, 0, None
        if p == best:
            se, paired = 0.0, len(v)
        elif len(shared) >= 2:
            d = [v[s] - at[best][s] for s in shared]
            se, paired, df = statistics.stdev(d) / math.sqrt(len(d)), len(d), len(d) - 1
        elif len(v) >= 2 and len(at[best]) >= 2:
            a = statistics.variance(v.values()) / len(v)
            b = statistics.variance(at[best].values()) / len(at[best])
            se = math.sqrt(a + b)
            df = (a + b) ** 2 / (a * a / (len(v) - 1) + b * b / (len(at[best]) - 1)) \
                if a + b > 0 else math.inf
        bound = t_bound(df) if df else None
        tied = True if p == best else (None if se is None else diff <= bound * se)
        out[p] = {"diff": diff, "se": se, "paired": paired, "bound": bound, "tied": tied,
                  "best": p == best}
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """A point's mean error and its sample std over seeds (0 for one seed), as the report's
    tables and the held-out check give them."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def best_per_size(points: dict[tuple[int, int, int], list[float]]) -> dict[int, tuple]:
    """The (K, n, N) of lowest mean error at each budget N."""
    best: dict[int, tuple] = {}
    for p, errs in points.items():
        size = p[2]
        if size not in best or statistics.mean(errs) < statistics.mean(points[best[size]]):
            best[size] = p
    return best
