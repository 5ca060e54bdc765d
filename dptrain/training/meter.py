"""What the training loop measures: each log window's mean loss, img/s and data wait, each
epoch's mean loss and training accuracy, kept on the device between log steps; and its state,
which a checkpoint carries so that a resumed run records what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time

import torch

from ..common.errors import COUNT, RunFailed


class NonFiniteLoss(RunFailed):
    """The loss became inf or nan: the run stops and keeps its last good checkpoint."""


# What a checkpoint holds of the meter (Meter.state), as resuming checks it.
METER = {"loss_sum": torch.Tensor, "finite": torch.Tensor, "correct": torch.Tensor,
         "seen_epoch": COUNT, "window_steps": COUNT, "last_loss": (int, float)}  # Meter.state


class Meter:
    """What the loop measures. Loss, accuracy and finiteness stay on the device between log
    steps (a .item() syncs host and device); a log window may span an epoch's end."""

    def __init__(self, device: torch.device, world: int):
        self.world, self.start = world, time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.epoch_loss = torch.zeros((), device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen_epoch = self.images = self.window_steps = self.epoch_steps = 0
        self.epoch_start = time.perf_counter()
        self.wait_total = self.wait_window = 0.0
        self.window_start, self.last_loss = time.perf_counter(), float("nan")

    def new_epoch(self) -> None:
        self.correct.zero_()
        self.epoch_loss.zero_()
        self.seen_epoch, self.epoch_steps = 0, 0
        self.epoch_start = time.perf_counter()

    def state(self) -> dict:
        """What a resumed run needs to record what an uninterrupted one records: the log
        window in progress, the epoch's accuracy so far, the last logged loss."""
        return {"loss_sum": self.loss_sum.cpu(), "finite": self.finite.cpu(),
                "correct": self.correct.cpu(), "seen_epoch": self.seen_epoch,
                "window_steps": self.window_steps, "last_loss": self.last_loss,
                "epoch_loss": self.epoch_loss.cpu(), "epoch_steps": self.epoch_steps}

    def load_state(self, state: dict) -> None:
        for name in ("loss_sum", "finite", "correct"):
            getattr(self, name).copy_(state[name])
        self.seen_epoch, self.window_steps = state["seen_epoch"], state["window_steps"]
        self.last_loss = state["last_loss"]
        # a checkpoint from before the epoch rows: the epoch's mean loss is unknown
        self.epoch_loss.fill_(state["epoch_loss"] if "epoch_loss" in state else math.nan)
        self.epoch_steps = state.get("epoch_steps", 0)

    def batches(self, loader):
        """The loader's batches, timing how long the loop waited for each."""
        t = time.perf_counter()
        for batch in loader:
            wait = time.perf_counter() - t
            self.wait_window += wait
            self.wait_total += wait
            yield batch
            t = time.perf_counter()

    def step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.epoch_loss += loss.detach()
        self.epoch_steps += 1
        self.finite &= torch.isfinite(loss.detach())
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen_epoch += len(labels)
        self.images += len(labels) * self.world
        self.window_steps += 1

    def check_finite(self, step: int, epoch: int) -> None:
        if not self.finite.item():
            raise NonFiniteLoss(f"the loss became non-finite by step {step}: stopped, keeping "
                                f"the last good checkpoint ({epoch} epoch(s) done). Lower --lr, "
                                "or try --amp off")

    def window(self, step: int, epoch: int, lr: float, res: int, batch_size: int) -> dict:
        """The metrics line of the steps since the last one; starts the next window."""
        self.last_loss = self.loss_sum.item() / self.window_steps
        self.check_finite(step, epoch)
        dt = time.perf_counter() - self.window_start
        line = {"kind": "step", "step": step, "epoch": epoch, "loss": self.last_loss, "lr": lr,
                "res": res, "images_per_s": self.window_steps * batch_size / dt,
                "data_wait": self.wait_window / dt}
        self.loss_sum.zero_()
        self.window_start, self.wait_window, self.window_steps = time.perf_counter(), 0.0, 0
        return line

    def epoch_row(self, step: int, epoch: int) -> dict:
        """The metrics line of an epoch (or of the run's last, partial one): its mean loss and
        training accuracy (this rank's images), and how long it took."""
        return {"kind": "epoch", "step": step, "epoch": epoch,
                "loss": self.epoch_loss.item() / max(1, self.epoch_steps),
                "top1": self.correct.item() / max(1, self.seen_epoch),
                "images": self.seen_epoch * self.world,
                "epoch_s": time.perf_counter() - self.epoch_start}
