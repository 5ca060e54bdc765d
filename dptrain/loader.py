"""Stream a subset through DALI: JPEGs straight from the memory-mapped tars, to uint8 batches.

One pipeline definition serves both devices: without a GPU it runs CPU-only
(`device_id=None`, CPU decode); with one, decoding is "mixed" (the hardware JPEG decoder and
nvJPEG) and the train transform's resize and flip run on the GPU. Our own sampler drives the
reads through `fn.external_source` (a sequential tar reader's shuffle buffer gives
near-single-class batches on class-sorted shards). Batches stay uint8, NHWC (channels-last);
conversion to float and normalisation belong to the training step, on its device.

A feeder thread makes the batches: it runs a producer (decoding with DALI here, or reading a
pixel cache: pixelcache, evalcache) on a CUDA stream of its own and queues each finished
batch. The training thread's share of a batch is one queue hand-off and, on a GPU, one stream
wait (an event recorded by the feeder): it never blocks on the decoder's GPU work, which the
DALI iterators did (a host sync per batch). The feeder also plans across epoch ends: epoch
e+1's first batches are made while epoch e's last ones train, so an epoch end does not drain
the pipeline.

Resizes that must match PIL (the eval transform on either device; every resize on the CPU)
are torch's antialiased bilinear kernel, PIL's filter (transforms.resize), applied by the
feeder. On the CPU, DALI's own resize (antialiased, linear) measured 1.37 ms per 224 px image
on one core, more than decoding the crop (1.26 ms), against torch's 0.26 ms.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import queue
import resource
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from .environment import cores_for_this_process
from .errors import DataError
from .subset import Subset, epoch_order, steps_per_epoch
from .transforms import batch_augmentation, resize

EVAL_RESIZE = 256 / 224  # default eval: shorter side to res * 256/224, then center-crop res


def default_hw_decoder_load(device: torch.device) -> float:
    """Share of JPEGs the mixed decoder sends to the GPU's hardware JPEG decoder (the rest go
    to nvJPEG on the SMs, Huffman-decoded on the CPU). H100 and H200 have 7 hardware JPEG
    engines: on an H200 training ResNet-18, 1.0 ran 7% faster than DALI's default 0.65 (29%
    on the legacy default stream); on an H100 the two were within the noise
    (benchmarks/README.md). Other GPUs keep DALI's 0.65 (an A100 has one engine; unmeasured)."""
    return 1.0 if torch.cuda.get_device_capability(device)[0] == 9 else 0.65


def _allow_open_files(n: int) -> None:
    """Raise the soft limit on open files (often 1,024) when a subset spans more tars (each
    mapping holds a descriptor of its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n + 256 > soft:
        want = n + 1024 if hard == resource.RLIM_INFINITY else min(hard, n + 1024)
        if n + 256 > want:
            raise DataError(f"the subset spans {n} tars but only {hard} files may be open: "
                            "re-shard with a larger --shard-size")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class _Reader:
    """DALI's batch source: the next planned batch's JPEGs, as views of the memory-mapped tars.

    Nothing is copied and nothing waits on I/O here: DALI's own threads touch the pages (a
    page fault reads them from disk or maps them from the page cache), so the Python thread
    that feeds DALI never blocks. (The reader this one replaced made 256 preads of ~110 KB per
    batch; with DALI's copy of them that took 16 ms per batch in the feeding thread while
    ResNet-18 trained, H200, 16 cores: each read gave up the GIL and had to win it back from
    the training thread.) The maps are random-access (the
    kernel's readahead read 5x the bytes touched) and each sample's pages are requested ahead
    (MADV_WILLNEED: one read per sample, started at once), so only the subset's pages are read.
    """

    def __init__(self, subset: Subset):
        self.subset = subset
        table = subset.index.samples[subset.rows]
        # Only the subset's tars are mapped (ImageNet has 1,000+), numbered compactly.
        used, self.tar = np.unique(np.asarray(table["tar"]), return_inverse=True)
        all_paths = subset.index.tar_paths
        self.paths = [all_paths[t] for t in used]
        _allow_open_files(len(self.paths))
        self.maps: list[mmap.mmap | None] = []
        self.bytes, self.tar_size = [], np.zeros(len(used), np.int64)
        for i, path in enumerate(self.paths):
            with open(path, "rb") as f:
                self.tar_size[i] = os.fstat(f.fileno()).st_size
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    if self.tar_size[i] else None
            if m is not None:
                m.madvise(mmap.MADV_RANDOM)
            self.maps.append(m)
            self.bytes.append(np.frombuffer(m, dtype=np.uint8) if m else np.zeros(0, np.uint8))
        self.offset = np.asarray(table["offset"])
        self.size = np.asarray(table["size"])
        self.height, self.width = np.asarray(table["height"]), np.asarray(table["width"])
        self.augment_seed: int | None = None  # set for training: crops are drawn here
        self.plans: Iterator[tuple[int, int, np.ndarray]] = iter(())
        self.pending: deque[np.ndarray] = deque()  # fed to DALI, output not yet taken

    def _name(self, p: int) -> str:
        """Where sample p lies: its tar, its offset and, read from the tar member's header
        just before it (where that is in the file), its key."""
        tar, offset = self.tar[p], int(self.offset[p])
        key = ""
        if 512 <= offset <= self.tar_size[tar]:
            name = bytes(self.bytes[tar][offset - 512:offset - 412]).split(b"\0")[0]
            key = name.decode(errors="replace").rsplit(".", 1)[0]
        return (f"{self.paths[tar]}: sample at offset {offset}"
                + (f" (key {key})" if key.isprintable() and key else ""))

    def __call__(self, info) -> tuple:
        epoch, step, positions = next(self.plans)
        tars, offsets, sizes = self.tar[positions], self.offset[positions], self.size[positions]
        cut = np.flatnonzero(offsets + sizes > self.tar_size[tars])
        if len(cut):  # checked here: a mapped page past the end of the file is a crash (SIGBUS)
            p = positions[cut[0]]
            have = max(0, int(self.tar_size[self.tar[p]] - self.offset[p]))
            raise DataError(f"{self._name(p)} is cut short ({have} of {self.size[p]} bytes): "
                            "run dptrain verify")
        jpegs = []
        for t, o, n in zip(tars.tolist(), offsets.tolist(), sizes.tolist()):
            start = o - o % mmap.PAGESIZE
            self.maps[t].madvise(mmap.MADV_WILLNEED, start, o + n - start)
            jpegs.append(self.bytes[t][o:o + n])
        self.pending.append(positions)
        labels = self.subset.labels[positions]
        if self.augment_seed is None:
            return jpegs, labels
        heights, widths = self.height[positions], self.width[positions]
        if not (heights.all() and widths.all()):
            raise DataError(f"{self._name(positions[np.argmin(heights * widths)])} has no image "
                            "size in the index: re-shard it with this version of dptrain")
        return (jpegs, labels,
                *batch_augmentation(self.augment_seed, epoch, step, heights, widths))

    def explain(self, error: Exception) -> Exception:
        """The decoder failed on a batch in flight: name the sample that is not a JPEG
        (damaged, or the index does not match the tar), or else the batch's tars, with the
        decoder's own first line."""
        tars = []
        for positions in self.pending:
            for p in positions.tolist():
                start = self.bytes[self.tar[p]][self.offset[p]:self.offset[p] + 2]
                if start.tobytes() != b"\xff\xd8":
                    return DataError(f"{self._name(p)} is not a JPEG (damaged, or the index "
                                     "does not match the tar): run dptrain verify")
                tars.append(str(self.paths[self.tar[p]]))
        if not tars:
            return error
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        names = sorted(set(tars))
        return DataError(f"the JPEG decoder failed on a batch from {', '.join(names[:3])}"
                         f"{' and others' if len(names) > 3 else ''} ({first[:200]}): run "
                         "dptrain verify")

    def close(self) -> None:
        self.bytes = []
        for m in filter(None, self.maps):
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere: it closes when collected
                pass
        self.maps = []


def _pipeline(reader: _Reader, *, train: bool, res: int, gpu: bool, decode: str,
              hw_decoder_load: float, batch_size: int, threads: int, prefetch: int):
    """The DALI graph. Train: decoded random-resized crops (windows and flips drawn by the
    reader); on a GPU resized to res x res and mirrored there too. Eval: whole decoded images
    (the feeder resizes them)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads,
                  device_id=torch.cuda.current_device() if gpu else None,
                  prefetch_queue_depth=prefetch)
    def pipe():
        # no_copy: DALI decodes straight from the mapped tars (they outlive the pipeline)
        kinds = [types.UINT8, types.INT64] + ([types.INT32] * 3 if train else [])
        jpegs, labels, *window = fn.external_source(source=reader, num_outputs=len(kinds),
                                                    batch=True, batch_info=True, dtype=kinds,
                                                    no_copy=True)
        on_gpu = gpu and decode == "gpu"
        # affine=False: the decoder's threads are not pinned to the first cores, which the
        # pipelines of two processes on one machine would otherwise share.
        decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load, affine=False) \
            if on_gpu else dict(device="cpu")
        # The stored pixel grid, whose size the index records: `dptrain shard` stores images
        # upright, and an older set's EXIF-rotated JPEG is decoded as PIL decodes it (unrotated)
        # instead of failing its crop windows (images.LoaderDecoder decodes the same way).
        decoder["adjust_orientation"] = False
        if train:
            # Fused decode + crop: only the window (drawn by the reader) is decoded.
            anchor, shape, flip = window
            images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW",
                                             normalized_anchor=False, normalized_shape=False,
                                             output_type=types.RGB, **decoder)
            if not gpu:  # the feeder resizes and flips the crops (see the module docstring)
                return images, labels, flip
            # Resize with the flip folded in: a region whose start lies past its end is
            # mirrored, which saves the separate flip pass.
            images = fn.resize(images.gpu(), size=[res, res], roi_relative=True,
                               roi_start=fn.stack(0.0, flip * 1.0),
                               roi_end=fn.stack(1.0, 1.0 - flip))
            return images, labels.gpu()
        # Eval: libjpeg-turbo's chroma upsampling on the GPU too, so both devices decode alike.
        if on_gpu:
            decoder["jpeg_fancy_upsampling"] = True
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        return (images.gpu(), labels.gpu()) if gpu else (images, labels)

    return pipe()


Produce = Callable[[Any, Callable[[str], None]], Iterator[tuple]]
"""A feeder's source of batches: called in the feeder's thread with its CUDA stream (None on
the CPU) and a `tick(stage)` that books the time since the last tick to a stage, it yields
(images, labels, JPEG bytes read) per batch, made on that stream. Closing it (in the same
thread) releases what it holds."""


def single_threaded_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for torch's CPU kernels, each running them on its own thread (torch's thread
    count is per thread: OpenMP teams within each would oversubscribe the cores DALI uses)."""
    return ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))


@contextlib.contextmanager
def on_stream(stream):
    """Work queued inside runs on `stream` (the feeder's), or as usual on the CPU."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        yield


class _Feeder:
    """A thread that runs one producer and queues what it finishes, each item with an event
    recorded on the thread's stream once its GPU work is queued (None on the CPU), or the error
    that stopped it."""

    def __init__(self, produce: Produce, prefetch: int, device: torch.device):
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # Seconds in each stage, summed over the batches queued: where a slow loader's time goes.
        self.seconds: dict[str, float] = {}
        self.queued = 0
        self._clock = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="dptrain-loader", daemon=True,
                                       args=(produce, device))
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

    def _run(self, produce: Produce, device: torch.device) -> None:
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
            items = produce(stream, self.tick)
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
                items.close()  # the producer's clean-up (DALI's threads, a cache writer) runs here

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _decoded(reader: _Reader, plans: Iterator[tuple[int, int, np.ndarray]], pipeline: dict,
             finish: Callable[[Any, np.ndarray], Any], tee: Callable | None = None) -> Produce:
    """The producer that decodes: DALI runs the pipeline over the planned batches (the reader
    hands it their JPEGs), `finish(outputs, positions)` makes the batch's images, and
    `tee(positions, images)`, if given, sees each batch (an eval cache being filled)."""
    def produce(stream, tick):
        reader.plans, reader.pending = plans, deque()
        pipe = _pipeline(reader, **pipeline)
        try:
            pipe.build()
            pipe.schedule_run()  # fills DALI's prefetch queue
            while True:
                # Bound to our stream, the outputs come back once their GPU work is queued.
                outs = pipe.share_outputs(cuda_stream=stream)
                tick("wait for DALI")
                positions = reader.pending.popleft()
                # Nothing here waits for the device: every copy and kernel is queued on our
                # stream, behind DALI's work, and tensors are copied out of DALI's buffers.
                with on_stream(stream):
                    labels = torch.from_dlpack(outs[1].as_tensor()).reshape(-1).clone()
                    images = finish(outs, positions)
                    if tee is not None:  # on our stream: after the work that made the images
                        tee(positions, images)
                del outs
                pipe.release_outputs()
                tick("finish")
                yield images, labels, int(reader.size[positions].sum())
                pipe.schedule_run()  # reads the next planned batch and feeds it to DALI
                tick("read + feed")
        except RuntimeError as e:
            raise reader.explain(e) from None
        finally:
            del pipe  # DALI's threads shut down here, in the feeder's thread
            if tee is not None and hasattr(tee, "close"):
                tee.close()

    return produce


def whole_images(reader: _Reader, batches: list[np.ndarray], pipeline: dict, stream,
                 tick) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """Each batch of positions decoded whole by DALI (the eval graph, on the pipeline's
    device, in the feeder's thread): (positions, images), the images views of DALI's buffers,
    lent until the next item is asked for. What fills a pixel cache as the first epoch
    trains. `reader` must draw no augmentation (its augment_seed None)."""
    if not batches:
        return
    # The plans never end (DALI reads ahead): after the last batch, the last batch again.
    padded = itertools.chain(((0, i, b) for i, b in enumerate(batches)),
                             itertools.repeat((0, len(batches), batches[-1])))
    reader.plans, reader.pending = padded, deque()
    pipe = _pipeline(reader, **{**pipeline, "train": False})
    try:
        pipe.build()
        pipe.schedule_run()
        for i in range(len(batches)):
            outs = pipe.share_outputs(cuda_stream=stream)
            tick("wait for DALI")
            positions = reader.pending.popleft()
            yield positions, [torch.from_dlpack(t) for t in outs[0]]
            del outs
            pipe.release_outputs()
            if i + 1 < len(batches):
                pipe.schedule_run()
    except RuntimeError as e:
        raise reader.explain(e) from None
    finally:
        del pipe


def _plans(first_epoch: int, first_step: int,
           epoch_batches) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, positions) of every batch from (epoch, step) on, epoch after epoch: the
    feeder reads ahead."""
    epoch, step = first_epoch, first_step
    while True:
        batches = epoch_batches(epoch)
        for s in range(step, len(batches)):
            yield epoch, s, batches[s]
        epoch, step = epoch + 1, 0


def _shutdown(reader: list, running: list[_Feeder], close_reader: bool) -> None:
    while running:
        running.pop().close()
    if close_reader and reader:
        reader.pop().close()


def epoch_batches(num_samples: int, epoch: int, *, batch_size: int, train: bool, seed: int,
                  rank: int, world_size: int, drop_last: bool) -> list[np.ndarray]:
    """One epoch's batches (positions in the subset) for one rank."""
    if train:
        order = epoch_order(num_samples, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
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
    cores). Call `close()` when done.

    Decoded pixels instead of JPEGs: `cache` (training; a `pixelcache.PixelCache` holding this
    rank's part) crops every batch from memory; `eval_cache` (evaluation; an
    `evalcache.EvalCache`) reads the eval-transformed images from disk when it holds them all,
    and otherwise decodes and fills it.
    """

    def __init__(self, subset: Subset, *, batch_size: int, train: bool, res: int = 224,
                 eval_resize: float = EVAL_RESIZE, device: str = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None,
                 threads: int | None = None, prefetch: int = 2, decode: str = "auto",
                 hw_decoder_load: float | None = None, cache: Any = None,
                 eval_cache: Any = None):
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
        assert (cache is None or train) and (eval_cache is None or not train), \
            "cache is for training, eval_cache for evaluation"
        if hw_decoder_load is None:
            hw_decoder_load = default_hw_decoder_load(self.device) if gpu else 0.0
        self.subset, self.batch_size, self.train, self.res = subset, batch_size, train, res
        self.eval_resize, self.cache, self.eval_cache = eval_resize, cache, eval_cache
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        if len(self) == 0:
            raise DataError(f"{len(subset)} samples over {world_size} rank(s) make no full batch "
                            f"of {batch_size}: use a smaller batch size")
        self.pipeline = dict(train=train, res=res, gpu=gpu,
                             decode=("gpu" if gpu else "cpu") if decode == "auto" else decode,
                             hw_decoder_load=hw_decoder_load, batch_size=batch_size,
                             threads=threads or cores_for_this_process(), prefetch=prefetch)
        # One epoch's batches (positions in the subset): plain values, no reference to the
        # loader, so the feeder can plan from it.
        self.plan = partial(epoch_batches, len(subset), batch_size=batch_size, train=train,
                            seed=seed, rank=rank, world_size=world_size,
                            drop_last=self.drop_last)
        self.epoch, self.start_step = 0, 0
        self.bytes_read = 0  # JPEG bytes of the batches handed out (benchmarks and tests)
        # The epoch order is shared by all ranks; augmentation is not.
        self.augment_seed = seed * 1009 + rank
        self._reader: list[_Reader] = []  # the tars' maps, once something is decoded
        self._running: list[_Feeder] = []  # the feeder, once started
        self._next = (0, 0)  # the (epoch, step) it hands out next
        # The feeder's thread holds no reference to the loader: a loader dropped without
        # close() is collected, and this stops its thread.
        self._finalizer = weakref.finalize(self, _shutdown, self._reader, self._running, True)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.subset), self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields this epoch's batches from `start_step` on (to resume)."""
        self.epoch, self.start_step = epoch, start_step

    def _producer(self, plans: Iterator[tuple[int, int, np.ndarray]]) -> Produce:
        """Where this iteration's batches come from: a pixel cache, a full eval cache, or the
        JPEGs (decoded by DALI, and filling the eval cache if there is one)."""
        if self.cache is not None:  # it fills as the first epoch is read (whole images)
            decode = partial(whole_images, self._tars(), pipeline=self.pipeline) \
                if not self.cache.full else None
            return self.cache.producer(plans, self.plan(self.epoch)[self.start_step:],
                                       self.augment_seed, self.res, decode)
        if self.eval_cache is not None and self.eval_cache.holds(self.subset):
            return self.eval_cache.producer(self.subset, plans, self.device)
        reader = self._tars()
        if self.train:
            reader.augment_seed = self.augment_seed
        # Values, not the loader: the feeder's thread must hold no reference to it.
        res, shorter = self.res, round(self.res * self.eval_resize)
        if self.train and self.pipeline["gpu"]:  # resized and mirrored by DALI
            finish = lambda outs, _: torch.from_dlpack(outs[0].as_tensor()).clone()  # noqa: E731
        elif self.train:
            finish = lambda outs, _: resize(  # noqa: E731
                [torch.from_dlpack(t) for t in outs[0]], res,
                flips=np.asarray(outs[2].as_tensor()).reshape(-1))
        else:
            finish = lambda outs, _: resize([torch.from_dlpack(t) for t in outs[0]],  # noqa: E731
                                            res, shorter=shorter)
        tee = self.eval_cache.writer(self.subset) if self.eval_cache is not None else None
        return _decoded(reader, plans, self.pipeline, finish, tee)

    def _tars(self) -> _Reader:
        """The subset's tars, mapped when something is first decoded."""
        if not self._reader:
            self._reader.append(_Reader(self.subset))
        return self._reader[0]

    def _feeder(self) -> _Feeder:
        """The running feeder if it is where this iteration starts, else a new one there."""
        if self._running and self._next == (self.epoch, self.start_step):
            return self._running[0]
        _shutdown(self._reader, self._running, False)
        plans = _plans(self.epoch, self.start_step, self.plan)
        self._running.append(_Feeder(self._producer(plans), self.pipeline["prefetch"],
                                     self.device))
        self._next = (self.epoch, self.start_step)
        return self._running[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        feeder = self._feeder()
        for step in range(self.start_step, len(self)):
            item = feeder.queue.get()
            if isinstance(item, BaseException):
                _shutdown(self._reader, self._running, False)
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
