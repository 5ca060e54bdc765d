"""`dptrain report SWEEP`: the paper's Figure 1 and a table, from a sweep's results.csv;
`dptrain report RUN`: one run's curves and its probe table.

Per downstream set (and their average): a contour map of mean error over (log K, log n) with
dashed anti-diagonals at each budget N and the best point of each N marked; error against
log(K / n), one curve per N with +-1 std over seeds as a band; a Markdown table of mean +- std
per point; and the error model's fits with their residuals and any parameter on a bound.
SWEEP/report/report.md links them. matplotlib, no display needed.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import numpy as np

from ..common.errors import DataError
from ..common.progress import plural
from ..common.runfolder import RunFolder, SweepFolder, make_folder, write_atomic
from .calibrate import holdout_check, label
from .predict import data_limits
from .results import (
    AVERAGE,
    TIE_SE,
    best_per_size,
    errors_by_point,
    errors_by_seed,
    mean_std,
    read_results,
    versus_best,
)
from .theory import FitError, fit_line, fit_points, residual_line


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


_MARKERS = "DsP^vX<>"


FORMATS = ("png", "pdf", "svg")  # the figures' formats: png for report.md, pdf/svg for a paper


def save_figure(fig, path: Path, dpi: int) -> None:
    """The figure at `path` (its format from the suffix), written under a temporary name and
    renamed: an interrupted report leaves the last figure whole."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def contour_figure(name: str, points: dict[tuple[int, int, int], list[float]], path: Path,
                   optima: dict[int, tuple[float, float]] | None = None,
                   predicted: dict[str, tuple[int, int]] | None = None,
                   tied: set[tuple[int, int, int]] | None = None) -> None:
    """`optima`: {N: (K*, n*)} from the model fitted to every point, marked as white circles;
    `predicted`: {method: (K, n)} predicted for the largest N from the smaller ones, one marker
    each, with a legend; `tied`: the splits the runs cannot tell from their budget's best,
    ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    ks = np.array([p[0] for p in points], float)
    ns = np.array([p[1] for p in points], float)
    err = np.array([statistics.mean(v) for v in points.values()])
    x, y = np.log10(ks), np.log10(ns)
    fig, ax = plt.subplots(figsize=(6, 5))
    try:  # a map needs points off one line: one budget alone gives only a line
        tri = mtri.Triangulation(x, y)
        filled = ax.tricontourf(tri, err, levels=12, cmap="viridis")
        fig.colorbar(filled, ax=ax, label="downstream error")
    except (RuntimeError, ValueError):
        pass
    sc = ax.scatter(x, y, c=err, cmap="viridis", edgecolors="white", s=60, zorder=3)
    if not ax.collections[:-1]:
        fig.colorbar(sc, ax=ax, label="downstream error")
    for xi, yi, e in zip(x, y, err):
        ax.annotate(f"{e:.3f}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=7)
    lo, hi = min(x.min(), y.min()) - 0.2, max(x.max(), y.max()) + 0.2
    for size, (k, n, _) in sorted(best_per_size(points).items()):
        ax.plot([lo, hi], [math.log10(size) - lo, math.log10(size) - hi], "k--", lw=0.8)
        ax.plot(math.log10(k), math.log10(n), "r*", ms=15, zorder=4)
        edge = min(x.max() + 0.2, math.log10(size) - y.min() + 0.2)  # where the line leaves
        ax.annotate(f"N={size:,}", (edge, math.log10(size) - edge), fontsize=7, ha="right",
                    va="bottom")
    for k, n, _ in tied or ():
        ax.plot(math.log10(k), math.log10(n), "o", mfc="none", mec="red", mew=1, ms=11,
                zorder=4)
    for k, n in (optima or {}).values():
        ax.plot(math.log10(k), math.log10(n), "o", mfc="none", mec="white", mew=2, ms=14,
                zorder=5)
    for (method, (k, n)), m in zip((predicted or {}).items(), _MARKERS):
        ax.plot(math.log10(k), math.log10(n), m, mfc="none", mec="red", mew=1.2, ms=9,
                zorder=6, label=method)
    if predicted:  # the corner above the largest budget's line holds no points
        ax.legend(loc="upper right", fontsize=6, markerscale=0.6,
                  title=f"predicted for N={max(p[2] for p in points):,}\nfrom the smaller N",
                  title_fontsize=6)
    ax.set(xlim=(x.min() - 0.2, x.max() + 0.2), ylim=(y.min() - 0.2, y.max() + 0.2),
           xlabel="log10 K (classes)", ylabel="log10 n (images per class)")
    ax.set_title(f"{name}: error over (K, n)\ndashed: fixed N, star: best per N"
                 + (", red ring: not told apart from it" if tied else "")
                 + (", white circle: the fit's optimum" if optima else ""), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, 120)


def ratio_figure(name: str, points: dict[tuple[int, int, int], list[float]], path: Path,
                 model=None) -> None:
    """`model`: a fitted theory.Fit, drawn dashed over each N's measured range of K/n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({p[2] for p in points}):
        pts = sorted((k / n, *mean_std(v)) for (k, n, s), v in points.items() if s == size)
        r, mean, std = (np.array(c) for c in zip(*pts))
        line, = ax.plot(r, mean, "o-", label=f"N={size:,}")
        ax.fill_between(r, mean - std, mean + std, alpha=0.2)
        if model is not None:  # K = sqrt(r N), n = sqrt(N / r)
            rr = np.geomspace(r.min(), r.max(), 60)
            ax.plot(rr, model.err(np.sqrt(rr * size), np.sqrt(size / rr)), "--",
                    color=line.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="K / n (classes per image-per-class)", ylabel="downstream error")
    ax.set_title(f"{name}: error against K/n\nband: +-1 std over seeds"
                 + ("; dashed: the fit to every point" if model is not None else ""), fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, 120)


def table(by_set: dict[str, dict[tuple[int, int, int], list[float]]],
          tied: dict[str, set[tuple[int, int, int]]] | None = None) -> str:
    """Mean +- std over seeds per point and set; in bold, the splits of each budget that the
    runs cannot tell from its best (`tied`, per set)."""
    names = sorted(n for n in by_set if n != AVERAGE) + ([AVERAGE] if AVERAGE in by_set else [])
    pts = sorted({p for v in by_set.values() for p in v}, key=lambda p: (p[2], p[0]))
    lines = ["| N | K | n | K/n | seeds | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for k, n, size in pts:
        cells = []
        for name in names:
            v = by_set[name].get((k, n, size))
            cell = "-" if not v else "{:.4f} +- {:.4f}".format(*mean_std(v))
            bold = (k, n, size) in (tied or {}).get(name, ())
            cells.append(f"**{cell}**" if bold else cell)
        seeds = max(len(by_set[name].get((k, n, size), [])) for name in names)
        lines.append(f"| {size:,} | {k} | {n} | {k / n:.3g} | {seeds} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def ties(seeds: dict[str, dict[tuple[int, int, int], dict[int, float]]]) -> dict[str, dict]:
    """Per set, each budget's splits against its best (`results.versus_best`)."""
    return {name: {p: c for size in sorted({p[2] for p in points})
                   for p, c in versus_best(points, size).items()}
            for name, points in seeds.items()}


def ties_section(compared: dict[str, dict]) -> list[str]:
    """`ties` as a table: each split's difference from its budget's best, +- its standard
    error, and whether the runs tell them apart."""
    md = ["", "## Which splits are as good as the best", "",
          f"Each split's mean error minus its budget's best, +- the standard error of that "
          f"difference: paired by seed (the std of the per-seed differences / sqrt(seeds)) "
          f"where the two share 2 or more seeds, else from each split's own seeds. A split "
          f"is told apart from the best when its difference exceeds Student's t bound for "
          f"95% on the se's degrees of freedom (3.18 standard errors at 4 paired seeds, 2.57 "
          f"at 6, near {TIE_SE:g} at 60); else it is not (bold in the table above, ringed on "
          "the contour maps). With one seed nothing can be told.",
          "", "| set | N | best K x n | not told apart | told apart (difference +- se) |",
          "|---|---|---|---|---|"]
    for name, comp in compared.items():
        for size in sorted({p[2] for p in comp}):
            at = sorted((p for p in comp if p[2] == size), key=lambda p: p[0])
            best = next(p for p in at if comp[p]["best"])

            def say(p):
                c = comp[p]
                se = "no se" if c["se"] is None else f"{c['diff']:+.4f} +- {c['se']:.4f}" \
                    + (f", paired over {c['paired']}" if c["paired"] else ", unpaired")
                return f"{p[0]} x {p[1]} ({se})"
            same = [say(p) for p in at if not comp[p]["best"] and comp[p]["tied"]]
            apart = [say(p) for p in at if comp[p]["tied"] is False]
            unknown = [say(p) for p in at if comp[p]["tied"] is None]
            md.append(f"| {name} | {size:,} | {best[0]} x {best[1]} | "
                      f"{'; '.join(same + [u + ': cannot tell' for u in unknown]) or '-'} | "
                      f"{'; '.join(apart) or '-'} |")
    return md + [""]


NEAR = 4  # the report also checks the fits to the points within 4x of each budget's best K/n


def holdout_checks(by_set: dict[str, dict], limits: dict) -> dict[str, dict]:
    """The prediction checked on the largest budget (calibrate.holdout_check) per set: each method
    fitted on all points, and on the points near each budget's best (`NEAR`)."""
    checks = {name: holdout_check(points, limits=limits) for name, points in by_set.items()}
    checks = {k: v for k, v in checks.items() if v}
    for name, c in checks.items():
        near = holdout_check(by_set[name], limits=limits, near=NEAR)
        c["rows"] += [{**r, "near": NEAR} for r in near["rows"] if r["method"] != "ratio_rule"]
    return checks


def _method(row: dict) -> str:
    return label(row["method"]) + (f", points within {row['near']}x of the best"
                                   if row.get("near") else "")


def holdout_section(checks: dict[str, dict]) -> list[str]:
    """`holdout_checks` as a table."""
    if not checks:
        return ["", "## The prediction, checked", "",
                "Needs 2 or more budgets: the smaller ones are fitted, the largest checked.", ""]
    c0 = next(iter(checks.values()))
    md = ["", f"## The prediction, checked at N={c0['size']:,}", "",
          f"Fitted on N = {', '.join(f'{s:,}' for s in c0['fit_sizes'])} only; the best split "
          f"of N = {c0['size']:,} predicted by each method, and what was measured there: at "
          "that split, or (marked ~) at the split run nearest it in K (mean +- std over "
          "seeds). `dptrain predict` recommends, of the methods within one seed std of the "
          "smallest gap, the one with the fewest parameters.", "",
          "| set | method | predicted K x n | measured error | measured best | gap, points |",
          "|---|---|---|---|---|---|"]
    for name, c in checks.items():
        b = c["best"]
        best = f"{b['classes']} x {b['per_class']}: {b['error'][0]:.4f} +- {b['error'][1]:.4f}"
        for r in c["rows"]:
            method = _method(r)
            if "error" in r:
                md.append(f"| {name} | {method} | not fitted: {r['error']} | | {best} | |")
                continue
            m, sc = r["measured"], r["scored"]
            at = "" if r["exact"] else f"~{sc['classes']} x {sc['per_class']}: "
            md.append(f"| {name} | {method} | {r['classes']} x {r['per_class']} | "
                      f"{at}{m[0]:.4f} +- {m[1]:.4f} | {best} | {r['gap_points']:+.1f} |")
    return md + [""]


def write_report(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 fmt: str = "png") -> Path:
    """Figures (in `fmt`), table and report.md in `out` [SWEEP/report]; returns report.md's
    path."""
    sweep_dir = Path(sweep_dir)
    rows = read_results(sweep_dir)
    by_set = errors_by_point(rows)
    compared = ties(errors_by_seed(rows))
    group = {name: {p for p, c in comp.items() if c["tied"]} for name, comp in compared.items()}
    out = Path(out) if out else sweep_dir / SweepFolder.REPORT
    make_folder(out)
    spec = SweepFolder(sweep_dir).read_spec()
    md = [f"# Sweep report: {sweep_dir.name}", "",
          f"- data: `{spec.get('data', '?')}`; downstream suite: `{spec.get('suite', '?')}`",
          f"- recipe: {spec.get('recipe', '?')}, options: "
          f"`{' '.join(spec.get('options', spec.get('pretrain_args', [])))}`",
          f"- budget: {spec.get('budget', '?')}",
          f"- {plural(len({r['run'] for r in rows}), 'run')}, "
          f"{plural(len(by_set) - (AVERAGE in by_set), 'downstream set')}"
          f"{' and their average' if AVERAGE in by_set else ''} "
          f"(error = 1 - top-1 of the linear probe, mean over probe repeats; +- is the std "
          "over pre-training seeds)", "", "## Mean error per point", "",
          "In bold: the splits of each budget that the runs cannot tell from its best "
          "(see [below](#which-splits-are-as-good-as-the-best)).", "", table(by_set, group),
          "## Best split per budget", ""]
    for name, points in by_set.items():
        best = best_per_size(points)
        md.append(f"- {name}: " + "; ".join(
            f"N={s:,}: K={k}, n={n} (K/n={k / n:.3g}, "
            f"error {statistics.mean(points[(k, n, s)]):.4f})"
            for s, (k, n, _) in sorted(best.items())))
    md += ["", "## Model fit", "",
           "err(K, n) = c0 + a K^-alpha + b n^-beta by bounded least squares on every point's "
           "mean error, free and with alpha = beta (`dptrain predict` adds intervals over seeds "
           "and the best split for a budget). A parameter ON A BOUND is where the fit stopped, "
           "not an estimate.", ""]
    models = {}  # the free fit of each set, drawn on its figures
    for name, points in by_set.items():
        for tied in (False, True):
            label = f"{name}, {'alpha = beta' if tied else 'free'}"
            try:
                f, keys = fit_points(points, tied=tied)
            except FitError as e:
                md.append(f"- {label}: not fitted: {e}")
                continue
            models.setdefault(name, f)
            md += [f"- {label}: {fit_line(f)}",
                   f"  - residuals (measured - fit): {residual_line(keys, f.residuals)}"]
    checks = holdout_checks(by_set, data_limits(sweep_dir))
    md += holdout_section(checks)
    md += ties_section(compared)
    md += ["", "## Figures", ""]
    for name, points in by_set.items():
        c, r = f"contour-{_slug(name)}.{fmt}", f"ratio-{_slug(name)}.{fmt}"
        f = models.get(name)
        optima = {} if f is None else {
            s: (k, s / k) for s in sorted({p[2] for p in points})
            for k in [f.best_classes(s)] if 0 < k < math.inf}
        predicted = {_method(r): (r["classes"], r["per_class"])
                     for r in checks.get(name, {}).get("rows", []) if "classes" in r}
        contour_figure(name, points, out / c, optima, predicted, group.get(name))
        ratio_figure(name, points, out / r, f)
        md += [f"### {name}", "", f"![error over (log K, log n)]({c})", "",
               f"![error against K/n]({r})", ""]
    write_atomic(out / "table.md", table(by_set, group).encode())
    path = out / "report.md"
    write_atomic(path, "\n".join(md).encode())
    return path


def write_run_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     fmt: str = "png") -> tuple[Path, str]:
    """One run's curves from metrics.jsonl, in `out`/curves.`fmt` [RUN/report/curves.png]:
    loss and learning rate against step, and the loader's side (img/s, the share of time
    waiting for data); returns the figure's path and the run's probe table (probe.json),
    which a sweep's report has no room for."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..probing.probe import render as probe_table

    run = RunFolder(run_dir)
    rows = [r for r in run.read_metrics() if isinstance(r.get("loss"), (int, float))]
    if not rows:
        raise DataError(f"{run.path / run.METRICS} holds no logged step yet")
    epochs = [r for r in run.read_metrics("epoch") if isinstance(r.get("loss"), (int, float))]
    step = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, key, title in ((axes[0, 0], "loss", "training loss (mean over the log window)"),
                           (axes[0, 1], "lr", "learning rate"),
                           (axes[1, 0], "images_per_s", "images / s"),
                           (axes[1, 1], "data_wait", "share of the window waiting for data")):
        ax.plot(step, [r.get(key, float("nan")) for r in rows], marker="." if len(rows) < 50
                else None, label="log window")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if epochs:  # each epoch's mean loss, at the step it ended
        axes[0, 0].plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o--",
                        color="C3", label="epoch mean")
        axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    summary = run.read_summary() or {}
    fig.suptitle(f"{run.path.name}: {summary.get('steps', step[-1]):,} steps"
                 + (f", train loss {summary['train_loss']:.4f}"
                    if summary.get("train_loss") is not None else " (unfinished)"), fontsize=11)
    fig.tight_layout()
    out = Path(out) if out else run / SweepFolder.REPORT
    make_folder(out)
    path = out / f"curves.{fmt}"
    save_figure(fig, path, 110)
    probe = run.read_probe()
    return path, (probe_table(probe) if probe.get("datasets") else "no probe yet: dptrain probe "
                  f"{run.path} --suite ...")
