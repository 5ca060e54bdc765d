"""Pre-train one model on one K x n subset: `dptrain pretrain --classes K --per-class n`.

    dptrain pretrain --data shards/imagenet-train --classes 500 --per-class 256 --out runs/k500
    torchrun --nproc_per_node=8 -m dptrain pretrain ...            # DDP, one process per GPU

The loop reads top to bottom: fetch a uint8 batch, normalise it on the device, forward under
autocast, backward, step, log. A run folder holds config.json, metrics.jsonl, checkpoint.pt
(atomic, every epoch) and summary.json; rerunning the command resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import SPEED_ONLY, PretrainOptions, TrainConfig, check_config
from .device import amp_context, resolve_amp, resolve_device, to_model_input
from .environment import Ranks, under_torchrun
from .errors import COUNT, DataError, RunFailed, Stopped, mismatch
from .evalcache import EvalCache, cache_dir_option
from .index import ShardIndex
from .launch import relaunch
from .loader import EVAL_RESIZE, Loader
from .models import build_model
from .pixelcache import PixelCache, cache_side, training_step_bytes
from .pixelcache import prepare as prepare_cache
from .progress import bar as progress_bar
from .progress import plural
from .runfolder import (
    RunFolder,
    folder_lock,
    load_checkpoint,
    restoring,
    save_torch,
)
from .subset import read_class_list, select
from .subset import steps_per_epoch as epoch_steps
from .tracking import open_tracker


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str) -> float:
    """Warm-up linearly to `peak` over `warmup` steps, then decay to 0 by step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (1 - t) if schedule == "linear" else peak * 0.5 * (1 + math.cos(math.pi * t))


def res_at(epoch: int, epochs: int, cfg: TrainConfig) -> int:
    """Progressive resolution: min_res -> res over the epochs, in steps of 32 px (FFCV)."""
    if cfg.min_res is None or epochs <= 1:
        return cfg.res
    r = cfg.min_res + (cfg.res - cfg.min_res) * min(1.0, epoch / (epochs - 1))
    return int(round(r / 32) * 32) if cfg.res - cfg.min_res >= 32 else cfg.res


def param_groups(model: torch.nn.Module, weight_decay: float, no_bn_wd: bool) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if no_bn_wd and p.ndim <= 1 else decay).append(p)  # norms and biases: 1-D
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLoss(RunFailed):
    """The loss became inf or nan: the run stops and keeps its last good checkpoint."""


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, autocast, channels_last: bool) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = 0
    for images, labels in loader:
        with autocast:
            logits = model(to_model_input(images, channels_last))
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    model.train()
    return correct.item() / max(1, seen)


def train_loader(subset, cfg: TrainConfig, res: int, device: str, rank: int, world: int,
                 cache: PixelCache | None = None) -> Loader:
    """This rank's training loader: each rank reads its own part, from its pixel cache if it
    has one."""
    return Loader(subset, batch_size=cfg.batch_size // world, train=True, res=res,
                  device=device, seed=cfg.seed, rank=rank, world_size=world,
                  threads=cfg.workers, decode=cfg.decode, hw_decoder_load=cfg.hw_decoder_load,
                  prefetch=cfg.prefetch, cache=cache)


def pixel_cache(subset, cfg: TrainConfig, model, autocast, ranks: Ranks, device: torch.device):
    """This rank's pixel cache, to be filled by the loader, or None (`pixelcache.prepare`),
    and what to record."""
    batch = cfg.batch_size // ranks.world

    def step(twin):  # what one training step at the largest resolution holds on the GPU
        x = torch.zeros((batch, cfg.res, cfg.res, 3), dtype=torch.uint8, device=device)
        with autocast:
            loss = twin(to_model_input(x, cfg.channels_last)).float().logsumexp(1).mean()
        loss.backward()

    def step_bytes() -> int:  # + the optimiser's state (momentum, or Adam's two moments)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return training_step_bytes(model, step) + 2 * params

    return prepare_cache(subset, mode=cfg.cache, side=cfg.cache_side or cache_side(cfg.res),
                         seed=cfg.seed, rank=ranks.rank, world=ranks.world, device=device,
                         threads=cfg.workers, step_bytes=step_bytes)


def setup_ranks(cfg: TrainConfig) -> tuple[Ranks, torch.device]:
    """Check the options, pick the device, and join the process group of a DDP run."""
    ranks = Ranks.from_env()
    cuda = resolve_device(cfg.device) == "cuda"
    check_config(cfg, ranks.world, cuda)
    device = torch.device("cuda", ranks.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ranks.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return ranks, device


@dataclass(frozen=True)
class Plan:
    """The run's length, from the subset: epochs end where a rank's share runs out."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    log_every: int  # as given, else 50 or fewer: a short run logs 20 rows or more


LOG_EVERY, LOG_ROWS = 50, 20  # --log-every's default, and the rows a shorter run still logs


def plan_steps(cfg: TrainConfig, num_samples: int, world: int) -> Plan:
    per_epoch = epoch_steps(num_samples, cfg.batch_size // world, world)
    if per_epoch == 0:
        raise DataError(f"{num_samples} images make no full batch of {cfg.batch_size}: use a "
                        "smaller --batch-size")
    total = cfg.steps or cfg.epochs * per_epoch
    return Plan(per_epoch, total, math.ceil(total / per_epoch),
                int(cfg.warmup_epochs * per_epoch),
                cfg.log_every or max(1, min(LOG_EVERY, total // LOG_ROWS)))


def _computes(record: dict) -> dict:
    """What a run computes: its options but those that only change its speed, and its data.
    Records from before --optimizer trained with SGD."""
    config = {"optimizer": "sgd", "beta2": 0.999, **record["config"]}
    return {**{k: v for k, v in config.items() if k not in SPEED_ONLY},
            "subset": record["subset"]}


def build(cfg: TrainConfig, num_classes: int, amp: str, device: torch.device):
    """The model, its optimiser (--optimizer), and the precision: an autocast context and a
    gradient scaler (active for fp16 only)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, cfg.weight_decay, cfg.no_bn_wd)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        optimizer = adam(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return model, optimizer, amp_context(device.type, amp), scaler


# What resuming reads of a checkpoint, besides what every reader does (runfolder).
RESUMABLE = {"optimizer": dict, "scaler": dict, "rng_cpu": torch.Tensor,
             "step": COUNT, "epoch": COUNT}
METER = {"loss_sum": torch.Tensor, "finite": torch.Tensor, "correct": torch.Tensor,
         "seen_epoch": COUNT, "window_steps": COUNT, "last_loss": (int, float)}  # Meter.state


def resume(path: Path, model, optimizer, scaler,
           device: torch.device) -> tuple[int, int, dict | None]:
    """(step, epoch, the meter's state) to go on from: the checkpoint's, or (0, 0, None)
    without one. The step may lie inside the epoch (a run stopped by a signal)."""
    if not path.is_file():
        return 0, 0, None
    try:
        ckpt = load_checkpoint(path, device, RESUMABLE)
        problem = mismatch(ckpt["meter"], METER, "meter") if "meter" in ckpt else None
        if problem:
            raise DataError(f"{path} is not a dptrain checkpoint ({problem})")
        with restoring(path):
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng_cpu"])
            if "rng_cuda" in ckpt and device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    except DataError as e:
        raise DataError(f"cannot resume: {e}; use --overwrite to start the run again, or "
                        "another --out") from None
    return ckpt["step"], ckpt["epoch"], ckpt.get("meter")


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


def misfits(cfg: TrainConfig, subset, plan: Plan) -> list[str]:
    """Warnings for options that do not fit the data, said on the run's first lines: a
    recipe's defaults are for ImageNet, and a small set trains slowly and badly on them."""
    found = []
    rows = subset.index.samples[subset.rows]
    short = int(np.median(np.minimum(rows["height"], rows["width"]))) if len(rows) else 0
    if short and cfg.res > short:
        found.append(f"WARNING: --res {cfg.res} is above most images' shorter side (median "
                     f"{short} px): every crop is upsampled; --res {short} (and a model for "
                     "small images, e.g. --arch smallcnn) fits this data")
    if plan.warmup_steps >= plan.total_steps:
        found.append(f"WARNING: the whole run is warm-up ({cfg.warmup_epochs:g} warm-up "
                     f"epoch{'' if cfg.warmup_epochs == 1 else 's'}, "
                     f"{plural(plan.total_steps, 'step')} in all): the learning rate "
                     "only rises; fewer --warmup-epochs or more --epochs")
    return found


def train_step(net, optimizer, autocast, scaler, images: torch.Tensor, labels: torch.Tensor,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch; (loss, logits), left on the device."""
    with autocast:
        logits = net(to_model_input(images, cfg.channels_last))
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, logits


def measure_img_per_s(cfg: TrainConfig, num_classes: int, batch_size: int, device: str,
                      steps: int = 3) -> float:
    """Training images per second of this config's model here, per process: `steps` timed
    steps on one batch of random images held in memory, after one untimed step (no loader, so
    an upper bound where loading is the limit). What `sweep --dry-run` plans with when no
    --img-per-s is given."""
    dev = torch.device(device)
    model, optimizer, autocast, scaler = build(cfg, num_classes,
                                               resolve_amp(cfg.amp, dev.type == "cuda"), dev)
    images = torch.randint(0, 256, (batch_size, cfg.res, cfg.res, 3), dtype=torch.uint8,
                           device=dev)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)
    for timed in (False, True):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(steps if timed else 1):
            loss, _ = train_step(model, optimizer, autocast, scaler, images, labels, cfg)
        loss.item()  # waits for the device
    return steps * batch_size / (time.perf_counter() - t)


def train(cfg: TrainConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
          make_loader=train_loader, log=None) -> dict:
    """Train (or resume, or return the summary of a finished run in `out`). `make_loader`
    (train_loader's arguments) is where batches come from: benchmarks pass one that replays
    batches from memory. `log(line)`: where the run's first words go (the pixel cache's
    decision) [stderr]."""
    # On a GPU the run has a CUDA stream of its own. On the legacy default stream, which waits
    # for other streams' work, ResNet-18 trained 23% slower beside the JPEG decoders (H200,
    # 10,263 against 13,263 img/s; benchmarks/README.md).
    stream = torch.cuda.stream(torch.cuda.Stream(Ranks.from_env().local_rank)) \
        if resolve_device(cfg.device) == "cuda" else contextlib.nullcontext()
    with contextlib.ExitStack() as held, stream:
        return _train(cfg, Path(out), overwrite, progress, make_loader, log, held)


def _train(cfg: TrainConfig, out: Path, overwrite: bool, progress: bool, make_loader,
           log, held: contextlib.ExitStack) -> dict:
    stop = held.enter_context(StopOnSignal())
    run = RunFolder(out)
    ranks, device = setup_ranks(cfg)
    cuda = device.type == "cuda"
    names = read_class_list(cfg.class_list) if cfg.class_list else None
    subset = select(ShardIndex.load(cfg.data), cfg.classes, cfg.per_class, seed=cfg.seed,
                    class_names=names, allow_fewer=cfg.allow_fewer)  # from the index alone
    plan = plan_steps(cfg, len(subset), ranks.world)
    amp = resolve_amp(cfg.amp, cuda)
    record = {"config": asdict(cfg), "subset": subset.describe(), "world_size": ranks.world,
              "amp": amp, "steps_per_epoch": plan.steps_per_epoch,
              "total_steps": plan.total_steps, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if cuda else str(device)}
    if ranks.is_main:  # the run folder is this run's until it ends: a second one is refused
        held.enter_context(folder_lock(run.path, "pretrain"))
    finished = run.open(record, _computes, overwrite=overwrite, main=ranks.is_main)
    if ranks.world > 1:
        torch.distributed.barrier()  # every rank sees the folder rank 0 prepared
    if finished:
        return finished
    model, optimizer, autocast, scaler = build(cfg, subset.num_classes, amp, device)
    step, epoch, meter_state = resume(run.checkpoint, model, optimizer, scaler, device)
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    if ranks.is_main:
        for line in ([f"resuming {run.path} from step {step:,} of {plan.total_steps:,}"]
                     if step else []) + misfits(cfg, subset, plan):
            (log or _stderr)(line)
    cache, cache_record = pixel_cache(subset, cfg, model, autocast, ranks, device)
    if ranks.is_main:
        (log or _stderr)(cache_record.line())
    meter = Meter(device, ranks.world)
    if meter_state:
        with restoring(run.checkpoint):
            meter.load_state(meter_state)

    def checkpoint(step: int, epoch: int) -> None:
        """The run so far: resuming from it computes and records what an uninterrupted run
        does. `epoch`: the one to go on with (from step - epoch x steps per epoch)."""
        meter.check_finite(step, epoch)  # never checkpoint a diverged model
        if ranks.is_main:  # the unwrapped module's state: no key surgery when loading
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                        "rng_cpu": torch.get_rng_state(), "config": asdict(cfg),
                        **({"rng_cuda": torch.cuda.get_rng_state(device)} if cuda else {}),
                        "meter": meter.state(), "num_classes": subset.num_classes,
                        "class_names": subset.class_names}, run.checkpoint)

    # -- the loop
    loader = None  # one per resolution (progressive resizing: 160 px, ..., then 192 px)
    metrics = run.open_metrics(step) if ranks.is_main else None
    tracker = held.enter_context(open_tracker(cfg.log_to if ranks.is_main else (), run.path,
                                              record, step))
    bar = progress_bar(total=plan.total_steps, initial=step, unit="step",
                       enabled=progress and ranks.is_main)
    while step < plan.total_steps:
        res = res_at(epoch, plan.epochs, cfg)
        if loader is None or loader.res != res:  # resolutions only grow: the last is done
            if loader is not None:
                loader.close()
            loader = make_loader(subset, cfg, res, str(device), ranks.rank, ranks.world,
                                 cache=cache)
        start = step - epoch * plan.steps_per_epoch  # > 0 after a stop inside the epoch
        if start == 0:
            meter.new_epoch()
        loader.set_epoch(epoch, start)
        for images, labels in meter.batches(loader):
            lr = lr_at(step, plan.total_steps, plan.warmup_steps, cfg.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(net, optimizer, autocast, scaler, images, labels, cfg)
            meter.step(loss, logits, labels)
            step += 1
            if step % plan.log_every == 0 or step == plan.total_steps:
                line = meter.window(step, epoch, lr, loader.res, cfg.batch_size)
                if metrics:
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                tracker.log({f"train/{k}": line[k] for k in ("loss", "lr", "images_per_s",
                                                             "data_wait")}, step)
                bar.set_postfix(epoch=epoch, loss=f"{line['loss']:.3f}",
                                img_s=f"{line['images_per_s']:.0f}", refresh=False)
            bar.update(1)
            if step >= plan.total_steps:
                break
            if stop.agreed(step, plan.log_every, ranks.world, device):
                checkpoint(step, epoch)
                bar.close()
                loader.close()
                if metrics:
                    metrics.close()
                raise stopped(run.path, step, plan.total_steps, stop.signal)
        line = meter.epoch_row(step, epoch)  # before the checkpoint: a resume logs it again
        if metrics:
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
        tracker.log({"train/top1_epoch": line["top1"]}, step)
        epoch += 1
        checkpoint(step, epoch)
    bar.close()
    wall = time.perf_counter() - meter.start
    loader_threads = loader.pipeline["threads"] if loader else None
    loader_ms = loader.stage_ms() if loader else {}
    if loader is not None:
        loader.close()  # its feeder has read ahead into an epoch that will not run

    # -- the end: validation on held-out images of the same classes, then the summary
    val_top1 = validate(cfg, model, subset, autocast, device, ranks) if cfg.val_data else None
    summary = {"steps": step, "epochs": epoch, "train_loss": meter.last_loss,
               "train_top1_last_epoch": meter.correct.item() / max(1, meter.seen_epoch),
               "val_top1": val_top1, "wall_s": wall,
               "images_per_s": meter.images / wall if wall > 0 else None,
               "data_wait_fraction": meter.wait_total / wall if wall > 0 else None,
               "device": record["device"], "world_size": ranks.world, "amp": amp,
               "loader_threads": loader_threads, "loader_ms_per_batch": loader_ms,
               "cache": asdict(cache_record.filled(cache)),
               "num_classes": subset.num_classes, "num_samples": len(subset)}
    if ranks.is_main:
        run.write_summary(summary)
        tracker.summary(summary)
        metrics.close()
    if ranks.world > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's validation
        torch.distributed.destroy_process_group()
    return summary


def validate(cfg: TrainConfig, model, subset, autocast, device: torch.device,
             ranks: Ranks) -> float | None:
    """Top-1 on --val-data's images of the run's classes (rank 0 only)."""
    if not ranks.is_main:
        return None
    index = ShardIndex.load(cfg.val_data)
    val = select(index, class_names=subset.class_names, allow_fewer=True)
    res = cfg.eval_res or cfg.res
    root = cache_dir_option(cfg.cache_dir) if cfg.cache != "off" else None
    loader = Loader(val, batch_size=cfg.batch_size // ranks.world, train=False, res=res,
                    device=str(device), threads=cfg.workers, decode=cfg.decode,
                    eval_cache=EvalCache(root, index, res, EVAL_RESIZE) if root else None)
    try:
        return evaluate(model, loader, autocast, cfg.channels_last)
    finally:
        loader.close()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pretrain_run(cfg: TrainConfig, o: PretrainOptions, *,
                 progress: bool = True) -> tuple[Path, dict]:
    """`dptrain pretrain`: (the run folder, its summary). With --gpus (outside torchrun), the
    same run again under torchrun, one rank per GPU, from its resolved config."""
    out = Path(o.out or RunFolder.default(cfg.data, cfg.classes, cfg.per_class, cfg.seed))
    if o.gpus and not under_torchrun():
        relaunch(o.gpus, asdict(cfg), out,
                 ["--overwrite"] * o.overwrite + ["--no-progress"] * (not progress))
    return out, train(cfg, out, overwrite=o.overwrite, progress=progress)


def summary_line(out: Path, s: dict) -> str:
    """`dptrain pretrain`'s last words, from the summary."""
    head = f"{out} is finished already ({plural(s['steps'], 'step')}); its summary:\n" \
        if s.get("already_finished") else ""
    val = "-" if s["val_top1"] is None else f"{s['val_top1']:.4f}"
    return (f"{head}{out}: {plural(s['steps'], 'step')}, {plural(s['epochs'], 'epoch')}, "
            f"train loss {s['train_loss']:.4f}, val top-1 {val}, "
            f"{s['images_per_s'] or 0:,.0f} img/s, data wait {(s['data_wait_fraction'] or 0):.0%}, "
            f"{s['wall_s']:.0f} s on {s['device']}")
