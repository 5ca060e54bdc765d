"""Sources holding train and test splits: CIFAR python pickles, and train/ + test/ folders."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import make_imagefolder, run_cli
from PIL import Image
from test_shards import read_samples

from dptrain.data.index import ShardIndex

NAMES = ["zebra", "apple", "moose"]  # not sorted: CIFAR's own ids must survive


def smooth(i: int) -> np.ndarray:
    """A 32x32 RGB gradient (JPEG keeps it nearly exact), different per image (i < 40)."""
    yy, xx = np.mgrid[0:32, 0:32]
    return np.stack([xx * 4 + i, yy * 4 + 2 * i, np.full((32, 32), 5 * i)], -1).astype(np.uint8)


def cifar_batch(images: list[np.ndarray], labels: list[int], key: bytes) -> dict:
    data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])  # channel-major rows
    return {b"data": data, key: labels, b"batch_label": b"test"}


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


class RunsCode:
    """A pickle that, when loaded by a plain unpickler, creates a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("payload, message", [
    ("code", "refused (loading it could run code)"),
    ("list", "is not a CIFAR file: no label_names"),
    ("garbage", "cannot read CIFAR file"),
])
def test_cifar_files_are_loaded_safely(tmp_path, payload, message):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    planted = tmp_path / "planted"
    meta = {"code": {b"label_names": [b"a"], b"x": RunsCode(planted)}, "list": [1, 2]}
    if payload == "garbage":
        (src / "batches.meta").write_bytes(b"\x80\x04not a pickle at all")
    else:
        write_pickle(src / "batches.meta", meta[payload])
    write_pickle(src / "test_batch", cifar_batch([smooth(0)], [0], b"labels"))
    p = run_cli("shard", src, tmp_path / "out", "--no-progress", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert message in p.stderr and "batches.meta" in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2  # click's "Error: ..." line (and usage)
    assert not planted.exists()  # nothing the pickle named was run


@pytest.mark.parametrize("kind", ["cifar-10", "cifar-100"])
def test_cifar_pickles_round_trip(tmp_path, kind):
    src = tmp_path / ("cifar-10-batches-py" if kind == "cifar-10" else "cifar-100-python")
    src.mkdir()
    train = [(smooth(i), i % 3) for i in range(12)]
    test = [(smooth(20 + i), (i + 1) % 3) for i in range(6)]
    if kind == "cifar-10":
        key = b"labels"
        write_pickle(src / "batches.meta", {b"label_names": [n.encode() for n in NAMES]})
        write_pickle(src / "data_batch_1", cifar_batch(*zip(*train[:8]), key))
        write_pickle(src / "data_batch_2", cifar_batch(*zip(*train[8:]), key))
        write_pickle(src / "test_batch", cifar_batch(*zip(*test), key))
    else:
        key = b"fine_labels"
        write_pickle(src / "meta", {b"fine_label_names": [n.encode() for n in NAMES]})
        write_pickle(src / "train", cifar_batch(*zip(*train), key))
        write_pickle(src / "test", cifar_batch(*zip(*test), key))
    out = tmp_path / "out"
    p = run_cli("shard", src, out, "--no-progress")
    assert "out/train" in p.stdout and "out/test" in p.stdout
    for split, expected in (("train", train), ("test", test)):
        index = ShardIndex.load(out / split)
        assert index.class_names == NAMES and index.meta["split"] == split
        assert "quality 95" in index.meta["source_encoding"]
        assert index.counts.tolist() == np.bincount([label for _, label in expected],
                                                        minlength=3).tolist()
        stored = read_samples(out / split)
        assert len(stored) == len(expected)
        # Every image is stored once, with its label, and decodes to its pixels.
        for image, label in expected:
            diffs = [np.abs(np.asarray(Image.open(io.BytesIO(d)), np.int16) - image).mean()
                     for _, d, lab in stored if lab == label]
            assert min(diffs) < 1.5  # quality 95 with 4:4:4 chroma: ~0.6 of 255
    assert "cifar" in run_cli("info", out / "test").stdout
    p = run_cli("info", out, check=False)  # the parent: it says where the sets are
    assert p.returncode == 2 and "holds the shard sets test, train" in p.stderr


def test_train_test_folders(tmp_path, texture):
    src = tmp_path / "flowers"
    make_imagefolder(src / "train", texture, classes=3, per_class=4, bad=False)
    make_imagefolder(src / "test", texture, classes=3, per_class=2, bad=False)
    for p in (src / "test" / "class_0").iterdir():
        p.unlink()
    (src / "test" / "class_0").rmdir()  # the test split lacks a class: ids must still match
    out = tmp_path / "out"
    run_cli("shard", src, out, "--no-progress")
    train, test = ShardIndex.load(out / "train"), ShardIndex.load(out / "test")
    assert train.class_names == test.class_names == ["class_0", "class_1", "class_2"]
    assert train.counts.tolist() == [4, 4, 4] and test.counts.tolist() == [0, 2, 2]
    assert test.meta["split"] == "test" and test.meta["source_format"] == "splits"
    p = run_cli("shard", src, tmp_path / "o2", "--classes-from", out / "train", check=False)
    assert p.returncode == 2 and "train and test splits" in p.stderr
