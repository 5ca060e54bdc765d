"""`dptrain verify`: is a shard set what its index says? Every file re-hashed, the table
checked against the tars' own headers, and how to rebuild a damaged set; plus the cheap size
check a rerun of `dptrain shard` makes before calling a set up to date.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .environment import cores_for_this_process
from .errors import DataError
from .index import INDEX_FILE, PROGRESS_DIR, SAMPLES_FILE, ShardIndex, idx_name, sha256_file


def _verify_tar(root: Path, tar_id: int, tar: dict, rows: np.ndarray) -> list[str]:
    path, problems = root / tar["file"], []
    if not path.is_file():
        return [f"{tar['file']}: missing"]
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
        return problems
    # The table must point at the tar's real members: .jpg payloads, each followed by its .cls.
    with open(path, "rb") as f:
        fd = f.fileno()
        for i, row in enumerate(rows):
            try:
                jpg = tarfile.TarInfo.frombuf(os.pread(fd, 512, row["offset"] - 512), "utf-8",
                                              "strict")
                cls_at = row["offset"] + -(-jpg.size // 512) * 512
                cls = tarfile.TarInfo.frombuf(os.pread(fd, 512, cls_at), "utf-8", "strict")
                label = os.pread(fd, cls.size, cls_at + 512)
            except tarfile.TarError as e:
                return [f"{tar['file']}: sample {i} at offset {row['offset']}: bad tar header "
                        f"({e})"]
            if (not jpg.name.endswith(".jpg") or jpg.size != row["size"]
                    or cls.name != jpg.name[:-4] + ".cls" or label != b"%d" % row["label"]):
                return [f"{tar['file']}: sample {i} at offset {row['offset']} does not match "
                        "the index"]
    return []


def verify(root: str | os.PathLike, workers: int | None = None) -> list[str]:
    """Re-hash every file and check the table against the tars; returns the problems found,
    each naming its file. A missing or unreadable index is a problem like a damaged tar."""
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
    # hashlib releases the GIL: threads hash tars in parallel
    with ThreadPoolExecutor(workers or cores_for_this_process()) as pool:
        jobs = [
            pool.submit(_verify_tar, root, t, tar, index.samples[order[bounds[t] : bounds[t + 1]]])
            for t, tar in enumerate(index.meta["tars"])
        ]
        for job in jobs:
            problems += job.result()
    return problems


def repair_hint(root: str | os.PathLike) -> str:
    """How to mend a damaged shard set: shard its source again into it."""
    try:
        source = json.loads((Path(root) / INDEX_FILE).read_text()).get("source", "SRC")
    except (OSError, ValueError):
        source = "SRC"
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
            as_json: bool = False) -> tuple[str, bool]:
    """`dptrain verify`: its text (or JSON) and whether the set is whole."""
    problems = verify(root, workers)
    if as_json:
        return json.dumps({"path": str(root), "ok": not problems, "problems": problems,
                           "hint": repair_hint(root) if problems else None}), not problems
    return render_verify(root, problems), not problems
