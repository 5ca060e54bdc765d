"""Build the built-in synthetic dataset as shards: the pre-training pool and the downstream tasks.

    python tools/make_shards.py                  # 1000 x 300 pool + 3 tasks, ~2 min on 2 cores
    python tools/make_shards.py --classes 100 --per-class 100   # what `make demo` needs, ~10 s

Writes OUT/pretrain (classes drawn from the shared distribution), OUT/tasks/tT/{train,test}
(classes the pool never saw) and OUT/suite.toml (for `dptrain probe --suite`). Everything is
written by `dptrain shard`'s writer; rerunning is a no-op, an interrupted run resumes, and a
larger pool keeps every image of a smaller one. See docs/synthetic.md.
"""

import click

from dptrain.common.errors import DataError
from dptrain.data.synthetic import (
    DEFAULT_DIR,
    POOL_CLASSES,
    POOL_PER_CLASS,
    Generator,
    write_pool,
    write_tasks,
)


def _sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of class counts")
    if not sizes or min(sizes) < 2:
        raise click.BadParameter("each task needs at least 2 classes")
    return sizes


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", default=str(DEFAULT_DIR), type=click.Path(file_okay=False),
              help="Folder for pretrain/, tasks/ and suite.toml.")
@click.option("--classes", default=POOL_CLASSES, type=click.IntRange(1),
              help="Classes in the pre-training pool.")
@click.option("--per-class", default=POOL_PER_CLASS, type=click.IntRange(1),
              help="Images per pool class.")
@click.option("--tasks", default="10,20,50", callback=_sizes,
              help="Downstream tasks: the number of classes of each.")
@click.option("--task-train", default=100, type=click.IntRange(1),
              help="Train images per task class.")
@click.option("--task-test", default=50, type=click.IntRange(1),
              help="Test images per task class.")
@click.option("--res", default=Generator.res, type=click.IntRange(8, 224), help="Image side, px.")
@click.option("--spread", default=Generator.spread, type=click.FloatRange(0, 1),
              help="Intra-class spread: std of each image's jitter of the class's parameters, "
                   "in units of each parameter's range.")
@click.option("--class-range", default=Generator.class_range,
              type=click.FloatRange(0, 1, min_open=True),
              help="Inter-class spread: classes are drawn from this centred part of each range "
                   "(smaller: classes more alike, harder).")
@click.option("--noise", default=Generator.noise, type=click.FloatRange(0),
              help="Pixel noise std (of 255).")
@click.option("--quality", default=Generator.quality, type=click.IntRange(1, 100),
              help="JPEG quality.")
@click.option("--seed", default=Generator.seed, type=int)
@click.option("--workers", type=click.IntRange(1), help="Processes [all cores].")
@click.option("--progress/--no-progress", default=True)
def main(out, classes, per_class, tasks, task_train, task_test, res, spread, class_range, noise,
         quality, seed, workers, progress):
    """Generate the two-step synthetic dataset straight into class-indexed shards."""
    gen = Generator(seed=seed, res=res, spread=spread, class_range=class_range, noise=noise,
                    quality=quality)
    task_images = sum(tasks) * (task_train + task_test)
    click.echo(f"{out}: a pool of {classes:,} classes x {per_class:,} images "
               f"({classes * per_class:,}) and {len(tasks)} tasks ({task_images:,} images) at "
               f"{res}x{res} px; sets already written are kept (the bars show the time left; "
               "--classes and --per-class make the pool smaller)", err=True)
    try:
        pool = write_pool(f"{out}/pretrain", classes, per_class, gen, workers=workers,
                          progress=progress)
        suite = write_tasks(out, tasks, task_train, task_test, gen, workers=workers,
                            progress=progress)
    except DataError as e:
        raise click.UsageError(str(e)) from None
    state = "up to date" if pool["up_to_date"] else f"written in {pool['seconds']:.1f} s"
    click.echo(f"{out}/pretrain: {pool['classes']} classes x {pool['per_class']} images of "
               f"{res}x{res} px ({state})")
    click.echo(f"{out}/tasks: {len(tasks)} tasks of {', '.join(map(str, tasks))} unseen classes "
               f"({task_train} train + {task_test} test images each); suite: {suite}")


if __name__ == "__main__":
    main()
