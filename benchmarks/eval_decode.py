"""Which JPEG decoder settings give PIL's pixels, and how fast each decodes: the eval choice.

    python benchmarks/eval_decode.py   # on a GPU also: mixed, with and without fancy upsampling

The eval transform must give the same images on both devices (within 0.5 of 255 of PIL's
decode + bilinear resize), and feature extraction should run at >= 10,000 img/s on a GPU.
This measures the decoding step alone, before any resize: every JPEG decoded whole by PIL
(libjpeg-turbo, the reference) and by DALI's decoders, the mean absolute difference per pixel
over 1,000 JPEGs, and each decoder's rate over 20,000 ImageNet-like JPEGs (500x375) in
batches of 256, one thread per core. DALI settings: CPU (libjpeg-turbo); on a GPU, "mixed"
with the hardware decoder taking everything (hw_decoder_load 1.0) or none of it (0.0), each
with libjpeg-turbo's chroma upsampling (jpeg_fancy_upsampling) and without. The reference
for speed in the same run is the CPU decoder.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import imagenet_like, save, table  # noqa: E402
from loader import shards  # noqa: E402

from dptrain.data.index import ShardIndex  # noqa: E402

BATCH, COMPARED = 256, 1000


def jpegs(index: ShardIndex) -> list[np.ndarray]:
    tars = [np.frombuffer(p.read_bytes(), np.uint8) for p in index.tar_paths]
    return [tars[r["tar"]][r["offset"]:r["offset"] + r["size"]] for r in index.samples]


def decode(files: list[np.ndarray], **decoder) -> tuple[list[np.ndarray], float]:
    """All files decoded by one DALI setting: img/s over all of them after a warm-up batch
    (batch 0), and the first COMPARED images decoded after it (files BATCH onwards)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = decoder.get("device") == "mixed"
    batches = [files[i:i + BATCH] for i in range(0, len(files) - BATCH + 1, BATCH)]
    it = itertools.cycle(batches)  # DALI asks ahead of the runs

    @pipeline_def(batch_size=BATCH, num_threads=len(os.sched_getaffinity(0)), seed=0,
                  device_id=0 if gpu else None, prefetch_queue_depth=2)
    def pipe():
        data = fn.external_source(source=lambda: next(it), dtype=types.UINT8, no_copy=True)
        return fn.decoders.image(data, output_type=types.RGB, **decoder)

    p = pipe()
    p.build()
    kept: list[np.ndarray] = []
    p.run()  # a warm-up batch
    t = time.perf_counter()
    for _ in batches:
        out = p.run()[0]
        if len(kept) < COMPARED:
            out = out.as_cpu() if gpu else out
            kept += [np.array(out.at(j)) for j in range(len(out))]
    if gpu:
        torch.cuda.synchronize()
    return kept[:COMPARED], len(batches) * BATCH / (time.perf_counter() - t)


def main() -> None:
    index = ShardIndex.load(shards(imagenet_like(100, 200)))
    files = jpegs(index)
    reference = [np.asarray(Image.open(io.BytesIO(f.tobytes())).convert("RGB"), np.int16)
                 for f in files[BATCH:BATCH + COMPARED]]  # what `decode` keeps
    settings = {"cpu (libjpeg-turbo)": dict(device="cpu")}
    if torch.cuda.is_available():
        for load in (1.0, 0.0):
            for fancy in (False, True):
                settings[f"mixed, hw_decoder_load {load}, fancy upsampling {fancy}"] = dict(
                    device="mixed", hw_decoder_load=load, jpeg_fancy_upsampling=fancy)
    rows = []
    for name, decoder in settings.items():
        images, rate = decode(files, **decoder)
        diff = float(np.mean([np.abs(a.astype(np.int16) - b).mean()
                              for a, b in zip(images, reference)]))
        rows.append({"decoder": name, "mean abs diff vs PIL": diff, "img/s": rate})
        print(f"{name}: {diff:.3f}, {rate:,.0f} img/s", flush=True)
    for r in rows:
        r["vs cpu"] = r["img/s"] / rows[0]["img/s"]
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"{len(files):,} JPEGs of 500x375 decoded whole, batch {BATCH}, "
          f"{len(os.sched_getaffinity(0))} threads, {where}; difference over {COMPARED}")
    print(table(rows))
    path = save("eval_decode", {"images": len(files), "compared": COMPARED, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
