"""The pixel cache (pixelcache) and the eval cache (evalcache), on the CPU. The kill -9
resume tests in test_train.py run with the pixel cache too."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICES, make_shard_set, run_here, tree_bytes

from dptrain.common.errors import DataError
from dptrain.common.runfolder import RunFolder
from dptrain.data.index import ShardIndex
from dptrain.data.subset import select
from dptrain.loading import pixelcache
from dptrain.loading.evalcache import EvalCache
from dptrain.loading.loader import Loader
from dptrain.loading.transforms import crop_windows, filter_weights, fit_size, resample, resize
from dptrain.training.config import make_config
from dptrain.training.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texture) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("cache"), texture, 6, 20, (64, 48))


def _cache(subset, side, device="cpu", world=1, rank=0, mode="auto"):
    """A rank's pixel cache, empty: the first loader that reads it fills it."""
    cache, record = pixelcache.prepare(subset, mode=mode, side=side, seed=0, rank=rank,
                                       world=world, device=torch.device(device), threads=2)
    assert cache is not None, record
    return cache, record


@pytest.mark.parametrize("device", DEVICES)
def test_cached_batches_are_the_streamed_ones_at_full_size(shards, device):
    """Stored whole (side >= the images' own), every epoch's batches, at two resolutions (as
    progressive resizing reads them), are the streamed batches: bit for bit on the CPU, where
    both paths resize with the same kernel; within rounding on a GPU (a batched resample)."""
    s = select(ShardIndex.load(shards), 6, 20, seed=0)
    cache, record = _cache(s, side=64, device=device)
    assert record.where == ("host" if device == "cpu" else "gpu") and record.images == 120
    assert record.shrunk == 0 and "120 images at <= 64 px, 0 of them shrunk" in record.line()
    assert record.gb == pytest.approx(120 * 48 * 64 * 3 / 1e9) and not cache.filled.any()
    for res in (32, 48):
        streamed = Loader(s, batch_size=16, train=True, res=res, seed=3, device=device)
        cached = Loader(s, batch_size=16, train=True, res=res, seed=3, device=device,
                        source=cache)
        for epoch in (0, 1):
            streamed.set_epoch(epoch)
            cached.set_epoch(epoch)
            pairs = list(zip(streamed, cached, strict=True))
            assert len(pairs) == 7
            for (x, y), (u, v) in pairs:
                assert torch.equal(y, v)
                if device == "cpu":
                    assert torch.equal(x, u)
                else:
                    assert (x.float() - u.float()).abs().mean() < 0.5
        assert cache.full and record.filled(cache).fill_img_per_s > 0  # in the first epoch
        assert cached.bytes_read == 0 < streamed.bytes_read
        streamed.close()
        cached.close()


def test_a_smaller_side_stores_shrunk_images_and_scales_the_windows(shards):
    s = select(ShardIndex.load(shards), 2, 5, seed=0)
    cache, record = _cache(s, side=32)
    assert cache.height.tolist() == [24] * 10 and cache.width.tolist() == [32] * 10  # 64x48
    assert cache.pixels.shape == (240, 32, 3) and record.gb == pytest.approx(240 * 32 * 3 / 1e9)
    assert record.shrunk == 10
    slots = np.arange(10)
    whole = cache.windows(slots, np.zeros((10, 2), int), np.tile([48, 64], (10, 1)))
    assert [a.tolist() for a in whole] == [[0] * 10, [0] * 10, [24] * 10, [32] * 10]
    y, x, h, w = cache.windows(slots[:1], np.array([[10, 20]]), np.array([[20, 30]]))
    assert (y[0], x[0], h[0], w[0]) == (5, 10, 10, 15)  # halved
    images, _ = next(iter(Loader(s, batch_size=4, train=True, res=16, source=cache)))
    assert images.shape == (4, 16, 16, 3) and images.dtype == torch.uint8
    h, w = fit_size(np.array([100, 30, 10]), np.array([50, 90, 10]), 40)
    assert h.tolist() == [40, 13, 10] and w.tolist() == [20, 40, 10]  # never enlarged


def test_batched_resample_is_the_per_image_kernel_within_rounding(texture):
    """What a GPU crops with (one batched resample) against what the CPU does (torch's kernel,
    per image): within 1 of 255 everywhere, 0.5 on average (the eval-parity bound)."""
    import io

    from PIL import Image

    from dptrain.data.imagenet_like import jpeg

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(np.array(Image.open(io.BytesIO(
        jpeg(texture, 0, c, i, width=120, height=90))).convert("RGB"))) for c in range(2)
        for i in range(8)]
    for res in (24, 64, 160):  # shrinking, about even, enlarging
        anchor, shape, flips = crop_windows(np.full(16, 90), np.full(16, 120), rng)
        crops = [im[a:a + h, b:b + w] for im, (a, b), (h, w) in zip(images, anchor, shape)]
        padded = torch.zeros((16, 90, 120, 3), dtype=torch.uint8)
        for i, c in enumerate(crops):
            padded[i, :c.shape[0], :c.shape[1]] = c
        ours = resample(padded, torch.as_tensor(shape[:, 0]), torch.as_tensor(shape[:, 1]),
                        torch.as_tensor(flips), res)
        diff = (ours.int() - resize(crops, res, flips=flips).int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.5, res
    w = filter_weights(torch.tensor([10, 3]), 5, 12)
    assert torch.allclose(w.sum(2), torch.ones(2, 5)) and (w[:, :, 10:] == 0).all()
    assert (w[1, :, 3:] == 0).all()  # nothing past a line's end


def test_a_cache_that_does_not_fit_falls_back_to_streaming(shards, tmp_path, monkeypatch):
    """With too little memory the run streams, says so, and trains as it would have."""
    monkeypatch.setattr(pixelcache, "host_bytes_available", lambda: 100_000)  # 0.1 MB
    lines = []
    cfg = make_config("fast", data=str(shards), classes=4, per_class=8, batch_size=16, res=32,
                      epochs=1, warmup_epochs=0, device="cpu", workers=2, log_every=1,
                      pixel_cache="host")  # no warm-up: a run all warm-up is warned about first
    s = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    assert s["pixel_cache"]["where"] == "off" and "not in host memory" in s["pixel_cache"]["why"]
    assert lines[0].startswith("pixel cache: off") and "streaming" in lines[0]
    monkeypatch.undo()
    fits = train(cfg, tmp_path / "run2", progress=False, log=lines.append)
    assert fits["pixel_cache"]["where"] == "host" and fits["pixel_cache"]["fill_s"] > 0
    assert fits["train_loss"] == s["train_loss"]  # stored whole: the same run either way
    assert pixelcache.decide("off", 1, torch.device("cpu"))[0] == "off"


def test_auto_goes_to_the_gpu_then_pinned_host_memory_then_streams(monkeypatch):
    """`--pixel-cache auto` on a GPU: the GPU while the cache fits beside the training step (its
    measured peak + 25% + 2 GiB), else pinned host memory within half of what is available,
    split between the machine's ranks, else streaming: never an out-of-memory crash. The
    device's and the host's free memory are made up here; the decision is the real one."""
    gib = 2**30
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * gib, 80 * gib))
    monkeypatch.setattr(pixelcache, "host_bytes_available", lambda: 64 * gib)
    step = 8 * gib  # 20 GiB free - (1.25 x 8 + 2) GiB kept: 8 GiB for a GPU cache
    assert pixelcache.decide("auto", 8 * gib, gpu, step)[0] == "gpu"
    where, why = pixelcache.decide("auto", 8 * gib + 1, gpu, step)
    assert where == "host" and why.startswith("not on the GPU (20.0 GiB free, 12.0 GiB kept")
    assert "fits in host memory (pinned) (32.0 GiB of 64.0 GiB available" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this machine share the host
    assert pixelcache.host_budget() == 8 * gib
    assert pixelcache.decide("auto", 8 * gib, gpu, 30 * gib)[0] == "host"
    where, why = pixelcache.decide("auto", 8 * gib + 1, gpu, 30 * gib)
    assert where == "off" and "not in host memory (8.0 GiB may be used)" in why
    assert pixelcache.decide("gpu", 8 * gib + 1, gpu, 30 * gib)[0] == "off"
    assert pixelcache.decide("host", 4 * gib, gpu, 0)[0] == "host"  # asked for: not the GPU


def test_pretrain_reports_its_cache_and_refuses_a_gpu_cache_without_a_gpu(shards, tmp_path):
    args = ["pretrain", "--data", shards, "--classes", 4, "--per-class", 8, "--epochs", 1,
            "--warmup-epochs", 0, "--res", 32, "--batch-size", 16, "--device", "cpu",
            "--no-progress"]  # no warm-up: a run all warm-up is warned about first
    p = run_here(*args, "--out", tmp_path / "run", "--pixel-cache-side", 32, check=True)
    assert p.stderr.startswith("pixel cache: host (") and "at <= 32 px" in p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pixel_cache"]["where"] == "host" and summary["pixel_cache"]["side"] == 32
    if not torch.cuda.is_available():
        p = run_here(*args, "--out", tmp_path / "r2", "--pixel-cache", "gpu")
        assert p.returncode == 2 and "--pixel-cache gpu needs a GPU" in p.stderr
        assert "Traceback" not in p.stderr
    # Where the pixels come from does not change what the run computes: a resume may differ.
    p = run_here(*args, "--out", tmp_path / "run", "--pixel-cache-side", 32, "--pixel-cache", "off",
                 check=True)
    assert "finished already" in p.stdout


def test_each_rank_caches_only_its_own_part(shards):
    s = select(ShardIndex.load(shards), 6, 20, seed=0)
    caches = [_cache(s, side=64, world=3, rank=r)[0] for r in range(3)]
    held = [set(np.flatnonzero(c.slot >= 0).tolist()) for c in caches]
    assert [len(h) for h in held] == [40] * 3 and not (held[0] & held[1] | held[1] & held[2])
    for rank, cache in enumerate(caches):  # every batch of that rank comes from its part
        loader = Loader(s, batch_size=8, train=True, res=16, rank=rank, world_size=3,
                        source=cache)
        for epoch in range(2):
            loader.set_epoch(epoch)
            assert sum(len(y) for _, y in loader) == 40
        loader.close()


# -- the eval cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_eval_cache_fills_once_then_serves_the_same_images(shards, tmp_path, device):
    index = ShardIndex.load(shards)
    s = select(index, class_names=index.class_names[:4])
    cache = EvalCache(tmp_path / "pixels", index, 32, 256 / 224)
    assert not cache.holds(s)
    kw = dict(batch_size=16, train=False, res=32, device=device)
    streamed = [x.clone() for x, _ in Loader(s, **kw)]
    first = Loader(s, **kw, source=cache)
    filled = [x.clone() for x, _ in first]
    first.close()
    assert cache.holds(s) and len(list(cache.dir.glob("*.npy"))) == 4
    assert not list(cache.dir.glob("*.partial"))
    again = Loader(s, **kw, source=cache)
    served = [(x.clone(), y.clone()) for x, y in again]
    assert served[0][0].device.type == served[0][1].device.type == device
    assert again.bytes_read == 0  # no JPEG read
    assert all(torch.equal(a, b) and torch.equal(a, c)
               for a, b, (c, _) in zip(streamed, filled, served))
    assert torch.cat([y for _, y in served]).tolist() == s.labels.tolist()
    if device != "cpu":
        return
    # Another class subset of the set reads the classes it shares, fills the others.
    other = select(index, class_names=index.class_names[2:])
    Loader(other, batch_size=16, train=False, res=32, source=cache).close()
    assert not cache.holds(other)
    list(Loader(other, batch_size=16, train=False, res=32, source=cache))
    assert cache.holds(other) and len(list(cache.dir.glob("*.npy"))) == 6


def test_an_interrupted_fill_leaves_no_half_class(shards, tmp_path):
    index = ShardIndex.load(shards)
    s = select(index)
    cache = EvalCache(tmp_path / "pixels", index, 32, 256 / 224)
    loader = Loader(s, batch_size=16, train=False, res=32, source=cache, prefetch=1)
    batches = iter(loader)
    next(batches)  # stopped early: the feeder has read a few batches ahead, not 120 images
    loader.close()
    assert not list(cache.dir.glob("*.partial"))  # unfinished classes are dropped
    done = sorted(cache.dir.glob("*.npy"))
    assert len(done) < 6 and all(np.load(f).shape == (20, 32, 32, 3) for f in done)
    dead = cache.dir / "00001.npy.999999999.partial"  # what a killed process leaves
    dead.write_bytes(b"half")
    list(Loader(s, batch_size=16, train=False, res=32, source=cache))
    assert cache.holds(s) and not dead.exists()


def test_a_changed_shard_set_is_never_served_from_a_cache(tmp_path, texture):
    out = make_shard_set(tmp_path / "set", texture, 3, 6, (48, 40))
    index = ShardIndex.load(out)
    root = tmp_path / "pixels"
    cache = EvalCache(root, index, 32, 256 / 224)
    list(Loader(select(index), batch_size=8, train=False, res=32, source=cache))
    tar = index.tar_paths[1]
    os.utime(tar)  # touched, not changed: hashed once more, and still served
    assert EvalCache(root, index, 32, 256 / 224).dir == cache.dir
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # one flipped byte, same size
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{tar.name} changed since the set was sharded.*"
                                        "dptrain verify"):
        EvalCache(root, index, 32, 256 / 224)
    tar.write_bytes(bytes(data[:-512]))  # cut short
    with pytest.raises(DataError, match="changed since the set was sharded"):
        EvalCache(root, index, 32, 256 / 224)


def test_probe_through_the_pixel_cache_on_a_read_only_set(tmp_path, texture):
    """A sweep's shard sets may be read-only: runs and probes only read them, and every cache
    goes to its own folder. The second probe (fresh feature cache) reads only the pixels."""
    train_set = make_shard_set(tmp_path / "train", texture, 4, 16, (48, 40))
    down = make_shard_set(tmp_path / "down", texture, 3, 10, (48, 40))
    test = make_shard_set(tmp_path / "test", texture, 3, 4, (48, 40), classes_from=down)
    for root in (train_set, down, test):
        for p in [*root.rglob("*"), root]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    sets = (train_set, down, test)
    before = {r: (tree_bytes(r), sorted(p.name for p in r.iterdir())) for r in sets}
    run = tmp_path / "run"
    pixels = tmp_path / "pixels"
    run_here("pretrain", "--data", train_set, "--classes", 4, "--per-class", 16, "--epochs", 1,
             "--res", 32, "--batch-size", 16, "--device", "cpu", "--no-progress",
             "--val-data", train_set, "--eval-cache", pixels, "--out", run, check=True)
    args = ["probe", run, "--data", down, "--test-data", test, "--repeats", 1, "--no-progress",
            "--eval-cache", pixels]
    first = run_here(*args, "--feature-cache", tmp_path / "f1", check=True)
    second = run_here(*args, "--feature-cache", tmp_path / "f2", check=True)
    assert "(0/2 cached)" in second.stdout  # features computed again, from cached pixels
    assert first.stdout.splitlines()[1].split()[:2] == second.stdout.splitlines()[1].split()[:2]
    assert len(list(pixels.glob("eval/*/*.npy"))) == 4 + 3 + 3  # validation's, the probe's
    after = {r: (tree_bytes(r), sorted(p.name for p in r.iterdir())) for r in sets}
    assert after == before  # nothing written into either set


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_caches_on_the_gpu_or_in_pinned_memory(shards, tmp_path):
    """On a GPU: the step's memory is measured and the cache goes on the GPU; a cache in
    pinned host memory gives the very batches the GPU cache gives."""
    from dataclasses import replace

    s = select(ShardIndex.load(shards), 6, 20, seed=0)
    on_gpu, record = _cache(s, side=48, device="cuda")
    in_host, host_record = _cache(s, side=48, device="cuda", mode="host")
    assert record.where == "gpu" and host_record.where == "host"
    assert in_host.pixels.is_pinned() and on_gpu.pixels.is_cuda
    for (x, y), (u, v) in zip(Loader(s, batch_size=16, train=True, res=32, device="cuda",
                                     source=on_gpu),
                              Loader(s, batch_size=16, train=True, res=32, device="cuda",
                                     source=in_host), strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)
    cfg = make_config("fast", data=str(shards), classes=6, per_class=20, batch_size=16, res=32,
                      epochs=2, device="cuda", log_every=1)
    lines = []
    summary = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    assert summary["pixel_cache"]["where"] == "gpu" and "kept for the training step" in lines[0]
    off = train(replace(cfg, pixel_cache="off"), tmp_path / "off", progress=False,
                log=lines.append)
    # The same crops, flips and order, cut from the GPU cache or decoded as they stream: the
    # two runs' losses agree step by step (within the two GPU decoders' chroma rounding).
    cached, streamed = ([r["loss"] for r in RunFolder(tmp_path / d).read_metrics()]
                        for d in ("run", "off"))
    assert off["pixel_cache"]["where"] == "off"
    assert len(cached) == len(streamed) == summary["steps"]
    assert np.allclose(cached, streamed, rtol=0.05), (cached, streamed)


def test_the_cache_command_lists_what_each_entry_holds_and_clears_them(shards, tmp_path):
    """`dptrain cache`: each eval cache entry's set, resolution, classes and size; --clear
    empties the folder, and the next probe fills it again."""
    run = tmp_path / "run"
    run_here("pretrain", "--data", shards, "--classes", 6, "--per-class", 8, "--epochs", 1,
             "--res", 32, "--batch-size", 16, "--device", "cpu", "--no-progress", "--out", run,
             check=True)
    probe = ["probe", run, "--data", shards, "--test-data", shards, "--repeats", 1,
             "--no-progress", "--eval-cache", tmp_path / "pixels"]
    run_here(*probe, check=True)
    listed = json.loads(run_here("cache", "--eval-cache", tmp_path / "pixels", "--json",
                                 check=True).stdout)
    (entry,) = listed["entries"]  # train and test are the same set: one entry
    assert (entry["data"], entry["res"], entry["classes"]) == (str(shards.resolve()), 32, 6)
    assert entry["bytes"] == listed["bytes"] == sum(
        f.stat().st_size for f in Path(entry["path"]).glob("*.npy")) > 6 * 20 * 32 * 32 * 3
    p = run_here("cache", "--eval-cache", tmp_path / "pixels", "--clear", check=True)
    assert p.stdout.splitlines()[-1].startswith(f"{tmp_path / 'pixels'}: 1 entry, ")
    assert "0 entries" in run_here("cache", "--eval-cache", tmp_path / "pixels").stdout
    run_here(*probe, "--feature-cache", tmp_path / "features", check=True)  # filled again
    assert len(json.loads(run_here("cache", "--eval-cache", tmp_path / "pixels", "--json",
                                   check=True).stdout)["entries"]) == 1
