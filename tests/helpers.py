"""Helpers shared by the tests (tiny models, networks with non-zero experts)."""

from __future__ import annotations

import torch

from lora_moe_core.config import Config
from lora_moe_core.network import LoRAMoENetwork
from lora_moe_core.wan import linear_shapes, resolve_targets


def randomize_experts(network: LoRAMoENetwork, std: float = 0.2) -> None:
    """Give the zero-initialised expert B matrices values, as training would."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for experts in network.experts.values():
            experts.lora_B.copy_(torch.randn(experts.lora_B.shape, generator=generator) * std)


def make_network(config: Config, transformer: torch.nn.Module, base_lora=None) -> LoRAMoENetwork:
    shapes = linear_shapes(transformer)
    targets = resolve_targets(config.lora, len(transformer.blocks))
    return LoRAMoENetwork(config, targets, shapes, base_lora=base_lora)


def run(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]
