"""Choose a K-class x n-per-class subset of a shard set: rows of its sample table, no tar opened.

Classes come from a seeded permutation (the first K of it) and samples are the first n stored
of each class, which the writer stored in a seeded random order. So subsets are uniform and
nested: for one seed, the (K, n) subset holds every (K', n') subset with K' <= K and n' <= n.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from ..common.errors import DataError
from .index import ShardIndex


@dataclass(frozen=True, eq=False)
class Subset:
    index: ShardIndex
    classes: np.ndarray  # label ids in the shard set, in subset-label order (0..K-1)
    rows: np.ndarray  # rows of index.samples, grouped by subset label
    labels: np.ndarray  # subset label of each row
    per_class: int | None  # n asked for (None: all of each class)
    seed: int
    allow_fewer: bool

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        names = self.index.class_names
        return [names[c] for c in self.classes]

    @property
    def nbytes(self) -> int:
        """JPEG bytes in the subset: what one epoch must read."""
        return int(self.index.samples["size"][self.rows].sum(dtype=np.int64))

    def take(self, positions: np.ndarray) -> Subset:
        """The samples at these positions, with their labels (a rank's part of the subset)."""
        return replace(self, rows=self.rows[positions], labels=self.labels[positions])

    def describe(self) -> dict:
        """What a run records about its data (config.json): enough to rebuild the subset."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {"shards": str(self.index.root), "classes": self.num_classes,
                "per_class": self.per_class, "seed": self.seed, "allow_fewer": self.allow_fewer,
                "num_samples": len(self), "per_class_min": int(counts.min()),
                "class_names": self.class_names,
                "fingerprint": hashlib.sha256(self.rows.tobytes()).hexdigest()[:16],
                "index_sha256": self.index.meta["samples_sha256"]}


def read_class_list(path: str) -> list[str]:
    """Class names, one per line (blank lines and `#` comments ignored)."""
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read class list {path}: {e.strerror or e}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"class list {path} names no class")
    return names


def _class_order(index: ShardIndex, seed: int) -> np.ndarray:
    nonempty = np.flatnonzero(index.counts > 0)
    return nonempty[np.random.default_rng((seed, 0)).permutation(len(nonempty))]


def select(index: ShardIndex, classes: int | None = None, per_class: int | None = None, *,
           seed: int = 0, class_names: list[str] | None = None,
           allow_fewer: bool = False) -> Subset:
    """The subset of `classes` classes (seeded choice, or `class_names`) x `per_class` samples.

    Limits are checked here, with errors that name the largest allowed values.
    """
    counts = index.counts
    available = int((counts > 0).sum())
    if class_names is not None:
        ids = {n: i for i, n in enumerate(index.class_names)}
        unknown = [n for n in class_names if n not in ids]
        if unknown:
            raise DataError(f"{len(unknown)} class name(s) not in {index.root} "
                            f"(e.g. {unknown[:3]}); see `dptrain info {index.root}`")
        if len(set(class_names)) != len(class_names):
            raise DataError("the class list names a class twice")
        if classes is not None and classes != len(class_names):
            raise DataError(f"--classes {classes} differs from the {len(class_names)} listed "
                            "classes")
        chosen = np.array([ids[n] for n in class_names], dtype=np.int64)
        empty = [n for n, c in zip(class_names, chosen) if counts[c] == 0]
        if empty:
            raise DataError(f"listed class(es) with no images in {index.root}: {empty[:3]}")
    else:
        k = available if classes is None else classes
        if not 1 <= k <= available:
            raise DataError(f"--classes {k} is not possible: {index.root} has {available} "
                            f"classes with images (allowed: 1..{available})")
        chosen = _class_order(index, seed)[:k]
    have = counts[chosen]
    if per_class is not None:
        if per_class < 1:
            raise DataError(f"--per-class must be at least 1, not {per_class}")
        smallest = int(have.min())
        if per_class > smallest and not allow_fewer:
            name = index.class_names[int(chosen[int(have.argmin())])]
            raise DataError(
                f"--per-class {per_class} is more than the smallest of the {len(chosen)} chosen "
                f"classes has ({name}: {smallest} images): allowed 1..{smallest}, or "
                f"--allow-fewer to keep all images of smaller classes")
        take = np.minimum(have, per_class)
    else:
        take = have
    start = index.class_start[chosen]
    rows = np.concatenate([np.arange(s, s + t) for s, t in zip(start, take)]).astype(np.int64)
    labels = np.repeat(np.arange(len(chosen)), take).astype(np.int64)
    return Subset(index, chosen, rows, labels, per_class, seed, allow_fewer)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1,
                    drop_last: bool = True) -> int:
    """Batches each rank gets per epoch; the same on every rank, so no rank waits on another."""
    per_rank = num_samples // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def rank_part(num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The positions in the subset that this rank trains on, the same in every epoch (sorted):
    all of them for one rank; for several, equal, disjoint parts of a seeded permutation (the
    remainder is left out). Fixed for the run, so that a rank's pixel cache holds every image
    the rank will see, and only those."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if world_size == 1:
        return np.arange(num_samples)
    per_rank = num_samples // world_size
    order = np.random.default_rng((seed, 2)).permutation(num_samples)
    return np.sort(order[rank * per_rank : (rank + 1) * per_rank])


def epoch_order(num_samples: int, *, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1, keys: np.ndarray | None = None) -> np.ndarray:
    """This rank's positions in the subset for one epoch: its part (`rank_part`) shuffled,
    seeded by (seed, epoch) and, with several ranks, the rank. With `keys` (each position's
    row in the shard set: `Subset.rows`), sorted by a number drawn for each row from (seed,
    epoch) instead: two subsets of one shard set then meet the images they share in the same
    order (--order keyed)."""
    part = rank_part(num_samples, seed=seed, rank=rank, world_size=world_size)
    if keys is not None:  # the draws of rows 0..max: a row's number is the same in any subset
        drawn = np.random.default_rng((seed, 1, epoch)).random(int(keys.max()) + 1)
        return part[np.argsort(drawn[keys[part]], kind="stable")]
    key = (seed, 1, epoch) if world_size == 1 else (seed, 1, epoch, rank)
    return part[np.random.default_rng(key).permutation(len(part))]
