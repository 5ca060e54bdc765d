"""Stream a subset through DALI: JPEG bytes by positioned reads, decoded to uint8 batches.

One pipeline definition serves both devices: without a GPU it runs CPU-only
(`device_id=None`, CPU decode); with one, decoding is "mixed" (nvJPEG and the hardware JPEG
decoder) and the resize and flip run on the GPU. Our own sampler drives the reads through
`fn.external_source` (a sequential tar reader's shuffle buffer gives near-single-class batches
on class-sorted shards). Batches stay uint8, NHWC (channels-last); conversion to float and
normalisation belong to the training step, on its device.

Without a GPU the resize leaves the pipeline: DALI's CPU resize (antialiased, linear) measured
1.37 ms per 224 px image on one core, more than decoding the crop (1.26 ms), while torch's
uint8 antialiased bilinear kernel (the one torchvision's Resize uses) takes 0.26 ms. So on the
CPU the pipeline stops at the decoded crops and `_resize` finishes each batch with torch.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .subset import Subset, epoch_order, steps_per_epoch

EVAL_RESIZE = 256 / 224  # default eval: shorter side to res * 256/224, then center-crop res


def _allow_open_files(n: int) -> None:
    """Raise the soft limit on open files (often 1,024) when a subset spans more tars."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + 256 > soft:
        want = n + 1024 if hard == resource.RLIM_INFINITY else min(hard, n + 1024)
        if n + 256 > want:
            raise DataError(f"the subset spans {n} tars but only {hard} files may be open: "
                            "re-shard with a larger --shard-size")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class _Reader:
    """DALI's batch source: reads the planned batches' JPEG bytes with one pread each."""

    def __init__(self, subset: Subset):
        self.subset = subset
        table = subset.index.samples[subset.rows]
        # Only the subset's tars are opened (ImageNet has 1,000+), numbered compactly.
        used, self.tar = np.unique(np.asarray(table["tar"]), return_inverse=True)
        all_paths = subset.index.tar_paths
        self.paths = [all_paths[t] for t in used]
        _allow_open_files(len(self.paths))
        self.fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        self.offset = np.asarray(table["offset"])
        self.size = np.asarray(table["size"])
        self.batches: list[np.ndarray] = []
        self.bytes_read = 0

    def __call__(self, info) -> tuple[list[np.ndarray], np.ndarray]:
        if info.iteration >= len(self.batches):
            raise StopIteration
        positions = self.batches[info.iteration]
        jpegs = []
        for p in positions:
            size = int(self.size[p])
            data = os.pread(self.fds[self.tar[p]], size, int(self.offset[p]))
            if len(data) != size:
                raise DataError(f"{self.paths[self.tar[p]]}: sample at offset {self.offset[p]} "
                                f"is cut short ({len(data)} of {size} bytes): run dptrain verify")
            if data[:2] != b"\xff\xd8":  # a wrong offset: the decoder's error would name no file
                raise DataError(f"{self.paths[self.tar[p]]}: sample at offset {self.offset[p]} "
                                "is not a JPEG: the index does not match the tar; "
                                "run dptrain verify")
            jpegs.append(np.frombuffer(data, dtype=np.uint8))
            self.bytes_read += size
        return jpegs, self.subset.labels[positions]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _pipeline(reader: _Reader, *, train: bool, res: int, eval_resize: float, gpu: bool,
              batch_size: int, threads: int, seed: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, seed=seed,
                  device_id=torch.cuda.current_device() if gpu else None,
                  prefetch_queue_depth=prefetch)
    def pipe():
        jpegs, labels = fn.external_source(source=reader, num_outputs=2, batch=True,
                                           batch_info=True, dtype=[types.UINT8, types.INT64])
        decode = "mixed" if gpu else "cpu"
        if train:
            # Fused decode + random-resized-crop: only the crop window is decoded.
            images = fn.decoders.image_random_crop(
                jpegs, device=decode, output_type=types.RGB,
                random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
            flip = fn.random.coin_flip()
            if not gpu:  # `_resize` resizes and flips the crops (see the module docstring)
                return images, labels, flip
            # Resize with the flip folded in: a region whose start lies past its end is
            # mirrored, which saves the separate flip pass.
            images = fn.resize(images, size=[res, res], roi_relative=True,
                               roi_start=fn.stack(0.0, flip * 1.0),
                               roi_end=fn.stack(1.0, 1.0 - flip))
        else:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            if not gpu:
                return images, labels
            images = fn.resize(images, resize_shorter=round(res * eval_resize))
            images = fn.crop(images, crop=(res, res))
        return images, labels.gpu()

    return pipe()


def _resize(images: list[torch.Tensor], res: int, flips: torch.Tensor | None = None,
            shorter: int | None = None) -> torch.Tensor:
    """Finish a CPU batch: HWC uint8 images -> one (B, res, res, 3) uint8 batch.

    Train (`flips` given): each crop resized to res x res and mirrored where flagged. Eval
    (`shorter` given): the shorter side resized to `shorter`, then the centre res x res, with
    the rounding of DALI's GPU path (origin rounded half up).
    """
    out = torch.empty((len(images), res, res, 3), dtype=torch.uint8)
    # One image is too little work to split over threads, and torch's idle OpenMP workers spin
    # on the cores DALI's threads decode on (645 against 1,020 img/s on 2 cores, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            if shorter is None:
                size = (res, res)
            elif h <= w:
                size = (shorter, round(w * shorter / h))
            else:
                size = (round(h * shorter / w), shorter)
            x = im.permute(2, 0, 1).unsqueeze(0)  # NCHW view of HWC memory: channels-last kernel
            y = F.interpolate(x, size=size, mode="bilinear", antialias=True)[0].permute(1, 2, 0)
            if shorter is not None:
                top, left = int((size[0] - res) / 2 + 0.5), int((size[1] - res) / 2 + 0.5)
                y = y[top : top + res, left : left + res]
            out[i] = y.flip(1) if flips is not None and flips[i] else y
    finally:
        torch.set_num_threads(threads)
    return out


class Loader:
    """(images, labels) batches of a subset: uint8 NHWC images and int64 labels on `device`.

    `train=True`: random-resized-crop + flip at `res`, reshuffled each epoch (`set_epoch`);
    `train=False`: resize the shorter side to `res * eval_resize`, center-crop `res`. With
    `world_size` > 1 each rank reads its own equal, disjoint part of every epoch. `len()` is
    batches per epoch, the same on every rank.
    """

    def __init__(self, subset: Subset, *, batch_size: int, train: bool, res: int = 224,
                 eval_resize: float = EVAL_RESIZE, device: str = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None,
                 threads: int | None = None, prefetch: int = 2):
        if len(subset) == 0:
            raise DataError("the subset is empty")
        if eval_resize < 1:
            raise ValueError(f"eval_resize must be >= 1 (the centre crop must fit), "
                             f"not {eval_resize}")
        self.subset, self.batch_size, self.train, self.res = subset, batch_size, train, res
        self.eval_resize = eval_resize
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.threads = threads or os.cpu_count() or 1
        self.prefetch = prefetch
        self.epoch, self.start_step = 0, 0
        self._reader = _Reader(subset)
        self._iterator = None
        if len(self) == 0:
            raise DataError(f"{len(subset)} samples over {world_size} rank(s) make no full batch "
                            f"of {batch_size}: use a smaller batch size")

    def __len__(self) -> int:
        return steps_per_epoch(len(self.subset), self.batch_size, self.world_size, self.drop_last)

    @property
    def bytes_read(self) -> int:
        """JPEG bytes read from the tars so far (benchmarks and tests check it)."""
        return self._reader.bytes_read

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields this epoch's batches from `start_step` on (to resume)."""
        self.epoch, self.start_step = epoch, start_step

    def _plan(self) -> list[np.ndarray]:
        if self.train:
            order = epoch_order(len(self.subset), seed=self.seed, epoch=self.epoch,
                                rank=self.rank, world_size=self.world_size)
        else:  # evaluation reads in stored order, each rank a contiguous part
            per_rank = len(self.subset) // self.world_size
            order = np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
        bs = self.batch_size
        return [order[i * bs : (i + 1) * bs] for i in range(self.start_step, len(self))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIRaggedIterator as Ragged

        gpu = self.device.type == "cuda"
        self._reader.batches = self._plan()
        if self._iterator is None:
            pipe = _pipeline(self._reader, train=self.train, res=self.res,
                             eval_resize=self.eval_resize, gpu=gpu,
                             batch_size=self.batch_size, threads=self.threads,
                             # the epoch order is shared by all ranks; augmentation is not
                             seed=self.seed * 1009 + self.rank, prefetch=self.prefetch)
            outputs = ["images", "labels"] + (["flips"] if self.train and not gpu else [])
            types = [Ragged.DENSE_TAG if gpu else Ragged.SPARSE_LIST_TAG] + [Ragged.DENSE_TAG] * 2
            self._iterator = Ragged([pipe], outputs, output_types=types[: len(outputs)], size=-1,
                                    auto_reset=False, prepare_first_batch=False)
        else:
            self._iterator.reset()
        for out in self._iterator:
            images, labels = out[0]["images"], out[0]["labels"].view(-1)
            if not gpu and self.train:
                images = _resize(images, self.res, flips=out[0]["flips"].view(-1))
            elif not gpu:
                images = _resize(images, self.res, shorter=round(self.res * self.eval_resize))
            yield images, labels
        self.epoch, self.start_step = self.epoch + 1, 0

    def close(self) -> None:
        self._reader.close()
