"""The built-in two-step dataset: determinism, class structure, unseen downstream classes, the
shard writer it goes through, `tools/make_shards.py` and `dptrain pretrain` without --data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, tree_bytes
from PIL import Image

import dptrain.data.synthetic as synthetic
from dptrain.data.index import ShardIndex
from dptrain.data.synthetic import POOL, TEST, TRAIN, Generator, write_pool, write_tasks
from dptrain.data.verify import verify
from dptrain.probing.logreg import linear_probe

ROOT = Path(__file__).resolve().parent.parent


def stored(root: Path) -> dict[str, bytes]:
    """Every sample of a shard set, by key, read by (tar, offset, size) from its index."""
    index = ShardIndex.load(root)
    out = {}
    for tar, path in enumerate(index.tar_paths):
        blob = path.read_bytes()
        for row in index.samples[index.samples["tar"] == tar]:
            name = index.class_names[row["label"]]
            head = blob[row["offset"] - 512: row["offset"] - 512 + 100].split(b"\0")[0].decode()
            out[f"{name}/{head.split('_', 1)[1].split('.')[0]}"] = \
                blob[row["offset"]: row["offset"] + row["size"]]
    return out


def test_same_seed_same_bytes_and_larger_pool_keeps_images(tmp_path):
    gen = Generator(seed=3, res=24)
    write_pool(tmp_path / "a", 4, 6, gen, progress=False)
    write_pool(tmp_path / "b", 4, 6, gen, progress=False)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    small = stored(tmp_path / "a")
    assert len(small) == 24
    for key, data in small.items():  # image i of class c depends only on (seed, c, i)
        c, i = key.split("/")
        assert data == gen.jpeg(POOL, int(c[1:]), TRAIN, int(i))
    r = write_pool(tmp_path / "a", 6, 9, gen, progress=False)  # extend in place
    assert (r["classes"], r["per_class"], r["up_to_date"]) == (6, 9, False)
    big = stored(tmp_path / "a")
    assert len(big) == 54 and all(big[k] == v for k, v in small.items())
    assert write_pool(tmp_path / "a", 5, 5, gen, progress=False)["up_to_date"]
    other = Generator(seed=4, res=24)
    assert gen.jpeg(POOL, 0, TRAIN, 0) != other.jpeg(POOL, 0, TRAIN, 0)
    with pytest.raises(synthetic.DataError, match="other parameters"):
        write_pool(tmp_path / "a", 4, 6, other, progress=False)


def test_classes_are_structured_and_images_vary():
    gen = Generator(res=32)
    k, n = 4, 80
    x = np.stack([gen.pixels(POOL, c, TRAIN, i).ravel() for c in range(k) for i in range(n)])
    y = np.repeat(np.arange(k), n)
    for c in range(k):  # no two images of a class are the same
        assert len({row.tobytes() for row in x[y == c]}) == n
    test = np.stack([gen.pixels(POOL, c, TEST, i).ravel() for c in range(k) for i in range(30)])
    r = linear_probe(x.astype(np.float32), y, test.astype(np.float32), np.repeat(np.arange(k), 30),
                     repeats=1)
    assert r["top1_mean"] > 0.6  # raw pixels, 4 classes: chance is 0.25
    # no spread: every image of a class shares the class's outline, texture and colours,
    # so images of one class are closer to each other than the spread-out ones are
    tight = Generator(res=32, spread=0.0)
    a, b = (np.stack([g.pixels(POOL, 0, TRAIN, i).astype(float).ravel() for i in range(20)])
            for g in (tight, gen))
    assert a.std(0).mean() < b.std(0).mean()


def test_downstream_classes_are_unseen_and_writer_is_the_librarys(tmp_path, monkeypatch):
    calls = []
    real = synthetic.write_source
    monkeypatch.setattr(synthetic, "write_source",
                        lambda src, out, **kw: calls.append(out) or real(src, out, **kw))
    gen = Generator(res=16)
    write_pool(tmp_path / "pretrain", 5, 4, gen, progress=False)
    suite = write_tasks(tmp_path, (3, 4), train=5, test=2, gen=gen, progress=False)
    assert len(calls) == 1 + 2 * 2  # the pool and each task's two splits: all by write_source
    pool = ShardIndex.load(tmp_path / "pretrain")
    assert pool.meta["source_format"] == "synthetic" and verify(tmp_path / "pretrain") == []
    seen = set(pool.class_names)
    latents = {tuple(gen.class_latent(POOL, c)) for c in range(5)}
    text = suite.read_text()
    for t, k in ((1, 3), (2, 4)):
        train = ShardIndex.load(tmp_path / "tasks" / f"t{t}" / "train")
        test = ShardIndex.load(tmp_path / "tasks" / f"t{t}" / "test")
        assert train.class_names == test.class_names and not seen & set(train.class_names)
        assert list(train.counts) == [5] * k and list(test.counts) == [2] * k
        assert not latents & {tuple(gen.class_latent(t, c)) for c in range(k)}
        assert f'data = "tasks/t{t}/train"' in text
    # train and test images of a task differ
    assert not set(stored(tmp_path / "tasks/t1/train").values()) & \
        set(stored(tmp_path / "tasks/t1/test").values())


def test_make_shards_tool_and_pretrain_default_data(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "make_shards.py")]
    p = subprocess.run([*tool, "--tasks", "3,x"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "comma-separated" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([*tool, "--res", "500"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "8<=x<=224" in p.stderr
    p = subprocess.run([*tool, "--classes", "4", "--per-class", "5", "--tasks", "2,3",
                        "--task-train", "4", "--task-test", "2", "--res", "16", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "4 classes x 5 images of 16x16" in p.stdout
    pool = tmp_path / "shards/synthetic/pretrain"
    assert ShardIndex.load(pool).meta["num_samples"] == 20
    # pretrain without --data: the built-in pool, extended to the run's K x n, its generator kept
    p = run_cli("pretrain", "--classes", "5", "--per-class", "6", "--epochs", "1",
                "--batch-size", "10", "--no-progress", "--out", "run", cwd=tmp_path)
    assert "built the synthetic pool" in p.stderr and "5 classes x 6 images" in p.stderr
    meta = ShardIndex.load(pool).meta
    assert meta["num_samples"] == 30 and json.loads(meta["source"])["generator"]["res"] == 16
    config = json.loads((tmp_path / "run/config.json").read_text())["config"]
    assert config["recipe"] == "synthetic" and config["arch"] == "smallcnn"
    assert (tmp_path / config["data"]).resolve() == pool.resolve()
    p = run_cli("probe", "run", "--suite", "shards/synthetic/suite.toml", "--repeats", "1",
                "--random-init", cwd=tmp_path)
    assert "random-init top-1" in p.stdout
    probe = json.loads((tmp_path / "run/probe.json").read_text())
    assert set(probe["random_init"]) == set(probe["datasets"]) == {"synthetic-t1", "synthetic-t2"}


def test_jpeg_is_what_pixels_encode():
    gen = Generator(res=20)
    im = Image.open(io.BytesIO(gen.jpeg(POOL, 1, TRAIN, 2)))
    assert im.size == (20, 20) and im.mode == "RGB"
    diff = np.abs(np.asarray(im, float) - gen.pixels(POOL, 1, TRAIN, 2)).mean()
    assert diff < 6
