"""The optimisers `--optimizer` names: one table, for the option's choices and help, the
building, and the state the pixel cache's GPU estimate makes room for. A new optimiser is an
entry of OPTIMIZERS and its constructor. No torch at import: `--help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Optimizer:
    """An optimiser `--optimizer` can name."""

    help: str  # its words in --optimizer's help
    # (param groups, lr, momentum (Adam's beta1), beta2) -> the optimiser
    make: Callable[[list[dict], float, float, float], torch.optim.Optimizer]
    state_per_param: int  # parameter-sized tensors it keeps (momentum, moments)


def _sgd(groups: list[dict], lr: float, momentum: float, beta2: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _adam(groups: list[dict], lr: float, momentum: float, beta2: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.Adam(groups, lr=lr, betas=(momentum, beta2))


def _adamw(groups: list[dict], lr: float, momentum: float, beta2: float) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, beta2))


OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer("SGD with momentum", _sgd, 1),
    "adam": Optimizer("Adam, weight decay added to the gradient (torch.optim.Adam)", _adam, 2),
    "adamw": Optimizer("decoupled weight decay (torch.optim.AdamW)", _adamw, 2),
}
OPTIMIZER_HELP = "; ".join(f"{name}: {o.help}" for name, o in OPTIMIZERS.items()) + "."
