"""Held-out evaluation: losses per family for base / Stage 1 / Stage 2, routing quality, sample metrics.

Every number here needs no downloaded weights. Losses are measured at fixed (t, noise) pairs per clip, so the
three models see exactly the same inputs and two runs of the evaluation agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lora_moe_core.adapters.routing import teacher_distribution
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.defaults import EVAL_TIMESTEPS as DEFAULT_EVAL_TIMESTEPS
from lora_moe_core.evaluation.batched import DEFAULT_BATCH, draw_noises, score_clip
from lora_moe_core.families import FAMILIES
from lora_moe_core.training import losses
from lora_moe_core.training.batches import collate

#: Evaluation timesteps (the default of ``--eval_timesteps``; see :mod:`lora_moe_core.defaults`).
EVAL_TIMESTEPS = DEFAULT_EVAL_TIMESTEPS


@dataclass
class LossTable:
    """Sums of per-clip losses by family (a clip naming two families counts for both) and overall."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, families: list[str], value: float) -> None:
        for key in [*families, "all"]:
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}


def entry_families(entry: CacheEntry) -> list[str]:
    return [name for index, name in enumerate(FAMILIES) if entry.labels[index] > 0]


@torch.no_grad()
def held_out_losses(
    entries: list[CacheEntry], dits: dict[str, nn.Module], boundary: float, prepare=None, seed: int = 0,
    timesteps: Sequence[float] = EVAL_TIMESTEPS, batch_size: int = DEFAULT_BATCH,
) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """Mean diffusion and ROI loss by family at the fixed ``timesteps`` and seeded noise.

    Args:
        entries: held-out clips.
        dits: ``{"high", "low"}`` DiTs, adapted as the model under test (on any device).
        boundary: high/low-noise switch (0.875).
        prepare: called with each one-clip batch before the forward (sets the LoRA-MoE routing).
        seed: noise seed (the same for every model).
        timesteps: the evaluation timesteps; batch_size: samples per DiT forward (:mod:`batched`).
    """
    diffusion, roi = LossTable(), LossTable()
    for index, entry in enumerate(entries):
        batch = collate([entry])
        if prepare is not None:
            prepare(batch)
        noises = draw_noises(batch, torch.Generator().manual_seed(seed * 100_003 + index), timesteps)
        clip_diffusion, clip_roi = score_clip(dits, boundary, batch, noises, timesteps, batch_size)
        families = entry_families(entry)
        for column in range(len(timesteps)):
            diffusion.add(families, float(clip_diffusion[0, column]))
            if batch.roi_weights.gt(1).any():
                roi.add(families, float(clip_roi[0, column]))
    return diffusion.means(), roi.means()


@torch.no_grad()
def routing_metrics(network, entries: list[CacheEntry], classifier: nn.Module | None = None) -> dict[str, object]:
    """Gates from caption labels (as in training) and, with a classifier, from the latents alone."""
    labelled = [e for e in entries if e.labelled]
    if not labelled:
        return {}
    confidence = network.config.router.hint_confidence
    labels = torch.stack([e.labels for e in labelled])
    gates = network.set_routing(labels * confidence)
    probs = network.router_probs
    teacher = teacher_distribution(labels * confidence, network.config.router.teacher_temperature,
                                   network.config.router.teacher_label_smoothing)  # fmt: skip
    top = gates.argmax(dim=1)
    confusion = np.zeros((len(FAMILIES), len(FAMILIES)), dtype=int)
    for row, expert in zip(labels.argmax(dim=1).tolist(), top.tolist(), strict=True):
        confusion[row, expert] += 1
    metrics: dict[str, object] = {
        "routing.accuracy": float((labels.gather(1, top[:, None]) > 0).float().mean()),
        # usage entropy is high whenever the experts are used equally often overall, even if every clip is
        # routed to a single expert; the per-clip entropy tells those apart
        "routing.usage_entropy": float(losses.entropy(gates.mean(dim=0))),
        "routing.gate_entropy_per_clip": float(losses.entropy(gates).mean()),
        "routing.teacher_kl": float(losses.teacher_kl_loss(probs, teacher)),
        "routing.confusion": confusion.tolist(),
        "routing.gate_means": {
            name: gates[labels[:, i] > 0].mean(dim=0).tolist()
            for i, name in enumerate(FAMILIES)
            if (labels[:, i] > 0).any()
        },  # fmt: skip
    }
    for index, name in enumerate(FAMILIES):
        metrics[f"usage.{name}"] = float(gates[:, index].mean())
    if classifier is not None:
        logits = torch.cat([classifier(e.latents[None]) for e in labelled])
        from_latents = network.set_routing(logits).argmax(dim=1)
        metrics["routing.classifier_accuracy"] = float((labels.gather(1, from_latents[:, None]) > 0).float().mean())
    return metrics


def temporal_flicker(frames: np.ndarray) -> float:
    """Mean absolute change between consecutive frames, in [0, 1] (lower is steadier)."""
    frames = frames.astype(np.float32) / 255.0
    return float(np.abs(np.diff(frames, axis=0)).mean()) if len(frames) > 1 else 0.0


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-4) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (regularised for small N)."""
    from scipy import linalg

    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    dim = a.shape[1]
    cov_a = np.cov(a, rowvar=False) if len(a) > 1 else np.zeros((dim, dim))
    cov_b = np.cov(b, rowvar=False) if len(b) > 1 else np.zeros((dim, dim))
    cov_a, cov_b = cov_a + eps * np.eye(dim), cov_b + eps * np.eye(dim)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
