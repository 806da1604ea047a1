"""Micro-batches of cached clips, in an order that depends only on (seed, epoch), so a resumed run sees the
same batches as an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.model.loading import MAX_SEQUENCE_LENGTH, pad_prompt_embeds


@dataclass
class Batch:
    """One micro-batch (all clips of one latent shape)."""

    latents: torch.Tensor  # [B, 16, F, H, W]
    roi_weights: torch.Tensor  # [B, F, H, W]
    probs: torch.Tensor  # [B, 4] caption family distribution
    labels: torch.Tensor  # [B, 4] multi-hot, zeros when the caption names no instrument
    text: torch.Tensor  # [B, 512, D] zero-padded UMT5 embeddings, as WanPipeline feeds the DiT
    names: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.latents.to(device), self.roi_weights.to(device), self.probs.to(device),
                     self.labels.to(device), self.text.to(device), self.names)  # fmt: skip


def epoch_batches(entries: list[CacheEntry], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled micro-batches of entry indices; a batch never mixes latent shapes (buckets)."""
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    by_shape: dict[tuple[int, ...], list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        pending = by_shape.setdefault(tuple(entries[index].latents.shape), [])
        pending.append(index)
        if len(pending) == batch_size:
            batches.append(pending.copy())
            pending.clear()
    batches += [pending for pending in by_shape.values() if pending]
    return batches


def collate(entries: list[CacheEntry]) -> Batch:
    return Batch(
        latents=torch.stack([e.latents for e in entries]),
        roi_weights=torch.stack([e.roi_weights for e in entries]),
        probs=torch.stack([e.probs for e in entries]),
        labels=torch.stack([e.labels for e in entries]),
        text=pad_prompt_embeds([e.text for e in entries], MAX_SEQUENCE_LENGTH),
        names=[e.name for e in entries],
    )


def step_generator(seed: int, epoch: int, micro_step: int) -> torch.Generator:
    """The RNG for one micro-batch's timesteps and noise: a pure function of its position in the run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + micro_step)
