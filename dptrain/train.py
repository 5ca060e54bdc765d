"""Pre-train one model on one K x n subset: `dptrain pretrain --classes K --per-class n`.

    dptrain pretrain --data shards/imagenet-train --classes 500 --per-class 256 --out runs/k500
    torchrun --nproc_per_node=8 -m dptrain pretrain ...            # DDP, one process per GPU

The loop reads top to bottom: fetch a uint8 batch, normalise it on the device, forward under
autocast, backward, step, log. A run folder holds config.json, metrics.jsonl, checkpoint.pt
(atomic, every epoch) and summary.json; rerunning the command resumes from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import TrainConfig, check_config
from .errors import DataError
from .index import ShardIndex
from .loader import Loader
from .models import build_model
from .runfolder import must_replace, save_torch, write_json
from .subset import read_class_list, select, steps_per_epoch as epoch_steps

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255
STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def resolve_device(name: str) -> str:
    """"cuda" or "cpu" for --device: "auto" takes the GPU when there is one; "cuda" without
    one is refused."""
    if name not in ("auto", "cpu", "cuda"):
        raise DataError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but CUDA is not available here: use --device cpu")
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_amp(amp: str, cuda: bool) -> str:
    """"auto": bf16 where the hardware computes in it, else fp16 (GPU) or fp32 (CPU). A CPU
    without AVX-512 BF16 or AMX emulates bf16 and trains ResNet-18 ~3x slower than in fp32."""
    if amp != "auto":
        return amp
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # private helpers: if they go away, assume no native bf16
        native = False
    return "bf16" if native else "off"


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


def to_model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC from the loader -> normalised float NCHW, on the device (never on the CPU
    loader). NHWC permuted to NCHW already has channels-last strides."""
    x = images.permute(0, 3, 1, 2).float()
    x = (x - MEAN.to(x.device).view(1, 3, 1, 1)) / STD.to(x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A dptrain checkpoint (weights_only: loading runs no code), or a DataError saying the
    file is not one (damaged, truncated, or something else)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        ckpt["config"]["arch"], ckpt["model"], ckpt["num_classes"]
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise DataError(f"{path} is not a dptrain checkpoint ({type(e).__name__})") from None
    return ckpt


class NonFiniteLoss(RuntimeError):
    pass


def _check_finite(finite: torch.Tensor, step: int, epoch: int) -> None:
    if not finite.item():
        raise NonFiniteLoss(f"the loss became non-finite by step {step}: stopped, keeping the "
                            f"last good checkpoint ({epoch} epoch(s) done). Lower --lr, or try "
                            "--amp off")


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


def train_loader(subset, cfg: TrainConfig, res: int, device: str, rank: int,
                 world: int) -> Loader:
    """This rank's training loader: the epoch order is shared, each rank reads its own part."""
    return Loader(subset, batch_size=cfg.batch_size // world, train=True, res=res,
                  device=device, seed=cfg.seed, rank=rank, world_size=world,
                  threads=cfg.workers, decode=cfg.decode, hw_decoder_load=cfg.hw_decoder_load,
                  prefetch=cfg.prefetch)


def train(cfg: TrainConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
          make_loader=train_loader) -> dict:
    """Train (or resume, or return the summary of a finished run in `out`). `make_loader`
    (train_loader's arguments) is where batches come from: benchmarks pass one that replays
    batches from memory."""
    # On a GPU the run has a CUDA stream of its own. On the legacy default stream, which waits
    # for other streams' work, ResNet-18 trained 23% slower beside the JPEG decoders (H200,
    # 10,263 against 13,263 img/s; benchmarks/README.md).
    if resolve_device(cfg.device) == "cuda":
        with torch.cuda.stream(torch.cuda.Stream(int(os.environ.get("LOCAL_RANK", 0)))):
            return _train(cfg, out, overwrite, progress, make_loader)
    return _train(cfg, out, overwrite, progress, make_loader)


def _train(cfg: TrainConfig, out: Path, overwrite: bool, progress: bool,
           make_loader) -> dict:
    # -- distributed: torchrun's environment, a few explicit lines
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = resolve_device(cfg.device) == "cuda"
    check_config(cfg, world, cuda)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    is_main = rank == 0

    # -- data: the subset, from the index alone
    index = ShardIndex.load(cfg.data)
    names = read_class_list(cfg.class_list) if cfg.class_list else None
    subset = select(index, cfg.classes, cfg.per_class, seed=cfg.seed, class_names=names,
                    allow_fewer=cfg.allow_fewer)
    per_rank_batch = cfg.batch_size // world
    steps_per_epoch = epoch_steps(len(subset), per_rank_batch, world)
    if steps_per_epoch == 0:
        raise DataError(f"{len(subset)} images make no full batch of {cfg.batch_size}: use a "
                        "smaller --batch-size")
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    # -- the run folder: resume, refuse other options, or report a finished run
    out = Path(out)
    amp = resolve_amp(cfg.amp, cuda)
    record = {"config": asdict(cfg), "subset": subset.describe(), "world_size": world, "amp": amp,
              "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
              "torch": torch.__version__, "device": str(device) if not cuda
              else torch.cuda.get_device_name(device)}
    if (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        options = {**record["config"], "subset": record["subset"]}
        replace = must_replace(out, {**old["config"], "subset": old["subset"]}, options,
                               overwrite=overwrite, holds="a run")
        if (overwrite or replace) and is_main:  # --overwrite: start over, whatever is there
            for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
                (out / name).unlink(missing_ok=True)
        elif not (overwrite or replace) and (out / "summary.json").is_file():
            return {**json.loads((out / "summary.json").read_text()), "already_finished": True}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", record)
    if world > 1:
        torch.distributed.barrier()  # every rank sees the folder rank 0 prepared

    # -- model, optimiser, precision: one step written once
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, subset.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.no_bn_wd), lr=cfg.lr,
                                momentum=cfg.momentum)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[amp]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    step, epoch = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        try:
            ckpt = load_checkpoint(ckpt_path, device)
        except DataError as e:
            raise DataError(f"cannot resume: {e}; use --overwrite to start the run again, or "
                            "another --out") from None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch = ckpt["step"], ckpt["epoch"]
        torch.set_rng_state(ckpt["rng_cpu"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    # -- the loop
    loader = None  # one per resolution (progressive resizing: 160 px, ..., then 192 px)
    log = open(out / "metrics.jsonl", "a") if is_main else None
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (progress and is_main))
    t_start, images_seen, wait_total = time.perf_counter(), 0, 0.0
    loss_sum = torch.zeros((), device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # checked without a sync per step
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen_epoch, last_loss = 0, float("nan")
    t_log, wait_log, n_log = time.perf_counter(), 0.0, 0  # a log window spans epoch ends
    while step < total_steps:
        res = res_at(epoch, epochs, cfg)
        if loader is None or loader.res != res:  # resolutions only grow: the last is done
            if loader is not None:
                loader.close()
            loader = make_loader(subset, cfg, res, str(device), rank, world)
        loader.set_epoch(epoch)
        correct.zero_()
        seen_epoch = 0
        t_fetch = time.perf_counter()
        for images, labels in loader:
            wait = time.perf_counter() - t_fetch
            wait_log += wait
            lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                logits = net(to_model_input(images, cfg.channels_last))
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            finite &= torch.isfinite(loss.detach())
            correct += (logits.detach().argmax(1) == labels).sum()
            seen_epoch += len(labels)
            step, n_log = step + 1, n_log + 1
            images_seen += len(labels) * world
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = loss_sum.item() / n_log  # .item() syncs host and device: log steps only
                _check_finite(finite, step, epoch)
                dt = time.perf_counter() - t_log
                metrics = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                           "res": loader.res, "images_per_s": n_log * cfg.batch_size / dt,
                           "data_wait": wait_log / dt}
                if log:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                bar.set_postfix(epoch=epoch, loss=f"{last_loss:.3f}",
                                img_s=f"{metrics['images_per_s']:.0f}")
                loss_sum.zero_()
                t_log, wait_log, n_log = time.perf_counter(), 0.0, 0
            bar.update(1)
            wait_total += wait
            if step >= total_steps:
                break
            t_fetch = time.perf_counter()
        _check_finite(finite, step, epoch)  # never checkpoint a diverged model
        epoch += 1
        if is_main:  # the unwrapped module's state: no key surgery when loading
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                         "rng_cpu": torch.get_rng_state(), "config": asdict(cfg),
                         "num_classes": subset.num_classes, "class_names": subset.class_names},
                        ckpt_path)
    bar.close()
    wall = time.perf_counter() - t_start
    loader_threads = loader.pipeline["threads"] if loader else None
    loader_ms = loader.stage_ms() if loader else {}
    if loader is not None:
        loader.close()  # its feeder has read ahead into an epoch that will not run

    # -- the end: validation on held-out images of the same classes, then the summary
    val_top1 = None
    if cfg.val_data and is_main:
        val = select(ShardIndex.load(cfg.val_data), class_names=subset.class_names,
                     allow_fewer=True)
        val_loader = Loader(val, batch_size=per_rank_batch, train=False,
                            res=cfg.eval_res or cfg.res, device=str(device), threads=cfg.workers,
                            decode=cfg.decode)
        val_top1 = evaluate(model, val_loader, autocast, cfg.channels_last)
        val_loader.close()
    summary = {"steps": step, "epochs": epoch, "train_loss": last_loss,
               "train_top1_last_epoch": correct.item() / max(1, seen_epoch),
               "val_top1": val_top1, "wall_s": wall,
               "images_per_s": images_seen / wall if wall > 0 else None,
               "data_wait_fraction": wait_total / wall if wall > 0 else None,
               "device": record["device"], "world_size": world, "amp": amp,
               "loader_threads": loader_threads, "loader_ms_per_batch": loader_ms,
               "num_classes": subset.num_classes, "num_samples": len(subset)}
    if is_main:
        write_json(out / "summary.json", summary)
        log.close()
    if world > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's validation
        torch.distributed.destroy_process_group()
    return summary
