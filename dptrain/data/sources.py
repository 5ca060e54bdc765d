"""Where images come from: the input layouts `dptrain shard` reads, as lists of inputs per class.

Every source gives class names and, per class, the inputs in a fixed (sorted) order; the shard
writer then applies the seeded shuffle. Nothing here decodes an image.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..common.errors import DataError
from ..common.options import option

# torchvision.datasets.folder.IMG_EXTENSIONS: what ImageFolder lists, so labels and files match it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png")
CIFAR_QUALITY = 95  # JPEG quality CIFAR's raw pixels are stored at (recorded in the index)
NOT_IMAGE_NAME = "not an image file name (extension)"


@dataclass(frozen=True)
class Item:
    """One input: a file, a byte range of a tar, bytes already read from a stream, or bytes
    made on demand in the writer's worker (generated images)."""

    name: str  # relative name in the source; keys and skip records use it
    path: str | None = None
    offset: int = 0
    size: int = -1  # -1: the whole file
    data: bytes | None = None
    make: Callable[[], bytes] | None = None  # picklable (a functools.partial)

    def read_into(self, buf: bytearray) -> memoryview | bytes:
        """The input's bytes, in `buf` when they fit: reusing one buffer saves an allocation
        per image (~10% of sharding's CPU). The view is valid until `buf` is reused."""
        if self.data is not None:
            return self.data
        if self.make is not None:
            return self.make()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size if self.size < 0 else self.size
            if size > len(buf):
                return os.pread(fd, size, self.offset)
            n = os.preadv(fd, [memoryview(buf)[:size]], self.offset)
            return memoryview(buf)[:n]
        finally:
            os.close(fd)


@dataclass
class Source:
    """What `dptrain shard` reads: the class names and, per class, its inputs (`items`, sorted
    by name) and the files skipped in its folder. A streamed source (the ImageNet tar) lists
    nothing up front: `classes()` reads it, through `stream`."""

    format: str
    path: Path
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), no class
    encoding: str | None = None  # how raw pixels were turned into JPEGs, if they were
    items: dict[str, list[Item]] = field(default_factory=dict, repr=False)
    class_skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)
    origin: str | None = None  # what the data is, where no path says it (generated data)
    # (path, wanted classes) -> what `classes()` yields, in one pass; None: `items` holds it
    stream: Callable[[Path, set[str]], Iterator[tuple]] | None = field(default=None, repr=False)

    @property
    def identity(self) -> str:
        """What a rerun must match to resume or reuse a shard set of this source."""
        return self.origin or str(self.path.resolve())

    @property
    def num_inputs(self) -> int | None:
        """Inputs to store; None where only a full pass can tell (a streamed tar)."""
        if self.stream is not None:
            return None
        return sum(map(len, self.items.values()))

    def classes(self, wanted: set[str]) -> Iterator[tuple[str, list[Item], list[tuple[str, str]]]]:
        """Yield (class name, its inputs in sorted order, its skipped files) for wanted classes."""
        if self.stream is not None:
            yield from self.stream(self.path, wanted)
            return
        for name in self.class_names:
            if name in wanted:
                yield name, self.items.get(name, []), self.class_skipped.get(name, [])


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _imagefolder(root: Path) -> Source:
    # Same class list as torchvision's find_classes: sorted names of the direct subfolders.
    names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    src = Source("imagefolder", root, names)
    prefix = len(str(root)) + 1
    for name in names:
        items, skipped = [], []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                path = f"{dirpath}/{fn}"
                if _is_image_name(fn):
                    items.append(Item(path[prefix:], path))
                else:
                    skipped.append((path[prefix:], NOT_IMAGE_NAME))
        src.items[name], src.class_skipped[name] = items, skipped
    return src


def _read_labels(labels: Path) -> list[tuple[str, str]]:
    """Rows of (filename, class): `filename,class` CSV, or Kaggle's LOC_val_solution.csv."""
    try:
        text = labels.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read labels file {labels}: {e}") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    # Kaggle's LOC_val_solution.csv (ImageId,PredictionString) puts "wnid x y x y ..." in
    # the second column: there the class is its first word. Elsewhere the whole field is the
    # class, spaces included ("golden retriever").
    kaggle = bool(rows) and [c.strip().lower() for c in rows[0][:2]] == ["imageid",
                                                                         "predictionstring"]
    if rows and rows[0][0].strip().lower() in ("filename", "file", "imageid", "image"):
        rows = rows[1:]
    out = []
    for lineno, r in enumerate(rows, 1):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise DataError(f"{labels}: row {lineno} is not 'filename,class': {','.join(r)!r}")
        out.append((r[0].strip(), r[1].split()[0] if kaggle else r[1].strip()))
    if not out:
        raise DataError(f"labels file {labels} has no rows (expected CSV 'filename,class')")
    return out


def _flat(root: Path, labels: Path) -> Source:
    files = sorted(e.name for e in os.scandir(root) if e.is_file())
    by_stem = {}
    for fn in files:
        by_stem.setdefault(os.path.splitext(fn)[0], fn)
    per_class: dict[str, list[Item]] = {}
    labelled, skipped = set(), []
    for fn, cls in _read_labels(labels):
        real = fn if fn in files else by_stem.get(fn)  # Kaggle's ImageId has no extension
        if real is None:
            skipped.append((fn, f"listed in {labels.name} but missing"))
            continue
        if real in labelled:
            raise DataError(f"{labels}: {fn!r} is labelled twice")
        labelled.add(real)
        per_class.setdefault(cls, []).append(Item(real, str(root / real)))
    for fn in files:
        if fn not in labelled:
            skipped.append((fn, f"no label in {labels.name}"))
    src = Source("flat", root, sorted(per_class), skipped)
    src.items = {c: sorted(v, key=lambda it: it.name) for c, v in per_class.items()}
    return src


def _wds(src: Path, tars: list[Path]) -> Source:
    """Group each tar's members into samples by key, as webdataset does; read each label."""
    from webdataset.tariterators import base_plus_ext  # webdataset's own key split

    per_label: dict[str, list[Item]] = {}
    skipped = []
    for tar in tars:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    key, ext = base_plus_ext(m.name)
                    if (m.isfile() or m.issym() or m.islnk()) and key:
                        samples.setdefault(key, {})[ext.lower()] = m
                    elif m.isfile():
                        skipped.append((f"{tar.name}:{m.name}", "member name has no extension"))
                with open(tar, "rb") as f:
                    for key, parts in samples.items():
                        where = f"{tar.name}:{key}"
                        img = next((parts[e] for e in WDS_IMAGE_EXTS if e in parts), None)
                        if img is None:
                            skipped.append((where, "no .jpg/.jpeg/.png in sample"))
                        elif not img.isfile():
                            skipped.append((where, f"{img.name} is a {_link_kind(img)}, not a "
                                                   "file: links are not followed"))
                        elif "cls" not in parts or not parts["cls"].isfile():
                            skipped.append((where, "no .cls in sample"))
                        else:
                            cls = os.pread(f.fileno(), parts["cls"].size, parts["cls"].offset_data)
                            label = cls.decode("utf-8", "replace").strip()
                            item = Item(where, str(tar), img.offset_data, img.size)
                            per_label.setdefault(label, []).append(item)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read WebDataset shard {tar}: {e}") from None
    labels = list(per_label)
    if all(s.lstrip("-").isdigit() for s in labels):
        labels.sort(key=int)  # integer labels keep their numeric order: ids stay as they were
    else:
        labels.sort()
    source = Source("wds", src, labels, skipped)
    source.items = {c: sorted(v, key=lambda it: it.name) for c, v in per_label.items()}
    return source


def _link_kind(m: tarfile.TarInfo) -> str:
    return "symbolic link" if m.issym() else "hard link"


def _tar_of_tars_names(path: Path) -> list[str]:
    # Headers only: tarfile seeks over each member's data, so this reads ~1000 blocks.
    with tarfile.open(path, "r:") as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    bad = [n for n in names if not n.endswith(".tar")]
    if bad:
        raise DataError(f"{path} mixes per-class tars with other files (e.g. {bad[0]!r})")
    return sorted(os.path.basename(n)[: -len(".tar")] for n in names)


def _stream_tar_of_tars(path: Path, wanted: set[str]):
    """One sequential pass over ILSVRC2012_img_train.tar, one inner tar (a class) in memory."""
    with tarfile.open(path, "r:") as outer:
        for m in outer:
            name = os.path.basename(m.name)[: -len(".tar")]
            if not m.isfile() or name not in wanted:
                continue  # tarfile seeks past unwanted members: resumes read only what's left
            blob = outer.extractfile(m).read()
            items, skipped = [], []
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as inner:
                for im in inner:
                    if im.isfile() and _is_image_name(im.name):
                        data = blob[im.offset_data : im.offset_data + im.size]
                        items.append(Item(f"{name}/{im.name}", data=data))
                    elif im.isfile():
                        skipped.append((f"{name}/{im.name}", NOT_IMAGE_NAME))
                    elif im.issym() or im.islnk():
                        skipped.append((f"{name}/{im.name}", f"a {_link_kind(im)}, not a "
                                                             "file: links are not followed"))
            yield name, sorted(items, key=lambda it: it.name), sorted(skipped)


def _first_member(path: Path) -> str | None:
    try:
        with tarfile.open(path, "r:") as tf:
            m = tf.next()
            return m.name if m else None
    except tarfile.ReadError:
        raise DataError(
            f"SRC {path} is a file but not an uncompressed tar: expected a folder, "
            "ILSVRC2012_img_train.tar or WebDataset .tar shards (not compressed ones)"
        ) from None


# What CIFAR's pickles are made of besides dicts, lists, strings, bytes and ints: numpy arrays
# (their reconstruction, in numpy 1's and 2's module names). Nothing else may be loaded: a
# pickle can name any callable, and unpickling calls it.
_CIFAR_GLOBALS = {(m, name) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for name in ("_reconstruct", "scalar")} | \
    {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
    {("numpy", "ndarray"), ("numpy", "dtype")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR files never hold: "
                                     "refused (loading it could run code)")


def _cifar(root: Path, split: str) -> Source:
    """CIFAR-10/100 python pickles (cifar-10-batches-py, cifar-100-python): class ids as in the
    dataset's meta file; pixels stored as JPEG at CIFAR_QUALITY. The pickles are read by a
    restricted unpickler (`_CIFAR_GLOBALS`)."""
    import numpy as np
    from PIL import Image

    def load(name: str, *keys: bytes) -> dict:
        path = root / name
        try:
            with open(path, "rb") as f:
                obj = _CifarUnpickler(f, encoding="bytes").load()
            missing = [k.decode() for k in keys if k not in obj]
        except Exception as e:  # unpickling raises many types for a malformed file
            raise DataError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from None
        if missing:
            raise DataError(f"{path} is not a CIFAR file: no {', '.join(missing)}")
        return obj

    if (root / "batches.meta").is_file():  # CIFAR-10
        names = [n.decode() for n in load("batches.meta", b"label_names")[b"label_names"]]
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        files = [f for f in files if (root / f).is_file()]
        key = b"labels"
    else:  # CIFAR-100
        names = [n.decode() for n in load("meta", b"fine_label_names")[b"fine_label_names"]]
        files, key = [split], b"fine_labels"
    if not files:
        raise DataError(f"{root} has no CIFAR {split} batch")
    per_class: dict[str, list[Item]] = {n: [] for n in names}
    for f in files:
        batch = load(f, b"data", key)
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        for i, (img, label) in enumerate(zip(pixels, batch[key])):
            buf = io.BytesIO()
            # 4:4:4 chroma: at 32x32 px, JPEG's default 4:2:0 halves the colour resolution.
            Image.fromarray(img.transpose(1, 2, 0)).save(buf, "JPEG", quality=CIFAR_QUALITY,
                                                         subsampling=0)
            per_class[names[label]].append(Item(f"{f}_{i:05d}", data=buf.getvalue()))
    src = Source("cifar", root, names,
                 encoding=f"JPEG quality {CIFAR_QUALITY}, 4:4:4 chroma, from raw pixels")
    src.items = per_class
    return src


def _is_cifar(src: Path, labels: Path | None) -> bool:
    return src.is_dir() and ((src / "batches.meta").is_file() or
                             ((src / "meta").is_file() and (src / "train").is_file()))


def _is_tar_of_tars(src: Path, labels: Path | None) -> bool:
    if not src.is_file():
        return False
    first = _first_member(src)
    if first is None:
        raise DataError(f"{src} is an empty tar")
    return first.endswith(".tar")


def _is_splits(src: Path, labels: Path | None) -> bool:
    """A folder holding train/ and test/ ImageFolders (each made of class folders)."""
    return src.is_dir() and labels is None and all(
        (src / s).is_dir() and any(e.is_dir() for e in os.scandir(src / s))
        for s in ("train", "test"))


def _is_labelled(src: Path, labels: Path | None) -> bool:
    return labels is not None and not src.is_file()  # a tar's labels are refused as a tar's


def _has_class_folders(src: Path, labels: Path | None) -> bool:
    return src.is_dir() and any(e.is_dir() for e in os.scandir(src))


def _is_wds(src: Path, labels: Path | None) -> bool:
    # Tried after the tar of tars and class folders: any other tar, or a folder of tars.
    return src.is_file() or any(e.name.endswith(".tar") for e in os.scandir(src))


def _read_splits(src: Path, labels: Path | None, split: str) -> Source:
    source = _imagefolder(src / split)
    source.format, source.path = "splits", src
    return source


def _read_flat(src: Path, labels: Path | None, split: str | None) -> Source:
    if labels is None:
        raise DataError("the flat format needs --labels FILE (CSV 'filename,class')")
    return _flat(src, labels)


def _read_tar_of_tars(src: Path, labels: Path | None, split: str | None) -> Source:
    if not src.is_file():
        raise DataError(f"format imagenet-tar needs the tar file, and {src} is a folder")
    return Source("imagenet-tar", src, _tar_of_tars_names(src), stream=_stream_tar_of_tars)


def _read_wds(src: Path, labels: Path | None, split: str | None) -> Source:
    tars = [src] if src.is_file() else sorted(src.rglob("*.tar"))
    if not tars:
        raise DataError(f"{src} holds no .tar shards")
    return _wds(src, tars)


@dataclass(frozen=True)
class Format:
    """One layout `dptrain shard` reads. A new layout is an entry of FORMATS and its reader."""

    read: Callable[[Path, Path | None, str | None], Source]  # (SRC, --labels, split) -> inputs
    detect: Callable[[Path, Path | None], bool]  # (SRC, --labels): is SRC in this layout?
    detect_rank: int  # where `detect` is asked: the first layout (lowest rank) that says yes
    labels: bool = False  # reads a --labels file
    folder: bool = False  # SRC must be a folder
    splits: bool = False  # SRC holds a train and a test split: OUT/train and OUT/test
    files_under_src: bool = False  # inputs are SRC's files: an OUT inside SRC would be read


# --format's choices, in this order. Detection asks the more particular layouts first: CIFAR's
# pickles (their folder may hold train/ and test/ too), train/ + test/ before class folders,
# --labels before class folders, a tar of tars before any tar.
FORMATS: dict[str, Format] = {
    "imagefolder": Format(lambda src, labels, split: _imagefolder(src), _has_class_folders, 4,
                          folder=True, files_under_src=True),
    "flat": Format(_read_flat, _is_labelled, 3, labels=True, folder=True, files_under_src=True),
    "imagenet-tar": Format(_read_tar_of_tars, _is_tar_of_tars, 2),
    "wds": Format(_read_wds, _is_wds, 5),
    "cifar": Format(lambda src, labels, split: _cifar(src, split), _is_cifar, 0, splits=True),
    "splits": Format(_read_splits, _is_splits, 1, splits=True, files_under_src=True),
}


def detect_format(src: Path, labels: Path | None) -> str:
    """The first of FORMATS, in detection order, whose layout SRC is in."""
    for name, f in sorted(FORMATS.items(), key=lambda kv: kv[1].detect_rank):
        if f.detect(src, labels):
            return name
    if any(_is_image_name(e.name) for e in os.scandir(src)):
        raise DataError(f"{src} is a flat folder of images: give its labels with --labels FILE")
    raise DataError(
        f"{src} holds no images: expected class folders, images + --labels, or .tar shards"
    )


def open_source(src: Path, fmt: str = "auto", labels: Path | None = None,
                split: str | None = None) -> Source:
    """Scan SRC (auto-detecting its layout unless `fmt` names one of FORMATS); for a layout
    holding splits, the `split` ("train" or "test") to read."""
    if not src.exists():
        raise DataError(f"source {src} does not exist")
    if fmt == "auto":
        fmt = detect_format(src, labels)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    layout = FORMATS[fmt]
    if labels is not None and not layout.labels:
        raise DataError(f"--labels goes with the flat format, not {fmt}")
    if layout.splits != (split is not None):
        raise DataError(f"format {fmt} " + ("holds train and test splits: shard it with "
                        "dptrain shard SRC OUT" if split is None else "has no splits"))
    if layout.folder and not src.is_dir():
        raise DataError(f"format {fmt} needs a folder, and {src} is a file")
    source = layout.read(src, labels, split)
    if not source.class_names or source.num_inputs == 0:
        raise DataError(f"{src} holds no images (format {fmt})")
    return source


@dataclass(frozen=True)
class SourceOptions:
    """What `dptrain shard` reads: SRC's layout and, for some layouts, where its labels are."""

    fmt: str = option("auto", "Layout of SRC: class folders (ImageNet train/), a flat folder + "
                      "--labels (ImageNet val), ILSVRC2012_img_train.tar, WebDataset shards, "
                      "CIFAR-10/100 python pickles, or train/ + test/ class folders (the last "
                      "two write OUT/train and OUT/test).", flag="--format",
                      choices=("auto", *FORMATS))
    labels: str | None = option(None, "CSV 'filename,class' for a flat folder (Kaggle's "
                                "LOC_val_solution.csv works).", path="file")
    classes_from: str | None = option(None, "Use the class list and ids of this shard set (for "
                                      "val/test splits).", path="dir")
