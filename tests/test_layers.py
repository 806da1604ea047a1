"""LoRALinear and LoRAMoELinear math: shapes, zero init, fused == per-expert loop, merge/unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_moe_core.adapters.lora import LoRALinear, LoRAWeights
from lora_moe_core.adapters.moe import ExpertLoRAWeights, LoRAMoELinear, RouteState


def _moe_layer(with_base: bool = True, with_experts: bool = True) -> LoRAMoELinear:
    base = nn.Linear(24, 32)
    base_lora = LoRAWeights(24, 32, rank=6, alpha=3.0) if with_base else None
    experts = ExpertLoRAWeights(24, 32, rank=4, num_experts=4, alpha=1.0) if with_experts else None
    with torch.no_grad():
        if base_lora is not None:
            base_lora.lora_B.normal_()
        if experts is not None:
            experts.lora_B.normal_()
    return LoRAMoELinear(base, RouteState(alpha_base=0.7), base_lora=base_lora, experts=experts)


def _reference(layer: LoRAMoELinear, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The seed's formula with an explicit loop over experts: W x + α_base ΔW_0 x + Σ_e g_e α_e ΔW_e x."""
    y = layer.base_layer(x)
    if layer.base_lora is not None:
        lora = layer.base_lora
        y = y + layer.route.alpha_base * lora.scaling * x @ (lora.lora_B @ lora.lora_A).T
    experts = layer.experts
    for e in range(experts.num_experts):
        delta = experts.scaling * experts.lora_B[e] @ experts.lora_A[e]  # [out, in]
        y = y + scale[:, e].view(-1, 1, 1) * (x @ delta.T)
    return y


def test_lora_linear_zero_init_is_identity_and_shapes():
    base = nn.Linear(24, 32)
    layer = LoRALinear(base, LoRAWeights(24, 32, rank=4, alpha=1.0))
    x = torch.randn(2, 5, 24)
    assert layer(x).shape == (2, 5, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.lora.lora_A.shape == (4, 24) and layer.lora.lora_B.shape == (32, 4)
    assert layer.lora.scaling == 0.25  # musubi: alpha / rank


def test_lora_linear_merge_unmerge_round_trip():
    base = nn.Linear(24, 32)
    lora = LoRAWeights(24, 32, rank=4, alpha=2.0)
    nn.init.normal_(lora.lora_B)
    layer = LoRALinear(base, lora, multiplier=0.8)
    original_weight = base.weight.clone()
    x = torch.randn(3, 24)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, base(x) + 0.8 * 0.5 * x @ (lora.lora_B @ lora.lora_A).T)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-6)


def test_moe_zero_init_experts_add_nothing():
    base = nn.Linear(24, 32)
    route = RouteState()
    route.expert_scale = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    layer = LoRAMoELinear(base, route, experts=ExpertLoRAWeights(24, 32, rank=4, num_experts=4))
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("with_base", [True, False])
def test_fused_experts_equal_per_expert_loop(with_base):
    layer = _moe_layer(with_base=with_base)
    x = torch.randn(3, 10, 24, dtype=torch.float64)
    layer.double()
    scale = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.5, 0.0, 0.0, 0.5], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    layer.route.expert_scale = scale
    fused = layer(x)
    assert fused.shape == (3, 10, 32)
    torch.testing.assert_close(fused, _reference(layer, x, scale), rtol=0, atol=1e-6)


def test_fused_fp32_matches_loop_within_1e6_relative():
    layer = _moe_layer()
    x = torch.randn(2, 16, 24)
    scale = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    layer.route.expert_scale = scale
    fused, loop = layer(x), _reference(layer, x, scale)
    assert ((fused - loop).norm() / loop.norm()).item() < 1e-6


def test_one_routing_row_broadcasts_and_wrong_batch_fails():
    layer = _moe_layer()
    x = torch.randn(3, 4, 24)
    layer.route.expert_scale = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    broadcast = layer(x)
    layer.route.expert_scale = torch.tensor([[0.0, 1.0, 0.0, 0.0]]).expand(3, 4)
    torch.testing.assert_close(layer(x), broadcast)
    layer.route.expert_scale = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="routing set for 2 samples"):
        layer(x)


def test_moe_merge_equals_unmerged_and_unmerge_restores():
    layer = _moe_layer()
    scale = torch.tensor([0.0, 0.7, 0.3, 0.0])
    layer.route.expert_scale = scale[None]
    x = torch.randn(2, 9, 24)
    unmerged = layer(x)
    weight = layer.base_layer.weight.clone()
    layer.merge(scale, layer.route.alpha_base)
    layer.merge(scale, layer.route.alpha_base)  # same routing: no-op
    layer.route.expert_scale = None  # merged layers ignore the route state
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="another routing"):
        layer.merge(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.7)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_gradients_reach_gates_through_the_fused_path():
    layer = _moe_layer()
    gates = torch.tensor([[0.0, 0.6, 0.4, 0.0]], requires_grad=True)
    layer.route.expert_scale = gates
    layer(torch.randn(1, 5, 24)).square().sum().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    assert layer.experts.lora_B.grad[1].abs().sum() > 0 and layer.experts.lora_B.grad[0].abs().sum() == 0
