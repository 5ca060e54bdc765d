"""`dptrain shard`: round trips from every source, the stored order, splitting, conversions."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import bad_inputs, make_imagefolder, tree_bytes
from PIL import Image, ImageOps

from dptrain.common.errors import DataError
from dptrain.data.index import ShardIndex, idx_name
from dptrain.data.shards import ShardOptions, shard_dataset


def read_samples(out: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, label) of every sample, read with tarfile (not with our index)."""
    samples = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                samples.append((key, data, int(members[key + ".cls"])))
    return samples


def test_imagefolder_round_trip(folder, tmp_path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "out"
    shard_dataset(folder, out, progress=False)
    index = ShardIndex.load(out)
    stored = read_samples(out)
    by_bytes = Counter(data for _, data, _ in stored)
    label_of_bytes = {data: label for _, data, label in stored}

    # Labels exactly as torchvision's ImageFolder assigns them, every readable image once.
    reference = ImageFolder(str(folder), loader=lambda p: p)
    assert index.class_names == reference.classes
    fates = bad_inputs()
    copied, converted = set(), 0
    for path, label in reference.samples:
        name = os.path.basename(path)
        fate = fates.get(name, (None, "copied"))[1]
        data = Path(path).read_bytes()
        if fate == "copied":
            assert by_bytes[data] == 1, name  # bytes unchanged, exactly once
            assert label_of_bytes[data] == label
            copied.add(data)
        elif fate == "converted":
            converted += 1
    copied, copied_bytes = len(copied), copied
    assert copied == 4 * 6 + 1 and converted == 5
    assert len(stored) == index.meta["num_samples"] == copied + converted

    # Conversions are RGB baseline JPEGs with the source's size; skips are recorded with reasons.
    assert {c["input"].split("/")[-1] for c in index.meta["converted"]} == {
        n for n, (_, f) in fates.items() if f == "converted"}
    for _, data, _ in stored:
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG" and im.mode in ("RGB", "L")
        if data not in copied_bytes:  # written by the converter: RGB baseline
            assert im.mode == "RGB" and not im.info.get("progressive"), im.info
    reasons = {s["input"].split("/")[-1]: s["reason"] for s in index.meta["skipped"]}
    for name, (_, fate) in fates.items():
        if fate not in ("copied", "converted"):
            assert reasons[name].startswith(fate), (name, reasons.get(name))
    cmyk = next(d for k, d, _ in stored if k.endswith("cmyk"))
    assert Image.open(io.BytesIO(cmyk)).mode == "RGB"


def test_table_points_at_every_payload(folder, tmp_path):
    out = tmp_path / "out"
    shard_dataset(folder, out, progress=False)
    index = ShardIndex.load(out)
    by_key = {key: (data, label) for key, data, label in read_samples(out)}
    payloads = {data for data, _ in by_key.values()}
    tars = index.tar_paths
    seen = set()
    for row in index.samples:
        with open(tars[row["tar"]], "rb") as f:
            data = os.pread(f.fileno(), int(row["size"]), int(row["offset"]))
        assert data in payloads
        im = Image.open(io.BytesIO(data))
        assert (im.height, im.width) == (row["height"], row["width"])
        seen.add(data)
    assert len(seen) == len(index.samples)
    # Rows are sorted by label; each class is one contiguous range.
    labels = index.samples["label"]
    assert np.all(np.diff(labels) >= 0)
    assert np.array_equal(np.bincount(labels, minlength=len(index.counts)), index.counts)
    info = index.info()
    assert info["num_samples"] == len(seen) and sum(info["per_class"]) == len(seen)


def test_keys_unique_and_stable(folder, tmp_path):
    shard_dataset(folder, tmp_path / "a", progress=False)
    shard_dataset(folder, tmp_path / "b", options=ShardOptions(seed=7), progress=False)
    keys_a = [k for k, _, _ in read_samples(tmp_path / "a")]
    keys_b = [k for k, _, _ in read_samples(tmp_path / "b")]
    assert len(set(keys_a)) == len(keys_a)
    assert set(keys_a) == set(keys_b)  # keys come from file names, not from the order
    assert "00001_img_1_3" in keys_a
    assert all("." not in k for k in keys_a)


def test_seeded_order_deterministic_and_uniform(tmp_path, texture):
    src = make_imagefolder(tmp_path / "src", texture, classes=2, per_class=40, bad=False)
    shard_dataset(src, tmp_path / "a", progress=False)
    shard_dataset(src, tmp_path / "a2", progress=False)
    shard_dataset(src, tmp_path / "b", options=ShardOptions(seed=1), progress=False)
    a, a2, b = (tree_bytes(tmp_path / n) for n in ("a", "a2", "b"))
    a.pop("index.json"), a2.pop("index.json")
    assert a == a2  # same seed: byte-identical tars, indexes and table
    order = lambda n: [k for k, _, _ in read_samples(tmp_path / n)]  # noqa: E731
    assert order("a") != order("b") and sorted(order("a")) == sorted(order("b"))
    # Stored order is a shuffle of the sorted inputs, not the sorted order itself.
    class0 = [k for k in order("a") if k.startswith("00000_")]
    assert class0 != sorted(class0, key=lambda k: int(k.rsplit("_", 1)[1]))


def test_shard_size_splits_classes(tmp_path, texture):
    src = make_imagefolder(tmp_path / "src", texture, classes=2, per_class=30,
                           size=(500, 375), bad=False)
    out = tmp_path / "out"
    limit = 1 << 20
    shard_dataset(src, out, options=ShardOptions(shard_size=limit), progress=False)
    index = ShardIndex.load(out)
    per_class = [len(c["tars"]) for c in index.meta["classes"]]
    assert all(n >= 3 for n in per_class)  # ~3.2 MB per class in 1 MB tars
    assert all(t["bytes"] <= limit for t in index.meta["tars"])
    assert len(read_samples(out)) == 60 == index.meta["num_samples"]
    for t in index.meta["tars"]:
        assert (out / idx_name(t["file"])).is_file()


def test_max_side_reencodes_only_larger_images(tmp_path, texture):
    from dptrain.data.imagenet_like import jpeg as imagenet_like_jpeg

    src = make_imagefolder(tmp_path / "src", texture, classes=1, per_class=3, size=(500, 375),
                           bad=False)
    small = src / "class_0" / "small.jpg"
    small.write_bytes(imagenet_like_jpeg(texture, 0, 0, 9, width=120, height=90))
    out = tmp_path / "out"
    shard_dataset(src, out, options=ShardOptions(max_side=160, quality=80), progress=False)
    index = ShardIndex.load(out)
    sides = sorted(zip(index.samples["width"].tolist(), index.samples["height"].tolist()))
    assert sides == [(120, 90), (160, 120), (160, 120), (160, 120)]
    assert sorted(c["action"] for c in index.meta["converted"]) == ["resized"] * 3
    stored = {k: d for k, d, _ in read_samples(out)}
    assert stored["00000_small"] == (src / "class_0" / "small.jpg").read_bytes()


def test_flat_folder_with_labels_and_classes_from(tmp_path, folder):
    train = tmp_path / "train"
    shard_dataset(folder, train, progress=False)
    val = tmp_path / "val"
    val.mkdir()
    for i, c in enumerate(["class_2", "class_1", "class_2"]):
        (val / f"v{i}.JPEG").write_bytes((folder / c / f"img_{c[-1]}_{i}.JPEG").read_bytes())
    (val / "unlabelled.JPEG").write_bytes((folder / "class_3" / "img_3_0.JPEG").read_bytes())
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])  # Kaggle's LOC_val_solution.csv form
        w.writerow(["v0", "class_2 1 2 3 4"])
        w.writerow(["v1.JPEG", "class_1"])
        w.writerow(["v2", "class_2"])
        w.writerow(["gone.JPEG", "class_1"])
    out = tmp_path / "valshards"
    shard_dataset(val, out, labels=labels, classes_from=train, progress=False)
    index = ShardIndex.load(out)
    assert index.class_names == ShardIndex.load(train).class_names  # the train split's ids
    assert index.counts.tolist() == [0, 1, 2, 0]
    assert {(k, label) for k, _, label in read_samples(out)} == {
        ("00002_v0", 2), ("00001_v1", 1), ("00002_v2", 2)}
    reasons = {s["input"]: s["reason"] for s in index.meta["skipped"]}
    assert reasons["gone.JPEG"].startswith("listed in labels.csv but missing")
    assert reasons["unlabelled.JPEG"] == "no label in labels.csv"

    # A class the reference does not have is an error, not a new id.
    with open(labels, "a") as f:
        f.write("unlabelled.JPEG,class_9\n")
    with pytest.raises(DataError, match="class_9"):
        shard_dataset(val, tmp_path / "v2", labels=labels, classes_from=train, progress=False)


def test_imagenet_tar_of_tars_matches_folder(tmp_path, folder):
    """ILSVRC2012_img_train.tar layout: a tar of per-class tars, read in one streamed pass."""
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as tf:
        for cls in sorted(os.listdir(folder), reverse=True):  # member order must not matter
            inner = tmp_path / f"{cls}.tar"
            with tarfile.open(inner, "w") as itf:
                for f in sorted(os.listdir(folder / cls)):
                    itf.add(folder / cls / f, arcname=f)
            tf.add(inner, arcname=f"{cls}.tar")
    shard_dataset(folder, tmp_path / "from_folder", progress=False)
    shard_dataset(outer, tmp_path / "from_tar", progress=False)
    a, b = tree_bytes(tmp_path / "from_folder"), tree_bytes(tmp_path / "from_tar")
    ia, ib = json.loads(a.pop("index.json")), json.loads(b.pop("index.json"))
    assert a == b  # same tars, idx files and table, byte for byte
    assert ib["source_format"] == "imagenet-tar"
    assert ia["classes"] == ib["classes"] and ia["converted"] == ib["converted"]
    assert [s["reason"] for s in ia["skipped"]] == [s["reason"] for s in ib["skipped"]]


def test_webdataset_source_reindexed_by_class(tmp_path, texture):
    import webdataset as wds

    from dptrain.data.imagenet_like import jpeg as imagenet_like_jpeg

    src = tmp_path / "wds"
    src.mkdir()
    expected = Counter()
    for s in range(3):  # classes mixed across shards, as webdataset users write them
        with wds.TarWriter(str(src / f"shard-{s:04d}.tar")) as w:
            for i in range(10):
                label = (s * 10 + i) % 3
                w.write({"__key__": f"s{s}/im{i:03d}", "jpg": imagenet_like_jpeg(
                    texture, 0, label, s * 10 + i, width=48, height=32), "cls": label})
                expected[label] += 1
        with wds.TarWriter(str(src / "extra.tar")) as w:
            w.write({"__key__": "nolabel", "jpg": b"\xff\xd8"})
    out = tmp_path / "out"
    shard_dataset(src, out, progress=False)
    index = ShardIndex.load(out)
    assert index.meta["source_format"] == "wds"
    assert index.class_names == ["0", "1", "2"]  # the original integer labels keep their ids
    assert index.counts.tolist() == [expected[0], expected[1], expected[2]]
    assert all(t["label"] == int(k[:5]) for t in index.meta["tars"] for k in [t["file"]])
    assert {(k.split("_", 1)[0], label) for k, _, label in read_samples(out)} == {
        ("00000", 0), ("00001", 1), ("00002", 2)}
    assert any(s["reason"] == "no .cls in sample" for s in index.meta["skipped"])


def test_bad_image_checks(texture):
    from conftest import encode, rgb, with_sof_size

    from dptrain.data.images import BadImage, store_image

    good = encode(rgb(1))
    assert store_image(good).action == "copied"
    for data, reason in [(good[:100], "truncated"), (good[:-2], "truncated"),
                         (with_sof_size(good, 12000, 9000), "too many pixels")]:
        with pytest.raises(BadImage, match=reason):
            store_image(data)
    with pytest.raises(BadImage, match="too many pixels"):
        store_image(encode(rgb(2), "PNG"), max_pixels=100)
    # Garbage inside the entropy-coded data passes the header walk (--check header copies it);
    # the default decode check hears the loader's decoder complain, and PIL cannot decode it
    # either, so it is skipped with both reasons.
    big = encode(rgb(1, 200, 150))
    n = len(big)
    garbage = big[: n // 2] + bytes(range(256)) * 4 + big[n // 2 + 1024 :]
    assert store_image(garbage, check="header").action == "copied"
    with pytest.raises(BadImage, match="damaged JPEG: Corrupt JPEG data: premature end of data "
                       "segment; not a decodable image"):
        store_image(garbage)


def test_a_plain_labels_csv_keeps_class_names_with_spaces(tmp_path, folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"a{i}.jpg").write_bytes((folder / "class_1" / f"img_1_{i}.JPEG").read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,class\na0.jpg,golden retriever\na1.jpg, golden retriever\n"
                      "a2.jpg,tabby cat\n")
    shard_dataset(flat, tmp_path / "out", labels=labels, progress=False)
    index = ShardIndex.load(tmp_path / "out")
    assert index.class_names == ["golden retriever", "tabby cat"]
    assert index.counts.tolist() == [2, 1]


def test_hostile_and_linked_tar_members_are_named_in_the_index(tmp_path, texture):
    from dptrain.data.imagenet_like import jpeg as imagenet_like_jpeg
    from dptrain.data.shards import render_results

    src = tmp_path / "wds"
    src.mkdir()

    def member(tf, name, data=b"", link=None):
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(src / "shard-0000.tar", "w") as tf:
        for key, i in (("../../evil", 0), ("ok", 1), ("a b", 2)):
            member(tf, f"{key}.jpg", imagenet_like_jpeg(texture, 0, 0, i, width=40, height=32))
            member(tf, f"{key}.cls", b"0")
        member(tf, "linked.jpg", link="/etc/passwd")
        member(tf, "linked.cls", b"0")
    out = tmp_path / "out"
    summary = shard_dataset(src, out, progress=False)
    index = ShardIndex.load(out)
    assert sorted((r["input"], r["key"]) for r in index.meta["renamed"]) == [
        ("shard-0000.tar:../../evil", "00000_evil"), ("shard-0000.tar:a b", "00000_a_b")]
    assert "2 renamed" in render_results([(out, {**summary, "this_run": summary["this_run"]})])
    reasons = {s["input"]: s["reason"] for s in index.meta["skipped"]}
    assert reasons["shard-0000.tar:linked"] == ("linked.jpg is a symbolic link, not a file: "
                                                 "links are not followed")
    assert all(not p.is_symlink() and p.parent == out for p in out.rglob("*"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_orientation_is_applied_and_stored_upright(texture, orientation):
    """DALI applies EXIF orientation and PIL does not: stored upright, with no tag left, the
    index's size is what every decoder makes of it."""
    from conftest import rotated

    from dptrain.data.images import LoaderDecoder, read_jpeg_header, store_image

    data = rotated(texture, orientation)
    stored = store_image(data)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert (stored.width, stored.height) == upright.size
    assert (stored.width, stored.height) == ((60, 100) if orientation >= 5 else (100, 60))
    if orientation == 1:
        assert stored.action == "copied" and stored.data is data
        return
    assert stored.action == f"converted (EXIF orientation {orientation} applied)"
    assert read_jpeg_header(stored.data).orientation == 1
    pixels = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB"), np.float64)
    off = np.abs(pixels - np.asarray(upright, np.float64)).mean()
    assert off < 6  # q90 re-encoding of a noisy texture
    if orientation <= 4:  # the sides kept: far from the image as stored, unturned
        as_stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
        assert np.abs(pixels - as_stored).mean() > 4 * off
    assert LoaderDecoder().problems([stored.data], [(stored.height, stored.width)]) == [None]


def test_damage_only_a_decoder_sees_is_converted_or_skipped(texture):
    from conftest import damaged_jpegs

    from dptrain.data.images import BadImage, LoaderDecoder, read_jpeg_header, store_image

    for name, (data, fate) in damaged_jpegs(texture).items():
        assert read_jpeg_header(data) is not None, name  # the marker walk passes them
        assert store_image(data, check="header").action == "copied", name
        if fate == "converted":
            stored = store_image(data)
            assert stored.action == ("converted (damaged JPEG: Corrupt JPEG data: extraneous "
                                     "bytes before marker 0xd9)")
            assert LoaderDecoder().problems([stored.data], [(60, 100)]) == [None]
        else:
            with pytest.raises(BadImage, match=re.escape(fate)):
                store_image(data)


def test_the_loader_decoder_names_the_damaged_images_of_a_batch(texture):
    from conftest import damaged_jpegs, rotated

    from dptrain.data.images import LoaderDecoder

    good = [rotated(texture, 1, i=i) for i in range(6)]
    bad = {k: v[0] for k, v in damaged_jpegs(texture).items()}
    batch = good[:2] + [bad["premature_end.jpg"]] + good[2:4] + [bad["extraneous.jpg"]] + good[4:]
    sizes = [(60, 100)] * len(batch)
    sizes[1] = (100, 60)
    found = LoaderDecoder(batch_size=4, threads=2).problems(batch, sizes)
    assert [i for i, f in enumerate(found) if f] == [1, 2, 5]
    assert found[1] == "decodes to 100x60, not the 60x100 of its header"
    assert "premature end of data segment" in found[2]
    assert "extraneous bytes before marker 0xd9" in found[5]


def test_a_source_with_no_storable_image_is_refused_and_leaves_out_empty(tmp_path):
    from conftest import encode, one_line_error, rgb, run_here

    from dptrain.data.index import SAMPLE_DTYPE, sha256_file

    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / c / f"x{i}.jpg").write_bytes(b"not a jpeg %d" % i)
    out = tmp_path / "out"
    for _ in range(2):  # and again: nothing half-done is left to resume
        one_line_error(run_here("shard", tmp_path / "src", out, "--no-progress"),
                       "no input of", "could be stored (6 not an image",
                       "a shard set needs at least one image")
        assert [p.name for p in out.iterdir()] == [".dptrain.lock"]
    # An empty set as dptrain wrote them before: info and pretrain refuse it in one line.
    (tmp_path / "src" / "a" / "x0.jpg").write_bytes(encode(rgb(0)))
    shard_dataset(tmp_path / "src", out, progress=False)
    for tar in [*out.glob("*.tar"), *out.glob("*.idx")]:
        tar.unlink()
    np.save(out / "samples.npy", np.zeros(0, SAMPLE_DTYPE))
    meta = json.loads((out / "index.json").read_text())
    meta.update(num_samples=0, tars=[], samples_sha256=sha256_file(out / "samples.npy"))
    meta["classes"][0].update(count=0, tars=[])
    (out / "index.json").write_text(json.dumps(meta))
    for command in (["info", out], ["pretrain", "--data", out, "--out", tmp_path / "run"]):
        one_line_error(run_here(*command), f"{out} holds no images (inputs skipped: 5; its "
                       "index.json lists why)")


def test_a_shard_worker_forked_from_a_process_that_decoded_does_not_hang(tmp_path):
    """A worker forked from a process holding uncollected DALI pipelines (a test, a notebook
    that decoded before sharding) must not collect them: their __del__ waits for threads the
    fork did not copy, and the worker hung (seen in the suite). Here the parent's decoder is
    left as cyclic garbage and each worker collects before it writes."""
    script = """if True:
    import gc, sys
    from pathlib import Path
    from dptrain.data import images, shards
    from dptrain.data.imagenet_like import jpeg, texture

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(3):
            (src / f"c{c}" / f"{i}.jpg").write_bytes(jpeg(texture(0), 0, c, i, width=48, height=40))
    gc.disable()  # so that the parent's decoder stays garbage this process has not collected
    decoder = images.LoaderDecoder()
    decoder.problems([(src / "c0" / "0.jpg").read_bytes()], [(40, 48)])
    decoder.cycle = decoder
    del decoder
    write_class = shards.write_class
    def collect_first(*a, **kw):  # in the worker: a collection, as any allocation may cause
        gc.collect()
        return write_class(*a, **kw)
    shards.write_class = collect_first
    shards.shard_dataset(src, out, progress=False, workers=2)
    print("sharded")
    """
    p = subprocess.run([sys.executable, "-c", script, tmp_path / "src", tmp_path / "out"],
                       capture_output=True, text=True, timeout=120)  # hung: raises
    assert p.returncode == 0 and p.stdout == "sharded\n", p.stderr
