"""Batches of a subset for training or evaluation: uint8 NHWC images and labels on the device,
made by a feeder thread from one pixel source.

A pixel source (`PixelSource`) makes the batches: the subset's JPEGs decoded as they stream
(`decode.Decoder`, the default), a training pixel cache (`pixelcache.PixelCache`) or an eval
cache (`evalcache.EvalCache`). The feeder thread runs it on a CUDA stream of its own and
queues each finished batch. The training thread's share of a batch is one queue hand-off and,
on a GPU, one stream wait (an event recorded by the feeder): it never blocks on the decoder's
GPU work, which the DALI iterators did (a host sync per batch). The feeder also plans across
epoch ends: epoch e+1's first batches are made while epoch e's last ones train, so an epoch end
does not drain the pipeline. Conversion to float and normalisation belong to the training step,
on its device.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np
import torch

from ..common.environment import cores_for_this_process
from ..common.errors import DataError
from ..data.subset import Subset, epoch_order, steps_per_epoch
from .decode import Batch, Decoder, Plan, default_hw_decoder_load
from .transforms import EVAL_RESIZE, EvalTransform, TrainTransform

__all__ = ["EVAL_RESIZE", "Feed", "Loader", "PixelSource", "epoch_batches"]


@dataclass(frozen=True)
class Feed:
    """What a pixel source is handed, in the feeder's thread, to make a loader's batches."""

    subset: Subset
    plans: Iterator[Plan]  # every batch from where the loader starts, epoch after epoch
    transform: TrainTransform | EvalTransform
    jpegs: Decoder  # the subset's JPEGs, decoded on demand
    device: torch.device
    stream: torch.cuda.Stream | None  # the feeder's (None on the CPU): batches are made on it
    tick: Callable[[str], None]  # books the time since the last tick to a stage


class PixelSource(Protocol):
    """Where a Loader's batches come from: one (images, labels, JPEG bytes read) per planned
    batch, made on the feed's stream. Closing the iterator (in the same thread) releases what
    it holds."""

    def batches(self, feed: Feed) -> Iterator[Batch]: ...


class Streamed:
    """The default source: every batch decoded from the JPEGs, with the loader's transform."""

    def batches(self, feed: Feed) -> Iterator[Batch]:
        return feed.jpegs.batches(feed.plans, feed.stream, feed.tick)


class _Feeder:
    """A thread that runs one pixel source and queues what it makes, each item with an event
    recorded on the thread's stream once its GPU work is queued (None on the CPU), or the error
    that stopped it."""

    def __init__(self, source: PixelSource, feed: Callable[..., Feed], prefetch: int,
                 device: torch.device):
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # Seconds in each stage, summed over the batches queued: where a slow loader's time goes.
        self.seconds: dict[str, float] = {}
        self.queued = 0
        self._clock = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="dptrain-loader", daemon=True,
                                       args=(source, feed, device))
        self.thread.start()

    def tick(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._clock
        self._clock = now

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, source: PixelSource, feed: Callable[..., Feed], device: torch.device) -> None:
        # One image is too little work to split over threads, and torch's idle OpenMP workers
        # spin on the cores DALI's threads decode on (645 against 1,020 img/s on 2 cores,
        # measured). The setting is this thread's own.
        torch.set_num_threads(1)
        stream = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
        items = None
        try:
            self._clock = time.perf_counter()
            items = source.batches(feed(stream=stream, tick=self.tick))
            for item in items:
                ready = None
                if stream is not None:  # the training stream waits for it; the host never does
                    ready = torch.cuda.Event()
                    ready.record(stream)
                if not self._put((*item, ready)):
                    break
                self.queued += 1
                self.tick("queue full")
            else:
                raise DataError("the loader ran out of planned batches")  # plans never end
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)
        finally:
            if items is not None:
                items.close()  # the source's clean-up (DALI's threads, a cache writer) runs here

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _plans(first_epoch: int, first_step: int, epoch_batches) -> Iterator[Plan]:
    """(epoch, step, positions) of every batch from (epoch, step) on, epoch after epoch: the
    feeder reads ahead."""
    epoch, step = first_epoch, first_step
    while True:
        batches = epoch_batches(epoch)
        for s in range(step, len(batches)):
            yield epoch, s, batches[s]
        epoch, step = epoch + 1, 0


def _shutdown(jpegs: Decoder, running: list[_Feeder], close_tars: bool) -> None:
    while running:
        running.pop().close()
    if close_tars:
        jpegs.close()


def epoch_batches(num_samples: int, epoch: int, *, batch_size: int, train: bool, seed: int,
                  rank: int, world_size: int, drop_last: bool,
                  keys: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's batches (positions in the subset) for one rank (`keys`: epoch_order's)."""
    if train:
        order = epoch_order(num_samples, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                            keys=keys)
    else:  # evaluation reads in stored order, each rank a contiguous part
        per_rank = num_samples // world_size
        order = np.arange(rank * per_rank, (rank + 1) * per_rank)
    steps = steps_per_epoch(num_samples, batch_size, world_size, drop_last)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


class Loader:
    """(images, labels) batches of a subset: uint8 NHWC images and int64 labels on `device`.

    `train=True`: random-resized-crop + flip at `res`, reshuffled each epoch (`set_epoch`);
    `train=False`: resize the shorter side to `res * eval_resize`, center-crop `res`. With
    `world_size` > 1 each rank reads its own equal, disjoint part of every epoch. `len()` is
    batches per epoch, the same on every rank. `decode`: "auto" (the GPU's decoders on a GPU),
    "gpu", or "cpu" (DALI's CPU threads; on a GPU the rest still runs there);
    `hw_decoder_load`: the share of JPEGs the GPU's hardware decoder takes (default:
    `default_hw_decoder_load`). `threads`: DALI's (default: this process's share of the
    cores). `source`: where the pixels come from (default: the JPEGs, decoded as they stream;
    a `pixelcache.PixelCache` holding this rank's part for training, an `evalcache.EvalCache`
    for evaluation). Call `close()` when done.
    """

    def __init__(self, subset: Subset, *, batch_size: int, train: bool, res: int = 224,
                 eval_resize: float = EVAL_RESIZE, device: str = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None,
                 threads: int | None = None, prefetch: int = 2, decode: str = "auto",
                 hw_decoder_load: float | None = None, source: PixelSource | None = None,
                 order: str = "shuffled"):
        if len(subset) == 0:
            raise DataError("the subset is empty")
        # Options are checked where they are parsed (config.check_config); these are bugs.
        assert eval_resize >= 1, "the centre crop must fit"
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is None:  # the feeder thread sets this device as its own
            self.device = torch.device("cuda", torch.cuda.current_device())
        assert decode in ("auto", "cpu") or (decode == "gpu" and gpu), decode
        assert prefetch >= 1 and (hw_decoder_load is None or 0 <= hw_decoder_load <= 1)
        if hw_decoder_load is None:
            hw_decoder_load = default_hw_decoder_load(self.device) if gpu else 0.0
        self.subset, self.batch_size, self.train, self.res = subset, batch_size, train, res
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        if len(self) == 0:
            raise DataError(f"{len(subset)} samples over {world_size} rank(s) make no full batch "
                            f"of {batch_size}: use a smaller batch size")
        # The epoch order is shared by all ranks; augmentation is not. Keyed (--order keyed):
        # the order and each image's crop follow its row in the shard set, not its position.
        assert order in ("shuffled", "keyed"), order
        keys = subset.rows if order == "keyed" else None
        self.transform = TrainTransform(seed * 1009 + rank, res, keys) if train else \
            EvalTransform(res, eval_resize)
        self.threads, self.prefetch = threads or cores_for_this_process(), prefetch
        self._jpegs = Decoder(subset, self.transform, gpu=gpu,
                              decode=("gpu" if gpu else "cpu") if decode == "auto" else decode,
                              hw_decoder_load=hw_decoder_load, batch_size=batch_size,
                              threads=self.threads, prefetch=prefetch)
        self.source = source or Streamed()
        # One epoch's batches (positions in the subset): plain values, no reference to the
        # loader, so the feeder can plan from it.
        self.plan = partial(epoch_batches, len(subset), batch_size=batch_size, train=train,
                            seed=seed, rank=rank, world_size=world_size,
                            drop_last=self.drop_last, keys=keys)
        self.epoch, self.start_step = 0, 0
        self.bytes_read = 0  # JPEG bytes of the batches handed out (benchmarks and tests)
        self._running: list[_Feeder] = []  # the feeder, once started
        self._next = (0, 0)  # the (epoch, step) it hands out next
        # The feeder's thread holds no reference to the loader: a loader dropped without
        # close() is collected, and this stops its thread.
        self._finalizer = weakref.finalize(self, _shutdown, self._jpegs, self._running, True)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.subset), self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields this epoch's batches from `start_step` on (to resume)."""
        self.epoch, self.start_step = epoch, start_step

    def _feeder(self) -> _Feeder:
        """The running feeder if it is where this iteration starts, else a new one there."""
        if self._running and self._next == (self.epoch, self.start_step):
            return self._running[0]
        _shutdown(self._jpegs, self._running, False)
        # Values, not the loader: the feeder's thread must hold no reference to it.
        feed = partial(Feed, self.subset, _plans(self.epoch, self.start_step, self.plan),
                       self.transform, self._jpegs, self.device)
        self._running.append(_Feeder(self.source, feed, self.prefetch, self.device))
        self._next = (self.epoch, self.start_step)
        return self._running[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        feeder = self._feeder()
        for step in range(self.start_step, len(self)):
            item = feeder.queue.get()
            if isinstance(item, BaseException):
                _shutdown(self._jpegs, self._running, False)
                raise item
            images, labels, nbytes, ready = item
            if ready is not None:  # a wait on the GPU, not on the host
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                images.record_stream(stream)  # the allocator reuses them only after this
                labels.record_stream(stream)
            self.bytes_read += nbytes
            self._next = (self.epoch, step + 1) if step + 1 < len(self) else (self.epoch + 1, 0)
            yield images, labels
        self.epoch, self.start_step = self.epoch + 1, 0

    def stage_ms(self) -> dict[str, float]:
        """The feeder's milliseconds per batch in each stage: where a slow loader's time goes
        ("queue full": waiting for the consumer, time the loader had to spare)."""
        if not self._running:
            return {}
        f = self._running[0]
        return {k: 1e3 * v / max(1, f.queued) for k, v in f.seconds.items()}

    def close(self) -> None:
        """Stop the feeder thread and close the tars."""
        self._finalizer()
