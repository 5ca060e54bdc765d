"""Make one input file storable: a JPEG every decoder (libjpeg-turbo, nvJPEG, DALI) reads.

Copy mode must run near disk speed, so a JPEG is checked by walking its markers (no pixel
decode): a valid frame header, a scan, and an end-of-image marker after the scan, which is what
a truncated file lacks. Only files a decoder would choke on are decoded and re-encoded.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

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


def read_jpeg_header(data: bytes | memoryview) -> JpegHeader | None:
    """Walk the marker segments up to the scan; None if `data` is not a JPEG at all.

    Raises BadImage for a JPEG that is structurally broken (truncated, no frame, no scan).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, sof = 2, None
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
            return sof
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


def store_image(
    data: bytes | memoryview,
    *,
    max_side: int | None = None,
    quality: int = 90,
    check: str = "header",
    max_pixels: int = 100_000_000,
) -> Stored:
    """Return the bytes to store for one input, or raise BadImage with the reason to record.

    A copied input is returned as the same object (`data`), so a view stays a view.

    `check="header"` validates JPEGs structurally (fast); `check="decode"` also decodes them.
    """
    if len(data) == 0:
        raise BadImage("empty file")
    header = read_jpeg_header(data)
    if header is not None:
        _check_size(header.width, header.height, max_pixels)
        why = None
        if header.sof in _SOF_OTHER:
            why = "lossless/arithmetic JPEG"
        elif header.precision != 8:
            why = f"{header.precision}-bit JPEG"
        elif header.components not in (1, 3):
            why = "CMYK JPEG" if header.components == 4 else f"{header.components}-channel JPEG"
        too_big = max_side is not None and max(header.width, header.height) > max_side
        if why is None and not too_big:
            if check == "decode":
                _decode(data, max_pixels)
            return Stored(data, header.height, header.width, "copied")
        im = _decode(data, max_pixels, draft_side=max_side if too_big else None)
        action = f"converted ({why})" if why else "resized"
    else:
        im = _decode(data, max_pixels)
        action = f"converted ({(im.format or 'unknown').lower()})"
        too_big = max_side is not None and max(im.size) > max_side
    im = _to_rgb(im) if (im.mode not in ("RGB", "L") or action.startswith("converted")) else im
    if too_big:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
        if action.startswith("converted"):
            action += " + resized"
    if max(im.size) > MAX_SIDE:
        raise BadImage(f"side longer than {MAX_SIDE} px ({im.width}x{im.height})")
    return Stored(_encode(im, quality), im.height, im.width, action)
