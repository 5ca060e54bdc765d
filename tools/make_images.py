"""Write a folder of ImageNet-like JPEGs in ImageNet's train layout (class folders).

    python tools/make_images.py shards/demo/images --classes 20 --per-class 40   # ~3 s, 2 cores
    python tools/make_images.py shards/demo/val-images --classes 20 --per-class 10 --start 1000

The input for `dptrain shard` in the demo and the benchmarks; a finished folder is reused.
"""

import click

from dptrain.data.imagenet_like import write_image_folder


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--classes", default=20, show_default=True, type=click.IntRange(1))
@click.option("--per-class", default=40, show_default=True, type=click.IntRange(1))
@click.option("--width", default=500, show_default=True, type=click.IntRange(8, 1024))
@click.option("--height", default=375, show_default=True, type=click.IntRange(8, 1024))
@click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 100))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--start", default=0, show_default=True, type=click.IntRange(min=0),
              help="First image index per class: another start gives a held-out split.")
def main(out, classes, per_class, width, height, quality, seed, start):
    root = write_image_folder(out, classes, per_class, width=width, height=height,
                              quality=quality, seed=seed, start=start)
    click.echo(f"{root}: {classes} classes x {per_class} JPEGs of {width}x{height}")


if __name__ == "__main__":
    main()
