"""Subset selection: exact counts, nesting, seeds, limits, epoch shuffles and rank splits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_imagefolder

from dptrain.common.errors import DataError
from dptrain.data.index import ShardIndex
from dptrain.data.shards import shard_dataset
from dptrain.data.subset import epoch_order, rank_part, read_class_list, select, steps_per_epoch


@pytest.fixture(scope="module")
def index(tmp_path_factory, texture) -> ShardIndex:
    """10 classes of 12..30 images (class c has 12 + 2c)."""
    root = tmp_path_factory.mktemp("subset")
    src = make_imagefolder(root / "src", texture, classes=10, per_class=30, size=(32, 24),
                           bad=False)
    for c in range(10):
        for i in range(12 + 2 * c, 30):
            (src / f"class_{c}" / f"img_{c}_{i}.JPEG").unlink()
    shard_dataset(src, root / "out", progress=False)
    return ShardIndex.load(root / "out")


def keys(subset) -> set[tuple[int, int]]:
    """(original label, row) pairs: what a subset holds."""
    return set(zip(subset.classes[subset.labels].tolist(), subset.rows.tolist()))


def test_exact_counts_and_labels(index):
    s = select(index, 4, 10, seed=0)
    assert len(s) == 40 and s.num_classes == 4
    assert np.bincount(s.labels).tolist() == [10] * 4
    table = index.samples[s.rows]
    assert np.array_equal(table["label"], s.classes[s.labels])  # labels map back to the index
    # The first n stored samples of each chosen class.
    for k, c in enumerate(s.classes):
        rows = s.rows[s.labels == k]
        assert rows.tolist() == list(range(index.class_start[c], index.class_start[c] + 10))
    assert s.nbytes == int(table["size"].sum())
    assert select(index).num_classes == 10 and len(select(index)) == index.meta["num_samples"]


def test_nested_and_seeded(index):
    big = select(index, 8, 12, seed=3)
    for k, n in [(1, 1), (3, 5), (8, 12), (5, 12), (8, 2)]:
        small = select(index, k, n, seed=3)
        assert keys(small) <= keys(big), (k, n)
        assert small.classes.tolist() == big.classes[:k].tolist()
    chosen = {seed: select(index, 5, 4, seed=seed).classes.tolist() for seed in (3, 4)}
    assert select(index, 5, 4, seed=3).classes.tolist() == chosen[3] != chosen[4]


def test_class_list(index, tmp_path):
    names = ["class_7", "class_2"]
    listing = tmp_path / "classes.txt"
    listing.write_text("# chosen by hand\nclass_7\n\nclass_2  # second\n")
    assert read_class_list(str(listing)) == names
    with pytest.raises(DataError, match="names no class"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        read_class_list(str(tmp_path / "empty.txt"))
    s = select(index, per_class=5, class_names=names)
    assert s.class_names == names and s.classes.tolist() == [7, 2]
    with pytest.raises(DataError, match="class_99"):
        select(index, class_names=["class_99"])
    with pytest.raises(DataError, match="differs"):
        select(index, 3, class_names=names)


def test_limits_name_the_largest_allowed_values(index):
    with pytest.raises(DataError, match=r"--classes 11 .*\(allowed: 1\.\.10\)"):
        select(index, 11, 5)
    with pytest.raises(DataError, match=r"--per-class 13 .*class_0: 12 images.*allowed 1\.\.12"):
        select(index, 10, 13)
    s = select(index, 10, 20, allow_fewer=True)
    assert np.bincount(s.labels, minlength=10)[s.classes.argsort()].tolist() == [
        min(12 + 2 * c, 20) for c in range(10)]
    assert s.describe()["allow_fewer"] is True


def test_selection_is_index_only():
    """1.28 M samples, 1000 classes: selecting 500 x 256 opens no tar. (How fast it is, a few
    milliseconds, is benchmarks/subset_io.py's to measure, not a test's.)"""
    from dptrain.data.index import SAMPLE_DTYPE

    counts = np.random.default_rng(0).integers(732, 1301, 1000)
    samples = np.zeros(int(counts.sum()), SAMPLE_DTYPE)
    samples["label"] = np.repeat(np.arange(1000), counts)
    meta = {"classes": [{"name": f"n{c:08d}", "count": int(n)} for c, n in enumerate(counts)],
            "tars": [], "samples_sha256": "x"}
    index = ShardIndex(None, meta, samples)  # no files behind it: nothing can be opened
    s = select(index, 500, 256, seed=0)
    assert len(s) == 500 * 256


def test_epoch_shuffle_mixes_classes(index):
    s = select(index, 8, 12, seed=0)
    order = epoch_order(len(s), seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(len(s)))
    batches = [s.labels[order[i : i + 32]] for i in range(0, len(order) - 31, 32)]
    assert all(len(set(b.tolist())) > 1 for b in batches)
    assert not np.array_equal(order, epoch_order(len(s), seed=0, epoch=1))
    assert np.array_equal(order, epoch_order(len(s), seed=0, epoch=0))


def test_a_keyed_order_meets_the_images_two_subsets_share_in_the_same_order(index):
    """--order keyed: nested subsets (8 x 10 inside 10 x 12) see their shared rows in one
    order, and each image in the same place relative to the others; each epoch reorders;
    the shuffled order (a permutation of positions) shares nothing of the kind."""
    small, large = select(index, 8, 10, seed=0), select(index, 10, 12, seed=0)
    shared = set(small.rows.tolist())

    def rows(subset, epoch, keyed=True):
        order = epoch_order(len(subset), seed=0, epoch=epoch,
                            keys=subset.rows if keyed else None)
        assert sorted(order.tolist()) == list(range(len(subset)))
        return [r for r in subset.rows[order].tolist() if r in shared]

    assert rows(small, 0) == rows(large, 0) != rows(small, 1) == rows(large, 1)
    assert rows(small, 0, keyed=False) != rows(large, 0, keyed=False)
    label = dict(zip(small.rows.tolist(), small.labels.tolist()))
    seen = [label[r] for r in rows(small, 0)]
    assert all(len(set(seen[i:i + 32])) > 1 for i in range(0, 96, 32))  # still mixes classes
    # with ranks: each rank's fixed part, in the keyed order
    parts = [epoch_order(len(large), seed=0, epoch=0, rank=r, world_size=2, keys=large.rows)
             for r in (0, 1)]
    for r, part in enumerate(parts):
        assert sorted(part.tolist()) == rank_part(len(large), seed=0, rank=r,
                                                  world_size=2).tolist()


def test_rank_parts_disjoint_equal_fixed_and_reshuffled():
    n, world = 103, 4
    parts = [epoch_order(n, seed=1, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert all(len(p) == n // world for p in parts)
    together = np.concatenate(parts)
    assert len(set(together.tolist())) == len(together) == 4 * 25  # disjoint; 3 left out
    # Each rank keeps its part for the whole run (its pixel cache holds just that part) and
    # reads it in a new order every epoch.
    for r in range(world):
        later = epoch_order(n, seed=1, epoch=3, rank=r, world_size=world)
        assert sorted(later.tolist()) == sorted(parts[r].tolist())
        assert not np.array_equal(later, parts[r])
        assert np.array_equal(np.sort(later), rank_part(n, seed=1, rank=r, world_size=world))
    assert not np.array_equal(np.sort(together), np.arange(4 * 25))  # a seeded choice
    assert np.array_equal(rank_part(n, seed=1), np.arange(n))  # one rank: everything
    assert steps_per_epoch(n, 8, world) == 3 and steps_per_epoch(n, 8, world, drop_last=False) == 4
    with pytest.raises(ValueError):
        epoch_order(n, seed=1, epoch=0, rank=4, world_size=4)
