"""A subset's JPEGs decoded by DALI, straight from the memory-mapped tars: the one place that
drives DALI, for the loader's streamed batches and for the whole images that fill a pixel cache.

One pipeline definition serves both devices: without a GPU it runs CPU-only
(`device_id=None`, CPU decode); with one, decoding is "mixed" (the hardware JPEG decoder and
nvJPEG). Our own sampler drives the reads through `fn.external_source` (a sequential tar
reader's shuffle buffer gives near-single-class batches on class-sorted shards). Training
decodes only each image's crop window (drawn by the train transform, `transforms.TrainTransform`)
and the transform's resize and flip finish the batch; evaluation decodes whole images and the
eval transform resizes them. Batches stay uint8, NHWC (channels-last).

Every resize is torch's (PIL's filter, `transforms`), on the decoder's device: on the CPU,
DALI's own resize (antialiased, linear) measured 1.37 ms per 224 px image on one core, more
than decoding the crop (1.26 ms), against torch's 0.26 ms; on a GPU the crops are padded to the
batch's largest (in DALI) and resampled in two batched matrix products, as a GPU pixel cache
crops, so that a streamed batch and a cached one are made alike on either device.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import resource
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..common.errors import DataError
from ..data.subset import Subset
from .transforms import EvalTransform, TrainTransform, index_tensor

Plan = tuple[int, int, np.ndarray]
"""A planned batch: (epoch, step, positions in the subset)."""
Batch = tuple[torch.Tensor, torch.Tensor, int]
"""A made batch: uint8 NHWC images, int64 labels, and the JPEG bytes read to make it."""


def default_hw_decoder_load(device: torch.device) -> float:
    """Share of JPEGs the mixed decoder sends to the GPU's hardware JPEG decoder (the rest go
    to nvJPEG on the SMs, Huffman-decoded on the CPU). H100 and H200 have 7 hardware JPEG
    engines: on an H200 training ResNet-18, 1.0 ran 7% faster than DALI's default 0.65 (29%
    on the legacy default stream); on an H100 the two were within the noise
    (benchmarks/README.md). Other GPUs keep DALI's 0.65 (an A100 has one engine; unmeasured)."""
    return 1.0 if torch.cuda.get_device_capability(device)[0] == 9 else 0.65


def single_threaded_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for torch's CPU kernels, each running them on its own thread (torch's thread
    count is per thread: OpenMP teams within each would oversubscribe the cores DALI uses)."""
    return ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))


@contextlib.contextmanager
def on_stream(stream):
    """Work queued inside runs on `stream` (the feeder's), or as usual on the CPU."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        yield


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
    """DALI's batch source: the next planned batch's JPEGs, as views of the memory-mapped tars
    (and, for training, the crop windows `draw` gives).

    Nothing is copied and nothing waits on I/O here: DALI's own threads touch the pages (a
    page fault reads them from disk or maps them from the page cache), so the Python thread
    that feeds DALI never blocks. (Reading each JPEG with pread instead took 16 ms per batch of
    256 in the feeding thread while ResNet-18 trained, H200, 16 cores: each read gave up the
    GIL and had to win it back from the training thread.) The maps are random-access (the
    kernel's readahead read 5x the bytes touched) and each sample's pages are requested ahead
    (MADV_WILLNEED: one read per sample, started at once), so only the subset's pages are read.
    Each batch handed to DALI is queued in `pending` as (positions, crop sizes, flips) until
    its output is taken.
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
        self.draw: Callable | None = None  # training: the transform's crop windows and flips
        self.plans: Iterator[Plan] = iter(())
        self.pending: deque[tuple] = deque()  # fed to DALI, output not yet taken

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
        labels = self.subset.labels[positions]
        if self.draw is None:
            self.pending.append((positions, None, None))
            return jpegs, labels
        heights, widths = self.height[positions], self.width[positions]
        if not (heights.all() and widths.all()):
            raise DataError(f"{self._name(positions[np.argmin(heights * widths)])} has no image "
                            "size in the index: re-shard it with this version of dptrain")
        anchor, shape, flips = self.draw(epoch, step, positions, heights, widths)
        self.pending.append((positions, shape, flips))
        return jpegs, labels, anchor, shape

    def explain(self, error: Exception) -> Exception:
        """The decoder failed on a batch in flight: name the sample that is not a JPEG
        (damaged, or the index does not match the tar), or else the batch's tars, with the
        decoder's own first line."""
        tars = []
        for positions, _shape, _flips in self.pending:
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


def _pipeline(reader: _Reader, *, crops: bool, pad: bool, gpu: bool, decode: str,
              hw_decoder_load: float, batch_size: int, threads: int, prefetch: int):
    """The DALI graph. `crops`: the decoded crop windows the reader draws (`pad`: padded to
    the batch's largest, to be resampled as one tensor); else whole decoded images."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads,
                  device_id=torch.cuda.current_device() if gpu else None,
                  prefetch_queue_depth=prefetch)
    def pipe():
        # no_copy: DALI decodes straight from the mapped tars (they outlive the pipeline)
        kinds = [types.UINT8, types.INT64] + ([types.INT32] * 2 if crops else [])
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
        if crops:  # fused decode + crop: only the window is decoded
            anchor, shape = window
            images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW",
                                             normalized_anchor=False, normalized_shape=False,
                                             output_type=types.RGB, **decoder)
            if gpu:
                images, labels = images.gpu(), labels.gpu()
            return (fn.pad(images, axis_names="HW") if pad else images), labels
        # Whole images: libjpeg-turbo's chroma upsampling on the GPU too, so both devices
        # decode alike.
        if on_gpu:
            decoder["jpeg_fancy_upsampling"] = True
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        return (images.gpu(), labels.gpu()) if gpu else (images, labels)

    return pipe()


class Decoder:
    """A subset's JPEGs decoded by DALI on demand, in the calling (feeder's) thread: `batches`
    makes the loader's batches with its transform, `whole` decodes whole images (what fills a
    pixel cache). The tars are mapped on first use and stay mapped until `close()`.

    `decode`: "gpu" (the GPU's decoders) or "cpu" (DALI's CPU threads; on a GPU the rest
    still runs there)."""

    def __init__(self, subset: Subset, transform: TrainTransform | EvalTransform, *, gpu: bool,
                 decode: str, hw_decoder_load: float, batch_size: int, threads: int,
                 prefetch: int):
        self.subset, self.transform = subset, transform
        self.settings = dict(gpu=gpu, decode=decode, hw_decoder_load=hw_decoder_load,
                             batch_size=batch_size, threads=threads, prefetch=prefetch)
        self.tars: list[_Reader] = []  # mapped when something is first decoded
        # Train crops padded into one tensor and resampled at once: a GPU's way (per-image
        # resizes would launch kernels per image); the CPU's uint8 kernel is per image.
        self.padded = gpu

    def _drive(self, plans: Iterator[Plan], stream, tick, *, crops: bool,
               count: int | None = None) -> Iterator[tuple[tuple, list]]:
        """The one loop that drives DALI over planned batches (`count` of them, or without
        end): yields each batch's pending entry (positions, crop sizes, flips) and its outputs,
        bound to `stream` (they come back once their GPU work is queued), and lent until the
        next is asked for."""
        if not self.tars:
            self.tars.append(_Reader(self.subset))
        reader = self.tars[0]
        reader.plans, reader.pending = plans, deque()
        reader.draw = self.transform.draw if crops else None
        pipe = _pipeline(reader, crops=crops, pad=crops and self.padded, **self.settings)
        try:
            pipe.build()
            pipe.schedule_run()  # fills DALI's prefetch queue
            for i in itertools.count() if count is None else range(count):
                outs = pipe.share_outputs(cuda_stream=stream)
                tick("wait for DALI")
                yield reader.pending.popleft(), outs
                del outs
                pipe.release_outputs()
                if count is None or i + 1 < count:
                    pipe.schedule_run()  # reads the next planned batch and feeds it to DALI
                    tick("read + feed")
        except RuntimeError as e:
            raise reader.explain(e) from None
        finally:
            del pipe  # DALI's threads shut down here, in the calling thread

    def batches(self, plans: Iterator[Plan], stream, tick,
                tee: Callable | None = None) -> Iterator[Batch]:
        """The planned batches, decoded and transformed on `stream`; `tee(positions, images)`,
        if given, sees each (an eval cache being filled; closed at the end if it has close)."""
        train = isinstance(self.transform, TrainTransform)
        try:
            for (positions, shape, flips), outs in self._drive(plans, stream, tick, crops=train):
                # Nothing here waits for the device: every copy and kernel is queued on our
                # stream, behind DALI's work, and tensors are copied out of DALI's buffers.
                with on_stream(stream):
                    labels = torch.from_dlpack(outs[1].as_tensor()).reshape(-1).clone()
                    if not train:
                        images = self.transform.finish([torch.from_dlpack(t) for t in outs[0]])
                    elif self.padded:
                        crops = torch.from_dlpack(outs[0].as_tensor())
                        images = self.transform.finish_padded(
                            crops, index_tensor(shape[:, 0], crops.device),
                            index_tensor(shape[:, 1], crops.device),
                            index_tensor(flips, crops.device))
                    else:
                        images = self.transform.finish([torch.from_dlpack(t) for t in outs[0]],
                                                       flips)
                    if tee is not None:  # on our stream: after the work that made the images
                        tee(positions, images)
                del outs
                tick("finish")
                yield images, labels, int(self.tars[0].size[positions].sum())
        finally:
            if tee is not None and hasattr(tee, "close"):
                tee.close()

    def whole(self, batches: list[np.ndarray], stream,
              tick) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """Each batch of positions decoded whole (on the decoder's device, in the calling
        thread): (positions, images), the images views of DALI's buffers, lent until the next
        item is asked for."""
        if not batches:
            return
        # DALI reads ahead: after the last batch, the last batch again (never decoded).
        padded = itertools.chain(((0, i, b) for i, b in enumerate(batches)),
                                 itertools.repeat((0, len(batches), batches[-1])))
        for (positions, _, _), outs in self._drive(padded, stream, tick, crops=False,
                                                   count=len(batches)):
            yield positions, [torch.from_dlpack(t) for t in outs[0]]

    def close(self) -> None:
        """Unmap the tars."""
        while self.tars:
            self.tars.pop().close()
