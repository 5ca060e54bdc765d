"""What a shard set's data is, checked cheaply: the key every cache of it is filed under, so
that no cache (features, eval pixels) is ever served for data that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..common.errors import DataError
from ..common.runfolder import write_json
from .index import SAMPLES_FILE, ShardIndex, sha256_file


def dataset_fingerprint(index: ShardIndex) -> str:
    """Content of a shard set, from its index: the sample table and every tar's hash."""
    h = hashlib.sha256(index.meta["samples_sha256"].encode())
    for t in index.meta["tars"]:
        h.update(t["sha256"].encode())
    return h.hexdigest()


def checked_fingerprint(index: ShardIndex, stamps: Path) -> str:
    """`dataset_fingerprint`, once every file behind it is checked to be what the index says.

    Each tar's (and samples.npy's) size and modification time are compared with those this
    folder of `stamps` recorded when it last checked them; a file seen for the first time or
    changed since is hashed once, and refused unless its sha256 is the index's. So an
    unchanged set costs a stat per file, and a set damaged or rewritten after sharding is
    refused instead of being served from a cache."""
    fingerprint = dataset_fingerprint(index)
    path = stamps / f"{fingerprint[:32]}.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    files = [(t["file"], t["sha256"]) for t in index.meta["tars"]]
    files.append((SAMPLES_FILE, index.meta["samples_sha256"]))
    changed = False
    for name, sha256 in files:
        file = index.root / name
        try:
            st = file.stat()
        except OSError as e:
            raise DataError(f"{file}: {e.strerror}: run dptrain verify {index.root}") from None
        stamp = [st.st_size, st.st_mtime_ns]
        if known.get(name) == stamp:
            continue
        if sha256_file(file) != sha256:
            raise DataError(f"{file} changed since the set was sharded (its sha256 is not the "
                            f"index's): run dptrain verify {index.root}")
        known[name], changed = stamp, True
    if changed:
        stamps.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    return fingerprint
