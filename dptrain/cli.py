"""The `dptrain` command: parses options and calls the library, nothing more."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from .common.environment import Ranks
from .common.errors import DataError, RunFailed, Stopped, one_line
from .common.options import (
    Renamed,
    click_options,
    json_option,
    old_flags,
    one_default_style,
    pick,
    progress_option,
    without_old_flags,
    workers_option,
)
from .data.shards import ShardOptions
from .data.sources import SourceOptions
from .probing.downstream import ProbeOptions
from .study.predict import PredictOptions
from .study.report import FORMATS
from .study.sweep import SweepOptions
from .training.config import TRAIN, PretrainOptions, TrainConfig, default_in_recipes


class _Group(click.Group):
    """Every command's errors as one line and an exit status (errors.one_line)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as e:
            raise without_old_flags(e) from None
        except (DataError, RunFailed, Stopped, KeyboardInterrupt, OSError) as e:
            line, status = one_line(e)  # anything else is a bug: its traceback stays
            if line and (not isinstance(e, Stopped) or Ranks.from_env().is_main):
                click.echo(line, err=True)  # every rank stops; one says so
            sys.exit(status)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dptrain")
def main() -> None:
    """dptrain: fast, honest experiments on what a pre-training set should contain.

    Shard a dataset once (`dptrain shard`), then stream any K-class x n-per-class subset of it.
    """
    from .common.launch import die_with_parent

    die_with_parent()


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path), required=False)
@click_options(SourceOptions)
@click_options(ShardOptions)
@workers_option()
@click.option("--overwrite", is_flag=True, help="Replace a shard set of another source/options.")
@progress_option()
def shard(src, out, workers, overwrite, progress, **options):
    """Write SRC as class-indexed WebDataset shards in OUT (default: shards/<SRC name>).

    Per class, tars of `<key>.jpg` + `<key>.cls` in a seeded random order, each with a DALI
    wds2idx index; index.json and samples.npy locate every image by (tar, offset, size). JPEGs
    are copied; others converted; broken files skipped and recorded. Rerun to resume.
    """
    from .data.shards import render_results, shard_source

    out = out or Path("shards") / src.name.split(".")[0]
    click.echo(render_results(shard_source(
        src, out, **asdict(pick(SourceOptions, options)), options=ShardOptions(**options),
        workers=workers, overwrite=overwrite, progress=progress)))


SWEEP = click.argument("sweep_dir", metavar="SWEEP",
                       type=click.Path(exists=True, file_okay=False, path_type=Path))


def config_options(group: str | None = None):
    """TrainConfig's fields as options; None keeps the recipe's value, which --help shows."""
    return click_options(TrainConfig, group, shown=default_in_recipes)


@main.command(context_settings={"show_default": True})
@config_options()
@click_options(PretrainOptions)
@progress_option()
def pretrain(progress, **options):
    """Pre-train one model on a K-class x n-per-class subset of a shard set.

    Writes config.json, metrics.jsonl, checkpoint.pt (every epoch) and summary.json to the run
    folder. Ctrl-C or SIGTERM saves a checkpoint at the next step and stops. Run the same
    command again to resume an interrupted run; a finished run is not retrained. Multi-GPU:
    --gpus G, or torchrun --nproc_per_node=G -m dptrain pretrain ...
    """
    from .training.config import pretrain_config
    from .training.train import pretrain_run, summary_line

    o = pick(PretrainOptions, options)
    cfg = pretrain_config(options, o, progress=progress, log=lambda m: click.echo(m, err=True))
    if o.print_config:
        return click.echo(json.dumps(asdict(cfg), indent=1))
    out, summary = pretrain_run(cfg, o, progress=progress)
    if Ranks.from_env().is_main:  # one summary per run
        click.echo(summary_line(out, summary))


@main.command(context_settings={"show_default": True})
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click_options(ProbeOptions)
@progress_option("Progress bars on stderr.")
def probe(run, progress, **options):
    """Linear probes of RUN's frozen backbone (a run folder or checkpoint) on downstream sets.

    Features are computed once per checkpoint and dataset and cached; each probe is L-BFGS
    logistic regression with the L2 strength chosen on a validation split (45 values in
    1e-6..1e5), refit on train+val, scored on test. Writes probe.json and adds the results
    to the run's summary.json.
    """
    from .probing.probe import render, run_probe

    click.echo(render(run_probe(run, ProbeOptions(**options), progress=progress)))


@main.command()
@click.argument("shard_set", metavar="SET",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
def info(shard_set, as_json):
    """Summarise the shard set in SET: classes, samples, per-class counts, bytes, skips."""
    from .data.index import ShardIndex, render_info

    i = ShardIndex.load(shard_set).info()
    click.echo(json.dumps(i) if as_json else render_info(i))


@main.command()
@click.argument("shard_set", metavar="SET",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@workers_option()
@click.option("--decode", is_flag=True, help="Decode every sample with the loader's decoder "
              "(done anyway for a set whose writer did not).")
@json_option
def verify(shard_set, workers, decode, as_json):
    """Re-hash every tar and index in SET, check samples.npy against the tars and each JPEG's
    header (size, EXIF orientation), and decode the samples where the set's writer did not.

    One verdict: OK (exit 0), or a DAMAGED line per bad or missing file or sample, with how to
    rebuild the set (exit 1). Exit 2 is for usage errors only.
    """
    from .data.verify import verdict

    text, ok = verdict(shard_set, workers, as_json, decode)
    click.echo(text, err=not ok and not as_json)
    sys.exit(0 if ok else 1)


@main.command()
@click_options(SweepOptions)
@click.option("--allow-fewer", is_flag=True, default=None,
              help="Keep classes smaller than n whole instead of skipping the point.")
@config_options(TRAIN)
@progress_option("A bar over the points on stderr, with failures and an ETA.")
def sweep(progress, **options):
    """Pre-train and probe every (K, n, seed) of a grid: the paper's experiment.

    Each point is `dptrain pretrain` + `dptrain probe --suite`, in OUT/runs/K{K}-n{n}-s{seed}.
    Run the same command again to finish an interrupted or partly failed sweep.
    """
    from .study.sweep import run_sweep

    o = pick(SweepOptions, options)
    text, failed = run_sweep(o, options, progress=progress, log=lambda m: click.echo(m, err=True))
    click.echo(text)
    for f in failed:
        click.echo(f"  failed {f['run']}: {f['error']}", err=True)
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--eval-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              cls=Renamed, old=old_flags("eval_cache"),
              help="The eval cache's folder [$XDG_CACHE_HOME/dptrain or ~/.cache/dptrain].")
@click.option("--clear", is_flag=True, help="Remove every entry; run it when no probe or "
              "validation is using the folder (they would fail, not be served stale).")
@json_option
def cache(eval_cache, clear, as_json):
    """The eval cache's entries (each downstream set's images decoded and resized once, for
    every probe and validation): where, what set, how large; --clear removes them."""
    import shutil

    from .common.progress import plural
    from .loading.evalcache import default_cache_dir, entries

    root = eval_cache or default_cache_dir()
    found = entries(root)
    if clear:
        for e in found:
            shutil.rmtree(e["path"])
    total = sum(e["bytes"] for e in found)
    if as_json:
        click.echo(json.dumps({"eval_cache": str(root), "entries": found, "bytes": total,
                               "cleared": clear}))
        return
    for e in found:
        click.echo(f"{e['bytes'] / 1e6:10,.1f} MB  {e['classes']:5,} classes  "
                   f"res {e['res'] or '?'}  {e['data'] or '(set not recorded)'}  {e['path']}")
    click.echo(f"{root}: {plural(len(found), 'entry', 'entries')}, {total / 1e6:,.1f} MB"
               + (", removed" if clear else ""))


@main.command()
@click.argument("folder", metavar="SWEEP|RUN",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the report in [SWEEP/report or RUN/report].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True,
              help="The figures' format (report.md shows png; pdf and svg for a paper).")
def report(folder, out, fmt):
    """Figures (error over log K, log n; error against K/n) and tables of a sweep, in
    SWEEP/report/report.md; or one run's curves (loss, lr, img/s, data wait against step) in
    RUN/report/curves.png, with its probe table."""
    from .common.runfolder import RunFolder
    from .study.report import write_report, write_run_report

    if (folder / RunFolder.CONFIG).is_file():
        path, probes = write_run_report(folder, out, fmt)
        click.echo(f"{probes}\nwrote {path}")
    else:
        click.echo(f"wrote {write_report(folder, out, fmt)}")


@main.command(context_settings={"show_default": True})
@SWEEP
@click_options(PredictOptions)
@json_option
def predict(sweep_dir, as_json, **options):
    """Fit err(K, n) = c0 + a K^-alpha + b n^-beta to a sweep and predict the best K, n for N.

    Per downstream set and their average, three predictors: the free fit, the alpha = beta fit
    (the paper's invariant-ratio case) and the ratio rule K* = sqrt(r* N). With two or more
    budgets, the one that predicted the sweep's largest budget best from the smaller ones is
    recommended (the check is printed); with one, none can be validated and predict says which
    budget to add. The K* interval is the free fit's bootstrap over budgets and residuals.
    --suggest names the splits to run next. Exits 1 when a downstream set gets no prediction
    at all (every predictor impossible); a predictor that fails beside others that did not is
    reported and leaves the exit status 0.
    """
    from .study.predict import predict_sweep, render

    out = predict_sweep(sweep_dir, **options)
    click.echo(json.dumps(out, indent=1) if as_json else render(out))
    if out["unpredicted"]:
        sys.exit(1)
one_default_style(main)
