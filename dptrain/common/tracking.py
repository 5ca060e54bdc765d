"""Where a run's numbers go besides its own files (`--log-to tensorboard|wandb`): per logged step
the loss, lr, img/s and data wait, per epoch the train top-1, at the end the summary, and
later each probe's top-1. Each backend is an optional extra (`pip install
'dptrain[tensorboard]'`, `'dptrain[wandb]'`), imported only when asked for.

TensorBoard writes RUN/tensorboard/ (a resumed run purges what the dead process logged after
its checkpoint). W&B writes RUN/wandb/ and honours its own settings (WANDB_MODE=offline works
with no network); a run keeps one W&B id, so a resume or a probe adds to the same W&B run. In
a sweep each point is a run, grouped by the sweep and tagged with K, n, N and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import DataError

BACKENDS = ("tensorboard", "wandb")
SWEEP = "DPTRAIN_SWEEP"  # set by a sweep for its children: the W&B group
BUDGET = "DPTRAIN_BUDGET"  # and the point's budget N, for its tags


class Tracker:
    """Every backend asked for, behind one interface; no backend: nothing happens."""

    def __init__(self, backends: list):
        self.backends = backends

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def log(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        for b in self.backends:
            b.log(values, step)

    def summary(self, values: dict) -> None:
        flat = {k: v for k, v in _flatten(values).items() if isinstance(v, (int, float, str))}
        for b in self.backends:
            b.summary(flat)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def open_tracker(kinds, run: Path, record: dict, resume_step: int | None = 0) -> Tracker:
    """The backends in `kinds` for the run folder `run`, whose config.json holds `record`;
    `resume_step`: the step a resumed run goes on from (0: a fresh one; None: add to a run
    that ended, as a probe does)."""
    backends = []
    for kind in dict.fromkeys(kinds or ()):
        if kind not in BACKENDS:
            raise DataError(f"--log-to {kind!r}: choose from {', '.join(BACKENDS)}")
        backends.append((_TensorBoard if kind == "tensorboard" else _WandB)(run, record,
                                                                           resume_step))
    return Tracker(backends)


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"--log-to {extra} needs the {extra} package: pip install "
                        f"'dptrain[{extra}]'") from None


class _TensorBoard:
    def __init__(self, run: Path, record: dict, resume_step: int):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step or None)
        if resume_step == 0:
            self.writer.add_text("config", f"```\n{json.dumps(record, indent=1)}\n```", 0)
        self.last_step = resume_step or 0

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.last_step = step
        self.writer.flush()

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"summary/{k}", v, self.last_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run: Path, record: dict, resume_step: int):
        wandb = _require("wandb", "wandb")
        cfg, subset = record["config"], record.get("subset", {})
        tags = [f"K={cfg['classes']}", f"n={cfg['per_class']}", f"seed={cfg['seed']}"]
        if os.environ.get(BUDGET):
            tags.append(f"N={os.environ[BUDGET]}")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dptrain"),
                                  dir=str(run), name=run.name, id=wandb_id(run, record),
                                  resume="allow", group=os.environ.get(SWEEP), tags=tags,
                                  config={**cfg, "subset": subset}, reinit="finish_previous")
        except Exception as e:  # no account, no network, a bad setting: W&B's own words
            raise DataError(f"--log-to wandb: {str(e).strip().splitlines()[0]}; "
                            "WANDB_MODE=offline logs with no account or network") from None

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


def wandb_id(run: Path, record: dict) -> str:
    """One W&B id per run: its folder and what it computes (an --overwrite with other
    options starts another W&B run)."""
    key = json.dumps([str(run.resolve()), record["config"], record.get("subset")],
                     sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
