"""Stream a subset through DALI: JPEG bytes by positioned reads, decoded to uint8 batches.

One pipeline definition serves both devices: without a GPU it runs CPU-only
(`device_id=None`, CPU decode); with one, decoding is "mixed" (nvJPEG and the hardware JPEG
decoder) and the crop/resize/flip run on the GPU. Our own sampler drives the reads through
`fn.external_source` (a sequential tar reader's shuffle buffer gives near-single-class batches
on class-sorted shards). Batches stay uint8, NHWC (channels-last); conversion to float and
normalisation belong to the training step, on its device.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import numpy as np
import torch

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
                                "is not a JPEG: the index does not match the tar; run dptrain verify")
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
            # Resize with the flip folded in: a region whose start lies past its end is
            # mirrored, which saves the separate flip pass.
            flip = fn.random.coin_flip()
            images = fn.resize(images, size=[res, res], roi_relative=True,
                               roi_start=fn.stack(0.0, flip * 1.0), roi_end=fn.stack(1.0, 1.0 - flip))
        else:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(res * eval_resize))
            images = fn.crop(images, crop=(res, res))
        return images, labels.gpu() if gpu else labels

    return pipe()


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
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._reader.batches = self._plan()
        if self._iterator is None:
            pipe = _pipeline(self._reader, train=self.train, res=self.res,
                             eval_resize=self.eval_resize, gpu=self.device.type == "cuda",
                             batch_size=self.batch_size, threads=self.threads,
                             # the epoch order is shared by all ranks; augmentation is not
                             seed=self.seed * 1009 + self.rank, prefetch=self.prefetch)
            self._iterator = DALIGenericIterator([pipe], ["images", "labels"], size=-1,
                                                 auto_reset=False, prepare_first_batch=False)
        else:
            self._iterator.reset()
        for out in self._iterator:
            yield out[0]["images"], out[0]["labels"].view(-1)
        self.epoch, self.start_step = self.epoch + 1, 0

    def close(self) -> None:
        self._reader.close()
