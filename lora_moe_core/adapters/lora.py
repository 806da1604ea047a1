"""Plain LoRA: one low-rank pair around a frozen ``nn.Linear`` (Stage 1 and the frozen base branch of Stage 2).

``y = W x + m · (alpha / r) · B A x``  (Hu et al., 2021, https://arxiv.org/abs/2106.09685), with the musubi
convention for ``alpha`` (scale = alpha/rank) so that a Stage-1 file from musubi-tuner means the same here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAWeights(nn.Module):
    """One low-rank pair ``ΔW = (alpha/rank) · B A``; shared by every wrapper that uses it.

    Args:
        in_features: input width of the adapted linear.
        out_features: output width of the adapted linear.
        rank: inner dimension r.
        alpha: LoRA alpha; None means alpha = rank (scale 1).

    Attributes:
        lora_A: ``[r, in]``, kaiming-uniform initialised.
        lora_B: ``[out, r]``, zero initialised, so a fresh adapter is the identity.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) · B A`` in fp32 (bf16 matmul on CPU loses the small delta)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def adapter_params(self) -> list[str]:
        return ["lora_A", "lora_B"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a :class:`LoRAWeights` branch scaled by ``multiplier``.

    The base layer is kept as ``self.base_layer`` and called, never patched. ``merge()`` folds the branch
    into the base weight (idempotent); ``unmerge()`` takes it out again.
    """

    def __init__(self, base_layer: nn.Linear, lora: LoRAWeights, multiplier: float = 1.0):
        super().__init__()
        if (lora.lora_A.shape[1], lora.lora_B.shape[0]) != (base_layer.in_features, base_layer.out_features):
            raise ValueError("LoRA shape does not match the base layer")
        self.base_layer = base_layer
        self.lora = lora
        self.multiplier = multiplier
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # diffusers reads `.weight.dtype` of some projections; expose the base weight as a plain Linear would
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.multiplier == 0:
            return y
        down = F.linear(x, self.lora.lora_A.to(x.dtype))  # [..., r]
        return y + F.linear(down, self.lora.lora_B.to(x.dtype)) * (self.multiplier * self.lora.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``multiplier·ΔW`` into the base weight; refuses to write NaN/Inf."""
        if self.merged:
            return
        add_to_weight(self.base_layer, self.multiplier * self.lora.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        add_to_weight(self.base_layer, -self.multiplier * self.lora.delta_weight())
        self.merged = False


def add_to_weight(layer: nn.Linear, delta: torch.Tensor) -> None:
    """``W += delta`` computed in fp32, checked for finiteness before the base weight is touched."""
    if layer.weight.dtype == torch.float8_e4m3fn:
        # an fp8 base loses the small delta in rounding; keep the adapters unmerged there (musubi advises the same)
        raise ValueError("cannot merge adapters into an fp8 base weight; run unmerged")
    merged = layer.weight.float() + delta.to(layer.weight.device)
    if not torch.isfinite(merged).all():
        raise ValueError("merge would produce NaN/Inf weights; the adapter is not merged")
    layer.weight.copy_(merged.to(layer.weight.dtype))
