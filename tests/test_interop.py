"""Our shards are plain WebDataset: webdataset, DALI (CPU-only), tarfile and GNU tar read them."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_shards import read_samples

from dptrain.data.index import ShardIndex, idx_name
from dptrain.data.shards import ShardOptions, shard_dataset


@pytest.fixture
def shards(folder, tmp_path) -> Path:
    out = tmp_path / "out"
    # A small shard size so that classes span several tars.
    shard_dataset(folder, out, options=ShardOptions(shard_size=20_000), progress=False)
    return out


def expected(out: Path) -> Counter:
    return Counter((data, label) for _, data, label in read_samples(out))


def test_webdataset_reads_every_sample(shards):
    import webdataset as wds

    index = ShardIndex.load(shards)
    urls = [str(p) for p in index.tar_paths]
    got = Counter((s["jpg"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False))
    assert got == expected(shards)
    assert sum(got.values()) == index.meta["num_samples"]


def test_dali_cpu_reader_uses_our_idx(shards):
    from nvidia.dali import fn, pipeline_def

    index = ShardIndex.load(shards)
    tars = [str(p) for p in index.tar_paths]
    idxs = [str(p.with_name(idx_name(p.name))) for p in index.tar_paths]
    batch = 4

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls"],
                                         missing_component_behavior="error", name="reader")
        return jpg, cls, fn.decoders.image(jpg, device="cpu")

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    assert n == index.meta["num_samples"]
    got = []
    for _ in range(math.ceil(n / batch)):
        jpgs, clss, images = p.run()
        for j in range(batch):
            image = np.array(images.at(j))
            assert image.ndim == 3 and image.shape[2] == 3  # DALI decodes every stored image
            got.append((np.array(jpgs.at(j)).tobytes(), int(np.array(clss.at(j)).tobytes())))
    assert Counter(got[:n]) == expected(shards)  # the last batch wraps around; count one epoch


def test_tar_tools_and_wds2idx(shards, tmp_path):
    index = ShardIndex.load(shards)
    for tar in index.tar_paths:
        listing = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert len(listing) == 2 * next(t["samples"] for t in index.meta["tars"]
                                        if t["file"] == tar.name)
        # DALI's own indexer, run on our tar, writes exactly the index we wrote.
        ref = tmp_path / "ref.idx"
        wds2idx = Path(sys.executable).with_name("wds2idx")
        subprocess.run([str(wds2idx), str(tar), str(ref)], check=True, capture_output=True)
        assert ref.read_bytes() == tar.with_name(idx_name(tar.name)).read_bytes()


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_extracts_the_same_bytes(shards, tmp_path):
    dest = tmp_path / "x"
    dest.mkdir()
    for tar in ShardIndex.load(shards).tar_paths:
        subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
    got = Counter((p.read_bytes(), int((p.with_suffix(".cls")).read_text()))
                  for p in dest.glob("*.jpg"))
    assert got == expected(shards)
