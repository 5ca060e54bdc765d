"""`dptrain verify`: is a shard set what its index says, and can the loader use every sample?
Every file re-hashed, the table checked against the tars' own headers and each JPEG's (size,
EXIF orientation), the samples decoded by the loader's decoder where the set was not written
so (`--decode` forces it), and how to rebuild a damaged set; plus the cheap size check a rerun
of `dptrain shard` makes before calling a set up to date.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..common.environment import cores_for_this_process
from ..common.errors import DataError
from .images import DECODER, BadImage, LoaderDecoder, read_jpeg_header
from .index import INDEX_FILE, PROGRESS_DIR, SAMPLES_FILE, ShardIndex, idx_name, sha256_file

DECODE_BATCH = 64  # images per decoder run: a damaged one costs the batch a second pass


def _verify_tar(root: Path, tar_id: int, tar: dict, rows: np.ndarray) -> tuple[list[str], bool]:
    """The tar's problems, and whether it is intact: what the index says, byte for byte (its
    samples may still be flagged: an EXIF rotation, a size that is not the header's)."""
    path, problems = root / tar["file"], []
    if not path.is_file():
        return [f"{tar['file']}: missing"], False
    if path.stat().st_size != tar["bytes"]:
        problems.append(f"{tar['file']}: size {path.stat().st_size} != {tar['bytes']} recorded")
    elif sha256_file(path) != tar["sha256"]:
        problems.append(f"{tar['file']}: sha256 mismatch (file damaged)")
    idx = root / idx_name(tar["file"])
    if not idx.is_file():
        problems.append(f"{idx.name}: missing")
    elif sha256_file(idx) != tar["idx_sha256"]:
        problems.append(f"{idx.name}: sha256 mismatch (file damaged)")
    if problems:
        return problems, False
    # The table must point at the tar's real members: .jpg payloads, each followed by its .cls.
    with open(path, "rb") as f:
        fd = f.fileno()
        for i, row in enumerate(rows):
            try:
                jpg = tarfile.TarInfo.frombuf(os.pread(fd, 512, row["offset"] - 512), "utf-8",
                                              "strict")
                cls_at = row["offset"] + -(-jpg.size // 512) * 512
                cls = tarfile.TarInfo.frombuf(os.pread(fd, 512, cls_at), "utf-8", "strict")
                # a label is a few digits: a header claiming more is not read (it may say GBs)
                label = os.pread(fd, min(cls.size, 32), cls_at + 512)
            except (tarfile.TarError, UnicodeDecodeError) as e:  # a field that is not UTF-8
                return [f"{tar['file']}: sample {i} at offset {row['offset']}: bad tar header "
                        f"({e})"], False
            if (not jpg.name.endswith(".jpg") or jpg.size != row["size"]
                    or cls.name != jpg.name[:-4] + ".cls" or label != b"%d" % row["label"]):
                return [f"{tar['file']}: sample {i} at offset {row['offset']} does not match "
                        "the index"], False
            wrong = _stored_wrong(os.pread(fd, jpg.size, row["offset"]), row)
            if wrong:
                problems.append(f"{tar['file']}: sample {i} ({jpg.name}) {wrong}")
    return problems, True


def _stored_wrong(data: bytes, row) -> str | None:
    """What makes a stored JPEG other than what the loader expects: its header's size against
    the index, and an EXIF rotation (sets written before shard applied it: DALI would rotate
    the image and no longer fit the index, so the loader decodes it unrotated)."""
    try:
        header = read_jpeg_header(data)
    except BadImage as e:
        return str(e)
    if header is None:
        return "is not a JPEG"
    if (header.height, header.width) != (row["height"], row["width"]):
        return (f"is {header.width}x{header.height}, the index says "
                f"{row['width']}x{row['height']}")
    if header.orientation != 1:
        return (f"carries EXIF orientation {header.orientation}, which this set's writer did not "
                "apply (the loader decodes it unrotated)")
    return None


def _undecodable(root: Path, tars: list[dict], rows: list[np.ndarray], threads: int) -> list[str]:
    """Every sample of these tars through the loader's decoder: those it fails, warns on or
    decodes to another size than the index records."""
    decoder, problems = LoaderDecoder(DECODE_BATCH, threads), []
    for tar, table in zip(tars, rows):
        with open(root / tar["file"], "rb") as f:
            fd = f.fileno()
            for start in range(0, len(table), DECODE_BATCH):
                part = table[start:start + DECODE_BATCH]
                datas = [os.pread(fd, int(r["size"]), int(r["offset"])) for r in part]
                found = decoder.problems(datas, [(int(r["height"]), int(r["width"]))
                                                 for r in part])
                problems += [f"{tar['file']}: sample {start + i} at offset {part[i]['offset']} "
                             f"does not decode in the loader ({why})"
                             for i, why in enumerate(found) if why]
    return problems


def verify(root: str | os.PathLike, workers: int | None = None, decode: bool = False
           ) -> list[str]:
    """Re-hash every file and check the table against the tars; returns the problems found,
    each naming its file. A missing or unreadable index is a problem like a damaged tar.
    The samples are decoded too where `decode`, or where the set's writer did not decode them
    with the loader's decoder (`images.DECODER`; sets written before it did)."""
    root = Path(root)
    if not (root / INDEX_FILE).is_file():
        unfinished = " (an interrupted dptrain shard: run it again)" \
            if (root / PROGRESS_DIR).is_dir() else ""
        return [f"{INDEX_FILE}: missing{unfinished}"]
    if not (root / SAMPLES_FILE).is_file():
        return [f"{SAMPLES_FILE}: missing"]
    try:
        index = ShardIndex.load(root)
    except DataError as e:  # unreadable, another format version, or the two do not match
        return [f"{INDEX_FILE}: {e}"]
    problems = []
    if sha256_file(root / SAMPLES_FILE) != index.meta["samples_sha256"]:
        problems.append(f"{SAMPLES_FILE}: sha256 mismatch (file damaged)")
    counts = np.bincount(index.samples["label"], minlength=len(index.counts))
    if not np.array_equal(counts, index.counts):
        problems.append(f"{SAMPLES_FILE}: per-class counts differ from {INDEX_FILE}")
    order = np.argsort(index.samples["tar"], kind="stable")
    bounds = np.searchsorted(index.samples["tar"][order], np.arange(len(index.meta["tars"]) + 1))
    tars = index.meta["tars"]
    rows = [index.samples[order[bounds[t]:bounds[t + 1]]] for t in range(len(tars))]
    threads = workers or cores_for_this_process()
    # hashlib releases the GIL: threads hash tars in parallel
    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(_verify_tar, [root] * len(tars), range(len(tars)), tars, rows))
    for tar_problems, _ in found:
        problems += tar_problems
    if decode or index.meta.get("job", {}).get("decoded_with") != DECODER:
        whole = [t for t, (_, intact) in enumerate(found) if intact]  # others: named already
        problems += _undecodable(root, [tars[t] for t in whole], [rows[t] for t in whole],
                                 threads)
    return problems


def repair_hint(root: str | os.PathLike) -> str:
    """How to mend a damaged shard set: shard its source again into it."""
    try:
        meta = json.loads((Path(root) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    source = meta.get("source", "SRC") if isinstance(meta, dict) else "SRC"
    if str(source).startswith("{"):  # generated data: its generator's own command
        return f"rebuild it: python tools/make_shards.py (or remove {root} and run again)"
    return f"rebuild it: dptrain shard {source} {root} --overwrite"


def render_verify(root: str | os.PathLike, problems: list[str]) -> str:
    """`dptrain verify`'s verdict: OK and the set's size, or a DAMAGED line per bad or missing
    file and how to rebuild the set."""
    if not problems:
        meta = ShardIndex.load(root).meta
        return f"{root}: OK ({len(meta['tars']):,} tars, {meta['num_samples']:,} samples)"
    return "\n".join([f"DAMAGED {Path(root) / p}" for p in problems]
                     + [f"{root}: {len(problems)} problem(s); {repair_hint(root)}"])


def sizes_differ(index: ShardIndex) -> list[str]:
    """Tars and their .idx files that are missing or not the size the index recorded: the
    cheap check a rerun of `dptrain shard` makes before calling a set up to date."""
    bad = []
    for tar in index.meta["tars"]:
        path = index.root / tar["file"]
        if not path.is_file() or path.stat().st_size != tar["bytes"]:
            bad.append(tar["file"])
        elif not (index.root / idx_name(tar["file"])).is_file():
            bad.append(idx_name(tar["file"]))
    return bad


def verdict(root: str | os.PathLike, workers: int | None = None,
            as_json: bool = False, decode: bool = False) -> tuple[str, bool]:
    """`dptrain verify`: its text (or JSON) and whether the set is whole."""
    problems = verify(root, workers, decode)
    if as_json:
        return json.dumps({"path": str(root), "ok": not problems, "problems": problems,
                           "hint": repair_hint(root) if problems else None}), not problems
    return render_verify(root, problems), not problems
