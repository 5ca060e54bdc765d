"""ImageNet-like JPEGs for benchmarks and tests, in ImageNet's train folder layout. Natural
images have a ~1/f spectrum: crops of a 1/f noise texture with per-class colour and per-image
gain give JPEGs that compress like ImageNet's (500x375 at quality 90: ~110 KB), so they cost
what ImageNet costs to read and decode. Image i of class c depends only on (seed, c, i). Not a
data set to learn from (`synthetic` is that).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.environment import cores_for_this_process
from ..common.runfolder import atomic_path

_TEXTURE_SIDE = 1024


@lru_cache(maxsize=2)
def texture(seed: int) -> np.ndarray:
    """A 1024x1024x3 field with a 1/f amplitude spectrum, zero mean and unit variance."""
    rng = np.random.default_rng([seed, 0x7E])
    fy = np.fft.fftfreq(_TEXTURE_SIDE)[:, None]
    fx = np.fft.rfftfreq(_TEXTURE_SIDE)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = rng.standard_normal(f.shape) * np.exp(2j * np.pi * rng.random(f.shape)) / f
        x = np.fft.irfft2(spec, s=(_TEXTURE_SIDE, _TEXTURE_SIDE))
        chans.append((x - x.mean()) / x.std())
    return np.stack(chans, -1).astype(np.float32)


def jpeg(field: np.ndarray, seed: int, label: int, index: int, *,
                       width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """One JPEG: a crop of `field` (a `texture`) in the class's colours, jittered per image."""
    if not (0 < width <= _TEXTURE_SIDE and 0 < height <= _TEXTURE_SIDE):
        raise ValueError(f"width and height must be in 1..{_TEXTURE_SIDE}")
    class_rng = np.random.default_rng([seed, label])
    mean = class_rng.uniform(60, 200, 3)
    rng = np.random.default_rng([seed, label, index])
    y = rng.integers(0, _TEXTURE_SIDE - height + 1)
    x = rng.integers(0, _TEXTURE_SIDE - width + 1)
    crop = field[y : y + height, x : x + width]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pixels = crop * rng.uniform(35, 45) + mean + rng.normal(0, 10, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_class_folder(tmp: Path, label: int, *, seed: int, start: int, per_class: int,
                        width: int, height: int, quality: int) -> None:
    folder = tmp / f"c{label:04d}"
    folder.mkdir(parents=True)
    field = texture(seed)
    for i in range(start, start + per_class):
        data = jpeg(field, seed, label, i, width=width, height=height,
                                  quality=quality)
        (folder / f"c{label:04d}_{i:05d}.JPEG").write_bytes(data)


def write_image_folder(root: str | os.PathLike, num_classes: int, per_class: int, *,
                       width: int = 500, height: int = 375, quality: int = 90, seed: int = 0,
                       start: int = 0, workers: int | None = None) -> Path:
    """Write `root/cNNNN/cNNNN_IIIII.JPEG` (ImageNet's train layout); reuses a finished root.

    Images `start` .. `start + per_class - 1` of each class: another `start` gives other
    images of the same classes (a held-out split).

    Written under a temporary name and renamed, so a folder that exists is complete; its
    `.params.json` says what it holds, and a folder made with other parameters is rebuilt.
    """
    root = Path(root)
    params = json.dumps({"num_classes": num_classes, "per_class": per_class, "width": width,
                         "height": height, "quality": quality, "seed": seed, "start": start})
    marker = root / ".params.json"
    if root.is_dir():
        if not marker.is_file():
            raise ValueError(f"{root} exists and was not written by write_image_folder")
        if marker.read_text() == params:
            return root
        shutil.rmtree(root)
    texture(seed)  # made once here; forked workers inherit it
    with atomic_path(root) as tmp:
        # Processes, not threads: rendering holds the GIL (16 threads wrote 20,000 JPEGs in
        # more than 50 s on a 16-core machine).
        write = partial(_write_class_folder, tmp, seed=seed, start=start, per_class=per_class,
                        width=width, height=height, quality=quality)
        with ProcessPoolExecutor(min(num_classes, workers or cores_for_this_process())) as pool:
            list(pool.map(write, range(num_classes)))
        (tmp / marker.name).write_text(params)
    return root
