"""A Wan DiT forward in two parts: the blocks before a given one, then the rest, each on its own batch.

Evaluation scores one clip at one ``(t, noise)`` under many routes of the same LoRA-MoE (each expert forced, the
learned gates, uniform gates). The experts sit in the last blocks only (seed: blocks 32-39 of 40), so everything
before the first expert block is the same for every route: :func:`run_prefix` computes it once per clip and
timestep, :func:`repeat_samples` copies its result for each route, and :func:`run_suffix` runs the adapted blocks
on all routes as one batch. The two parts are diffusers' ``WanTransformer3DModel.forward`` cut at a block (same
modules, same order), so a prefix of 0 blocks followed by the whole suffix is that forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class BlockInputs:
    """What the blocks from ``start`` on read: hidden states after ``blocks[:start]`` and the per-sample
    conditioning every block shares."""

    hidden: torch.Tensor  # [B, L, C]
    text: torch.Tensor  # [B, L_text, C] projected text embeddings
    timestep_proj: torch.Tensor  # [B, 6, C] block modulation
    temb: torch.Tensor  # [B, C] output-norm modulation
    rotary: tuple[torch.Tensor, torch.Tensor]  # RoPE tables (the same for every sample of one shape)
    grid: tuple[int, int, int]  # frames, height, width after patching
    start: int


def run_prefix(dit: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
               stop: int) -> BlockInputs:  # fmt: skip
    """Embed the inputs and run ``blocks[:stop]`` (``timestep`` ``[B]``, diffusers' convention)."""
    frames, height, width = hidden_states.shape[2:]
    p_t, p_h, p_w = dit.config.patch_size
    rotary = dit.rope(hidden_states)
    hidden = dit.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, timestep_proj, text, _ = dit.condition_embedder(timestep, text, None, timestep_seq_len=None)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    for block in dit.blocks[:stop]:
        hidden = block(hidden, text, timestep_proj, rotary)
    return BlockInputs(hidden, text, timestep_proj, temb, rotary, (frames // p_t, height // p_h, width // p_w), stop)


def repeat_samples(inputs: BlockInputs, index: torch.Tensor) -> BlockInputs:
    """The samples ``index`` (``[N]`` positions into the batch, repeats allowed) of ``inputs``."""
    return replace(inputs, hidden=inputs.hidden[index], text=inputs.text[index],
                   timestep_proj=inputs.timestep_proj[index], temb=inputs.temb[index])  # fmt: skip


def run_suffix(dit: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """``blocks[start:]``, the output norm and projection: the velocity ``[B, C, F, H, W]``."""
    hidden = inputs.hidden
    for block in dit.blocks[inputs.start :]:
        hidden = block(hidden, inputs.text, inputs.timestep_proj, inputs.rotary)
    shift, scale = (dit.scale_shift_table.to(inputs.temb.device) + inputs.temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = (dit.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = dit.proj_out(hidden)
    frames, height, width = inputs.grid
    p_t, p_h, p_w = dit.config.patch_size
    hidden = hidden.reshape(hidden.shape[0], frames, height, width, p_t, p_h, p_w, -1)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
