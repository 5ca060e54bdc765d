"""Where the tensors live: the device a run asks for, the autocast dtype it can use there, and
the model's input on it (the loader hands over uint8 images; they become floats only here, on
the device, as in FFCV).
"""

from __future__ import annotations

import functools

import torch

from ..common.errors import DataError

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


def amp_context(device_type: str, amp: str) -> torch.autocast:
    """The autocast context of a resolved --amp value ("off" disables it)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[amp]
    return torch.autocast(device_type, dtype=dtype, enabled=amp != "off")


def to_model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC from the loader -> normalised float NCHW, on the device (never on the CPU
    loader). NHWC permuted to NCHW already has channels-last strides."""
    mean, std = _normalisation(images.device)
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD on `device`, copied there once. torch follows a blocking copy from host
    memory with a wait for the stream, so copying them every step kept the host from queueing
    the next step while the GPU ran this one."""
    return MEAN.to(device).view(1, 3, 1, 1), STD.to(device).view(1, 3, 1, 1)
