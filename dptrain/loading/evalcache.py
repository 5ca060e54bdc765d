"""The eval cache: a shard set's images eval-transformed once (the shorter side resized to
res x eval_resize, the centre res x res) and kept as uint8, one .npy per class, so that every
probe and every validation of a sweep reads pixels instead of decoding the JPEGs again.

Its folder (`--eval-cache`; a sweep gives all its runs SWEEP/cache) holds an entry per
(shard set content, res, eval_resize): eval/<key>/<label>.npy, each class's images in stored
order. The key says what the data is (`datakey.checked_fingerprint`), so a set that changed
since it was sharded is refused, never served stale. The first reader decodes and fills the
classes it reads; a class file appears whole or not at all (written under a name of its own
process, then renamed), so probes running side by side and interrupted ones leave no half
class. The shard set is only read: it may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..common.runfolder import partial_path, publish, remove_dead_partials, write_json
from ..data.datakey import checked_fingerprint
from ..data.index import ShardIndex
from ..data.subset import Subset
from .decode import Batch, on_stream
from .loader import Feed
from .transforms import EvalTransform

VERSION = 1  # of the eval transform: a change in how eval images are made starts new entries
ABOUT = "about.json"  # in an entry: the shard set, res and eval resize it was made from


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dptrain, or ~/.cache/dptrain."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dptrain"


def cache_dir_option(value: str | None) -> Path | None:
    """An --eval-cache value: a folder, the default one (None), or no cache ("off")."""
    if value == "off":
        return None
    return Path(value) if value else default_cache_dir()


class EvalCache:
    """One shard set's eval pixels at one (res, eval_resize), under `root`."""

    def __init__(self, root: Path, index: ShardIndex, res: int, eval_resize: float):
        fingerprint = checked_fingerprint(index, root / "stamps")
        key = hashlib.sha256(json.dumps([fingerprint, res, eval_resize, VERSION]).encode())
        self.dir = root / "eval" / key.hexdigest()[:32]
        self.index, self.res, self.eval_resize = index, res, eval_resize

    def path(self, label: int) -> Path:
        return self.dir / f"{label:05d}.npy"

    def _where(self, subset: Subset, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label in the set, row within its class) of subset positions."""
        labels = subset.classes[subset.labels[positions]]
        return labels, subset.rows[positions] - self.index.class_start[labels]

    def holds(self, subset: Subset) -> bool:
        """Whether every class of `subset` is cached (an eval subset takes whole classes)."""
        return all(self.path(int(c)).is_file() for c in subset.classes)

    def batches(self, feed: Feed) -> Iterator[Batch]:
        """The loader's eval batches (a `loader.PixelSource`): read from the class files when
        the cache holds all of the feed's subset (into pinned memory on a GPU run, then sent to
        the device), else decoded from the JPEGs, filling the cache as they pass."""
        assert feed.transform == EvalTransform(self.res, self.eval_resize), feed.transform
        if not self.holds(feed.subset):
            yield from feed.jpegs.batches(feed.plans, feed.stream, feed.tick,
                                          tee=self.writer(feed.subset))
            return
        maps: dict[int, np.ndarray] = {}
        gpu = feed.stream is not None
        for _epoch, _step, positions in feed.plans:
            out = torch.empty((len(positions), self.res, self.res, 3), dtype=torch.uint8,
                              pin_memory=gpu)
            dest = out.numpy()
            labels, rows = self._where(feed.subset, positions)
            # Runs of consecutive rows of one class: one slice copy each.
            cut = np.flatnonzero((np.diff(labels) != 0) | (np.diff(rows) != 1)) + 1
            for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(positions)]):
                c = int(labels[lo])
                if c not in maps:
                    maps[c] = np.load(self.path(c), mmap_mode="r")
                dest[lo:hi] = maps[c][rows[lo] : rows[lo] + hi - lo]
            y = torch.from_numpy(feed.subset.labels[positions])
            feed.tick("read cache")
            if gpu:
                with on_stream(feed.stream):
                    out = out.to(feed.device, non_blocking=True)
                    y = y.pin_memory().to(feed.device, non_blocking=True)
            yield out, y, 0

    def writer(self, subset: Subset) -> _Writer:
        return _Writer(self, subset)


class _Writer:
    """Fills an eval cache from the decoded batches it is shown (`decode.Decoder.batches`'s tee): a
    class file is renamed into place once all its images are written; `close()` drops the
    unfinished ones."""

    def __init__(self, cache: EvalCache, subset: Subset):
        self.cache, self.subset = cache, subset
        self.open: dict[int, tuple[np.ndarray, np.ndarray, Path]] = {}  # file, rows written, tmp
        cache.dir.mkdir(parents=True, exist_ok=True)
        remove_dead_partials(cache.dir)  # classes a process that died never finished
        if not (cache.dir / ABOUT).is_file():  # what `dptrain cache` says the entry holds
            write_json(cache.dir / ABOUT, {"data": str(cache.index.root.resolve()),
                                           "res": cache.res, "eval_resize": cache.eval_resize})

    def __call__(self, positions: np.ndarray, images: torch.Tensor) -> None:
        pixels = images.cpu().numpy()
        labels, rows = self.cache._where(self.subset, positions)
        for c in np.unique(labels).tolist():
            final = self.cache.path(c)
            if c not in self.open:
                if final.is_file():
                    continue
                tmp = partial_path(final)
                count = int(self.cache.index.counts[c])
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                  shape=(count, *pixels.shape[1:]))
                self.open[c] = (array, np.zeros(count, bool), tmp)
            array, written, tmp = self.open[c]
            mine = labels == c
            array[rows[mine]] = pixels[mine]
            written[rows[mine]] = True
            if written.all():
                array.flush()
                del self.open[c], array
                publish(tmp, final)

    def close(self) -> None:
        for _array, _written, tmp in self.open.values():
            tmp.unlink(missing_ok=True)
        self.open.clear()


def entries(root: Path) -> list[dict]:
    """The eval cache entries under `root` (`dptrain cache`): each one's folder, shard set,
    res, class files, bytes and when it was last written, oldest first."""
    found = []
    for entry in sorted((root / "eval").glob("*/")) if (root / "eval").is_dir() else []:
        files = list(entry.glob("*.npy"))
        try:
            about = json.loads((entry / ABOUT).read_text())
        except (OSError, ValueError):
            about = {}  # an entry made before about.json, or one whose writer died first
        found.append({"path": str(entry), "data": about.get("data"), "res": about.get("res"),
                      "classes": len(files), "bytes": sum(f.stat().st_size for f in files),
                      "written": max((f.stat().st_mtime for f in files),
                                     default=entry.stat().st_mtime)})
    return sorted(found, key=lambda e: e["written"])
