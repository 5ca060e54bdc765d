"""The `dptrain` command: parses options and calls the library, nothing more."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click

from .config import TRAIN, TrainConfig, default_in_recipes
from .errors import DataError
from .progress import plural


class UserError(click.ClickException):
    """Bad input: one line on stderr, exit status 2 (as click's usage errors)."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DataError as e:
            raise UserError(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dptrain")
def main() -> None:
    """dptrain: fast, honest experiments on what a pre-training set should contain.

    Shard a dataset once (`dptrain shard`), then stream any K-class x n-per-class subset of it.
    """


def _mb(ctx, param, value: float) -> int:
    return int(value * 2**20)


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "imagefolder", "flat", "imagenet-tar", "wds", "cifar",
                                 "splits"]),
              help="Layout of SRC: class folders (ImageNet train/), a flat folder + --labels "
                   "(ImageNet val), ILSVRC2012_img_train.tar, WebDataset shards, CIFAR-10/100 "
                   "python pickles, or train/ + test/ class folders (the last two write "
                   "OUT/train and OUT/test).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV 'filename,class' for a flat folder (Kaggle's LOC_val_solution.csv works).")
@click.option("--classes-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Use the class list and ids of this shard set (for val/test splits).")
@click.option("--seed", default=0, show_default=True, help="Seeds the stored order in each class.")
@click.option("--shard-size", default=256.0, show_default=True, type=click.FloatRange(min=0.01),
              callback=_mb, help="MB per tar; a larger class is split over several tars.")
@click.option("--max-side", type=click.IntRange(min=16),
              help="Re-encode images whose longer side exceeds this (px); default: copy all.")
@click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality of re-encoded images.")
@click.option("--check", default="header", show_default=True,
              type=click.Choice(["header", "decode"]),
              help="header: validate JPEG structure (fast); decode: also decode every JPEG.")
@click.option("--max-pixels", default=100_000_000, show_default=True, type=click.IntRange(min=1),
              help="Skip larger images as decompression bombs.")
@click.option("--workers", type=click.IntRange(min=1), help="Threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace a shard set of another source/options.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr.")
def shard(src, out, fmt, labels, classes_from, seed, shard_size, max_side, quality, check,
          max_pixels, workers, overwrite, progress):
    """Write SRC as class-indexed WebDataset shards in OUT (default: shards/<SRC name>).

    Per class, tars of `<key>.jpg` + `<key>.cls` in a seeded random order (the first n samples
    of a class are a uniform sample), each with a DALI wds2idx index; plus index.json and
    samples.npy, which locate every image by (tar, offset, size). JPEGs are copied unchanged;
    images a decoder would choke on are converted, broken files skipped and recorded.
    Interrupted? Run the same command again: it resumes.
    """
    from .shards import ShardOptions, render_results, shard_source

    out = out or Path("shards") / src.name.split(".")[0]
    opts = ShardOptions(seed=seed, shard_size=shard_size, max_side=max_side, quality=quality,
                        check=check, max_pixels=max_pixels)
    try:
        results = shard_source(src, out, fmt=fmt, labels=labels, classes_from=classes_from,
                               options=opts, workers=workers, overwrite=overwrite,
                               progress=progress)
    except KeyboardInterrupt:
        click.echo(f"interrupted: run the same command again to resume {out}", err=True)
        sys.exit(130)
    click.echo(render_results(results))


def config_options(group: str | None = None):
    """One click option per TrainConfig field (of `group`, or all), generated from the field:
    its help, its type and range, and its value in each recipe. Every option defaults to None,
    which keeps the recipe's value."""
    options = []
    for f in fields(TrainConfig):
        m = f.metadata
        if group and m["group"] != group:
            continue
        flag, off = _flags(f.name)
        shown = default_in_recipes(f.name)
        text = m["help"] + (f" [{shown}]" if shown and not m["help"].endswith("]") else "")
        if "bool" in f.type:
            options.append(click.option(f"{flag}/{off}", f.name, default=None, help=text))
            continue
        low, high, low_open, high_open = m["range"]
        if m["choices"]:
            kind = click.Choice(m["choices"])
        elif m["path"]:
            kind = click.Path(exists=True, file_okay=m["path"] == "file",
                              dir_okay=m["path"] == "dir")
        elif "int" in f.type:
            kind = click.IntRange(low, high) if low is not None or high is not None else int
        elif "float" in f.type:
            kind = click.FloatRange(low, high, min_open=low_open, max_open=high_open)
        else:
            kind = str
        options.append(click.option(flag, f.name, type=kind, default=None, help=text))
    return lambda fn: functools.reduce(lambda g, o: o(g), reversed(options), fn)


def _flags(name: str) -> tuple[str, str]:
    """A field's option and, for a yes/no field, its opposite: --x/--no-x, and a "no_" field's
    opposite drops the "no-" (--no-bn-wd/--bn-wd)."""
    flag = "--" + name.replace("_", "-")
    return flag, "--" + flag[5:] if name.startswith("no_") else "--no-" + flag[2:]


def given_options(options: dict) -> list[str]:
    """The command-line form of the TrainConfig values given (None: not given): what a sweep
    records for its report."""
    argv = []
    for name, value in options.items():
        if value is None:
            continue
        flag, off = _flags(name)
        argv += [flag if value else off] if isinstance(value, bool) else [flag, str(value)]
    return argv


_GPUS = click.option("--gpus", type=click.IntRange(min=1),
                     help="Launch DDP on this many GPUs of this machine (runs torchrun).")


@main.command(context_settings={"show_default": True})
@config_options()
@_GPUS
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder [runs/<data>-K<K>-n<n>-s<seed>].")
@click.option("--overwrite", is_flag=True,
              help="Start the run folder over (one made with other options, or a damaged "
                   "checkpoint).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Start from this resolved config (from --print-config, or a sweep's "
                   "pretrain.json) instead of a recipe; options given replace its values.")
@click.option("--print-config", is_flag=True,
              help="Print the run's resolved options (the recipe with what was given) as JSON "
                   "and exit, running nothing.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
def pretrain(out, recipe, gpus, overwrite, config_file, print_config, progress, res, **options):
    """Pre-train one model on a K-class x n-per-class subset of a shard set.

    Writes config.json, metrics.jsonl, checkpoint.pt (every epoch) and summary.json to the run
    folder. Run the same command again to resume an interrupted run; a finished run is not
    retrained. Multi-GPU: --gpus G, or torchrun --nproc_per_node=G -m dptrain pretrain ...
    """
    from .config import load_config, make_config
    from .launch import relaunch, under_torchrun

    if options["data"] is None and not config_file:  # the built-in synthetic pool
        if "RANK" in os.environ and not gpus:
            raise UserError("under torchrun, give --data (build the synthetic pool first: "
                            "python tools/make_shards.py)")
        from .synthetic import DEFAULT_POOL, ensure_pool

        options["data"] = str(DEFAULT_POOL)
        if not print_config:
            click.echo(ensure_pool(options["classes"], options["per_class"], progress), err=True)
        sys.argv += ["--data", options["data"]]  # what --gpus re-runs, once per GPU
        recipe = recipe or "synthetic"
    if config_file:
        cfg = load_config(config_file, recipe=recipe, res=res, **options)
    else:
        cfg = make_config(recipe or "fast", res=res, **options)
    if print_config:
        click.echo(json.dumps(asdict(cfg), indent=1))
        return
    if gpus and not under_torchrun():
        relaunch(gpus, sys.argv[1:])
    from .train import NonFiniteLoss, summary_line, train

    out = out or Path("runs") / (f"{Path(cfg.data).name}-K{cfg.classes or 'all'}-"
                                 f"n{cfg.per_class or 'all'}-s{cfg.seed}")
    try:
        s = train(cfg, out, overwrite=overwrite, progress=progress)
    except NonFiniteLoss as e:
        raise click.ClickException(str(e)) from None
    if int(os.environ.get("RANK", 0)) != 0:
        return  # one summary per run, from rank 0
    click.echo(summary_line(out, s))


@main.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "train_data", multiple=True,
              type=click.Path(exists=True, file_okay=False),
              help="Downstream train shards; repeat with --test-data and --name per dataset.")
@click.option("--test-data", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Its test shards (sharded with --classes-from the train shards).")
@click.option("--name", "names", multiple=True, help="Its name [the train shards' folder name].")
@click.option("--suite", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML/JSON file of datasets: [[dataset]] name, data, test_data.")
@click.option("--res", type=click.IntRange(min=16), help="Feature resolution [pre-training's].")
@click.option("--repeats", default=5, type=click.IntRange(min=1),
              help="Probes per dataset, each with another validation split.")
@click.option("--val-fraction", default=0.2, type=click.FloatRange(0, 1, min_open=True,
                                                                    max_open=True),
              help="Part of train held out to choose the L2 strength.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Feature cache [RUN/features].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where features are computed [auto: the GPU when there is one].")
@click.option("--workers", type=click.IntRange(min=1),
              help="DALI threads for feature extraction [all cores].")
@click.option("--seed", default=0, type=int, help="Seeds the validation splits.")
@click.option("--random-init", is_flag=True,
              help="Also probe the same architecture as initialised (the reference any "
                   "pre-training must beat) and print both.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def probe(run, train_data, test_data, names, suite, res, repeats, val_fraction, cache, device,
          workers, seed, random_init, progress):
    """Linear probes of RUN's frozen backbone (a run folder or checkpoint) on downstream sets.

    Features are computed once per checkpoint and dataset and cached; each probe is L-BFGS
    logistic regression with the L2 strength chosen on a validation split (45 values in
    1e-6..1e5), refit on train+val, scored on test. Writes probe.json and adds the results
    to the run's summary.json.
    """
    from .probe import downstream_sets, probe_run, render

    datasets = downstream_sets(train_data, test_data, names, suite)
    out = probe_run(run, datasets, res=res, cache=cache, repeats=repeats,
                    val_fraction=val_fraction, seed=seed, device=device, threads=workers,
                    random_init=random_init, progress=progress)
    click.echo(render(out))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(out, as_json):
    """Summarise the shard set in OUT: classes, samples, per-class counts, bytes, skips."""
    from .index import ShardIndex, render_info

    i = ShardIndex.load(out).info()
    click.echo(json.dumps(i) if as_json else render_info(i))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=1), help="Threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(out, workers, as_json):
    """Re-hash every tar and index in OUT and check samples.npy against the tars.

    One verdict: OK (exit 0), or a DAMAGED line per bad or missing file, with how to rebuild
    the set (exit 1). Exit 2 is for usage errors only.
    """
    from .index import ShardIndex, repair_hint, verify as verify_set

    problems = verify_set(out, workers)
    hint = repair_hint(out) if problems else None
    if as_json:
        click.echo(json.dumps({"path": str(out), "ok": not problems, "problems": problems,
                               "hint": hint}))
    else:
        for p in problems:
            click.echo(f"DAMAGED {out / p}", err=True)
        if problems:
            click.echo(f"{out}: {len(problems)} problem(s); {hint}", err=True)
        else:
            meta = ShardIndex.load(out).meta
            click.echo(f"{out}: OK ({len(meta['tars']):,} tars, {meta['num_samples']:,} samples)")
    if problems:
        sys.exit(1)


def _numbers(kind):
    def parse(ctx, param, value):
        if value is None:
            return []
        try:
            out = [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of "
                                     f"{kind.__name__}s") from None
        if any(v <= 0 for v in out):
            raise click.BadParameter("values must be positive")
        return out
    return parse


def _pairs(ctx, param, value):
    if value is None:
        return []
    try:
        out = [tuple(int(x) for x in v.split(":")) for v in value.split(",") if v.strip()]
    except ValueError:
        out = [()]
    if any(len(p) != 2 or min(p) < 1 for p in out):
        raise click.BadParameter(f"{value!r}: expected K:n pairs of positive integers, e.g. "
                                 "100:64,400:16")
    return out


@main.command(context_settings={"show_default": True})
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shard set to pre-train on.")
@click.option("--suite", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Downstream sets to probe every run on (TOML/JSON, as probe --suite).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Sweep folder: runs/, results.csv, sweep.json, failures.json.")
@click.option("--sizes", callback=_numbers(int), help="Budgets N, e.g. 64000,256000.")
@click.option("--classes", "classes_grid", callback=_numbers(int),
              help="K values per size (n = N / K, rounded).")
@click.option("--ratios", callback=_numbers(float), help="K / n values per size.")
@click.option("--points", callback=_pairs, help="Explicit K:n points, e.g. 100:64,400:16.")
@click.option("--seeds", default=3, type=click.IntRange(min=1), help="Seeds 0..S-1 per point.")
@click.option("--repeats", default=5, type=click.IntRange(min=1), help="Probe repeats.")
@click.option("--allow-fewer", is_flag=True, default=None,
              help="Keep classes smaller than n whole instead of skipping the point.")
@config_options(TRAIN)
@_GPUS
@click.option("--launcher", default="local", type=click.Choice(["local", "slurm",
                                                                 "submitit-local"]),
              help="local: one run per visible GPU (one at a time on a CPU); slurm: one job per "
                   "point through submitit (submitit-local: the same path, run here).")
@click.option("--slurm-partition", help="Slurm partition.")
@click.option("--slurm-time", default=240, type=click.IntRange(min=1),
              help="Slurm time limit per point, minutes.")
@click.option("--slurm-cpus", default=16, type=click.IntRange(min=1), help="CPUs per job.")
@click.option("--dry-run", is_flag=True,
              help="Run nothing: print every feasible point, the images its pre-training "
                   "processes and its estimated wall time, and the sweep's total.")
@click.option("--img-per-s", type=click.FloatRange(min=0, min_open=True),
              help="With --dry-run: training throughput per GPU (or per CPU run) [the newest "
                   "benchmarks/results/train_step-*.json of the same --arch and --res].")
@click.option("--plan-gpus", type=click.IntRange(min=1),
              help="With --dry-run: GPUs to plan for [the visible ones].")
@click.option("--progress/--no-progress", default=True,
              help="A bar over the points on stderr, with failures and an ETA.")
def sweep(data, suite, out, sizes, classes_grid, ratios, points, seeds, repeats, launcher,
          slurm_partition, slurm_time, slurm_cpus, dry_run, img_per_s, plan_gpus, progress,
          **options):
    """Pre-train and probe every (K, n, seed) of a grid: the paper's experiment.

    Each point is `dptrain pretrain` + `dptrain probe --suite`, in OUT/runs/K{K}-n{n}-s{seed}.
    Run the same command again to finish an interrupted or partly failed sweep.
    """
    import torch

    from .config import check_config, make_config
    from .index import ShardIndex
    from .probe import read_suite
    from .sweep import dry_run_text, feasible, grid, prepare, sweep as run_sweep

    pairs = grid(sizes=sizes, classes=classes_grid, ratios=ratios, points=points)
    gpus = options.pop("gpus") or 1
    given = given_options(options)
    cfg = make_config(options.pop("recipe") or "fast", data=str(Path(data).resolve()), **options)
    check_config(cfg, 1, torch.cuda.is_available())
    datasets = [d[0] for d in read_suite(Path(suite))]
    index = ShardIndex.load(data)
    todo, skipped = feasible(index, pairs, list(range(seeds)), cfg.allow_fewer)
    for reason in skipped:
        click.echo(f"skipped (infeasible) {reason}", err=True)
    if not todo:
        raise UserError("no feasible point in the grid")
    if dry_run:
        click.echo(dry_run_text(todo, index, cfg, gpus, img_per_s, plan_gpus))
        return
    spec, slots = prepare(cfg, suite=suite, out=out, repeats=repeats, gpus=gpus,
                          launcher=launcher, given=given, skipped=skipped)
    slurm = {"timeout_min": slurm_time, "cpus_per_task": slurm_cpus, "gpus_per_node": gpus}
    if slurm_partition:
        slurm["slurm_partition"] = slurm_partition
    try:
        r = run_sweep(spec, todo, datasets, launcher=launcher, slots=slots, slurm=slurm,
                      log=lambda m: click.echo(m, err=True), progress=progress)
    except KeyboardInterrupt:
        click.echo(f"interrupted: run the same command again to complete {out}", err=True)
        sys.exit(130)
    click.echo(f"{out}: {plural(r['points'], 'point')}, {r['ran']} run now, "
               f"{len(r['failed'])} failed; "
               f"results in {out / 'results.csv'}")
    if r["failed"]:
        for f in r["failed"]:
            click.echo(f"  failed {f['run']}: {f['error']}", err=True)
        sys.exit(1)


@main.command()
@click.argument("sweep_dir", metavar="SWEEP", type=click.Path(exists=True, file_okay=False,
                                                             path_type=Path))
def report(sweep_dir):
    """Figures (error over log K, log n; error against K/n) and tables of a sweep, in
    SWEEP/report/report.md."""
    from .report import write_report

    click.echo(f"wrote {write_report(sweep_dir)}")


@main.command(context_settings={"show_default": True})
@click.argument("sweep_dir", metavar="SWEEP", type=click.Path(exists=True, file_okay=False,
                                                             path_type=Path))
@click.option("--size", required=True, type=click.IntRange(min=1),
              help="The budget N to predict the best split for.")
@click.option("--fit-sizes", callback=_numbers(int),
              help="Fit only the points of these budgets [all], e.g. the small ones, to check "
                   "the prediction against the sweep's own runs at --size.")
@click.option("--max-classes", type=click.IntRange(min=1),
              help="Classes available [the sweep's shard set].")
@click.option("--max-per-class", type=click.IntRange(min=1),
              help="Images per class available [the smallest class of the shard set].")
@click.option("--bootstrap", "samples", default=200, type=click.IntRange(min=0),
              help="Bootstrap fits over seeds for the uncertainty (0: none).")
@click.option("--fit-near", "near", type=click.FloatRange(min=1),
              help="Fit only the points whose K/n is within this factor of their budget's "
                   "best measured K/n [all points].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def predict(sweep_dir, size, fit_sizes, max_classes, max_per_class, samples, near, as_json):
    """Fit err(K, n) = c0 + a K^-alpha + b n^-beta to a sweep and predict the best K, n for N.

    Per downstream set and their average: the free fit and the alpha = beta fit (the paper's
    invariant-ratio case) with bootstrap intervals over seeds, r* at each measured N, and for
    --size the predicted K*, n* and error against using all classes; plus the paper's rule
    K* = sqrt(r* N) with r* measured at the fitted budgets. Exits 1 when a fit is impossible.
    """
    from .theory import predict_sweep, render

    out = predict_sweep(sweep_dir, size, fit_sizes=fit_sizes, max_classes=max_classes,
                        max_per_class=max_per_class, samples=samples, near=near)
    click.echo(json.dumps(out, indent=1) if as_json else render(out))
    if out["failures"]:
        sys.exit(1)
