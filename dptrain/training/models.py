"""Models by name: every torchvision classification model, plus `smallcnn` for the built-in
32-64 px synthetic data, where an ImageNet ResNet's 4x stem would leave 1-2 px feature maps.

The backbone's features are the input of its last Linear layer (global-pooled), which the
probe takes by replacing that layer (`probe._penultimate`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.errors import DataError


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four stages of two 3x3 conv-BN-ReLU (widths w, 2w, 4w, 8w; stride 2 between stages),
    global average pool, linear classifier: ~1.2 M parameters at w = 32."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [_block(c, w, 1 if i == 0 else 2), _block(w, w, 1)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


BUILT_IN = {"smallcnn": SmallCNN}


def model_names() -> list[str]:
    import torchvision.models as tvm
    from torchvision.models import list_models

    return sorted(BUILT_IN) + list_models(module=tvm)


def check_arch(arch: str) -> None:
    if arch in BUILT_IN:  # torchvision's import is ~2 s: a built-in model's run does not pay it
        return
    names = model_names()
    if arch not in names:
        close = [a for a in names if a.startswith(arch[:4])][:5] or names[:5]
        raise DataError(f"unknown --arch {arch!r}: smallcnn or any torchvision classification "
                        f"model, e.g. {', '.join(close)}")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised model (seed torch first for a reproducible init)."""
    if arch in BUILT_IN:
        return BUILT_IN[arch](num_classes)
    from torchvision.models import get_model

    return get_model(arch, weights=None, num_classes=num_classes)
