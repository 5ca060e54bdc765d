"""Linear probes on cached features: `dptrain probe RUN --data TRAIN --test-data TEST`.

One forward pass per (checkpoint, dataset, transform) computes the frozen backbone's
penultimate features, cached on disk as fp16; every probe after that is seconds of the solver
(logreg.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..common.errors import DataError
from ..common.progress import bar as progress_bar
from ..common.runfolder import (
    LOCK,
    RunFolder,
    atomic_path,
    folder_lock,
    load_checkpoint,
    restoring,
    save_torch,
)
from ..common.tracking import open_tracker
from ..data.datakey import checked_fingerprint
from ..data.index import ShardIndex, sha256_file
from ..data.subset import select
from ..loading.evalcache import EvalCache, cache_dir_option
from ..loading.loader import EVAL_RESIZE, Loader
from ..training.device import amp_context, resolve_amp, resolve_device, to_model_input
from ..training.models import build_model
from .downstream import ProbeOptions, downstream_sets
from .logreg import linear_probe


def _penultimate(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its last linear layer (the classifier): global-pooled features."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise DataError("the model has no linear classifier to remove")
    parent = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
    setattr(parent, last.rsplit(".", 1)[-1], torch.nn.Identity())
    return model


def load_backbone(path: Path, device: torch.device) -> torch.nn.Module:
    """A dptrain checkpoint's model, frozen, without its classifier."""
    ckpt = load_checkpoint(path, device)
    with restoring(path):
        model = build_model(ckpt["config"]["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    return _frozen(model, device)


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The backbone of `model` on `device`, for extraction: channels_last, as the loader's
    batches arrive (to_model_input), so no layout conversions; no classifier, no gradients."""
    model = model.to(device, memory_format=torch.channels_last)
    return _penultimate(model).eval().requires_grad_(False)


def measure_extraction(arch: str, res: int, num_classes: int, device: str,
                       batch_size: int = 256, steps: int = 3) -> tuple[float, int]:
    """(images per second, feature dimension) of `features` for this model here: `steps`
    timed forward passes on one batch of random images held in memory, after one untimed (no
    loader: an upper bound where decoding is the limit). What `sweep --dry-run` plans with."""
    dev = torch.device(device)
    model = _frozen(build_model(arch, num_classes), dev)
    images = torch.randint(0, 256, (batch_size, res, res, 3), dtype=torch.uint8, device=dev)
    precision = amp_context(dev.type, resolve_amp("auto", True) if dev.type == "cuda" else "off")
    with torch.inference_mode(), precision:
        for timed in (False, True):
            t = time.perf_counter()
            for _ in range(steps if timed else 1):
                x = model(to_model_input(images, True))
            x.float().cpu()  # waits for the device
    return steps * batch_size / (time.perf_counter() - t), int(x.shape[1])


def random_init_checkpoint(checkpoint: Path, cache: Path) -> Path:
    """The reference any pre-training must beat: the run's architecture as initialised (seeded
    with the run's seed, so it is the run's own starting point), saved as a checkpoint so its
    features are computed and cached like any other."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    path = cache / f"random-init-{config['arch']}-{ckpt['num_classes']}-s{config['seed']}.pt"
    if not path.is_file():
        torch.manual_seed(config["seed"])
        model = build_model(config["arch"], ckpt["num_classes"])
        cache.mkdir(parents=True, exist_ok=True)
        save_torch({"model": model.state_dict(), "config": config,
                    "num_classes": ckpt["num_classes"], "step": 0}, path)
    return path


@torch.no_grad()
def features(checkpoint: Path, config: dict, shards: str, *, res: int | None = None,
             eval_resize: float = EVAL_RESIZE, cache: Path, pixels: Path | None = None,
             device: str = "cpu", batch_size: int = 256, threads: int | None = None,
             decode: str = "auto", class_names: list[str] | None = None, amp: str | None = None,
             on_batch=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Penultimate features (fp16) and labels of a shard set; (features, labels, cache hit).

    Cached per (checkpoint content, dataset content, resolution, resize ratio, layer,
    precision), the dataset's content checked against its tars first
    (`datakey.checked_fingerprint`), so a changed set is never served. The images come from
    the eval pixel cache in `pixels` (filled on first use; None: decoded every time). Labels
    follow `class_names` when given (a test split's classes in its train split's order).
    `config` is the checkpoint's training config (its resolution is the default). `amp`
    ("off", "bf16", "fp16"): by default the GPU's autocast type, as training uses there, and
    fp32 on a CPU (on an H100, bf16 extracted only ~5% faster than fp32:
    benchmarks/README.md). `on_batch(images)` after each batch, for a progress bar.
    """
    index = ShardIndex.load(shards)
    subset = select(index, class_names=class_names)
    ckpt_hash = sha256_file(checkpoint)
    res = res or config.get("eval_res") or config["res"]
    if amp is None:
        amp = resolve_amp("auto", True) if device == "cuda" else "off"
    data = checked_fingerprint(index, (pixels or cache) / "stamps")
    key = hashlib.sha256(json.dumps([ckpt_hash, data, res, eval_resize, "penultimate",
                                     subset.class_names, amp]).encode()).hexdigest()
    path = cache / f"{key[:32]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["features"], z["labels"], True
    model = load_backbone(checkpoint, torch.device(device))
    loader = Loader(subset, batch_size=batch_size, train=False, res=res,
                    eval_resize=eval_resize, device=device, threads=threads, decode=decode,
                    source=EvalCache(pixels, index, res, eval_resize) if pixels else None)
    feats, labels = [], []
    precision = amp_context(torch.device(device).type, amp)
    for images, y in loader:
        # The same normalisation as training; fp16 on disk halves the cache.
        with torch.inference_mode(), precision:
            x = model(to_model_input(images, True))
        feats.append(x.float().cpu().half().numpy())
        labels.append(y.cpu().numpy())
        if on_batch:
            on_batch(len(y))
    loader.close()
    out_f, out_l = np.concatenate(feats), np.concatenate(labels)
    if not np.isfinite(out_f).all():  # fp16: also what exceeds 65,504
        raise DataError(f"{checkpoint}'s weights give non-finite features on {shards} (a "
                        "damaged checkpoint, or a run that diverged): nothing was probed")
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, features=out_f, labels=out_l)
    return out_f, out_l, False


def _probe(checkpoint: Path, config: dict, datasets: list[tuple[str, str, str]], *,
           res: int | None, cache: Path, pixels: Path | None, repeats: int, val_fraction: float,
           seed: int, device: str, threads: int | None, progress: bool = False,
           what: str = "") -> dict:
    results = {}
    for name, train_shards, test_shards in datasets:
        train_index, test_index = ShardIndex.load(train_shards), ShardIndex.load(test_shards)
        names = [n for n, c in zip(train_index.class_names, train_index.counts) if c > 0]
        test_names = [n for n, c in zip(test_index.class_names, test_index.counts) if c > 0]
        if set(test_names) != set(names):
            raise DataError(f"{name}: the test set's classes differ from its train set's "
                            f"({len(test_names)} vs {len(names)}); shard the test split with "
                            f"--classes-from {train_shards}")
        t0 = time.perf_counter()
        images = int(train_index.counts.sum() + test_index.counts.sum())
        with progress_bar(total=images, unit="img", desc=f"{what}{name}: features",
                          enabled=progress, leave=False) as bar:
            kw = dict(res=res, cache=cache, pixels=pixels, device=device, threads=threads,
                      class_names=names, on_batch=bar.update)
            xtr, ytr, hit_tr = features(checkpoint, config, train_shards, **kw)
            xte, yte, hit_te = features(checkpoint, config, test_shards, **kw)
        t1 = time.perf_counter()
        with progress_bar(total=repeats, unit="fit", desc=f"{what}{name}: probes",
                          enabled=progress, leave=False) as bar:
            result = linear_probe(xtr, ytr, xte, yte, repeats=repeats,
                                  val_fraction=val_fraction, seed=seed, device=device,
                                  on_repeat=bar.update)
        results[name] = {**result, "train_data": str(train_shards), "test_data": str(test_shards),
                         "cache_hits": int(hit_tr) + int(hit_te), "feature_seconds": t1 - t0,
                         "probe_seconds": time.perf_counter() - t1}
    return results


def _brief(results: dict) -> dict:
    return {k: {"top1_mean": v["top1_mean"], "top1_std": v["top1_std"],
                "error_mean": v["error_mean"]} for k, v in results.items()}


def run_probe(run: Path, o: ProbeOptions, progress: bool = False) -> dict:
    """`dptrain probe RUN`: its downstream sets from the options, probed."""
    return probe_run(run, downstream_sets(o.data, o.test_data, o.names,
                                          Path(o.suite) if o.suite else None), o,
                     progress=progress)


def probe_run(run: Path, datasets: list[tuple[str, str, str]], o: ProbeOptions = ProbeOptions(),
              *, progress: bool = False) -> dict:
    """Probe a run folder (or a checkpoint file) on each (name, train shards, test shards),
    as `o` says (its --data, --test-data, --name and --suite aside: `datasets` are those); with
    `o.random_init`, also the run's architecture as initialised, the reference. A run whose
    checkpoint is short of its planned steps is refused unless `o.allow_unfinished`. A set
    probed before with other settings (repeats, validation part, data) is refused unless
    `o.overwrite`: probe.json keeps one result per name."""
    checkpoint = RunFolder(run).checkpoint if run.is_dir() else run
    if not checkpoint.is_file():
        if (run / LOCK).is_file():  # a run before its first checkpoint: who is writing it
            with folder_lock(run, "probe"):
                pass
        raise DataError(f"{run} is not a dptrain run (no {RunFolder.CHECKPOINT})")
    run_dir = RunFolder(checkpoint.parent)
    with folder_lock(run_dir.path, "probe"):  # one writer of probe.json and summary.json
        return _probe_run(checkpoint, datasets, run_dir, o, progress)


def _probe_run(checkpoint: Path, datasets, run_dir: RunFolder, o: ProbeOptions,
               progress: bool) -> dict:
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    record = run_dir.read_config()  # None beside a bare checkpoint; unreadable: refused now
    done, total = unfinished(ckpt, record)
    if done is not None and not o.allow_unfinished:
        raise DataError(f"{run_dir.path} is unfinished: its checkpoint is at step {done} of "
                        f"{total}; finish it (run its pretrain command again), or probe it as "
                        "it is with --allow-unfinished")
    cache = Path(o.feature_cache) if o.feature_cache else run_dir / RunFolder.FEATURES
    kw = dict(res=o.res, cache=cache, pixels=cache_dir_option(o.eval_cache), repeats=o.repeats,
              val_fraction=o.val_fraction, seed=o.seed, device=resolve_device(o.device),
              threads=o.workers, progress=progress)
    old = run_dir.read_probe()
    if not o.overwrite:
        _refuse_other_settings(old, datasets, o.repeats, o.val_fraction, o.random_init)
    out = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
           "datasets": _probe(checkpoint, config, datasets, **kw)}
    merged = {**old, **out, "datasets": {**old.get("datasets", {}), **out["datasets"]}}
    if o.random_init:
        out["random_init"] = _probe(random_init_checkpoint(checkpoint, cache), config, datasets,
                                    what="random init, ", **kw)
        merged["random_init"] = {**old.get("random_init", {}), **out["random_init"]}
    out["written"] = str(run_dir.write_probe(merged))
    briefs = {"probe": _brief(merged["datasets"]),
              **({"probe_random_init": _brief(merged["random_init"])}
                 if "random_init" in merged else {})}
    run_dir.update_summary(**briefs)
    if o.log_to and record:
        with open_tracker(o.log_to, run_dir.path, record, resume_step=None) as tracker:
            tracker.log({f"{what}/{name}/top1": r["top1_mean"] for what, sets in briefs.items()
                         for name, r in sets.items()}, ckpt.get("step", 0))
            tracker.summary(briefs)
    return out


def _refuse_other_settings(old: dict, datasets, repeats: int, val_fraction: float,
                           random_init: bool) -> None:
    """A set's result in probe.json is replaced only by one made the same way (a rerun, or a
    sweep's probe of a resumed point); another --repeats, --val-fraction or data would
    silently take the place of the earlier result."""
    for what in ("datasets",) + (("random_init",) if random_init else ()):
        for name, train, test in datasets:
            r = old.get(what, {}).get(name)
            if r is None:
                continue
            was = {"--repeats": len(r.get("repeats", [])), "--val-fraction": r.get(
                "val_fraction"), "data": (r.get("train_data"), r.get("test_data"))}
            now = {"--repeats": repeats, "--val-fraction": val_fraction, "data": (train, test)}
            differ = [k for k in now if was[k] != now[k]]
            if differ:
                then = [f"{k} {was[k]} (now {now[k]})" for k in differ if k != "data"]
                then += ["other data"] if "data" in differ else []
                raise DataError(f"probe.json already holds {name}, probed with "
                                f"{', '.join(then)}: add --overwrite to replace it, or give "
                                "this probe another --name")


def unfinished(ckpt: dict, record: dict | None) -> tuple[int | None, int | None]:
    """(step, planned steps) of a run whose checkpoint is short of its plan (its run folder's
    config `record` says how many steps); (None, None) when it is finished or nothing says."""
    total = (record or {}).get("total_steps")
    if total is None:
        return None, None
    return (ckpt["step"], total) if ckpt.get("step", total) < total else (None, None)


def render(out: dict) -> str:
    """`dptrain probe`'s table: top-1 per set, next to the random init's when it was probed."""
    ref = out.get("random_init", {})
    lines = [f"{'dataset':24s} {'top-1':>8s} {'std':>7s} {'error':>7s}"
             + (f" {'random-init top-1':>18s} {'gain':>7s}" if ref else "") + "  l2 (per repeat)"]
    for name, r in out["datasets"].items():
        l2s = " ".join(f"{x['l2']:.0e}" for x in r["repeats"])
        vs = ""
        if ref:
            base = ref[name]["top1_mean"]
            vs = f" {base:11.4f} +-{ref[name]['top1_std']:.3f} {r['top1_mean'] - base:+7.4f}"
        lines.append(f"{name:24s} {r['top1_mean']:8.4f} {r['top1_std']:7.4f} "
                     f"{r['error_mean']:7.4f}{vs}  {l2s}  ({r['cache_hits']}/2 cached)")
    if "written" in out:
        lines.append(f"wrote {out['written']}")
    return "\n".join(lines)
