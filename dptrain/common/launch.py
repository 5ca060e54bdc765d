"""How dptrain starts processes: `dptrain pretrain --gpus G` is the run's resolved config under
torchrun, one process per GPU of this machine (torchrun's environment is all the trainer reads:
environment.py); a sweep's children die with the sweep.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from .errors import DataError


def relaunch(gpus: int, config: dict, out: Path, flags: list[str]) -> None:
    """Replace this process by torchrun running `dptrain pretrain --config FILE --out OUT
    FLAGS` on `gpus` GPUs, FILE holding the resolved `config`: the ranks parse nothing again.
    Refused, before anything is written, when fewer GPUs are visible."""
    import torch

    from .runfolder import RunFolder

    visible = torch.cuda.device_count()
    if gpus > visible:
        raise DataError(f"--gpus {gpus}, but {visible or 'no'} CUDA GPU(s) are visible here; "
                        "for several CPU processes use torchrun --nproc_per_node=N -m dptrain "
                        "pretrain ... --device cpu")
    config_file = RunFolder(out).write_launch_config(config)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={gpus}", "-m", "dptrain", "pretrain",
                              "--config", str(config_file), "--out", str(out), *flags])


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
