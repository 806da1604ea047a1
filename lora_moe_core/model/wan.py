"""WAN2.2 model knowledge: task shapes, the high/low-noise boundary, adapter target resolution.

Module names are diffusers' (``blocks.N.attn1.to_q``); lora_formats.py maps them to musubi/ComfyUI names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_moe_core.config import LoRAConfig
from lora_moe_core.errors import UserError

#: Seed rank fields → the diffusers linear they adapt inside a block.
RANK_FIELDS: dict[str, str] = {
    "rank_q": "attn1.to_q",
    "rank_k": "attn1.to_k",
    "rank_v": "attn1.to_v",
    "rank_o": "attn1.to_out.0",
    "rank_ffn": "ffn.net.0.proj",
}


@dataclass(frozen=True)
class WanTask:
    """Shape and schedule facts of one WAN2.2 model family."""

    name: str
    transformer_config: dict[str, Any]
    boundary_ratio: float  # t >= boundary·1000 runs `transformer` (high noise), below it `transformer_2`
    flow_shift: float  # official inference shift
    two_experts: bool


_A14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip

# diffusers' own Wan test model (2×12 heads, ffn 32, text 16) with 4 blocks, so "last_3" differs from "all".
_TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=16, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
)  # fmt: skip

TASKS: dict[str, WanTask] = {
    "t2v-A14B": WanTask("t2v-A14B", _A14B_TRANSFORMER, boundary_ratio=0.875, flow_shift=12.0, two_experts=True),
    "tiny": WanTask("tiny", _TINY_TRANSFORMER, boundary_ratio=0.875, flow_shift=12.0, two_experts=True),
}


def get_task(name: str) -> WanTask:
    """Look up a task by name; unknown names fail with the valid list."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; valid: {', '.join(TASKS)}")
    return TASKS[name]


def build_transformer(task: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Build a randomly initialised ``WanTransformer3DModel`` of the task's shape (no weights are downloaded).

    ``tiny`` is the CPU test and demo model; the A14B shape is built directly on ``device`` for benchmarks.
    """
    from diffusers import WanTransformer3DModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**get_task(task).transformer_config)
    if dtype != torch.float32:
        model = model.to(dtype)
    torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False)


def select_blocks(selector: str | list[int], num_layers: int) -> list[int]:
    """Resolve a block selector (``last_8``, ``first_2``, ``32-39``, ``all`` or a list) to sorted indices.

    ``last_N``/``first_N`` are clamped to the model's depth, so the seed's ``last_8`` means every block of a
    smaller test model.
    """
    if isinstance(selector, list):
        bad = [index for index in selector if index >= num_layers]
        if bad:
            raise UserError(f"block index {bad[0]} out of range: the model has {num_layers} blocks")
        return sorted(set(selector))
    if selector == "all":
        return list(range(num_layers))
    kind, _, value = selector.partition("_")
    if kind == "last":
        return list(range(max(0, num_layers - int(value)), num_layers))
    if kind == "first":
        return list(range(min(num_layers, int(value))))
    start, end = (int(part) for part in selector.split("-"))
    if not start <= end < num_layers:
        raise UserError(f"block range {selector} does not fit a model with {num_layers} blocks")
    return list(range(start, end + 1))


def resolve_targets(lora: LoRAConfig, num_layers: int, default_rank: int | None = None) -> dict[str, int]:
    """Map each targeted module name to its rank, following the seed's per-module rank fields.

    Args:
        lora: the ``[lora]`` config section.
        num_layers: depth of the DiT.
        default_rank: rank for modules whose ``rank_*`` is unset (default ``lora.lora_dim``).
    """
    default_rank = default_rank or lora.lora_dim
    attention_blocks = select_blocks(lora.target_blocks, num_layers)
    ffn_blocks = select_blocks(lora.ffn_target_blocks, num_layers)
    targets: dict[str, int] = {}
    for field, module in RANK_FIELDS.items():
        rank = getattr(lora, field)
        rank = default_rank if rank is None else rank
        if rank == 0:
            continue
        for block in ffn_blocks if field == "rank_ffn" else attention_blocks:
            targets[f"blocks.{block}.{module}"] = rank
    return dict(sorted(targets.items(), key=lambda item: _module_sort_key(item[0])))


def _module_sort_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blocks" else -1, name)


def linear_shapes(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` for every ``nn.Linear`` in the transformer.

    Already-wrapped adapter layers report their base layer's shape under the original name (also a LoRA wrapped
    inside a frozen one: ``<name>.base_layer.base_layer``).
    """
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in transformer.named_modules():
        while name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        if isinstance(module, nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def num_blocks(transformer: nn.Module) -> int:
    """Depth of a ``WanTransformer3DModel``."""
    return len(transformer.blocks)


def task_linear_shapes(task: str) -> dict[str, tuple[int, int]]:
    """Linear shapes of a task's DiT, built on the meta device (no memory, no weights)."""
    return linear_shapes(build_transformer(task, device="meta"))
