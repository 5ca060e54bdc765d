"""What a pre-training run is told: `TrainConfig`, one field per option, and the recipes, which
are tables of values (as torchvision's presets). The command line is generated from the fields
(`dptrain pretrain --help` shows each with its help and its value in every recipe; see
options.py), so an option is declared once, here. No torch: `--help` stays fast.
"""

from __future__ import annotations

import functools
import json
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from ..common.errors import DataError
from ..common.options import option, renamed
from ..common.tracking import BACKENDS
from .optimizers import OPTIMIZER_HELP, OPTIMIZERS

SUBSET, TRAIN = "subset", "train"  # which options `sweep` sets per point, and which it passes on
# Options that change how fast a run goes or where it reports, not what it computes: a resume
# may change them.
SPEED_ONLY = ("workers", "prefetch", "log_every", "pixel_cache", "eval_cache", "log_to")


# Recipes are tables of values; any of them can be overridden on the command line.
# The paper's card as written: 100 epochs, batch 64, the Adam optimizer with lr 0.1, momentum
# (Adam's beta1) 0.9 and weight decay 1e-4 (Adam's, added to the gradient), at 224 px; it names
# no schedule: cosine. README's recipe table has what it trains to.
_PAPER = dict(epochs=100, batch_size=64, lr=0.1, momentum=0.9, weight_decay=1e-4,
              no_bn_wd=False, label_smoothing=0.0, schedule="cosine", warmup_epochs=0.0,
              res=224, min_res=None)
RECIPES: dict[str, dict] = {
    "paper": dict(optimizer="adam", **_PAPER),
    # The card with SGD instead of Adam (momentum 0.9), all else the same.
    "paper-sgd": dict(optimizer="sgd", **_PAPER),
    # FFCV-style: label smoothing, warm-up + linear decay, no wd on norms/biases, 160 -> 192 px,
    # large batch with the lr scaled (0.5 per 256 images).
    "fast": dict(optimizer="sgd", epochs=16, batch_size=512, lr=1.0, momentum=0.9,
                 weight_decay=5e-5, no_bn_wd=True, label_smoothing=0.1, schedule="linear",
                 warmup_epochs=2.0, res=192, min_res=160),
    # The built-in synthetic data (32 px): a small CNN, short schedule, CPU-friendly batch.
    "synthetic": dict(optimizer="sgd", arch="smallcnn", epochs=15, batch_size=128, lr=0.2,
                      momentum=0.9, weight_decay=5e-4, no_bn_wd=True, label_smoothing=0.1,
                      schedule="linear", warmup_epochs=1.0, res=32, min_res=None),
}


# A field and its option (help, allowed values); most are training options a sweep passes on.
_opt = functools.partial(option, group=TRAIN)


def _recipe(name: str, help: str, **kw):
    """A field whose default is the default recipe's value (fast's): written once, in RECIPES."""
    return _opt(RECIPES["fast"][name], help, **kw)


@dataclass(frozen=True)
class TrainConfig:
    data: str = _opt("", "Shard set to pre-train on (from dptrain shard) [the built-in synthetic "
                     "pool shards/synthetic/pretrain, built or extended to the run's K x n on "
                     "first use, with --recipe synthetic].", group=SUBSET, path="dir")
    classes: int | None = _opt(None, "K: number of classes [all].", group=SUBSET, low=1)
    per_class: int | None = _opt(None, "n: images per class [all].", group=SUBSET, low=1)
    class_list: str | None = _opt(None, "File of class names, one per line, instead of a seeded "
                                  "choice of K.", group=SUBSET, path="file")
    allow_fewer: bool = _opt(False, "Keep classes smaller than n whole instead of refusing.",
                             group=SUBSET)
    seed: int = _opt(0, "Subset choice (unless --subset-seed), data order, init and "
                     "augmentation.", group=SUBSET)
    subset_seed: int | None = _opt(None, "Seed of the subset's choice alone (which classes, "
                                   "which images), apart from the training randomness that "
                                   "--seed draws: a sweep given it trains every seed on one "
                                   "subset [--seed].", low=0)
    order: str = _opt("shuffled", "Each epoch's data order and crops: shuffled (a seeded "
                      "permutation of the subset; crops drawn per batch) or keyed (each image's "
                      "place and crop drawn from the seed, the epoch and the image itself, so that "
                      "a sweep's splits, nested subsets, meet the images they share in the same "
                      "order and crops: their differences then pair closer by seed; "
                      "docs/noise-budget.md).", choices=("shuffled", "keyed"))
    val_data: str | None = _opt(None, "Held-out images of the same classes (shards made with "
                                "--classes-from).", path="dir")
    recipe: str = _opt("fast", "fast: FFCV-style (label smoothing, warm-up + linear decay, no wd "
                       "on norms and biases, 160 -> 192 px, large batch); paper: the paper's card "
                       "as written (Adam 0.1, batch 64, 224 px, cosine); paper-sgd: the same with "
                       "SGD; synthetic: smallcnn at 32 px, for the built-in data. Every value "
                       "below is the recipe's unless given. [fast; synthetic without --data or on "
                       "the built-in data]",
                       choices=tuple(RECIPES))
    arch: str = _opt("resnet18", "smallcnn or any torchvision classification model.")
    epochs: int = _recipe("epochs", "Passes over the subset.", low=1)
    steps: int | None = _opt(None, "Total optimisation steps instead of --epochs (the lr "
                             "schedule follows): the same compute for every (K, n) of a grid.",
                             low=1)
    batch_size: int = _recipe("batch_size", "Images per step over all ranks; changing it "
                              "without --lr scales the recipe's lr linearly.", low=1)
    optimizer: str = _recipe("optimizer", OPTIMIZER_HELP, choices=tuple(OPTIMIZERS))
    lr: float = _recipe("lr", "Peak learning rate.", low=0, low_open=True)
    momentum: float = _recipe("momentum", "SGD's momentum, or Adam's beta1 (what a card written "
                              "for Adam calls its momentum).", low=0, high=1, high_open=True)
    beta2: float = _opt(0.999, "Adam's beta2 (sgd: unused).", low=0, high=1, high_open=True)
    weight_decay: float = _recipe("weight_decay", "L2 weight decay.", low=0)
    no_bn_wd: bool = _recipe("no_bn_wd", "No weight decay on norm and bias parameters (--bn-wd: "
                             "decay them too).")
    label_smoothing: float = _recipe("label_smoothing", "Label smoothing of the cross-entropy.",
                                     low=0, high=1, high_open=True)
    schedule: str = _recipe("schedule", "Learning-rate decay after the warm-up.",
                            choices=("linear", "cosine"))
    warmup_epochs: float = _recipe("warmup_epochs", "Linear learning-rate warm-up, in epochs of "
                                   "the subset (0: none).", low=0)
    res: int = _recipe("res", "Training resolution in px (the last one, if progressive; --res "
                       "alone turns progressive resolution off).", low=16)
    min_res: int | None = _recipe("min_res", "Progressive resolution from here up to --res, in "
                                  "steps of 32 px (FFCV); none: off.", low=16)
    eval_res: int | None = _opt(None, "Resolution of --val-data [--res].", low=16)
    amp: str = _opt("auto", "Autocast dtype; auto: bf16 where the hardware has it, else fp16 on "
                    "a GPU, fp32 on a CPU; fp16 (GPU only) uses a gradient scaler.",
                    choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = _opt(True, "Channels-last memory format for the model and its input.")
    compile: bool = _opt(False, "torch.compile the model.")
    device: str = _opt("auto", "Where to train; auto: the GPU when there is one.",
                       choices=("auto", "cpu", "cuda"))
    workers: int | None = _opt(None, "DALI threads [this process's share of the cores: all of "
                               "them, divided between torchrun's local ranks].", low=1)
    decode: str = _opt("auto", "Where JPEGs are decoded; auto: on the GPU (hardware decoder + "
                       "nvJPEG) in a GPU run; cpu: DALI's CPU threads, leaving the GPU to the "
                       "model.", choices=("auto", "gpu", "cpu"))
    hw_decoder_load: float | None = _opt(None, "Share of JPEGs the GPU's hardware JPEG decoder "
                                         "takes, the rest going to nvJPEG on the SMs [1.0 on "
                                         "H100/H200, measured faster; DALI's 0.65 on other "
                                         "GPUs].", low=0, high=1)
    prefetch: int = _opt(2, "Batches DALI prepares ahead, and as many finished ones queued.",
                         low=1)
    log_every: int | None = _opt(None, "Steps between metrics lines (each one syncs host and "
                                 "device) [50, fewer in a run under 1,000 steps: 20 lines or "
                                 "more].", low=1)
    pixel_cache: str = _opt("auto", "Pixel cache: decode the subset once and crop every epoch "
                            "from the decoded images, kept on the gpu, in host memory (pinned "
                            "on a GPU run), or off (decode every epoch); auto: the GPU if it "
                            "fits beside training, else host memory, else off. Unless off, "
                            "--val-data is read through the eval cache (--eval-cache).",
                            choices=("auto", "gpu", "host", "off"))
    pixel_cache_side: int | None = _opt(None, "Longer side, px, at most, of the images the pixel "
                                        "cache stores (never enlarged) [2 x --res].", low=16)
    eval_cache: str | None = _opt(None, "Folder of the eval cache: evaluation images decoded "
                                  "and resized once (--val-data here; probes and sweeps use it "
                                  "too) [$XDG_CACHE_HOME/dptrain or ~/.cache/dptrain; off: "
                                  "none].")
    log_to: tuple = _opt((), "Also log to TensorBoard (RUN/tensorboard) or Weights & Biases "
                         "(RUN/wandb; WANDB_MODE=offline works without a network); repeat for "
                         "both. Each needs its extra: pip install 'dptrain[tensorboard]'. "
                         "[none]",
                         choices=BACKENDS, multiple=True)


@dataclass(frozen=True)
class PretrainOptions:
    """`dptrain pretrain`'s options beside the run's config: where it goes and how it starts."""

    out: str | None = option(None, "Run folder [runs/<data>-K<K>-n<n>-s<seed>].", path="out")
    overwrite: bool = option(False, "Start the run folder over (one made with other options, or "
                             "a damaged checkpoint).")
    config_file: str | None = option(None, "Start from this resolved config (from "
                                     "--print-config, or a sweep's pretrain.json) instead of a "
                                     "recipe; options given replace its values.", path="file",
                                     flag="--config")
    print_config: bool = option(False, "Print the run's resolved options (the recipe with what "
                                "was given) as JSON and exit, running nothing.")
    gpus: int | None = option(None, "Launch DDP on this many GPUs of this machine (runs "
                              "torchrun).", low=1)


def pretrain_config(given: dict, o: PretrainOptions, *, progress: bool = True,
                    log=print) -> TrainConfig:
    """`pretrain`'s config: the recipe's (or --config's) values with those `given`. Without
    --data, the built-in synthetic pool and its recipe; the pool is built or extended to the
    run's K x n first, unless the config is only printed."""
    given = dict(given)
    if given.get("data") is None and not o.config_file:
        from ..data.synthetic import DEFAULT_POOL, ensure_pool

        if not o.print_config:
            log(ensure_pool(given.get("classes"), given.get("per_class"), progress))
        given.update(data=str(DEFAULT_POOL), recipe=given.get("recipe") or "synthetic")
    elif given.get("recipe") is None and not o.config_file and data_recipe(given["data"]):
        given["recipe"] = data_recipe(given["data"])
        if not o.print_config:
            log(f"{given['data']} is the built-in synthetic data: --recipe synthetic (give "
                "--recipe to choose another)")
    return load_config(o.config_file, **given)


def data_recipe(data: str) -> str | None:
    """The recipe a shard set calls for when none is given: `synthetic` for a set of the
    built-in data (tools/make_shards.py; its index says so), which the ImageNet recipes would
    train at 6x its resolution; None for any other (or an unreadable one: its readers say
    why)."""
    try:
        meta = json.loads((Path(data) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return "synthetic" if isinstance(meta, dict) and meta.get("source_format") == "synthetic" \
        else None


def default_in_recipes(name: str) -> str:
    """A field's value in each recipe, for --help: 'fast: 16, paper: 100, synthetic: 15', or
    the one default where no recipe sets it."""
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    values = {r: v.get(name, default) for r, v in RECIPES.items()}
    if len(set(map(repr, values.values()))) == 1:
        return "" if default in (None, "", (), MISSING) else _show(default)
    return ", ".join(f"{r}: {_show(v)}" for r, v in values.items())


def _show(v) -> str:
    return "none" if v is None else ("yes" if v is True else "no" if v is False else f"{v:g}"
                                     if isinstance(v, float) else str(v))


def make_config(recipe: str = "fast", **overrides) -> TrainConfig:
    """The recipe's values with `overrides` (None means: keep the recipe's). A batch size
    changed without an explicit lr scales the recipe's lr linearly; a res given without a
    min_res turns progressive resolution off."""
    if recipe not in RECIPES:
        raise DataError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], "recipe": recipe}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"not TrainConfig fields: {sorted(unknown)}")
    if "batch_size" in given and "lr" not in given:
        values["lr"] = values["lr"] * given["batch_size"] / values["batch_size"]
    if "res" in given and "min_res" not in given:
        values["min_res"] = None
    return TrainConfig(**{**values, **given})


def load_config(path: str | Path | None, recipe: str | None = None, **overrides) -> TrainConfig:
    """A resolved config (`pretrain --print-config`, a sweep's pretrain.json) used as it is,
    with `overrides` (None: keep the file's) replacing its values: no recipe applies. Without
    a file: the recipe's values (make_config)."""
    if path is None:
        return make_config(recipe or "fast", **overrides)
    overrides["recipe"] = recipe
    try:
        values = renamed(json.loads(Path(path).read_text()))  # one written under old names too
    except (OSError, ValueError) as e:
        raise DataError(f"--config {path}: not a JSON config ({e})") from None
    names = {f.name for f in fields(TrainConfig)}
    if not isinstance(values, dict) or set(values) - names:
        extra = sorted(set(values) - names) if isinstance(values, dict) else "not an object"
        raise DataError(f"--config {path}: not a pretrain config ({extra}); write one with "
                        "dptrain pretrain ... --print-config")
    for f in fields(TrainConfig):  # JSON has lists where the options give tuples
        if f.metadata["multiple"] and isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return replace(TrainConfig(**values), **{k: v for k, v in overrides.items() if v is not None})


def check_config(cfg: TrainConfig, world_size: int, cuda: bool) -> None:
    """Refuse impossible options before any work, with what is allowed."""
    from .models import check_arch

    check_arch(cfg.arch)
    for f in fields(TrainConfig):  # what click checks on the command line, for --config too
        value, flag = getattr(cfg, f.name), f"--{f.name.replace('_', '-')}"
        choices = f.metadata["choices"]
        for v in value if f.metadata["multiple"] else [value]:
            if choices and v not in choices:
                raise DataError(f"{flag} must be one of {', '.join(choices)}, not {v!r}")
        low, high, low_open, high_open = f.metadata["range"]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                (low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            lo = "" if low is None else f"{low:g}{'<' if low_open else '<='}"
            hi = "" if high is None else f"{'<' if high_open else '<='}{high:g}"
            raise DataError(f"{flag} must be {lo}x{hi}, not {value!r}")
    if cfg.batch_size % world_size:
        raise DataError(f"--batch-size {cfg.batch_size} does not split over {world_size} ranks")
    if cfg.min_res is not None and cfg.min_res > cfg.res:
        raise DataError(f"--min-res {cfg.min_res} is above --res {cfg.res}")
    if cfg.amp == "fp16" and not cuda:
        raise DataError("--amp fp16 needs a GPU; on the CPU use auto, bf16 or off")
    if cfg.pixel_cache == "gpu" and not cuda:
        raise DataError("--pixel-cache gpu needs a GPU; on the CPU use auto, host or off")
    if cfg.decode == "gpu" and not cuda:
        raise DataError("--decode must be auto or cpu, or gpu on a GPU run, not 'gpu'")
