"""The on-disk format of a shard set, and reading it back: `index.json` + `samples.npy` + tars.

A shard set is a folder of per-class WebDataset tars (`LLLLL-PPP.tar`, class label and part),
each with a DALI `wds2idx` v1.2 index (`LLLLL-PPP.idx`), plus:
- `index.json`: format version, source, options, seed, classes (name, id, count, tars), every
  tar's size and sha256, every skipped input with its reason;
- `samples.npy`: one fixed-width row per sample (label, tar id, byte offset and size of the JPEG
  payload, height, width), sorted by label and then by stored order. A class is a contiguous
  range of rows and any sample is one positioned read: no tar is ever scanned.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..common.errors import COUNT, DataError, mismatch

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.npy"
PROGRESS_DIR = ".progress"  # exists only while a shard set is being written
SAMPLE_DTYPE = np.dtype(
    [
        ("label", "<i4"),
        ("tar", "<i4"),  # position in index.json's "tars"
        ("offset", "<i8"),  # byte offset of the JPEG payload in its tar
        ("size", "<i4"),  # JPEG payload bytes
        ("height", "<u2"),
        ("width", "<u2"),
    ]
)


_name = (str, lambda v: v not in ("", ".", "..") and "/" not in v and "\0" not in v,
         "a file name in the set's folder")
_optional_str = (str, type(None))
# What readers of index.json use, checked when it is loaded (other keys are kept as written).
INDEX_SCHEMA = {
    "source": str, "source_format": str, "options": {"seed": int}, "num_samples": COUNT,
    "samples_sha256": str, "classes": [{"name": str, "count": COUNT, "tars": [_name]}],
    "tars": [{"file": _name, "bytes": COUNT, "sha256": str, "idx_sha256": str}],
    "skipped": [{"input": str, "reason": str}], "converted": [{"input": str, "action": str}],
    "split?": _optional_str, "source_encoding?": _optional_str, "job?": dict,
    "renamed?": [{"input": str, "key": str}],
}


def tar_name(label: int, part: int) -> str:
    return f"{label:05d}-{part:03d}.tar"


def idx_name(tar: str) -> str:
    # wds2idx's default: the tar's name up to its first dot, then ".idx".
    return tar.split(".", 1)[0] + ".idx"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _table_problem(samples: np.ndarray, meta: dict) -> str | None:
    """What in the sample table no reader may meet, or None: rows out of label order, a
    label or tar that does not exist, a JPEG outside its tar (readers take the table's
    offsets as they are; that each row matches its tar's headers is `verify`'s to check)."""
    labels, tars = samples["label"], samples["tar"]
    counts = [c["count"] for c in meta["classes"]]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(counts)
                        or (np.diff(labels) < 0).any()):
        return "labels out of order or range"
    if not np.array_equal(np.bincount(labels, minlength=len(counts)), counts):
        return "per-class counts differ"
    if len(tars) and (tars.min() < 0 or tars.max() >= len(meta["tars"])):
        return "a tar that is not in the index"
    sizes = np.array([t["bytes"] for t in meta["tars"]] + [0], dtype=np.int64)[tars]
    if ((samples["offset"] < 512) | (samples["size"] < 0)
            | (samples["offset"] > sizes - samples["size"])).any():
        return "a sample outside its tar"
    return None


class ShardIndex:
    """A loaded shard set: `meta` is index.json, `samples` the memory-mapped per-sample table."""

    def __init__(self, root: Path, meta: dict, samples: np.ndarray):
        self.root, self.meta, self.samples = root, meta, samples

    @classmethod
    def load(cls, root: str | os.PathLike, mmap: bool = True) -> ShardIndex:
        root = Path(root)
        path = root / INDEX_FILE
        if not path.is_file() and (root / PROGRESS_DIR).is_dir():
            raise DataError(f"{root} is unfinished: run the dptrain shard command again to "
                            "finish it")
        inside = sorted(p.parent.name for p in root.glob(f"*/{INDEX_FILE}")) \
            if not path.is_file() and root.is_dir() else []
        if inside:  # the parent of a cifar or splits source's train/ and test/
            raise DataError(f"{root} holds the shard sets {', '.join(inside)}, not one itself: "
                            f"give {root / inside[0]}")
        if not path.is_file():
            raise DataError(f"{root} is not a dptrain shard set (no {INDEX_FILE})")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise DataError(
                f"{path} has format version {version!r}; this dptrain reads "
                f"version {FORMAT_VERSION}: re-shard with this version"
            )
        problem = mismatch(meta, INDEX_SCHEMA)
        if problem:
            raise DataError(f"{path} is damaged ({problem}): run dptrain verify, or re-shard")
        try:
            samples = np.load(root / SAMPLES_FILE, mmap_mode="r" if mmap else None)
        except Exception as e:  # numpy raises many types for a file that is not .npy
            raise DataError(f"cannot read {root / SAMPLES_FILE}: {e}") from None
        if (samples.dtype != SAMPLE_DTYPE or samples.ndim != 1
                or len(samples) != meta["num_samples"]):
            raise DataError(f"{root / SAMPLES_FILE} does not match {path}: re-shard or verify")
        problem = _table_problem(samples, meta)
        if problem:
            raise DataError(f"{root / SAMPLES_FILE} does not match {path} ({problem}): "
                            "run dptrain verify, or re-shard")
        if not len(samples):  # written before shard refused a source with no storable image
            raise DataError(f"{root} holds no images (inputs skipped: {len(meta['skipped']):,}; "
                            f"its index.json lists why): shard a source with images")
        return cls(root, meta, samples)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.meta["classes"]]

    @property
    def counts(self) -> np.ndarray:
        return np.array([c["count"] for c in self.meta["classes"]], dtype=np.int64)

    @property
    def class_start(self) -> np.ndarray:
        """Row where each class's samples start (rows are sorted by label)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def tar_paths(self) -> list[Path]:
        return [self.root / t["file"] for t in self.meta["tars"]]

    def info(self) -> dict:
        counts = self.counts
        nonempty = counts[counts > 0]
        return {
            "path": str(self.root),
            "format_version": self.meta["format_version"],
            "source": self.meta["source"],
            "source_format": self.meta["source_format"],
            "split": self.meta.get("split"),
            "source_encoding": self.meta.get("source_encoding"),
            "seed": self.meta["options"]["seed"],
            "num_classes": len(counts),
            "num_samples": int(counts.sum()),
            "bytes": int(sum(t["bytes"] for t in self.meta["tars"])),
            "num_tars": len(self.meta["tars"]),
            "per_class": counts.tolist(),
            "per_class_min": int(nonempty.min()) if len(nonempty) else 0,
            "per_class_median": float(np.median(nonempty)) if len(nonempty) else 0.0,
            "per_class_max": int(nonempty.max()) if len(nonempty) else 0,
            "empty_classes": int((counts == 0).sum()),
            "median_height": int(np.median(self.samples["height"])) if len(counts) else 0,
            "median_width": int(np.median(self.samples["width"])) if len(counts) else 0,
            "converted": len(self.meta["converted"]),
            "skipped": len(self.meta["skipped"]),
            "skipped_by_reason": dict(Counter(s["reason"] for s in self.meta["skipped"])),
        }


def render_info(i: dict) -> str:
    """`dptrain info`'s text, from ShardIndex.info()."""
    split = f", {i['split']} split" if i["split"] else ""
    lines = [f"{i['path']}: format v{i['format_version']}, from {i['source']} "
             f"({i['source_format']}{split}), seed {i['seed']}"]
    if i["source_encoding"]:
        lines.append(f"  stored as {i['source_encoding']}")
    lines += [f"  classes   {i['num_classes']:,} ({i['empty_classes']} empty)",
              f"  samples   {i['num_samples']:,}  per class min/median/max "
              f"{i['per_class_min']}/{i['per_class_median']:g}/{i['per_class_max']}",
              f"  bytes     {i['bytes'] / 1e6:,.1f} MB in {i['num_tars']:,} tars; "
              f"median image {i['median_width']}x{i['median_height']}",
              f"  converted {i['converted']:,}  skipped {i['skipped']:,}"]
    lines += [f"    {n:,}: {reason}" for reason, n in
              sorted(i["skipped_by_reason"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
