"""LoRA mixture of experts around a frozen ``nn.Linear``, computed as one fused low-rank product pair.

Per projection (seed)::

    y = W x + α_base·s_0·B_0 A_0 x + Σ_e g_e·α_e·s_e·B_e A_e x        s = alpha / rank

All branches share one pair of skinny GEMMs: ``A_cat = [A_0; A_1; …; A_E]`` (``[R, in]``) and
``B_cat = [B_0 | B_1 | … | B_E]`` (``[out, R]``); the per-sample gates scale the ``R`` middle activations.
This equals the sum above exactly (linearity) without a loop over experts and without building a
per-sample weight, whose dense ``[out, in]`` gradient would cost as much as the base GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_moe_core.adapters.lora import LoRAWeights, add_to_weight


class ExpertLoRAWeights(nn.Module):
    """E low-rank pairs of equal rank, stacked.

    Attributes:
        lora_A: ``[E, r, in]``, kaiming-uniform per expert.
        lora_B: ``[E, out, r]``, zeros, so fresh experts add nothing.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_experts: int, alpha: float | None = None):
        super().__init__()
        self.rank = rank
        self.num_experts = num_experts
        self.alpha = float(rank if alpha is None else alpha)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def adapter_params(self) -> list[str]:
        return ["lora_A", "lora_B"]


class RouteState:
    """The routing of the current forward pass, shared by every :class:`LoRAMoELinear` of a network.

    Attributes:
        expert_scale: ``[B, E]`` (or ``[1, E]``) multiplier per sample and expert: router gate × timestep
            gate × α_expert. Set by the network before each transformer forward.
        alpha_base: multiplier of the frozen base LoRA branch.
    """

    def __init__(self, alpha_base: float = 1.0):
        self.expert_scale: torch.Tensor | None = None
        self.alpha_base = alpha_base


class LoRAMoELinear(nn.Module):
    """A frozen ``nn.Linear`` with an optional frozen base LoRA and an optional gated expert bank.

    Either branch may be absent: a Stage-1 file may cover modules the experts do not (musubi adapts all
    ten linears of a block), and experts may sit where Stage 1 put nothing.

    Args:
        base_layer: the frozen linear, kept and called as is.
        route: the network's shared :class:`RouteState`.
        base_lora: frozen Stage-1 pair for this module, if any.
        experts: the expert bank for this module, if any.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        route: RouteState,
        base_lora: LoRAWeights | None = None,
        experts: ExpertLoRAWeights | None = None,
    ):
        super().__init__()
        if base_lora is None and experts is None:
            raise ValueError("LoRAMoELinear needs a base LoRA, experts or both")
        self.base_layer = base_layer
        self.base_lora = base_lora
        self.experts = experts
        self.route = route
        self.merged_multipliers: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self.merged_multipliers is not None

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_cat [R, in]`` and ``B_cat [out, R]``: base rows first, then expert e's r rows for e = 0..E-1."""
        downs, ups = [], []
        if self.base_lora is not None:
            downs.append(self.base_lora.lora_A)
            ups.append(self.base_lora.lora_B)
        if self.experts is not None:
            num_experts, rank, in_features = self.experts.lora_A.shape
            downs.append(self.experts.lora_A.reshape(num_experts * rank, in_features))
            # [E, out, r] -> [out, E, r] -> [out, E·r]; expert-major columns match the rows of A_cat
            ups.append(self.experts.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank))
        return torch.cat(downs, dim=0), torch.cat(ups, dim=1)

    def rank_multipliers(self, expert_scale: torch.Tensor | None, alpha_base: float) -> torch.Tensor:
        """``[B, R]`` multiplier of each middle activation: LoRA scales, α's and gates folded together.

        Args:
            expert_scale: ``[B, E]`` gate × timestep gate × α_expert, or None when the layer has no experts.
            alpha_base: multiplier of the base branch.
        """
        parts = []
        batch = 1 if expert_scale is None else expert_scale.shape[0]
        device = (self.base_lora if self.base_lora is not None else self.experts).lora_A.device
        if self.base_lora is not None:
            value = alpha_base * self.base_lora.scaling
            parts.append(torch.full((batch, self.base_lora.rank), value, device=device))
        if self.experts is not None:
            if expert_scale is None:
                raise RuntimeError("no routing set: call LoRAMoENetwork.set_routing(...) before the forward")
            scaled = expert_scale.float().to(device) * self.experts.scaling  # [B, E]
            parts.append(scaled.repeat_interleave(self.experts.rank, dim=1))  # [B, E·r], keeps autograd to gates
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        down, up = self.stacked_weights()
        multipliers = self.rank_multipliers(self.route.expert_scale, self.route.alpha_base)  # [Bg, R]
        if multipliers.shape[0] not in (1, x.shape[0]):
            raise RuntimeError(f"routing set for {multipliers.shape[0]} samples but the batch has {x.shape[0]}")
        hidden = F.linear(x, down.to(x.dtype))  # [B, N, R]
        multipliers = multipliers.view(multipliers.shape[0], *([1] * (x.dim() - 2)), -1)  # [B, 1, R]
        return y + F.linear(hidden * multipliers.to(x.dtype), up.to(x.dtype))

    def delta_weight(self, multipliers: torch.Tensor) -> torch.Tensor:
        """Dense ``B_cat · diag(m) · A_cat`` in fp32 for one fixed routing ``m`` (``[R]``)."""
        down, up = self.stacked_weights()
        return (up.float() * multipliers.float()) @ down.float()

    @torch.no_grad()
    def merge(self, expert_scale: torch.Tensor | None, alpha_base: float) -> None:
        """Fold the adapters into the base weight for one fixed routing (``[E]`` or ``[1, E]``).

        A mixture can only be merged for a fixed route: while merged, the forward ignores the route state.
        Merging again with the same routing is a no-op; with another routing, unmerge first.
        """
        if expert_scale is not None:
            expert_scale = expert_scale.reshape(1, -1)
        multipliers = self.rank_multipliers(expert_scale, alpha_base)[0]
        if self.merged:
            if torch.equal(multipliers, self.merged_multipliers):
                return
            raise RuntimeError("layer is merged for another routing; unmerge() first")
        add_to_weight(self.base_layer, self.delta_weight(multipliers))
        self.merged_multipliers = multipliers

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        add_to_weight(self.base_layer, -self.delta_weight(self.merged_multipliers))
        self.merged_multipliers = None
