"""Stopping a run on a signal without losing work: SIGTERM (Slurm, a dying sweep), SIGUSR2
(submitit, ahead of a time limit) or Ctrl-C ask the training loop to stop at its next step,
after a checkpoint there; in DDP every rank stops at the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from ..common.errors import Stopped


def stopped(out: Path, step: int, total: int, signum: int) -> Stopped:
    """SIGTERM or SIGINT stopped the run at a step boundary, after saving a checkpoint there."""
    return Stopped(f"{out}: stopped at step {step} of {total} ({signal.Signals(signum).name}); "
                   "checkpoint saved: run the same command to resume", signum)


class StopOnSignal:
    """SIGTERM (what Slurm sends before it preempts or ends a job, and what a sweep's run
    gets when the sweep dies), SIGUSR2 (what submitit has Slurm send ahead of a time limit)
    and SIGINT (Ctrl-C) during a run ask it to stop: the loop
    finishes its step, saves a checkpoint and raises Stopped, so no work is lost. A second
    Ctrl-C stops at once (the checkpoint on disk is then the last whole one); a repeated
    SIGTERM changes nothing (a dying sweep's threads may each send one)."""

    def __init__(self):
        self.signal: int | None = None
        self._before: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # where handlers can be set
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = self.signal or signum

    def __exit__(self, *_) -> None:
        for sig, before in self._before.items():
            signal.signal(sig, before)

    def agreed(self, step: int, every: int, world: int, device: torch.device) -> bool:
        """Whether to stop after `step`: at once in one process; in DDP every `every` steps,
        when any rank was signalled, all at the same step."""
        if world == 1:
            return self.signal is not None
        if step % every:
            return False
        flag = torch.tensor(self.signal or 0, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signal = self.signal or int(flag.item()) or None
        return self.signal is not None
