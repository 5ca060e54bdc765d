"""Make one input file storable: a JPEG every decoder (libjpeg-turbo, nvJPEG, DALI) reads.

A JPEG's markers are walked first (a valid frame header, a scan, an end-of-image marker after
the scan, which is what a truncated file lacks, and its EXIF orientation). Then, by default,
it is decoded by DALI's CPU decoder as the loader runs it (`LoaderDecoder`): damage inside the
compressed data (a bogus marker length, an undefined Huffman table, premature end of data)
shows only to a decoder, and one such file would stop a training run. Files a decoder chokes
on or complains about, or that are stored rotated (an EXIF orientation other than 1, which
DALI applies and the index's header size does not), are re-encoded as upright RGB baseline
JPEG; what cannot be decoded at all is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import struct
import tempfile
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Frame markers: baseline, extended sequential and progressive Huffman JPEGs decode everywhere.
_SOF_PLAIN = {0xC0, 0xC1, 0xC2}
# Lossless, hierarchical and arithmetic-coded frames: nvJPEG and many tools refuse them.
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # markers without a length field
MAX_SIDE = 65535  # JPEG cannot store a longer side; the index stores sides as uint16


class BadImage(Exception):
    """The input cannot be stored; the message is the reason recorded in the index."""


@dataclass(frozen=True)
class Stored:
    data: bytes | memoryview  # a copied input is the caller's own buffer, not a copy
    height: int
    width: int
    action: str  # "copied", or what was done: "converted (png)", "resized", ...


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    sof: int
    orientation: int = 1  # EXIF's: 1 is upright; 2-8 flip and/or rotate (5-8 swap the sides)


def _exif_orientation(segment: bytes | memoryview) -> int:
    """The orientation tag (0x0112) of IFD0 in an APP1 "Exif" segment's payload; 1 when the
    segment holds none or is malformed (as PIL reads it: it then leaves the image as stored)."""
    seg = bytes(segment)
    if not seg.startswith(b"Exif\0\0") or len(seg) < 14:
        return 1
    tiff = seg[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for e in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * e)
            if tag == 0x0112:
                # A SHORT, as the standard has it; other values mean nothing to any reader.
                return value if kind == 3 and 1 <= value <= 8 else 1
    except struct.error:  # the IFD points past the segment
        pass
    return 1


def read_jpeg_header(data: bytes | memoryview) -> JpegHeader | None:
    """Walk the marker segments up to the scan; None if `data` is not a JPEG at all.

    Raises BadImage for a JPEG that is structurally broken (truncated, no frame, no scan).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, sof, orientation = 2, None, 1
    while True:
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes before a marker are legal
        if i + 2 > n:
            raise BadImage("truncated JPEG (ends inside its headers)")
        if data[i] != 0xFF:
            raise BadImage("corrupt JPEG (bad marker structure)")
        marker = data[i + 1]
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == 0xD9:
            raise BadImage("corrupt JPEG (end of image before any scan)")
        if i + 4 > n:
            raise BadImage("truncated JPEG (ends inside its headers)")
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            raise BadImage("truncated JPEG (ends inside its headers)")
        if marker in _SOF_PLAIN or marker in _SOF_OTHER:
            if length < 8:
                raise BadImage("corrupt JPEG (short frame header)")
            precision, height, width, comps = struct.unpack_from(">BHHB", data, i + 4)
            sof = JpegHeader(width, height, comps, precision, marker)
        elif marker == 0xE1 and orientation == 1:  # APP1: Exif (or XMP, which has no tag)
            orientation = _exif_orientation(data[i + 4:i + 2 + length])
        elif marker == 0xDA:
            if sof is None:
                raise BadImage("corrupt JPEG (scan before frame header)")
            scan_start = i + 2 + length
            # Entropy-coded data escapes 0xFF as FF00, so FFD9 after the scan is the real end.
            # It is nearly always in the last bytes; search the rest only when it is not.
            tail = max(scan_start, n - 4096)
            if (bytes(data[tail:]).rfind(b"\xff\xd9") < 0
                    and bytes(data[scan_start:tail + 1]).rfind(b"\xff\xd9") < 0):
                raise BadImage("truncated JPEG (no end-of-image marker)")
            return JpegHeader(sof.width, sof.height, sof.components, sof.precision, sof.sof,
                              orientation)
        i += 2 + length


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(f"too many pixels ({width}x{height} > {max_pixels}; decompression bomb?)")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: PIL's convert("RGB") clips at 255; keep the top 8 bits instead.
        a = np.asarray(im).astype(np.uint32)
        im = Image.fromarray((a >> 8 if a.max() > 255 else a).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    # Alpha is dropped as torchvision's loader drops it (convert("RGB")), so pixels match.
    return im.convert("RGB")


def _encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)  # baseline, 4:2:0, like most of ImageNet
    return buf.getvalue()


def _decode(data: bytes, max_pixels: int, draft_side: int | None = None) -> Image.Image:
    with warnings.catch_warnings():
        # Pixel counts are checked against max_pixels below; PIL's own threshold would
        # override a larger --max-pixels.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            _check_size(im.width, im.height, max_pixels)
            if draft_side and im.format == "JPEG":
                # DCT-domain downscale: decode at the smallest 1/k scale still >= the target.
                scale = draft_side / max(im.size)
                im.draft(im.mode, (max(1, int(im.width * scale)), max(1, int(im.height * scale))))
            im.load()
        except BadImage:
            raise
        except Image.DecompressionBombError as e:
            raise BadImage(f"too many pixels (decompression bomb?): {e}") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except Exception as e:  # PIL raises many types for undecodable input
            msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))  # reasons must be reproducible
            raise BadImage(f"not a decodable image ({type(e).__name__}: {msg})") from None
    return im


DECODER = "DALI CPU (libjpeg-turbo), EXIF orientation not applied"
"""What `check="decode"` decodes with: the loader's own decoder and settings (decode._pipeline).
A shard set's index records it; `dptrain verify` decodes the samples of a set without it."""


class LoaderDecoder:
    """DALI's CPU decoder as the loader runs it (`fn.decoders.image`, RGB, the stored pixel
    grid: adjust_orientation off), one batch of encoded images at a time. `problems` says, for
    each image, why the loader could not use it as stored, or None.

    libjpeg-turbo reports recoverable damage ("Corrupt JPEG data: premature end of data
    segment") as a warning on the process's standard error and decodes on: such a file is
    damaged too (a GPU decoder may refuse it), so the warnings are caught from file
    descriptor 2 while a batch decodes. DALI fails a whole batch for one bad image, so a batch
    with any complaint is decoded again one image at a time to name the culprits."""

    _stderr_lock = threading.Lock()  # descriptor 2 is the process's: one capture at a time

    def __init__(self, batch_size: int = 1, threads: int = 1):
        self.batch_size, self.threads = batch_size, threads
        self._built = None
        self._err = tempfile.TemporaryFile()

    def _pipe(self):
        if self._built is None:
            from nvidia.dali import fn, pipeline_def, types

            @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=None,
                          prefetch_queue_depth=1)
            def pipe():
                jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
                return fn.decoders.image(jpegs, output_type=types.RGB, device="cpu",
                                         adjust_orientation=False)

            self._built = pipe()
            self._built.build()
        return self._built

    @contextlib.contextmanager
    def _captured(self):
        with self._stderr_lock:
            self._err.seek(0)
            self._err.truncate()
            saved = os.dup(2)
            os.dup2(self._err.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    def _said(self) -> str:
        self._err.seek(0)
        text = self._err.read().decode("utf-8", "replace")
        return next((line.strip() for line in text.splitlines() if line.strip()), "")

    def _decode(self, datas: list) -> list[tuple[int, int]]:
        """Decoded (height, width) of each; raises BadImage with what the decoder said."""
        pipe = self._pipe()
        try:
            with self._captured():
                pipe.feed_input("jpegs", [np.frombuffer(d, np.uint8) for d in datas])
                (out,) = pipe.run()
        except Exception as e:  # DALI raises RuntimeError, and the pipeline is spent
            self._built = None
            raise BadImage(_reason(self._said() or _dali_error(e))) from None
        said = self._said()  # a warning: the image decoded, but damaged
        if said:
            raise BadImage(_reason(said))
        return [tuple(out.at(i).shape[:2]) for i in range(len(datas))]

    def problems(self, datas: list, sizes: list[tuple[int, int]]) -> list[str | None]:
        """Why each encoded image (given its expected (height, width)) cannot be used as
        stored, or None: the decoder failed, warned, or made another size."""
        found: list[str | None] = []
        for start in range(0, len(datas), self.batch_size):
            part = datas[start:start + self.batch_size]
            want = sizes[start:start + self.batch_size]
            try:
                found += [_wrong_size(g, w) for g, w in zip(self._decode(part), want)]
            except BadImage as e:
                found += [str(e)] if len(part) == 1 else \
                    [self.problems([d], [w])[0] for d, w in zip(part, want)]  # the culprits
        return found


def _wrong_size(got: tuple[int, int], want: tuple[int, int]) -> str | None:
    if tuple(got) == tuple(want):
        return None
    return f"decodes to {got[1]}x{got[0]}, not the {want[1]}x{want[0]} of its header"


def _dali_error(e: Exception) -> str:
    """The decoder's own words from a DALI error: its last line that names no file or path."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "/" not in ln and not ln.startswith(("Critical error",
                                                                         "Error in thread"))]
    return (useful or lines or [type(e).__name__])[-1]


def _reason(said: str) -> str:
    # Reasons are counted and compared between runs: no addresses, no byte counts
    said = re.sub(r" at 0x[0-9a-fA-F]+", "", said)
    return re.sub(r"\d+ extraneous bytes", "extraneous bytes", said)[:200]


_decoders: dict[int, LoaderDecoder] = {}
# A process forked from one that ran DALI pipelines (a shard worker, from a test or a notebook
# that decoded) inherits them without their threads: were the child's garbage collector to
# collect one, its __del__ would wait for those threads forever. The child keeps what it
# inherited as it is instead (gc.freeze: never collected there; its own objects are).
os.register_at_fork(after_in_child=gc.freeze)


def loader_decoder() -> LoaderDecoder:
    """This process's decoder for single images, built on first use. Per process id: a shard
    worker forked from a process that decoded holds a copy of its decoder whose DALI threads
    did not survive the fork (running it waits for them forever)."""
    if os.getpid() not in _decoders:
        _decoders[os.getpid()] = LoaderDecoder()
    return _decoders[os.getpid()]


def _conversion_needed(header: JpegHeader) -> str | None:
    """Why a structurally sound JPEG is not stored as it is, or None."""
    if header.sof in _SOF_OTHER:
        return "lossless/arithmetic JPEG"
    if header.precision != 8:
        return f"{header.precision}-bit JPEG"
    if header.components not in (1, 3):
        return "CMYK JPEG" if header.components == 4 else f"{header.components}-channel JPEG"
    if header.orientation != 1:
        return f"EXIF orientation {header.orientation} applied"
    return None


def store_image(
    data: bytes | memoryview,
    *,
    max_side: int | None = None,
    quality: int = 90,
    check: str = "decode",
    max_pixels: int = 100_000_000,
) -> Stored:
    """Return the bytes to store for one input, or raise BadImage with the reason to record.

    A copied input is returned as the same object (`data`), so a view stays a view.

    `check="decode"` decodes every JPEG to be stored with the loader's decoder (the input
    copied, or what it was converted to), and converts or skips what it complains about;
    `check="header"` only walks a JPEG's markers (fast; damage inside the compressed data then
    shows in training, and `dptrain verify --decode` finds it).
    """
    if len(data) == 0:
        raise BadImage("empty file")
    header = read_jpeg_header(data)
    damage = None
    if header is not None:
        _check_size(header.width, header.height, max_pixels)
        why = _conversion_needed(header)
        too_big = max_side is not None and max(header.width, header.height) > max_side
        if why is None and not too_big:
            if check == "decode":
                (damage,) = loader_decoder().problems([data], [(header.height, header.width)])
            if damage is None:
                return Stored(data, header.height, header.width, "copied")
            why = f"damaged JPEG: {damage}"
        try:
            im = _decode(data, max_pixels, draft_side=max_side if too_big else None)
        except BadImage as e:
            raise BadImage(f"{why}; {e}" if damage else str(e)) from None
        action = f"converted ({why})" if why else "resized"
    else:
        im = _decode(data, max_pixels)
        action = f"converted ({(im.format or 'unknown').lower()})"
        too_big = max_side is not None and max(im.size) > max_side
    if im.getexif().get(0x0112, 1) in range(2, 9):  # PNG, WebP and TIFF carry EXIF too
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im) if (im.mode not in ("RGB", "L") or action.startswith("converted")) else im
    if too_big:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        if action.startswith("converted"):
            action += " + resized"
    if max(im.size) > MAX_SIDE:
        raise BadImage(f"side longer than {MAX_SIDE} px ({im.width}x{im.height})")
    encoded = _encode(im, quality)
    if check == "decode":
        (problem,) = loader_decoder().problems([encoded], [(im.height, im.width)])
        if problem is not None:
            raise BadImage(f"re-encoded, it still does not decode in the loader: {problem}")
    return Stored(encoded, im.height, im.width, action)
