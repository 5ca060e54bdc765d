"""`dptrain pretrain --gpus G`: the same command again under torchrun, one process per GPU of
this machine. torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) is all the trainer reads.
"""

from __future__ import annotations

import os
import sys

from .errors import DataError


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch(gpus: int, argv: list[str]) -> None:
    """Replace this process by torchrun running `dptrain ARGV` (without --gpus) on `gpus`
    GPUs; refused when fewer are visible."""
    import torch

    visible = torch.cuda.device_count()
    if gpus > visible:
        raise DataError(f"--gpus {gpus}, but {visible or 'no'} CUDA GPU(s) are visible here; "
                        "for several CPU processes use torchrun --nproc_per_node=N -m dptrain "
                        "pretrain ... --device cpu")
    rest, skip = [], False
    for a in argv:  # the same command without --gpus
        if skip or a == "--gpus" or a.startswith("--gpus="):
            skip = a == "--gpus"
            continue
        rest.append(a)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={gpus}", "-m", "dptrain", *rest])
