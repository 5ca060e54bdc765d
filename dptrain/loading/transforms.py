"""The image transforms, on uint8 HWC pixels of either device, each written once for every
path (streamed JPEGs, the pixel cache, the eval cache): the train transform (`TrainTransform`:
crop windows drawn as torchvision's RandomResizedCrop draws them, resized and flipped), the eval
transform (`EvalTransform`: resize and centre crop), and the shrink to a pixel cache's stored
size.

Every resize is PIL's filter (antialiased bilinear), so both devices and every path (streamed
or cached) give the same images: `resize` is torch's kernel applied per image (uint8 on the
CPU, 5x faster there than DALI's); `resample` is the same filter for a whole batch of crops at
once, written as two batched matrix products, which is how a GPU crops from its cache without
a kernel launch per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EVAL_RESIZE = 256 / 224  # default eval: shorter side to res * 256/224, then center-crop res


def crop_windows(heights: np.ndarray, widths: np.ndarray, rng: np.random.Generator,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 attempts: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-resized-crop windows and coin flips for a batch of images of these sizes, as
    torchvision's RandomResizedCrop draws them: up to `attempts` tries at an area in `scale`
    of the image and an aspect ratio in `ratio` (log-uniform), else the central crop with the
    ratio clamped. Returns (top-left (y, x), size (h, w), flips) as int32 arrays."""
    h, w = heights.astype(np.float64), widths.astype(np.float64)
    n = len(h)
    target = (h * w)[:, None] * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts)))
    cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (cw >= 1) & (ch >= 1) & (cw <= w[:, None]) & (ch <= h[:, None])
    first = fits.argmax(1)
    found = fits[np.arange(n), first]
    image_ratio = w / h
    fw = np.where(image_ratio > ratio[1], np.round(h * ratio[1]), w)  # too wide: full height
    fh = np.where(image_ratio < ratio[0], np.round(w / ratio[0]), h)  # too tall: full width
    cw = np.where(found, cw[np.arange(n), first], fw)
    ch = np.where(found, ch[np.arange(n), first], fh)
    y = np.where(found, rng.integers(0, (h - ch + 1).astype(np.int64)), (h - ch) // 2)
    x = np.where(found, rng.integers(0, (w - cw + 1).astype(np.int64)), (w - cw) // 2)
    flips = rng.random(n) < 0.5
    return (np.stack([y, x], 1).astype(np.int32), np.stack([ch, cw], 1).astype(np.int32),
            flips.astype(np.int32))


def batch_augmentation(seed: int, epoch: int, step: int, heights: np.ndarray,
                       widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A training batch's crop windows and flips, in the images' own pixels: drawn from
    (seed, epoch, step) alone, so a resumed run sees the crops it would have seen, whether
    they are decoded from the JPEGs or cut from a pixel cache."""
    return crop_windows(heights, widths, np.random.default_rng((seed, epoch, step)))


class _Uniforms:
    """The draws `crop_windows` asks of a Generator (uniform, integers, random), taken column
    by column from a matrix of per-image uniforms: each image's numbers its own."""

    def __init__(self, u: np.ndarray):
        self.u, self.col = u, 0

    def _take(self, k: int) -> np.ndarray:
        self.col += k
        return self.u[:, self.col - k:self.col]

    def uniform(self, low: float, high: float, shape: tuple[int, int]) -> np.ndarray:
        return low + (high - low) * self._take(shape[1])

    def integers(self, low: int, high: np.ndarray) -> np.ndarray:
        return low + (self._take(1)[:, 0] * high).astype(np.int64)

    def random(self, n: int) -> np.ndarray:
        return self._take(1)[:, 0]


def keyed_uniforms(seed: int, epoch: int, keys: np.ndarray, count: int) -> np.ndarray:
    """`count` uniforms in [0, 1) for each key, a function of (seed, epoch, key, column) alone:
    SplitMix64's finaliser (Steele et al. 2014) over a counter, vectorised (a Generator per
    image cost ~1 ms here)."""
    # arrays throughout: numpy's uint64 arrays wrap silently, its scalars warn
    mix = (np.array([seed, epoch], dtype=np.uint64)
           * np.array([0x9E3779B97F4A7C15, 0xD1B54A32D192ED03], dtype=np.uint64)).sum()
    x = keys.astype(np.uint64)[:, None] * np.uint64(0xBF58476D1CE4E5B9) + mix
    x = x + np.arange(1, count + 1, dtype=np.uint64)[None] * np.uint64(0x94D049BB133111EB)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def keyed_augmentation(seed: int, epoch: int, keys: np.ndarray, heights: np.ndarray,
                       widths: np.ndarray, attempts: int = 10
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`batch_augmentation` with each image's window drawn from (seed, epoch, its key) alone:
    an image gets the same crop in an epoch whichever batch, subset or place it is in
    (--order keyed)."""
    u = keyed_uniforms(seed, epoch, keys, 2 * attempts + 3)
    return crop_windows(heights, widths, _Uniforms(u), attempts=attempts)


@dataclass(frozen=True)
class TrainTransform:
    """The train transform: random-resized-crop windows and flips drawn in the images' own
    pixels (`draw`), each crop resized to res x res with PIL's filter and mirrored where drawn
    (`finish`, or `finish_padded` for a padded batch). `seed` is the rank's augmentation seed;
    `keys` (the subset's rows), when given, key each image's window (`keyed_augmentation`).
    Whoever cuts the crops (DALI's fused decode, a pixel cache), the batch is made here."""

    seed: int
    res: int
    keys: np.ndarray | None = None

    def draw(self, epoch: int, step: int, positions: np.ndarray, heights: np.ndarray,
             widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.keys is not None:
            return keyed_augmentation(self.seed, epoch, self.keys[positions], heights, widths)
        return batch_augmentation(self.seed, epoch, step, heights, widths)

    def finish(self, crops: list[torch.Tensor], flips: np.ndarray,
               pool=None, threads: int = 1) -> torch.Tensor:
        """Crops, one tensor each -> the batch: torch's per-image kernel (uint8 on the CPU),
        split over `pool`'s `threads` if given."""
        if pool is None:
            return resize(crops, self.res, flips=flips)
        parts = [p for p in np.array_split(np.arange(len(crops)), threads) if len(p)]
        done = pool.map(lambda p: resize([crops[i] for i in p], self.res, flips=flips[p]),
                        parts)
        return torch.cat(list(done))

    def finish_padded(self, crops: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                      flips: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) crops padded to the largest (each valid in its top-left heights[b] x
        widths[b]) -> the batch, resampled at once (`resample`: a GPU's way, no per-image
        kernel launch)."""
        return resample(crops, heights, widths, flips, self.res)


@dataclass(frozen=True)
class EvalTransform:
    """The eval transform: the shorter side resized to res x `ratio` (PIL's filter), then the
    centre res x res."""

    res: int
    ratio: float = EVAL_RESIZE

    def finish(self, images: list[torch.Tensor]) -> torch.Tensor:
        return resize(images, self.res, shorter=round(self.res * self.ratio))


def index_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small index array on `device`, sent without making the host wait."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def fit_size(heights: np.ndarray, widths: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The size an image is stored at in a pixel cache: its longer side at most `side`, the
    aspect ratio kept (rounded, at least 1 px), never enlarged."""
    h, w = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    longer = np.maximum(h, w)
    shrink = longer > side
    scale = side / np.maximum(longer, 1)
    return (np.where(shrink, np.maximum(1, np.round(h * scale)), h).astype(np.int64),
            np.where(shrink, np.maximum(1, np.round(w * scale)), w).astype(np.int64))


def resize(images: list[torch.Tensor], res: int, flips: np.ndarray | None = None,
           shorter: int | None = None) -> torch.Tensor:
    """HWC uint8 images (CPU or GPU) -> one (B, res, res, 3) uint8 batch on their device.

    Train (`flips` given): each crop resized to res x res and mirrored where flagged. Eval
    (`shorter` given): the shorter side resized to `shorter`, then the centre res x res, the
    origin rounded half up (as DALI does). torch's antialiased bilinear is PIL's filter; its
    uint8 kernel exists only on the CPU, so a GPU image is resized in float and rounded.
    Images of one size are resized together, one kernel per size: eval images often share a
    few sizes, while train crops all differ.
    """
    device = images[0].device
    out = torch.empty((len(images), res, res, 3), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for (h, w, _), members in groups.items():
        if shorter is None:
            size = (res, res)
        elif h <= w:
            size = (shorter, round(w * shorter / h))
        else:
            size = (round(h * shorter / w), shorter)
        y = _interpolate([images[i] for i in members], size)
        if shorter is not None:
            top, left = int((size[0] - res) / 2 + 0.5), int((size[1] - res) / 2 + 0.5)
            y = y[:, top : top + res, left : left + res]
        for j, i in enumerate(members):
            out[i] = y[j].flip(1) if flips is not None and flips[i] else y[j]
    return out


def fit(image: torch.Tensor, side: int) -> torch.Tensor:
    """One HWC uint8 image shrunk to fit side x side (`fit_size`), as a new tensor."""
    h, w = fit_size(np.array([image.shape[0]]), np.array([image.shape[1]]), side)
    if (h[0], w[0]) == tuple(image.shape[:2]):
        return image.clone()
    return _interpolate([image], (int(h[0]), int(w[0])))[0]


def _interpolate(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Images of one size -> (B, size, 3) uint8: torch's antialiased bilinear (PIL's filter)."""
    x = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
    x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: the channels-last kernel
    if x.device.type == "cuda":
        x = x.float()
    y = F.interpolate(x, size=size, mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    return y.round_().clamp_(0, 255).to(torch.uint8) if y.is_floating_point() else y


def filter_weights(lengths: torch.Tensor, out: int, span: int) -> torch.Tensor:
    """(B, out, span) float32: row i of b holds the weights with which output pixel i of a
    length-`lengths[b]` line resized to `out` pixels averages input pixels 0..span-1 (zero at
    and past the line's end). PIL's antialiased bilinear filter, as torch computes it
    (aten's _compute_indices_min_size_weights_aa): a triangle as wide as the scale when
    shrinking, normalised."""
    length = lengths.to(torch.float64)[:, None, None]
    scale = length / out
    support = torch.clamp(scale, min=1.0)
    invscale = 1.0 / support
    centre = scale * (torch.arange(out, dtype=torch.float64, device=lengths.device)[None, :, None]
                      + 0.5)
    low = torch.clamp(torch.trunc(centre - support + 0.5), min=0)
    high = torch.minimum(torch.trunc(centre + support + 0.5), length)
    j = torch.arange(span, dtype=torch.float64, device=lengths.device)[None, None, :]
    w = torch.clamp(1 - ((j - centre + 0.5) * invscale).abs(), min=0) * ((j >= low) & (j < high))
    return (w / w.sum(2, keepdim=True)).float()


def resample(crops: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
             flips: torch.Tensor, res: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 crops, each valid in its top-left heights[b] x widths[b] (the rest
    is padding, weighted zero) -> (B, res, res, 3) uint8, resized with `resize`'s filter and
    mirrored where `flips`. Two batched matrix products in float32 (exact for uint8 inputs up
    to rounding: within 1 of `resize` per pixel), one for each axis, with no per-image work."""
    b, h, w, _ = crops.shape
    rows = filter_weights(heights, res, h)  # (B, res, H)
    cols = filter_weights(widths, res, w)  # (B, res, W)
    cols = torch.where(flips.bool()[:, None, None], cols.flip(1), cols)
    x = crops.float().view(b, h, w * 3)
    tall = torch.bmm(rows, x).view(b, res, w, 3)  # each column resized: (B, res, W, 3)
    t = tall.permute(0, 2, 1, 3).reshape(b, w, res * 3)
    y = torch.bmm(cols, t).view(b, res, res, 3).permute(0, 2, 1, 3)  # then each row
    return y.round_().clamp_(0, 255).to(torch.uint8).contiguous()
