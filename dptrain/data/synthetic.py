"""Built-in data: the two-step synthetic dataset (`tools/make_shards.py`, the default of
`dptrain pretrain`). ImageNet-like JPEGs for benchmarks are in `imagenet_like`.

Two-step data follows the paper's model: draw K classes from one shared distribution, then n
images around each class. A class is LATENT numbers in [0, 1] (outline harmonics, size, aspect,
grating frequencies, orientations and weights, two colours); an image jitters every one of them
by `spread` and renders a star-shaped blob filled with gratings blending the two colours, rotated,
scaled and moved, on a random background with a distractor shape, plus pixel noise. Image i of
class c depends only on (generator parameters, c, i): the same seed gives byte-identical shards,
and a larger pool holds every image of a smaller one. Images go straight into shards through
`dptrain shard`'s writer (`shards.write_source`), with no temporary files.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.environment import under_torchrun
from ..common.errors import DataError
from ..common.runfolder import write_atomic
from .index import INDEX_FILE, ShardIndex
from .shards import write_source
from .sources import Item, Source

# -- two-step synthetic data -------------------------------------------------------------------

_LATENT_SIZES = {"amp": 4, "phase": 4, "radius": 1, "aspect": 1, "freq": 3, "orient": 3,
                 "weight": 3, "colour1": 3, "colour2": 3}
_CIRCULAR = ("phase", "orient")  # jitter wraps around instead of clipping
_SLICE, _n = {}, 0
for _name, _size in _LATENT_SIZES.items():
    _SLICE[_name], _n = slice(_n, _n + _size), _n + _size
LATENT = _n  # 25 numbers per class
POOL = 0  # group 0 is the pre-training pool, groups 1, 2, ... the downstream tasks
TRAIN, TEST = 0, 1  # splits
DEFAULT_DIR = Path("shards/synthetic")  # tools/make_shards.py and `dptrain pretrain` use it
DEFAULT_POOL = DEFAULT_DIR / "pretrain"
POOL_CLASSES, POOL_PER_CLASS = 1000, 300  # the default pool


@dataclass(frozen=True)
class Generator:
    """The generator's parameters; with (group, class, split, index) they fix every image."""

    seed: int = 0
    res: int = 32  # px, square images (up to 224)
    spread: float = 0.15  # intra-class: std of each image's jitter, in units of each range
    class_range: float = 1.0  # inter-class: classes drawn from this centred part of each range
    noise: float = 6.0  # pixel noise std (of 255)
    quality: int = 90  # JPEG quality (4:4:4 chroma: small images keep their colour detail)

    def check(self) -> None:
        if not 8 <= self.res <= 224:
            raise DataError(f"--res must be in 8..224, not {self.res}")
        if not (0 <= self.spread <= 1 and 0 < self.class_range <= 1 and self.noise >= 0):
            raise DataError("--spread must be in 0..1, --class-range in (0, 1], --noise >= 0")

    def class_latent(self, group: int, label: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0xC1A55, group, label])
        return 0.5 + self.class_range * (rng.random(LATENT) - 0.5)

    def pixels(self, group: int, label: int, split: int, index: int) -> np.ndarray:
        """One image, uint8 HxWx3."""
        rng = np.random.default_rng([self.seed, group, label, split, index])
        z = self.class_latent(group, label) + self.spread * rng.standard_normal(LATENT)
        z = np.clip(z, 0, 1).astype(np.float32)  # float32 throughout: twice the speed
        for name in _CIRCULAR:
            z[_SLICE[name]] %= 1.0
        x, y = _grid(self.res)
        rng_bg = rng.random(12, dtype=np.float32)
        # background: a random colour with a random low-frequency grating, and a distractor
        bg_colour = rng_bg[:3] * 255
        angle = rng_bg[3] * np.pi
        wave = np.sin(2 * np.pi * (0.5 + 1.5 * rng_bg[4]) * (x * np.cos(angle) + y * np.sin(angle)))
        image = bg_colour + (30 * wave)[..., None]  # float32
        d_amp, d_phase = rng.random(4, dtype=np.float32) * 0.3, rng.random(4, dtype=np.float32)
        d_mask = _star(x, y, rng_bg[5] * 1.6 - 0.8, rng_bg[6] * 1.6 - 0.8, rng_bg[7] * 2 * np.pi,
                       0.15 + 0.2 * rng_bg[8], 1.0, d_amp, d_phase, self.res)[0]
        image += d_mask[..., None] * (rng.random(3, dtype=np.float32) * 255 - image)
        # the object: the class's outline and texture, posed at random
        pose = rng.random(4, dtype=np.float32)
        mask, u, v = _star(x, y, 0.4 * pose[0] - 0.2, 0.4 * pose[1] - 0.2, pose[2] * 2 * np.pi,
                           (0.35 + 0.25 * z[_SLICE["radius"]][0]) * (0.8 + 0.3 * pose[3]),
                           0.6 + 0.4 * z[_SLICE["aspect"]][0], 0.35 * z[_SLICE["amp"]],
                           z[_SLICE["phase"]], self.res)
        freq = 1.0 + 5.0 * z[_SLICE["freq"]]
        orient = np.pi * z[_SLICE["orient"]]
        weight = 0.2 + z[_SLICE["weight"]]
        shift = rng.random(3, dtype=np.float32) * np.float32(2 * np.pi)
        g = sum(w * np.sin(2 * np.pi * f * (u * np.cos(o) + v * np.sin(o)) + s)
                for w, f, o, s in zip(weight, freq, orient, shift))
        g = (0.5 + 0.5 * g / weight.sum())[..., None]
        texture = 255 * (z[_SLICE["colour1"]] * (1 - g) + z[_SLICE["colour2"]] * g)
        image += mask[..., None] * (texture - image)
        image += np.float32(self.noise) * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8)

    def jpeg(self, group: int, label: int, split: int, index: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels(group, label, split, index)).save(
            buf, "JPEG", quality=self.quality, subsampling=0)
        return buf.getvalue()


def source(gen: Generator, group: int, class_names: list[str], per_class: int,
           split: int = TRAIN) -> Source:
    """Classes 0..len(class_names)-1 of `group`, images 0..per_class-1 of `split`, as a source
    for the shard writer: each input is made in the worker that writes it."""
    gen.check()
    origin = json.dumps({"generator": asdict(gen), "group": group, "split": split,
                         "classes": len(class_names), "per_class": per_class})
    src = Source("synthetic", Path("synthetic"), list(class_names), origin=origin,
                 encoding=f"generated, JPEG quality {gen.quality}, 4:4:4 chroma")
    src.items = {name: [Item(f"{name}/{i:06d}.jpg", make=partial(gen.jpeg, group, label, split,
                                                                    i))
                         for i in range(per_class)]
                  for label, name in enumerate(class_names)}
    return src


def pool_names(classes: int) -> list[str]:
    return [f"p{c:05d}" for c in range(classes)]


def task_names(task: int, classes: int) -> list[str]:
    return [f"t{task}c{c:03d}" for c in range(classes)]


def write_pool(out: str | os.PathLike, classes: int, per_class: int,
               gen: Generator | None = None, *, workers: int | None = None,
               progress: bool = True) -> dict:
    """The pre-training pool: `classes` x `per_class` images of group POOL.

    An existing pool made by the same generator (`gen` None: whatever generator made it, else
    the default one) is reused if it is large enough and otherwise rebuilt at the larger size
    (the images it held are kept: they depend only on (c, i)); a pool of another generator is
    refused, since subsets of it would silently change.
    """
    out = Path(out)
    old = None
    if (out / INDEX_FILE).is_file():
        try:
            old = json.loads(ShardIndex.load(out).meta["source"])
        except (ValueError, TypeError):
            raise DataError(f"{out} is a shard set, but not a synthetic pool: choose another "
                            "folder") from None
    if gen is None:
        gen = Generator(**old["generator"]) if old else Generator()
    if old is not None:
        if old.get("generator") != asdict(gen):
            raise DataError(f"{out} was generated with other parameters ({old.get('generator')}):"
                            " remove it or choose another folder")
        if old["classes"] >= classes and old["per_class"] >= per_class:
            return {"up_to_date": True, "classes": old["classes"], "per_class": old["per_class"]}
        classes, per_class = max(classes, old["classes"]), max(per_class, old["per_class"])
    summary = write_source(source(gen, POOL, pool_names(classes), per_class), out,
                           workers=workers, progress=progress, overwrite=True)
    return {**summary, "classes": classes, "per_class": per_class}


def write_tasks(out: str | os.PathLike, sizes: tuple[int, ...] = (10, 20, 50), train: int = 100,
                test: int = 50, gen: Generator = Generator(), *, workers: int | None = None,
                progress: bool = True) -> Path:
    """Downstream tasks of classes the pool never saw (groups 1, 2, ...): OUT/tasks/tT/train
    and test, and OUT/suite.toml listing them for `dptrain probe --suite`."""
    out = Path(out)
    lines = []
    for t, k in enumerate(sizes, start=1):
        names, folder = task_names(t, k), out / "tasks" / f"t{t}"
        for split, count, name in ((TRAIN, train, "train"), (TEST, test, "test")):
            write_source(source(gen, t, names, count, split), folder / name, workers=workers,
                         progress=progress, overwrite=True)
        lines += ["[[dataset]]", f'name = "synthetic-t{t}"', f'data = "tasks/t{t}/train"',
                  f'test_data = "tasks/t{t}/test"', ""]
    suite = out / "suite.toml"
    write_atomic(suite, (f"# {len(sizes)} synthetic downstream tasks ({train} train + {test} "
                         "test images per class)\n" + "\n".join(lines)).encode())
    return suite


@lru_cache(maxsize=8)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]."""
    c = ((np.arange(res) + 0.5) / res * 2 - 1).astype(np.float32)
    return c[None, :].repeat(res, 0), c[:, None].repeat(res, 1)


def _star(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rotation: float, radius: float,
          aspect: float, amp: np.ndarray, phase: np.ndarray, res: int):
    """A soft mask of a star-shaped region (radius modulated by harmonics 2..5) and the
    object's own coordinates (u, v), so its texture turns and moves with it."""
    c, s = np.cos(rotation), np.sin(rotation)
    u = c * (x - cx) + s * (y - cy)
    v = (-s * (x - cx) + c * (y - cy)) / aspect
    w = u + 1j * v
    rho = np.abs(w)
    turn = w / np.maximum(rho, 1e-6)  # e^(i theta): harmonics by multiplication, no trig
    power, wobble = turn * turn, 1.0
    for a, p in zip(amp, phase):
        wobble = wobble + a * (power * np.exp(2j * np.pi * p)).real
        power = power * turn
    r = radius * wobble
    return np.clip((r - rho) * res / 2 + 0.5, 0, 1), u, v


def ensure_pool(classes: int | None, per_class: int | None, progress: bool = True) -> str:
    """`dptrain pretrain` without --data: the built-in pool (DEFAULT_POOL), built or extended
    to hold a classes x per_class subset. Returns what it did, for the user. Refused under
    torchrun, whose ranks would all build it at once."""
    if under_torchrun():
        raise DataError("under torchrun, give --data (build the synthetic pool first: "
                        "python tools/make_shards.py)")
    r = write_pool(DEFAULT_POOL, classes or POOL_CLASSES, per_class or POOL_PER_CLASS,
                   progress=progress)
    if r["up_to_date"]:
        return (f"no --data: using the built-in synthetic pool {DEFAULT_POOL} ({r['classes']} "
                f"classes x {r['per_class']} images)")
    return (f"no --data: built the synthetic pool {DEFAULT_POOL} ({r['classes']} classes x "
            f"{r['per_class']} images, {r['seconds']:.0f} s); it is what K x n subsets are "
            "drawn from, so keep it fixed within an experiment")
