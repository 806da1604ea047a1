"""Which device and dtype a command computes in: ``auto`` is the GPU when there is one (caching, evaluation and
inference at A14B size on a CPU take hours), and weights there are bf16 as musubi-tuner keeps them."""

from __future__ import annotations

import re

import torch

from lora_moe_core.errors import UserError

#: Devices a command can run on; "meta" or "xla" would load no weights and fail deep inside diffusers.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d{1,2})?")


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto`` → cuda when available, else cpu."""
    if device is not None and not DEVICE_PATTERN.fullmatch(str(device)):
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    try:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else None
        resolved = resolved or torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available here")
    return resolved


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU, where bf16 matmuls are slow and the tiny model's numbers are pinned."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
