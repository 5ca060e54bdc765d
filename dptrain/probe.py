"""Linear probes on cached features: `dptrain probe RUN --data TRAIN --test-data TEST`.

One forward pass per (checkpoint, dataset, transform) computes the frozen backbone's
penultimate features, cached on disk as fp16; every probe after that is seconds of solver
time. The probe is the usual protocol (Kornblith et al. 2019): multinomial logistic regression
on standardised features by full-batch L-BFGS, the L2 strength chosen over a log-spaced grid
on a seeded validation split of train (warm-started along the grid, strongest first), then
refit on train + val and scored on test; repeated with different validation splits.

The L2 strength follows scikit-learn's convention, C = 1 / l2: the objective is the summed
cross-entropy plus l2 / 2 * ||W||^2, with an unpenalised bias.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .datakey import checked_fingerprint
from .errors import DataError
from .evalcache import EvalCache
from .index import ShardIndex, sha256_file
from .loader import EVAL_RESIZE, Loader
from .models import build_model
from .progress import bar as progress_bar
from .runfolder import atomic_path, folder_lock, load_checkpoint, save_torch, write_json
from .subset import select
from .device import amp_context, resolve_amp, resolve_device, to_model_input

L2_GRID = np.logspace(-6, 5, 45)  # Kornblith et al. 2019: 45 values in [1e-6, 1e5]


class LinearFit(NamedTuple):
    """A solution, weights `w` (classes x features, like nn.Linear) and bias `b`, with the mean
    cross-entropy and its gradient there. The next fit on the same data starts from it without
    evaluating anything: only the penalty's share of the gradient changes with the L2 strength."""

    w: torch.Tensor
    b: torch.Tensor
    loss: torch.Tensor
    grad_w: torch.Tensor
    grad_b: torch.Tensor


def _cross_entropy(x: torch.Tensor, flat_target: torch.Tensor, w: torch.Tensor,
                   b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and its gradient, written out: two passes over x. (Autograd's
    backward of x @ w measured 2-7x slower than this p^T x on the CPU.)"""
    logp = torch.log_softmax(torch.addmm(b, x, w.T), 1)
    loss = -logp.view(-1)[flat_target].mean()
    p = logp.exp_()
    p.view(-1)[flat_target] -= 1  # softmax - one-hot
    p /= len(x)
    return loss, p.T @ x, p.sum(0)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
               init: LinearFit | tuple[torch.Tensor, torch.Tensor] | None = None,
               max_iter: int = 500, tol: float = 1e-4) -> LinearFit:
    """Multinomial logistic regression by full-batch L-BFGS.

    Stops where scikit-learn's lbfgs stops by default (max |gradient| < `tol` = 1e-4 on the
    same mean-form objective). `init` warm-starts: a (w, b) pair, or a `LinearFit` on the same x, y,
    whose stored gradient replaces the first evaluation (when it already meets `tol` at the new
    strength, nothing is evaluated at all)."""
    n = len(y)
    flat_target = torch.arange(n, device=x.device) * num_classes + y
    if isinstance(init, LinearFit):
        start = init
        w, b = init.w.clone(), init.b.clone()
        if (init.grad_w + l2 / n * init.w).abs().max() <= tol and init.grad_b.abs().max() <= tol:
            return init
    else:
        start = None
        w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        if init is not None:
            w, b = init[0].clone(), init[1].clone()
    recent: list[LinearFit] = []  # the final point is one of the last evaluations
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=tol, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        nonlocal start
        if start is not None:  # the first call: the warm start's stored evaluation
            ev, start = start, None
        else:
            ev = LinearFit(w.clone(), b.clone(), *_cross_entropy(x, flat_target, w, b))
            recent[:] = recent[-20:] + [ev]
        # The mean keeps the scale of the loss independent of n; l2 / (2n) matches
        # scikit-learn's summed objective with C = 1 / l2.
        w.grad, b.grad = ev.grad_w + l2 / n * w, ev.grad_b.clone()
        return ev.loss + l2 / (2 * n) * (w * w).sum()

    opt.step(closure)
    for ev in reversed(recent):
        if torch.equal(ev.w, w) and torch.equal(ev.b, b):
            return ev
    return LinearFit(w, b, *_cross_entropy(x, flat_target, w, b))


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _accuracy(fit: LinearFit, x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.addmm(fit.b, x, fit.w.T).argmax(1) == y).double().mean().item()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, l2_grid: np.ndarray = L2_GRID, val_fraction: float = 0.2,
                 repeats: int = 5, seed: int = 0, device: str = "cpu",
                 on_repeat=None) -> dict:
    """Choose l2 on a validation split, refit on train + val, score test; `repeats` times
    (`on_repeat()` after each, for a progress bar)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if len(train_y) < 2 or len(test_y) == 0:
        raise DataError(f"too few samples to probe ({len(train_y)} train, {len(test_y)} test)")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    xs = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    ys = torch.as_tensor(train_y, dtype=torch.int64, device=device)
    xt = torch.as_tensor(test_x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(test_y, dtype=torch.int64, device=device)
    grid = sorted(l2_grid, reverse=True)  # strongest first: each fit warm-starts the next
    x_all, x_test = _standardise(xs, xt)
    refits: dict[float, float] = {}  # the refit on all of train depends only on l2
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        perm = torch.as_tensor(np.random.default_rng((seed, r)).permutation(len(ys)), device=device)
        n_val = max(1, int(round(val_fraction * len(ys))))
        val, fit = perm[:n_val], perm[n_val:]
        x_fit, x_val = _standardise(xs[fit], xs[val])
        fits, scores = [None], []
        for l2 in grid:
            # Fits that only rank the L2 strengths stop at 1e-3: 2.3x fewer evaluations, the
            # same top strengths (measured on benchmarks/probe.py's data); the refit stops at
            # scikit-learn's 1e-4.
            fits.append(fit_logreg(x_fit, ys[fit], num_classes, float(l2), init=fits[-1],
                                   tol=1e-3))
            scores.append(_accuracy(fits[-1], x_val, ys[val]))
        best = int(np.argmax(scores))  # ties: the strongest regularisation wins
        l2 = float(grid[best])
        if l2 not in refits:  # warm-started from the sweep's solution at that strength
            final = fit_logreg(x_all, ys, num_classes, l2, init=fits[best + 1][:2])
            refits[l2] = _accuracy(final, x_test, yt)
        runs.append({"seed": r, "l2": l2, "val_top1": scores[best], "test_top1": refits[l2],
                     "seconds": time.perf_counter() - t0})
        if on_repeat:
            on_repeat()
    accs = np.array([x["test_top1"] for x in runs])
    return {"top1_mean": float(accs.mean()), "top1_std": float(accs.std()),
            "error_mean": float(1 - accs.mean()), "error_std": float(accs.std()),
            "repeats": runs, "feature_dim": int(train_x.shape[1]),
            "num_classes": num_classes, "train_samples": int(len(train_y)),
            "test_samples": int(len(test_y)), "val_fraction": val_fraction,
            "l2_grid": [float(x) for x in grid]}


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
    model = build_model(ckpt["config"]["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    # channels_last, as the loader's batches arrive (to_model_input): no layout conversions
    model = model.to(device, memory_format=torch.channels_last)
    return _penultimate(model).eval().requires_grad_(False)


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
                    eval_cache=EvalCache(pixels, index, res, eval_resize) if pixels else None)
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
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, features=out_f, labels=out_l)
    return out_f, out_l, False


def read_suite(path: Path) -> list[tuple[str, str, str]]:
    """Downstream sets from a TOML or JSON file: `[[dataset]]` tables (TOML) or a list (JSON)
    of {name, data, test_data}; relative paths are relative to the file."""
    import tomllib

    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read suite {path}: {e}") from None
    entries = doc if isinstance(doc, list) else doc.get("dataset", doc.get("datasets"))
    if not isinstance(entries, list) or not entries:
        raise DataError(f"suite {path} lists no dataset: expected [[dataset]] entries with "
                        "name, data and test_data")
    out = []
    allowed = ("name", "data", "test_data")
    for e in entries:
        if not isinstance(e, dict) or not {"data", "test_data"} <= set(e):
            raise DataError(f"suite {path}: each dataset needs data and test_data: {e!r}")
        unknown = sorted(set(e) - set(allowed))
        if unknown:
            raise DataError(f"suite {path}: unknown key(s) {', '.join(unknown)} in {e!r}; a "
                            f"dataset takes {', '.join(allowed)}")
        train, test = (str((path.parent / e[k]).resolve()) for k in ("data", "test_data"))
        out.append((str(e.get("name") or Path(train).name), train, test))
    return out


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


def probe_run(run: Path, datasets: list[tuple[str, str, str]], *, res: int | None = None,
              cache: Path | None = None, pixels: Path | None = None, repeats: int = 5,
              val_fraction: float = 0.2, seed: int = 0, device: str = "auto",
              threads: int | None = None, random_init: bool = False,
              allow_unfinished: bool = False, progress: bool = False) -> dict:
    """Probe a run folder (or a checkpoint file) on each (name, train shards, test shards);
    with `random_init`, also the run's architecture as initialised, the reference. `cache`:
    the feature cache [RUN/features]; `pixels`: the eval pixel cache's folder (None: none).
    A run whose checkpoint is short of its planned steps is refused unless
    `allow_unfinished`."""
    checkpoint = run / "checkpoint.pt" if run.is_dir() else run
    if not checkpoint.is_file():
        raise DataError(f"{run} is not a dptrain run (no checkpoint.pt)")
    run_dir = checkpoint.parent
    with folder_lock(run_dir, "probe"):  # one writer of probe.json and summary.json
        return _probe_run(checkpoint, datasets, run_dir, res=res, cache=cache, pixels=pixels,
                          repeats=repeats, val_fraction=val_fraction, seed=seed, device=device,
                          threads=threads, random_init=random_init,
                          allow_unfinished=allow_unfinished, progress=progress)


def _probe_run(checkpoint: Path, datasets, run_dir: Path, *, res, cache, pixels, repeats,
               val_fraction, seed, device, threads, random_init, allow_unfinished,
               progress) -> dict:
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    done, total = unfinished(ckpt, run_dir)
    if done is not None and not allow_unfinished:
        raise DataError(f"{run_dir} is unfinished: its checkpoint is at step {done} of {total}; "
                        "finish it (run its pretrain command again), or probe it as it is with "
                        "--allow-unfinished")
    cache = cache or run_dir / "features"
    kw = dict(res=res, cache=cache, pixels=pixels, repeats=repeats, val_fraction=val_fraction,
              seed=seed, device=resolve_device(device), threads=threads, progress=progress)
    out = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
           "datasets": _probe(checkpoint, config, datasets, **kw)}
    old_path = run_dir / "probe.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    merged = {**old, **out, "datasets": {**old.get("datasets", {}), **out["datasets"]}}
    if random_init:
        out["random_init"] = _probe(random_init_checkpoint(checkpoint, cache), config, datasets,
                                    what="random init, ", **kw)
        merged["random_init"] = {**old.get("random_init", {}), **out["random_init"]}
    write_json(run_dir / "probe.json", merged)
    out["written"] = str(run_dir / "probe.json")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["probe"] = _brief(merged["datasets"])
        if "random_init" in merged:
            summary["probe_random_init"] = _brief(merged["random_init"])
        write_json(summary_path, summary)
    return out


def unfinished(ckpt: dict, run_dir: Path) -> tuple[int | None, int | None]:
    """(step, planned steps) of a run whose checkpoint is short of its plan (its run folder's
    config.json says how many steps); (None, None) when it is finished or nothing says."""
    try:
        total = json.loads((run_dir / "config.json").read_text())["total_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return (ckpt["step"], total) if ckpt.get("step", total) < total else (None, None)


def downstream_sets(train_data: list[str], test_data: list[str], names: list[str],
                    suite: Path | None) -> list[tuple[str, str, str]]:
    """(name, train shards, test shards) from `probe`'s --data/--test-data/--name and --suite."""
    if len(train_data) != len(test_data) or (names and len(names) != len(train_data)):
        raise DataError("give one --test-data (and one --name, if any) per --data")
    datasets = list(zip(names or [Path(d).name for d in train_data], train_data, test_data))
    datasets += read_suite(suite) if suite else []
    if not datasets:
        raise DataError("no downstream dataset: give --data and --test-data, or --suite FILE")
    names = [d[0] for d in datasets]
    if len(set(names)) != len(names):
        raise DataError(f"dataset names must differ: {', '.join(names)} (use --name)")
    return datasets


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
