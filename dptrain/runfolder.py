"""The rules of a folder a command fills (`shard`, `pretrain`, `probe`, `sweep`, `report`), in
one place: a file appears whole or not at all, and a folder made with other options is refused
unless --overwrite. So an interrupted command can simply be run again. Checkpoints are written
(`save_torch`) and read (`load_checkpoint`) here too.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DataError

PARTIAL = ".partial"  # suffix of files and folders being written


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside `path` to write into (a file or a folder); renamed to `path`
    when the block ends without an error, removed when it fails. `suffix` keeps an extension
    that a writer insists on (numpy's savez appends .npz to any other name)."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL + suffix)
    _remove(tmp)  # what an interrupted earlier try left
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name and rename, so readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically: a checkpoint is the old one or the new one, never half."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def must_replace(folder: Path, old: dict | None, new: dict, *, overwrite: bool,
                 holds: str) -> bool:
    """Whether `folder`, which holds `old` (the options it was made with; None: nothing of
    ours), must be emptied for `new`: when the options differ. Without --overwrite that is
    refused, naming the options that differ."""
    if old is None:
        return False
    if old != new and not overwrite:
        differ = [k for k in new if old.get(k) != new[k]] or ["unreadable"]
        raise DataError(f"{folder} holds {holds} with other options ({', '.join(differ)} "
                        "differ): use --overwrite to replace it, or another --out")
    return old != new


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """A dptrain checkpoint (weights_only: loading runs no code), or a DataError saying the
    file is not one (damaged, truncated, or something else)."""
    import torch

    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        ckpt["config"]["arch"], ckpt["model"], ckpt["num_classes"]
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise DataError(f"{path} is not a dptrain checkpoint ({type(e).__name__})") from None
    return ckpt
