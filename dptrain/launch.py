"""How dptrain starts processes: `dptrain pretrain --gpus G` is the same command again under
torchrun, one process per GPU of this machine (torchrun's environment, RANK, LOCAL_RANK and
WORLD_SIZE, is all the trainer reads); a sweep's children die with the sweep.
"""

from __future__ import annotations

import ctypes
import os
import signal
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


PARENT = "DPTRAIN_PARENT_PID"  # set by a sweep for the commands it runs


def child_env(env: dict) -> dict:
    """The environment for a command this process runs and waits for: it gets SIGTERM when
    this process dies, kill -9 included (`die_with_parent`)."""
    return {**env, PARENT: str(os.getpid())}


def die_with_parent() -> None:
    """In a command a sweep runs: ask the kernel for SIGTERM when the sweep dies (Linux's
    PR_SET_PDEATHSIG), which stops a run at its next step with a checkpoint. Otherwise a
    killed sweep would leave its runs training, and a rerun would meet them."""
    pid = os.environ.pop(PARENT, None)  # for this process only, not for its own children
    if not pid:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != int(pid):  # the sweep died before the request: act as if it came
        os.kill(os.getpid(), signal.SIGTERM)
