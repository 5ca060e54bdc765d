"""The DALI loader, CPU-only here (device_id=None); the same pipeline runs mixed on a GPU."""

from __future__ import annotations

import gc
import io
import time

import numpy as np
import pytest
import torch
from conftest import DEVICES, make_imagefolder, make_shard_set
from PIL import Image

from dptrain.common.errors import DataError
from dptrain.data.index import ShardIndex
from dptrain.data.shards import shard_dataset
from dptrain.data.subset import select
from dptrain.loading.loader import EVAL_RESIZE, Loader
from dptrain.loading.transforms import batch_augmentation


@pytest.fixture(scope="module")
def index(tmp_path_factory, texture) -> ShardIndex:
    return ShardIndex.load(make_shard_set(tmp_path_factory.mktemp("loader"), texture, 8, 12,
                                          (96, 72)))


def epoch_labels(loader: Loader) -> list[torch.Tensor]:
    out = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (loader.res, loader.res, 3)
        assert labels.dtype == torch.int64 and len(labels) == len(images)
        out.append(labels.clone())
    return out


def test_train_epoch_mixes_classes_and_covers_subset(index):
    s = select(index, 8, 12, seed=0)
    # Batches of 8 from classes of 12: in the stored (class-sorted) order most batches would
    # hold one class; shuffled, a single-class batch has odds of ~3e-8.
    loader = Loader(s, batch_size=8, train=True, res=32, drop_last=False)
    assert len(loader) == 12
    for epoch in range(2):
        batches = epoch_labels(loader)
        assert len(batches) == 12
        assert all(len(set(b.tolist())) > 1 for b in batches)  # never a single-class batch
        assert torch.bincount(torch.cat(batches), minlength=8).tolist() == [12] * 8
    assert loader.epoch == 2


def test_bytes_read_in_one_epoch_equal_subset_bytes(index):
    s = select(index, 5, 7, seed=1)
    loader = Loader(s, batch_size=8, train=False, res=32)
    assert sum(len(b) for b in epoch_labels(loader)) == len(s) == 35
    assert loader.bytes_read == s.nbytes  # no byte outside the subset, none twice
    train = Loader(s, batch_size=8, train=True, res=32, drop_last=False)
    epoch_labels(train)
    assert train.bytes_read == s.nbytes


def test_maps_only_the_subsets_tars(index):
    s = select(index, 3, 4, seed=0)
    loader = Loader(s, batch_size=4, train=False, res=32)
    assert sum(len(b) for b in epoch_labels(loader)) == 12 and loader.bytes_read == s.nbytes
    assert len(loader._jpegs.tars[0].maps) == 3 < len(index.tar_paths)  # one tar per class here
    loader.close()


def test_raises_a_low_open_files_limit(index):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))  # below what the check keeps free
    try:
        loader = Loader(select(index, 2, 2), batch_size=4, train=False, res=32)
        next(iter(loader))  # the tars are mapped when something is first decoded
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2 + 1024
        loader.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_drop_last_and_len(index):
    s = select(index, 5, 7, seed=1)  # 35 samples
    assert len(Loader(s, batch_size=8, train=True, res=32)) == 4  # drops the last 3
    assert sum(len(b) for b in epoch_labels(Loader(s, batch_size=8, train=True, res=32))) == 32
    with pytest.raises(DataError, match="no full batch"):
        Loader(s, batch_size=64, train=True, res=32)


def test_same_seed_same_batches_and_resume_mid_epoch(index):
    s = select(index, 8, 12, seed=0)
    a = Loader(s, batch_size=16, train=True, res=32, seed=5)
    b = Loader(s, batch_size=16, train=True, res=32, seed=5)
    a.set_epoch(3)
    b.set_epoch(3, start_step=2)
    full, tail = epoch_labels(a), epoch_labels(b)
    assert len(full) == 6 and len(tail) == 4
    assert all(torch.equal(x, y) for x, y in zip(full[2:], tail))


def test_ranks_read_disjoint_equal_parts(index):
    s = select(index, 8, 12, seed=0)  # 96 samples
    loaders = [Loader(s, batch_size=8, train=True, res=32, rank=r, world_size=3) for r in range(3)]
    assert {len(x) for x in loaders} == {4}  # the same number of steps on every rank
    labels = [torch.cat(epoch_labels(x)) for x in loaders]
    assert torch.bincount(torch.cat(labels), minlength=8).tolist() == [12] * 8
    assert sum(x.bytes_read for x in loaders) == s.nbytes


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device, decode", [("cpu", "auto"), pytest.param("cuda", "gpu", marks=GPU),
                                            pytest.param("cuda", "cpu", marks=GPU)])
@pytest.mark.parametrize("ratio", [EVAL_RESIZE, 1.0])
def test_eval_transform_matches_pil(index, ratio, device, decode):
    res = 48
    s = select(index, 2, 4, seed=0)
    loader = Loader(s, batch_size=8, train=False, res=res, eval_resize=ratio, device=device,
                    decode=decode)
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == device
    images, labels = images.cpu(), labels.cpu()
    tars = index.tar_paths
    for i, row in enumerate(index.samples[s.rows]):
        with open(tars[row["tar"]], "rb") as f:
            im = Image.open(io.BytesIO(f.read()[row["offset"] : row["offset"] + row["size"]]))
        short = round(res * ratio)
        w, h = im.size
        size = (short, round(h * short / w)) if w < h else (round(w * short / h), short)
        im = im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        # DALI rounds the centre crop's origin half up (torchvision's round() goes half to
        # even): one pixel apart when the margin is odd.
        left, top = int((size[0] - res) / 2 + 0.5), int((size[1] - res) / 2 + 0.5)
        ref = np.asarray(im.crop((left, top, left + res, top + res)), dtype=np.float32)
        diff = np.abs(images[i].numpy().astype(np.float32) - ref)
        # torch's antialiased bilinear is PIL's filter (~0.001 of 255 seen on the CPU); the GPU
        # decodes with libjpeg-turbo's chroma upsampling and resizes with the same filter.
        assert diff.mean() < 0.5, (i, diff.mean())
        assert int(labels[i]) == int(s.labels[i])


def test_keyed_crops_follow_the_image_whatever_its_subset_batch_or_place(tmp_path, texture):
    """--order keyed: an image's crop window and flip are drawn from (seed, epoch, its row),
    so two nested subsets give a shared image the same window, in whichever batch and place
    it comes; the shuffled transform's windows follow the batch's places instead. The Loader
    given order="keyed" plans and crops that way."""
    from dptrain.loading.transforms import TrainTransform

    index = ShardIndex.load(make_shard_set(tmp_path, texture, 5, 10, (64, 48)))
    small, large = select(index, 3, 6, seed=1), select(index, 5, 10, seed=1)
    h, w = index.samples["height"], index.samples["width"]

    def windows(subset, keyed: bool, epoch=0):
        t = TrainTransform(7, 32, subset.rows if keyed else None)
        pos = np.random.default_rng(epoch).permutation(len(subset))  # any batch, any place
        drawn = t.draw(epoch, 0, pos, h[subset.rows[pos]], w[subset.rows[pos]])
        return {int(r): tuple(np.concatenate([a[i].ravel() for a in drawn]))
                for i, r in enumerate(subset.rows[pos])}

    a, b = windows(small, True), windows(large, True)
    assert all(a[r] == b[r] for r in a) and len(set(a.values())) > len(a) // 2
    assert windows(small, True, epoch=1) != a  # each epoch its own
    a, b = windows(small, False), windows(large, False)
    assert sum(a[r] == b[r] for r in a) < len(a) // 4
    loader = Loader(large, batch_size=8, train=True, res=32, seed=1, order="keyed")
    assert loader.transform.keys is large.rows
    shared = set(small.rows.tolist())
    planned = [r for batch in loader.plan(0) for r in large.rows[batch].tolist() if r in shared]
    inside = Loader(small, batch_size=6, train=True, res=32, seed=1, order="keyed")
    assert planned[:6] == [r for batch in inside.plan(0) for r in small.rows[batch].tolist()][:6]
    loader.close()
    inside.close()


@pytest.mark.parametrize("device", DEVICES)
def test_train_transform_crops_resizes_and_flips_half(tmp_path, device):
    """Images brighten left to right (120 x 90 px): a res x res crop of a window w px wide
    spans w px of the ramp, and a mirrored one brightens right to left. Every image is the
    same size, so the windows are those drawn from (seed, epoch, step) alone."""
    src = tmp_path / "src"
    ramp = np.repeat(np.linspace(0, 255, 120)[None, :, None], 90, 0).repeat(3, 2)
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(24):
            Image.fromarray(ramp.astype(np.uint8)).save(src / f"c{c}" / f"{i}.jpg", quality=95)
    shard_dataset(src, tmp_path / "out", progress=False)
    loader = Loader(select(ShardIndex.load(tmp_path / "out")), batch_size=16, train=True,
                    res=32, seed=3, device=device)
    flipped, widths = [], []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for step, (images, _labels) in zip(range(3), loader):
            assert images.device.type == device and images.dtype == torch.uint8
            assert images.shape == (16, 32, 32, 3)
            cols = images.cpu().float().mean(dim=(1, 3))  # mean brightness of each column
            slopes = (cols[:, -1] - cols[:, 0]).numpy()
            _, size, flips = batch_augmentation(3 * 1009, epoch, step, np.full(16, 90),
                                                np.full(16, 120))  # seed * 1009 + rank
            # The ramp rises 255/119 a pixel; the output's columns sample the window's
            # middles, (w - w/32) px apart end to end.
            span = 255 / 119 * size[:, 1] * 31 / 32 * np.where(flips, -1, 1)
            assert np.allclose(slopes / span, 1, atol=0.05), (epoch, step, slopes / span)
            flipped += flips.tolist()
            widths += size[:, 1].tolist()
    assert 0.3 < np.mean(flipped) < 0.7  # about half mirrored
    assert min(widths) < 60 and max(widths) > 100  # scales from 0.08 to 1 of the area


def test_damaged_tar_names_file_and_sample(tmp_path, texture):
    src = make_imagefolder(tmp_path / "src", texture, classes=2, per_class=6, bad=False)
    shard_dataset(src, tmp_path / "out", progress=False)
    index = ShardIndex.load(tmp_path / "out")
    tar = index.tar_paths[1]
    tar.write_bytes(tar.read_bytes()[:2000])  # cut short: most samples are gone
    loader = Loader(select(index), batch_size=4, train=False, res=32)
    with pytest.raises(Exception, match=rf"{tar.name}: sample at offset \d+ .*is cut short"):
        for _ in loader:
            pass


def test_index_not_matching_tar_names_file_and_sample(tmp_path, texture):
    import json

    from dptrain.data.index import sha256_file

    src = make_imagefolder(tmp_path / "src", texture, classes=2, per_class=6, bad=False)
    out = tmp_path / "out"
    shard_dataset(src, out, progress=False)
    table = np.load(out / "samples.npy")
    table["offset"][4] += 512  # points at the next header, not at a JPEG
    np.save(out / "samples.npy", table)
    meta = json.loads((out / "index.json").read_text())
    meta["samples_sha256"] = sha256_file(out / "samples.npy")
    (out / "index.json").write_text(json.dumps(meta))
    index = ShardIndex.load(out)
    loader = Loader(select(index), batch_size=4, train=False, res=32)
    tar = index.tar_paths[table["tar"][4]].name
    with pytest.raises(Exception, match=rf"{tar}: sample at offset \d+ .*is not a JPEG"):
        for _ in loader:
            pass


def test_padded_crops_are_the_per_image_crops(index):
    """A GPU's way of finishing train crops (DALI pads them to the batch's largest, and the
    train transform resamples the padded batch at once), run on the CPU: the same batches as
    the per-image resize, within 1 per pixel (the filter in float32), the same flips."""
    s = select(index, 4, 12, seed=0)
    per_image = Loader(s, batch_size=16, train=True, res=24, seed=2)
    padded = Loader(s, batch_size=16, train=True, res=24, seed=2)
    padded._jpegs.padded = True
    for epoch in range(2):
        per_image.set_epoch(epoch)
        padded.set_epoch(epoch)
        for (a, la), (b, lb) in zip(per_image, padded):
            assert a.shape == b.shape == (16, 24, 24, 3) and torch.equal(la, lb)
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1, diff.max()  # a flip or window wrong is far more
    per_image.close()
    padded.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mixed_decode(index):
    s = select(index, 8, 12, seed=0)
    loader = Loader(s, batch_size=16, train=True, res=64, device="cuda", drop_last=False)
    seen = 0
    for images, labels in loader:
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8
        seen += len(labels)
    assert seen == len(s) and loader.bytes_read == s.nbytes


def test_next_epoch_is_read_ahead_by_the_same_feeder(index):
    """An epoch end does not drain the pipeline: epoch 1 is being read while epoch 0 ends."""
    s = select(index, 8, 12, seed=0)
    loader = Loader(s, batch_size=16, train=True, res=32, seed=5)
    first = epoch_labels(loader)
    feeder = loader._running[0]
    deadline = time.monotonic() + 30
    while not feeder.queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feeder.queue.full()  # epoch 1's first batches, finished before anyone asked
    loader.set_epoch(1)  # what the training loop does: the continuation, no restart
    second = epoch_labels(loader)
    assert loader._running[0] is feeder
    fresh = Loader(s, batch_size=16, train=True, res=32, seed=5)
    fresh.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(second, epoch_labels(fresh)))
    loader.set_epoch(0)  # anything else restarts the feeder there
    assert all(torch.equal(x, y) for x, y in zip(first, epoch_labels(loader)))
    assert loader._running[0] is not feeder and not feeder.thread.is_alive()
    loader.close()
    fresh.close()
    assert not loader._running


def test_a_dropped_loader_stops_its_thread(index):
    loader = Loader(select(index, 4, 12, seed=0), batch_size=8, train=True, res=32)
    batches = iter(loader)
    next(batches)
    thread = loader._running[0].thread
    assert thread.is_alive()
    del batches, loader
    gc.collect()
    assert not thread.is_alive()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batches_survive_a_slow_consumer_on_another_stream(index):
    """The hand-off is stream-ordered: a consumer on its own stream, delayed on the GPU, sees
    every batch intact (the feeder may not reuse the memory until that stream is done)."""
    s = select(index, 8, 12, seed=0)
    reference = [x.clone() for x, _ in Loader(s, batch_size=16, train=False, res=32,
                                              device="cuda")]
    loader = Loader(s, batch_size=16, train=False, res=32, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        seen = []
        for _ in range(3):
            for images, _labels in loader:
                torch.cuda._sleep(20_000_000)  # tens of ms of GPU time before the batch is read
                seen.append(images.clone())
    torch.cuda.synchronize()
    assert len(seen) == 3 * len(reference)
    # (a reused buffer would hold another batch: far more than decoder rounding apart)
    assert all((x.float() - reference[i % len(reference)].float()).abs().mean() < 1
               for i, x in enumerate(seen))
    loader.close()


def test_crop_windows_are_torchvisions_random_resized_crop_and_seeded():
    from dptrain.loading.transforms import crop_windows

    rng = np.random.default_rng(0)
    h, w = rng.integers(20, 600, 5000), rng.integers(20, 600, 5000)
    anchor, shape, flips = crop_windows(h, w, np.random.default_rng(1))
    assert (anchor >= 0).all() and (shape >= 1).all()
    assert (anchor[:, 0] + shape[:, 0] <= h).all() and (anchor[:, 1] + shape[:, 1] <= w).all()
    area, ratio = shape.prod(1) / (h * w), shape[:, 1] / shape[:, 0]
    big = (h > 200) & (w > 200)  # where rounding cannot move the area or ratio much
    assert area[big].min() >= 0.079 and area[big].max() <= 1
    assert ratio[big].min() >= 0.74 and ratio[big].max() <= 1.35
    assert 0.45 < flips.mean() < 0.55
    from torchvision.transforms import RandomResizedCrop  # the same draw, by torchvision

    torch.manual_seed(0)
    tv = [np.prod(RandomResizedCrop.get_params(torch.empty(1, a, b), (0.08, 1.0),
                                               (3 / 4, 4 / 3))[2:]) / (a * b)
          for a, b in zip(h[:2000].tolist(), w[:2000].tolist())]
    assert abs(np.mean(area) - np.mean(tv)) < 0.02 and abs(np.median(area) - np.median(tv)) < 0.03
    same = crop_windows(h, w, np.random.default_rng(1))  # a batch's crops: its seed alone
    assert all(np.array_equal(a, b) for a, b in zip((anchor, shape, flips), same))
    # No window fits a 1000 x 10 image: the central crop at the nearest allowed ratio.
    anchor, shape, _ = crop_windows(np.array([1000]), np.array([10]), np.random.default_rng(2))
    assert shape.tolist() == [[13, 10]] and anchor.tolist() == [[493, 0]]
