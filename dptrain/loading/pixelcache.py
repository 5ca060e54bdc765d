"""Decode each image once: a training run's part of the subset kept decoded in memory, so that
every epoch after the first crops from pixels instead of decoding the JPEGs again
(`--pixel-cache`).

Each rank keeps its own part of the subset (`subset.rank_part`, fixed for the run) as uint8
rows of one tensor: on the GPU, in pinned host memory, or in RAM on a machine without one.
The cache fills as the first epoch trains: each of that epoch's batches is decoded whole
(not just its crops), each image shrunk so its longer side is at most `--pixel-cache-side`
(never enlarged; `transforms.fit_size`) and stored, and the batch is then cut from the cache
like every later one; the few images that epoch left out (the last, partial batch) are
decoded at its end. So the fill costs no pass of its own: on a GPU the decoders fill it while
the model trains, as they would stream. Each batch's crop windows and flips are drawn from
(seed, rank, epoch, step) in the images' own pixels by the train transform, as for streamed
batches (`transforms.TrainTransform`), scaled to the stored size, cut out and finished by the
same transform at the epoch's resolution, so progressive resizing reads the same cache. Where
the stored side is at least the image's own, a batch is the streamed batch: bit for bit on the
CPU (tested; on a GPU the whole-image and the crop decoders may upsample chroma differently).

`--pixel-cache auto` puts the cache on the GPU when it fits beside training (the training step's
peak memory, measured on a copy of the model, plus a margin), else in host memory (half of what
is available, shared between the machine's ranks), else the run streams as before: never an
out-of-memory crash. The run's log and summary.json say where, why, how large, and how fast
it filled.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..common.environment import Ranks, cores_for_this_process
from ..data.subset import Subset, rank_part
from .decode import Batch, Plan, on_stream, single_threaded_pool
from .loader import Feed
from .transforms import TrainTransform, fit, fit_size, index_tensor

SIDE_PER_RES = 2  # the stored longer side, in units of the training resolution, by default
HOST_SHARE = 0.5  # of the memory available to this machine's ranks, at most, for host caches
GPU_MARGIN = 2 << 30  # bytes kept free on the GPU beyond the training step's measured peak


@dataclass(frozen=True)
class CacheRecord:
    """Where a run's pixel cache lives ("gpu", "host" or "off"), why, how large, and how fast
    it filled: what the run's first log line and its summary.json ("pixel_cache") say."""

    where: str
    why: str
    gb: float
    side: int
    images: int
    shrunk: int = 0  # images whose longer side is above `side`: their crops are blurrier
    fill_s: float | None = None
    fill_img_per_s: float | None = None

    def line(self) -> str:
        amount = f"{self.gb:.2f} GB" if self.gb >= 0.1 else f"{1e3 * self.gb:.1f} MB"
        size = (f"{amount} for {self.images:,} images at <= {self.side} px, "
                f"{self.shrunk:,} of them shrunk")
        filled = (f", filled in {self.fill_s:.1f} s ({self.fill_img_per_s:,.0f} img/s)"
                  if self.fill_s is not None else
                  ", filled as the first epoch trains" if self.where != "off" else "")
        return f"pixel cache: {self.where} ({size}{filled}): {self.why}"

    def filled(self, cache: PixelCache | None) -> CacheRecord:
        """This record with the fill's time and rate, once `cache` is full."""
        if cache is None or cache.fill_s is None:
            return self
        return replace(self, fill_s=cache.fill_s, fill_img_per_s=self.images / cache.fill_s)


def cache_side(res: int) -> int:
    """The default stored side for training at `res`: SIDE_PER_RES x res."""
    return SIDE_PER_RES * res


def cache_bytes(heights: np.ndarray, widths: np.ndarray, side: int) -> int:
    """Bytes a cache of images of these sizes takes at `side`: their stored rows, each as wide
    as the widest stored image."""
    h, w = fit_size(heights, widths, side)
    return int(h.sum()) * int(w.max()) * 3 if len(h) else 0


def host_bytes_available() -> int:
    """Memory this process may still use: the kernel's MemAvailable, or less where a cgroup
    (a container, a Slurm job) limits it."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def host_budget() -> int:
    """Bytes a host cache of this process may take: a share of what is available, split
    between the ranks of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(HOST_SHARE * host_bytes_available()) // Ranks.from_env().local_world


def training_step_bytes(model: torch.nn.Module, step) -> int:
    """Peak GPU memory `step(model_copy)` adds (a forward and backward pass: activations,
    gradients; the optimiser's state is the caller's to add, `optimizers.OPTIMIZERS`), run on
    a copy of the model, so the run's weights, buffers and random state are untouched."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device]):
        twin = copy.deepcopy(model)
        step(twin)
        del twin
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return peak


def decide(mode: str, need: int, device: torch.device,
           step_bytes: int | None = None) -> tuple[str, str]:
    """Where a cache of `need` bytes goes, and why: `mode` as asked, within what fits (see the
    module docstring)."""
    if mode == "off":
        return "off", "--pixel-cache off: every epoch decodes the JPEGs"
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    notes = []
    if device.type == "cuda" and mode in ("auto", "gpu"):
        free, _total = torch.cuda.mem_get_info(device)
        keep = int(1.25 * (step_bytes or 0)) + GPU_MARGIN
        if need <= free - keep:
            return "gpu", (f"fits on the GPU beside training ({gib(free)} free, {gib(keep)} "
                           "kept for the training step)")
        notes.append(f"not on the GPU ({gib(free)} free, {gib(keep)} kept for training)")
    budget = host_budget()
    if need <= budget:
        where = "host memory" + (" (pinned)" if device.type == "cuda" else "")
        return "host", "; ".join(notes + [f"fits in {where} ({gib(budget)} of "
                                          f"{gib(host_bytes_available())} available may be "
                                          "used)"])
    notes.append(f"not in host memory ({gib(budget)} may be used)")
    return "off", ("; ".join(notes) + ": streaming, every epoch decodes the JPEGs; a smaller "
                   "--pixel-cache-side makes the cache smaller")


class PixelCache:
    """A rank's part of a subset, decoded and shrunk to fit side x side: image `slot` is rows
    start[slot]..+height of `pixels` (rows, width, 3), columns 0..width[slot], once
    `filled[slot]`."""

    def __init__(self, subset: Subset, positions: np.ndarray, side: int, pixels: torch.Tensor,
                 device: torch.device, threads: int):
        self.side, self.pixels, self.device, self.threads = side, pixels, device, threads
        table = subset.index.samples[subset.rows[positions]]
        self.orig_h, self.orig_w = (np.asarray(table[k], np.int64) for k in ("height", "width"))
        self.height, self.width = fit_size(self.orig_h, self.orig_w, side)
        self.start = np.cumsum(self.height) - self.height
        self.positions = positions  # slot -> subset position
        self.slot = np.full(len(subset), -1, np.int64)  # subset position -> slot
        self.slot[positions] = np.arange(len(positions))
        self.labels = torch.as_tensor(subset.labels[positions], device=device)
        self.filled = np.zeros(len(positions), bool)
        self.fill_s: float | None = None  # from the first decode to the last image stored
        self._fill_start: float | None = None

    @property
    def full(self) -> bool:
        return bool(self.filled.all())

    def windows(self, slots: np.ndarray, anchor: np.ndarray,
                shape: np.ndarray) -> tuple[np.ndarray, ...]:
        """Crop windows drawn in the images' own pixels -> (y, x, h, w) in stored pixels: the
        same windows where an image is stored whole."""
        out = []
        for axis, stored, orig in ((0, self.height, self.orig_h), (1, self.width, self.orig_w)):
            scale = stored[slots] / orig[slots]
            lo = np.round(anchor[:, axis] * scale).astype(np.int64)
            hi = np.round((anchor[:, axis] + shape[:, axis]) * scale).astype(np.int64)
            size = np.maximum(1, hi - lo)
            out += [np.minimum(lo, stored[slots] - size), size]
        return out[0], out[2], out[1], out[3]

    def fill_plan(self, first_batches: list[np.ndarray]) -> tuple[list[bool], list[np.ndarray]]:
        """What to decode while the loader's first epoch runs, given that epoch's batches (from
        where it starts): for each batch whether it brings images not yet in the cache, and the
        batches to decode: each such batch's new images, then, to be stored at the epoch's end,
        every image that epoch leaves out, in stored order."""
        planned = self.filled.copy()
        new_in, batches = [], []
        for positions in first_batches:
            new = positions[~planned[self.slot[positions]]]
            planned[self.slot[new]] = True
            new_in.append(len(new) > 0)
            if len(new):
                batches.append(new)
        rest = self.positions[~planned]
        size = max((len(b) for b in first_batches), default=256)
        return new_in, batches + [rest[i:i + size] for i in range(0, len(rest), size)]

    def batches(self, feed: Feed) -> Iterator[Batch]:
        """The loader's training batches (a `loader.PixelSource`): each planned batch's crops,
        made by the feed's train transform, with the batch's labels, on the device. Until the
        cache is full, the feed's decoder decodes whole what the first epoch brings that the
        cache lacks."""
        assert isinstance(feed.transform, TrainTransform), "a pixel cache serves training"
        cpu_work = self.device.type == "cpu" or self.pixels.device.type == "cpu"
        pool = single_threaded_pool(self.threads) if cpu_work and self.threads > 1 else None
        plans, decoded, new_in = feed.plans, None, []
        if not self.full:
            first, plans = _first_epoch(plans)
            new_in, batches = self.fill_plan(first)
            decoded = feed.jpegs.whole(batches, feed.stream, feed.tick)
            self._fill_start = self._fill_start or time.perf_counter()
        try:
            for i, (epoch, step, positions) in enumerate(plans):
                if decoded is not None:
                    if i < len(new_in) and new_in[i]:
                        self._store(next(decoded), pool, feed.stream)
                    elif i == len(new_in):  # the epoch is over: what it left out
                        for item in decoded:
                            self._store(item, pool, feed.stream)
                        decoded = None
                    feed.tick("decode + store")
                slots = self.slot[positions]
                if (slots < 0).any():
                    raise RuntimeError("a batch asks for an image of another rank's part")
                anchor, shape, flips = feed.transform.draw(epoch, step, positions,
                                                           self.orig_h[slots], self.orig_w[slots])
                with on_stream(feed.stream):
                    images = self._crops(slots, *self.windows(slots, anchor, shape), flips,
                                         feed.transform, pool)
                    labels = self.labels[index_tensor(slots, self.device)]
                feed.tick("crop + resize")
                yield images, labels, 0
        finally:
            if decoded is not None:
                decoded.close()
            if pool is not None:
                pool.shutdown()

    def _store(self, item: tuple[np.ndarray, list[torch.Tensor]], pool, stream) -> None:
        """Decoded whole images (lent by the decoder) into their rows, shrunk where larger than
        the stored side; on the CPU on the pool's threads, which share the first touch of the
        cache's pages too."""
        positions, images = item
        slots = self.slot[positions]

        def store(slot: int, image: torch.Tensor) -> None:
            if image.shape[:2] != (self.orig_h[slot], self.orig_w[slot]):
                raise RuntimeError(f"an image decoded to {tuple(image.shape[:2])}, not the size "
                                   "the index records: run dptrain verify")
            h, w = int(self.height[slot]), int(self.width[slot])
            if (h, w) != image.shape[:2]:
                image = fit(image, self.side)
            self.pixels[self.start[slot]:self.start[slot] + h, :w].copy_(
                image, non_blocking=self.pixels.is_pinned())

        work = list(zip(slots.tolist(), images))
        if pool is not None and images[0].device.type == "cpu":
            list(pool.map(lambda a: store(*a), work))
        else:  # GPU images: on the feeder's stream, which DALI's work is ordered before
            with on_stream(stream):
                for a in work:
                    store(*a)
        if stream is not None and self.pixels.device.type == "cpu":
            stream.synchronize()  # copies to host memory, read by the host for the next crops
        self.filled[slots] = True
        if self.full:
            self.fill_s = time.perf_counter() - self._fill_start

    def _crops(self, slots, y, x, h, w, flips, transform: TrainTransform, pool) -> torch.Tensor:
        """The batch's windows (in stored pixels) cut out and finished by the transform."""
        rows = self.start[slots] + y
        if self.device.type == "cpu":  # per image, torch's uint8 kernel (the streamed path's)
            views = [self.pixels[r:r + a, c:c + b] for r, c, a, b in
                     zip(rows.tolist(), x.tolist(), h.tolist(), w.tolist())]
            return transform.finish(views, flips, pool, self.threads)
        # On a GPU: the batch's crops, padded to the largest, then one batched resample.
        hmax, wmax = int(h.max()), int(w.max())
        on = lambda a: index_tensor(a, self.device)  # noqa: E731
        if self.pixels.device.type == "cuda":
            r = on(rows)[:, None] + torch.minimum(
                torch.arange(hmax, device=self.device)[None], on(h - 1)[:, None])
            c = on(x)[:, None] + torch.minimum(
                torch.arange(wmax, device=self.device)[None], on(w - 1)[:, None])
            crops = self.pixels[r[:, :, None], c[:, None, :]]
        else:  # from pinned host memory: copied row block by row block, then sent at once
            staged = torch.empty((len(slots), hmax, wmax, 3), dtype=torch.uint8, pin_memory=True)

            def copy_part(p):
                for i in p:
                    staged[i, :h[i], :w[i]] = self.pixels[rows[i]:rows[i] + h[i], x[i]:x[i] + w[i]]

            list((pool.map if pool else map)(copy_part, np.array_split(np.arange(len(slots)),
                                                                       self.threads)))
            crops = staged.to(self.device, non_blocking=True)
        return transform.finish_padded(crops, on(h), on(w), on(flips))


def _first_epoch(plans: Iterator[Plan]) -> tuple[list[np.ndarray], Iterator[Plan]]:
    """The batches of the plans' first epoch (from where they start), and the plans again,
    whole: what a cache's fill is planned from."""
    seen = []
    for plan in plans:
        if seen and plan[0] != seen[0][0]:
            return [p[2] for p in seen], itertools.chain(seen, [plan], plans)
        seen.append(plan)
    return [p[2] for p in seen], iter(seen)


def prepare(subset: Subset, *, mode: str, side: int, seed: int, rank: int, world: int,
            device: torch.device, threads: int | None,
            step_bytes=None) -> tuple[PixelCache | None, CacheRecord]:
    """This rank's cache, empty (the loader fills it as the first epoch trains), or None
    (streaming), and what to record about it. `step_bytes()`: the training step's peak GPU
    memory, measured only when asked."""
    positions = rank_part(len(subset), seed=seed, rank=rank, world_size=world)
    table = subset.index.samples[subset.rows[positions]]
    need = cache_bytes(table["height"], table["width"], side)
    measured = step_bytes() if step_bytes and device.type == "cuda" and mode in ("auto", "gpu") \
        else None
    where, why = decide(mode, need, device, step_bytes=measured)
    shrunk = int((np.maximum(table["height"], table["width"]) > side).sum())
    record = CacheRecord(where=where, why=why, gb=need / 1e9, side=side, images=len(positions),
                         shrunk=shrunk)
    if where == "off":
        return None, record
    heights, widths = fit_size(table["height"], table["width"], side)
    gpu = device.type == "cuda"
    pixels = torch.empty((int(heights.sum()), int(widths.max()), 3), dtype=torch.uint8,
                         device=device if where == "gpu" else "cpu",
                         pin_memory=gpu and where == "host")
    threads = threads or cores_for_this_process()
    return PixelCache(subset, positions, side, pixels, device, threads), record
