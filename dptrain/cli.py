"""The `dptrain` command: parses options and calls the library, nothing more."""

from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from .config import TRAIN, TrainConfig, default_in_recipes
from .errors import DataError
from .options import click_options
from .shards import ShardOptions
from .sweep import SweepOptions
from .theory import PredictOptions


class UserError(click.ClickException):
    """Bad input: one line on stderr, exit status 2 (as click's usage errors)."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DataError as e:
            raise UserError(str(e)) from None
        except OSError as e:  # a full disk, a quota, a read-only or forbidden folder
            if e.errno not in OUTPUT_ERRORS:
                raise
            raise click.ClickException(output_error(e)) from None


# What stops a command from writing, which the user fixes outside dptrain; anything else is a
# bug or a lost device, and keeps its traceback.
OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG}


def output_error(e: OSError) -> str:
    """One line for an OSError on output: what, why, and that a rerun resumes (whatever was
    written whole before stays: every file is written under a temporary name and renamed)."""
    what = f" {e.filename}" if e.filename else ""
    verb = "access" if e.errno in (errno.EACCES, errno.EPERM) else "write"
    return (f"cannot {verb}{what}: {e.strerror or e}; fix that and run the same command "
            "again: it goes on from what was finished")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dptrain")
def main() -> None:
    """dptrain: fast, honest experiments on what a pre-training set should contain.

    Shard a dataset once (`dptrain shard`), then stream any K-class x n-per-class subset of it.
    """
    from .launch import die_with_parent

    die_with_parent()


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
@click_options(ShardOptions)
@click.option("--workers", type=click.IntRange(min=1), help="Threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace a shard set of another source/options.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr.")
def shard(src, out, fmt, labels, classes_from, workers, overwrite, progress, **options):
    """Write SRC as class-indexed WebDataset shards in OUT (default: shards/<SRC name>).

    Per class, tars of `<key>.jpg` + `<key>.cls` in a seeded random order (the first n samples
    of a class are a uniform sample), each with a DALI wds2idx index; plus index.json and
    samples.npy, which locate every image by (tar, offset, size). JPEGs are copied unchanged;
    images a decoder would choke on are converted, broken files skipped and recorded.
    Interrupted? Run the same command again: it resumes.
    """
    from .shards import render_results, shard_source

    out = out or Path("shards") / src.name.split(".")[0]
    try:
        results = shard_source(src, out, fmt=fmt, labels=labels, classes_from=classes_from,
                               options=ShardOptions(**options), workers=workers,
                               overwrite=overwrite, progress=progress)
    except KeyboardInterrupt:
        click.echo(f"interrupted: run the same command again to resume {out}", err=True)
        sys.exit(130)
    click.echo(render_results(results))


def config_options(group: str | None = None):
    """TrainConfig's fields as options; None keeps the recipe's value, which --help shows."""
    return click_options(TrainConfig, group, shown=default_in_recipes)


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
    folder. Ctrl-C or SIGTERM saves a checkpoint at the next step and stops. Run the same
    command again to resume an interrupted run; a finished run is not retrained. Multi-GPU:
    --gpus G, or torchrun --nproc_per_node=G -m dptrain pretrain ...
    """
    from .config import load_config
    from .launch import relaunch, under_torchrun

    if options["data"] is None and not config_file:  # the built-in synthetic pool
        from .synthetic import DEFAULT_POOL, ensure_pool

        if not print_config:
            click.echo(ensure_pool(options["classes"], options["per_class"], progress), err=True)
        options["data"], recipe = str(DEFAULT_POOL), recipe or "synthetic"
        sys.argv += ["--data", options["data"]]  # what --gpus re-runs, once per GPU
    cfg = load_config(config_file, recipe, res=res, **options)
    if print_config:
        return click.echo(json.dumps(asdict(cfg), indent=1))
    if gpus and not under_torchrun():
        relaunch(gpus, sys.argv[1:])
    from .train import NonFiniteLoss, Stopped, default_run_folder, summary_line, train

    out = out or default_run_folder(cfg)
    try:
        s = train(cfg, out, overwrite=overwrite, progress=progress)
    except NonFiniteLoss as e:
        raise click.ClickException(str(e)) from None
    except Stopped as e:
        if int(os.environ.get("RANK", 0)) == 0:
            click.echo(f"{out}: {e}", err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # before the first step: nothing to save yet
        click.echo(f"interrupted: run the same command again to resume {out}", err=True)
        sys.exit(130)
    if int(os.environ.get("RANK", 0)) == 0:  # one summary per run
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
@click.option("--feature-cache", "--cache", "cache",
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the features cache [RUN/features].")
@click.option("--cache-dir", help="Folder of eval pixel caches: each downstream set's images, "
              "decoded and resized once, for every probe [$XDG_CACHE_HOME/dptrain or "
              "~/.cache/dptrain; off: decode every time].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where features are computed [auto: the GPU when there is one].")
@click.option("--workers", type=click.IntRange(min=1),
              help="DALI threads for feature extraction [all cores].")
@click.option("--seed", default=0, type=int, help="Seeds the validation splits.")
@click.option("--random-init", is_flag=True,
              help="Also probe the same architecture as initialised (the reference any "
                   "pre-training must beat) and print both.")
@click.option("--allow-unfinished", is_flag=True,
              help="Probe a run whose checkpoint is short of its planned steps (refused "
                   "otherwise).")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def probe(run, train_data, test_data, names, suite, res, repeats, val_fraction, cache,
          cache_dir, device, workers, seed, random_init, allow_unfinished, progress):
    """Linear probes of RUN's frozen backbone (a run folder or checkpoint) on downstream sets.

    Features are computed once per checkpoint and dataset and cached; each probe is L-BFGS
    logistic regression with the L2 strength chosen on a validation split (45 values in
    1e-6..1e5), refit on train+val, scored on test. Writes probe.json and adds the results
    to the run's summary.json.
    """
    from .evalcache import cache_dir_option
    from .probe import downstream_sets, probe_run, render

    datasets = downstream_sets(train_data, test_data, names, suite)
    out = probe_run(run, datasets, res=res, cache=cache, pixels=cache_dir_option(cache_dir),
                    repeats=repeats,
                    val_fraction=val_fraction, seed=seed, device=device, threads=workers,
                    random_init=random_init, allow_unfinished=allow_unfinished,
                    progress=progress)
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
    from .index import render_verify, repair_hint, verify as verify_set

    problems = verify_set(out, workers)
    if as_json:
        click.echo(json.dumps({"path": str(out), "ok": not problems, "problems": problems,
                               "hint": repair_hint(out) if problems else None}))
    else:
        click.echo(render_verify(out, problems), err=bool(problems))
    sys.exit(1 if problems else 0)


@main.command()
@click_options(SweepOptions)
@click.option("--allow-fewer", is_flag=True, default=None,
              help="Keep classes smaller than n whole instead of skipping the point.")
@config_options(TRAIN)
@_GPUS
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A bar over the points on stderr, with failures and an ETA.")
def sweep(gpus, progress, **options):
    """Pre-train and probe every (K, n, seed) of a grid: the paper's experiment.

    Each point is `dptrain pretrain` + `dptrain probe --suite`, in OUT/runs/K{K}-n{n}-s{seed}.
    Run the same command again to finish an interrupted or partly failed sweep.
    """
    from .sweep import run_sweep

    o = SweepOptions(**{k: options.pop(k) for k in SweepOptions.__dataclass_fields__})
    try:
        text, failed = run_sweep(o, options, gpus=gpus or 1, progress=progress,
                                 log=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo(f"interrupted: run the same command again to complete {o.out}", err=True)
        sys.exit(130)
    click.echo(text)
    for f in failed:
        click.echo(f"  failed {f['run']}: {f['error']}", err=True)
    sys.exit(1 if failed else 0)


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
@click_options(PredictOptions)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def predict(sweep_dir, as_json, **options):
    """Fit err(K, n) = c0 + a K^-alpha + b n^-beta to a sweep and predict the best K, n for N.

    Per downstream set and their average: the free fit and the alpha = beta fit (the paper's
    invariant-ratio case) with bootstrap intervals over seeds, r* at each measured N, and for
    --size the predicted K*, n* and error against using all classes; plus the paper's rule
    K* = sqrt(r* N) with r* measured at the fitted budgets. Exits 1 when a fit is impossible.
    """
    from .theory import predict_sweep, render

    out = predict_sweep(sweep_dir, **options)
    click.echo(json.dumps(out, indent=1) if as_json else render(out))
    if out["failures"]:
        sys.exit(1)
