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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..common.environment import Ranks, under_torchrun
from ..common.errors import COUNT, DataError, mismatch
from ..common.launch import relaunch
from ..common.progress import bar as progress_bar
from ..common.progress import plural
from ..common.runfolder import (
    RunFolder,
    folder_lock,
    load_checkpoint,
    restoring,
    save_torch,
)
from ..common.tracking import open_tracker
from ..data.index import ShardIndex
from ..data.subset import Subset, read_class_list, select
from ..data.subset import steps_per_epoch as epoch_steps
from ..loading.evalcache import EvalCache, cache_dir_option
from ..loading.loader import EVAL_RESIZE, Loader
from ..loading.pixelcache import PixelCache, cache_side, training_step_bytes
from ..loading.pixelcache import prepare as prepare_cache
from .config import SPEED_ONLY, PretrainOptions, TrainConfig, check_config
from .device import amp_context, resolve_amp, resolve_device, to_model_input
from .meter import METER, Meter
from .models import build_model
from .optimizers import OPTIMIZERS
from .stopping import StopOnSignal, stopped


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
                  prefetch=cfg.prefetch, source=cache, order=cfg.order)


def pixel_cache(subset, cfg: TrainConfig, model, autocast, ranks: Ranks, device: torch.device):
    """This rank's pixel cache, to be filled by the loader, or None (`pixelcache.prepare`),
    and what to record."""
    batch = cfg.batch_size // ranks.world

    def step(twin):  # what one training step at the largest resolution holds on the GPU
        x = torch.zeros((batch, cfg.res, cfg.res, 3), dtype=torch.uint8, device=device)
        with autocast:
            loss = twin(to_model_input(x, cfg.channels_last)).float().logsumexp(1).mean()
        loss.backward()

    def step_bytes() -> int:  # + the optimiser's state, which the step (no optimiser) leaves out
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return training_step_bytes(model, step) + OPTIMIZERS[cfg.optimizer].state_per_param * params

    return prepare_cache(subset, mode=cfg.pixel_cache,
                         side=cfg.pixel_cache_side or cache_side(cfg.res),
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
    Records from before --optimizer trained with SGD, drew their subset with --seed, and
    shuffled their order."""
    config = {"optimizer": "sgd", "beta2": 0.999, "subset_seed": None, "order": "shuffled",
              **record["config"]}
    return {**{k: v for k, v in config.items() if k not in SPEED_ONLY},
            "subset": record["subset"]}


def build(cfg: TrainConfig, num_classes: int, amp: str, device: torch.device):
    """The model, its optimiser (--optimizer), and the precision: an autocast context and a
    gradient scaler (active for fp16 only)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = OPTIMIZERS[cfg.optimizer].make(
        param_groups(model, cfg.weight_decay, cfg.no_bn_wd), cfg.lr, cfg.momentum, cfg.beta2)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return model, optimizer, amp_context(device.type, amp), scaler


# What resuming reads of a checkpoint, besides what every reader does (runfolder).
RESUMABLE = {"optimizer": dict, "scaler": dict, "rng_cpu": torch.Tensor,
             "step": COUNT, "epoch": COUNT}


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


@dataclass
class _Run:
    """A run set up to train (`_set_up`): what the loop reads, and where it stands."""

    cfg: TrainConfig
    folder: RunFolder
    ranks: Ranks
    device: torch.device
    subset: Subset
    plan: Plan
    record: dict
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: wrapped for DDP, compiled
    optimizer: torch.optim.Optimizer
    autocast: Any
    scaler: torch.amp.GradScaler
    cache: PixelCache | None
    cache_record: Any
    meter: Meter
    stop: StopOnSignal
    metrics: Any  # metrics.jsonl, open to append (rank 0), or None
    tracker: Any
    step: int
    epoch: int

    def log_row(self, line: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()

    def checkpoint(self) -> None:
        """The run so far: resuming from it computes and records what an uninterrupted run
        does. `epoch`: the one to go on with (from step - epoch x steps per epoch)."""
        self.meter.check_finite(self.step, self.epoch)  # never checkpoint a diverged model
        if self.ranks.is_main:  # the unwrapped module's state: no key surgery when loading
            cuda = self.device.type == "cuda"
            save_torch({"model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scaler": self.scaler.state_dict(), "step": self.step,
                        "epoch": self.epoch, "rng_cpu": torch.get_rng_state(),
                        "config": asdict(self.cfg),
                        **({"rng_cuda": torch.cuda.get_rng_state(self.device)} if cuda else {}),
                        "meter": self.meter.state(), "num_classes": self.subset.num_classes,
                        "class_names": self.subset.class_names}, self.folder.checkpoint)


def _train(cfg: TrainConfig, out: Path, overwrite: bool, progress: bool, make_loader,
           log, held: contextlib.ExitStack) -> dict:
    """Set up, loop, finish; everything opened on the way is held by `held`, so that a stop
    by signal, an error and the end close things alike."""
    run = _set_up(cfg, out, overwrite, log or _stderr, held)
    if isinstance(run, dict):  # finished already: its summary
        return run
    loader = _loop(run, make_loader, progress, held)
    return _finish(run, loader)


def _set_up(cfg: TrainConfig, out: Path, overwrite: bool, log,
            held: contextlib.ExitStack) -> _Run | dict:
    """The run folder held and opened, the subset and the plan, the model and its optimiser
    as the checkpoint left them, the pixel cache, the meter and the records; or the summary
    of a run that is finished already."""
    stop = held.enter_context(StopOnSignal())
    folder = RunFolder(out)
    ranks, device = setup_ranks(cfg)
    cuda = device.type == "cuda"
    names = read_class_list(cfg.class_list) if cfg.class_list else None
    subset = select(ShardIndex.load(cfg.data), cfg.classes, cfg.per_class,
                    seed=cfg.seed if cfg.subset_seed is None else cfg.subset_seed,
                    class_names=names, allow_fewer=cfg.allow_fewer)  # from the index alone
    plan = plan_steps(cfg, len(subset), ranks.world)
    amp = resolve_amp(cfg.amp, cuda)
    record = {"config": asdict(cfg), "subset": subset.describe(), "world_size": ranks.world,
              "amp": amp, "steps_per_epoch": plan.steps_per_epoch,
              "total_steps": plan.total_steps, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if cuda else str(device)}
    if ranks.is_main:  # the run folder is this run's until it ends: a second one is refused
        held.enter_context(folder_lock(folder.path, "pretrain"))
    finished = folder.open(record, _computes, overwrite=overwrite, main=ranks.is_main)
    if ranks.world > 1:
        torch.distributed.barrier()  # every rank sees the folder rank 0 prepared
    if finished:
        return finished
    model, optimizer, autocast, scaler = build(cfg, subset.num_classes, amp, device)
    step, epoch, meter_state = resume(folder.checkpoint, model, optimizer, scaler, device)
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    if ranks.is_main:
        for line in ([f"resuming {folder.path} from step {step:,} of {plan.total_steps:,}"]
                     if step else []) + misfits(cfg, subset, plan):
            log(line)
    cache, cache_record = pixel_cache(subset, cfg, model, autocast, ranks, device)
    if ranks.is_main:
        log(cache_record.line())
    meter = Meter(device, ranks.world)
    if meter_state:
        with restoring(folder.checkpoint):
            meter.load_state(meter_state)
    metrics = held.enter_context(folder.open_metrics(step)) if ranks.is_main else None
    tracker = held.enter_context(open_tracker(cfg.log_to if ranks.is_main else (), folder.path,
                                              record, step))
    return _Run(cfg, folder, ranks, device, subset, plan, record, model, net, optimizer,
                autocast, scaler, cache, cache_record, meter, stop, metrics, tracker, step,
                epoch)


def _loop(run: _Run, make_loader, progress: bool, held: contextlib.ExitStack) -> Loader | None:
    """Epochs of steps from where the run stands to its last: a log row every `log_every`
    steps, an epoch row and a checkpoint at each epoch's end; a signal stops it at the next
    step with a checkpoint there (Stopped). Returns the last loader, still open."""
    cfg, plan, meter = run.cfg, run.plan, run.meter
    bar = held.enter_context(progress_bar(total=plan.total_steps, initial=run.step,
                                          unit="step", enabled=progress and run.ranks.is_main))
    loader = None  # one per resolution (progressive resizing: 160 px, ..., then 192 px)
    held.callback(lambda: loader and loader.close())
    while run.step < plan.total_steps:
        res = res_at(run.epoch, plan.epochs, cfg)
        if loader is None or loader.res != res:  # resolutions only grow: the last is done
            if loader is not None:
                loader.close()
            loader = make_loader(run.subset, cfg, res, str(run.device), run.ranks.rank,
                                 run.ranks.world, cache=run.cache)
        start = run.step - run.epoch * plan.steps_per_epoch  # > 0 after a stop mid-epoch
        if start == 0:
            meter.new_epoch()
        loader.set_epoch(run.epoch, start)
        for images, labels in meter.batches(loader):
            lr = lr_at(run.step, plan.total_steps, plan.warmup_steps, cfg.lr, cfg.schedule)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(run.net, run.optimizer, run.autocast, run.scaler, images,
                                      labels, cfg)
            meter.step(loss, logits, labels)
            run.step += 1
            if run.step % plan.log_every == 0 or run.step == plan.total_steps:
                line = meter.window(run.step, run.epoch, lr, loader.res, cfg.batch_size)
                run.log_row(line)
                run.tracker.log({f"train/{k}": line[k] for k in ("loss", "lr", "images_per_s",
                                                                 "data_wait")}, run.step)
                bar.set_postfix(epoch=run.epoch, loss=f"{line['loss']:.3f}",
                                img_s=f"{line['images_per_s']:.0f}", refresh=False)
            bar.update(1)
            if run.step >= plan.total_steps:
                break
            if run.stop.agreed(run.step, plan.log_every, run.ranks.world, run.device):
                run.checkpoint()
                raise stopped(run.folder.path, run.step, plan.total_steps, run.stop.signal)
        line = meter.epoch_row(run.step, run.epoch)  # before the checkpoint: a resume logs
        run.log_row(line)  # it again
        run.tracker.log({"train/top1_epoch": line["top1"]}, run.step)
        run.epoch += 1
        run.checkpoint()
    bar.close()
    return loader


def _finish(run: _Run, loader: Loader | None) -> dict:
    """Validation on held-out images of the same classes, then the summary."""
    cfg, ranks, meter = run.cfg, run.ranks, run.meter
    wall = time.perf_counter() - meter.start
    loader_threads = loader.threads if loader else None
    loader_ms = loader.stage_ms() if loader else {}
    if loader is not None:
        loader.close()  # its feeder has read ahead into an epoch that will not run
    val_top1 = validate(cfg, run.model, run.subset, run.autocast, run.device, ranks) \
        if cfg.val_data else None
    summary = {"steps": run.step, "epochs": run.epoch, "train_loss": meter.last_loss,
               "train_top1_last_epoch": meter.correct.item() / max(1, meter.seen_epoch),
               "val_top1": val_top1, "wall_s": wall,
               "images_per_s": meter.images / wall if wall > 0 else None,
               "data_wait_fraction": meter.wait_total / wall if wall > 0 else None,
               "device": run.record["device"], "world_size": ranks.world,
               "amp": run.record["amp"], "loader_threads": loader_threads,
               "loader_ms_per_batch": loader_ms,
               "pixel_cache": asdict(run.cache_record.filled(run.cache)),
               "num_classes": run.subset.num_classes, "num_samples": len(run.subset)}
    if ranks.is_main:
        run.folder.write_summary(summary)
        run.tracker.summary(summary)
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
    root = cache_dir_option(cfg.eval_cache) if cfg.pixel_cache != "off" else None
    loader = Loader(val, batch_size=cfg.batch_size // ranks.world, train=False, res=res,
                    device=str(device), threads=cfg.workers, decode=cfg.decode,
                    source=EvalCache(root, index, res, EVAL_RESIZE) if root else None)
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
