"""The arms of the specialisation benchmark (bench/method.py): training and held-out evaluation of each.

Every arm trains with the library's own :class:`TrainingLoop` and recipes on the tiny Wan2.2 pair and is measured
with ``evaluation.specialisation`` / ``evaluation.arms`` at the same fixed (t, noise) pairs. The vanilla arms are
the pipeline's matched single-LoRA arm (``training.baseline_arm``), made from the routed arm's Stage-2 config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from lora_moe_core.adapters.checkpoint import load_network
from lora_moe_core.config import Config, load_config
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.evaluation import arms as arm_evaluation
from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.lora_files import read_lora
from lora_moe_core.model.loading import load_dits
from lora_moe_core.model.wan import get_task, linear_shapes
from lora_moe_core.tracking.tracker import NullTracker
from lora_moe_core.training.baseline_arm import BaselineArmRecipe, matched_lora_config
from lora_moe_core.training.loop import TrainingLoop
from lora_moe_core.training.monitor import EarlyStopping
from lora_moe_core.training.recipes import Stage1Recipe, Stage2Recipe
from lora_moe_core.training.run import family_prior

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
CPU = torch.device("cpu")
BOUNDARY = get_task("tiny").boundary_ratio
#: Stage-2 arms minimise the same loss that is evaluated (the flow-matching loss), like the vanilla arms: the ROI
#: and temporal terms are off everywhere; the seed's routing terms (entropy, balance, teacher KL) stay on.
SAME_OBJECTIVE = {"weight_roi_recon": 0.0, "use_temporal_loss": False}


class _NeverStop(EarlyStopping):
    """Early stopping off: arms must take exactly the same number of optimizer steps."""

    def check(self, summary: dict[str, float]) -> str | None:
        return None


def _train(config: Config, recipe, entries: list[CacheEntry], out: Path) -> tuple[Path, int, list[dict]]:
    """Run the library's training loop; returns the final checkpoint, the optimizer steps and the epoch history."""
    loop = TrainingLoop(config, recipe, entries, out, NullTracker(), CPU)
    loop.state.early_stopping = _NeverStop()
    final = loop.run()
    return final, loop.state.step, loop.state.history


def lora_clip_losses(lora: Path, heldout: list[CacheEntry], stage1: Path | None = None) -> np.ndarray:
    """Per-clip held-out loss ``[N]`` of the tiny DiTs (+ the frozen Stage-1 LoRA) + a LoRA file, at the fixed pairs."""
    base = read_lora(stage1).modules if stage1 is not None else None
    return arm_evaluation.lora_clip_losses(heldout, load_dits("tiny"), BOUNDARY, read_lora(lora).modules, base)


def train_stage1(train: list[CacheEntry], seed: int, epochs: int, out: Path) -> tuple[Path, list[Path], list[dict]]:
    """Stage 1 on the pooled clips; also saves a checkpoint after every eighth of its steps, to show the plateau.

    Returns the final LoRA, the eight checkpoints (the last is the final one) and the epoch history."""
    steps = epochs * -(-len(train) // 2)
    every = max(1, steps // 8)
    overrides = {"seed": seed, "num_train_epochs": epochs, "output_dir": str(out), "save_every_n_steps": every}
    config = load_config(DEMO / "vanilla_lora.toml", overrides)
    torch.manual_seed(seed)
    final, _, history = _train(config, Stage1Recipe(config, load_dits("tiny"), CPU), train, out)
    checkpoints = [out / f"lora_step_{k * every}.safetensors" for k in range(1, 8)]
    return final, [*(path for path in checkpoints if path.exists()), final], history


def shuffled_labels(entries: list[CacheEntry], seed: int) -> list[CacheEntry]:
    """The same clips with their caption labels permuted across clips (a seeded permutation)."""
    order = np.random.default_rng([seed, 13]).permutation(len(entries))
    return [dataclasses.replace(entry, labels=entries[j].labels, probs=entries[j].probs)
            for entry, j in zip(entries, order, strict=True)]  # fmt: skip


def stage2_config(seed: int, epochs: int, stage1: Path, out: Path, **overrides) -> Config:
    """The Stage-2 arms' config: the demo Stage 2 from ``stage1``, minimising the evaluated loss."""
    overrides = {"seed": seed, "num_train_epochs": epochs, "output_dir": str(out), "base_lora_weights": str(stage1),
                 **SAME_OBJECTIVE, **overrides}  # fmt: skip
    return load_config(DEMO / "lora_moe_stage_b_merged.toml", overrides)


def train_stage2(arm: str, train: list[CacheEntry], seed: int, epochs: int, stage1: Path, out: Path):
    """A Stage-2 arm from the Stage-1 plateau: ``routed`` (learned router on caption labels), ``shuffled`` (the
    same with labels permuted across clips) or ``uniform`` (routing_mode uniform). Returns (checkpoint, steps)."""
    config = stage2_config(seed, epochs, stage1, out, **({"routing_mode": "uniform"} if arm == "uniform" else {}))
    entries = shuffled_labels(train, seed) if arm == "shuffled" else train
    torch.manual_seed(seed)
    recipe = Stage2Recipe(config, load_dits("tiny"), CPU, family_prior=family_prior(entries))
    final, steps, _ = _train(config, recipe, entries, out)
    return final, steps


def evaluate_stage2(checkpoint: Path, heldout: list[CacheEntry]) -> tuple[dict[str, float], np.ndarray]:
    """What ``lora-moe evaluate`` reports about specialisation, on a fresh load of the checkpoint, and the per-clip
    losses ``[N, E]`` with each expert forced (for intervals over seeds)."""
    dits = load_dits("tiny")
    network = load_network(checkpoint, linear_shapes(dits["high"]))
    per_route = spec.route_losses(network, heldout, dits, BOUNDARY, seed=0)
    return spec.summarise(per_route, spec.family_members(heldout)), spec.expert_clip_losses(per_route)


def train_vanilla(entries: list[CacheEntry], seed: int, epochs: int, stage1: Path, out: Path, scale: int) -> tuple:
    """The matched single-LoRA arm of the routed arm's Stage 2 (the pipeline's ``baseline_arm``) over the frozen
    Stage-1 plateau, ``scale``× an expert's ranks and alpha (4: Stage 2's total trainable rank at the experts'
    per-rank scaling; 1: one expert, the per-family oracle). Returns (file, steps)."""
    config = matched_lora_config(stage2_config(seed, epochs, stage1, out), experts=scale)
    config.training.output_dir = str(out)
    torch.manual_seed(seed)
    final, steps, _ = _train(config, BaselineArmRecipe(config, load_dits("tiny"), CPU), entries, out)
    return final, steps


def family_subset(entries: list[CacheEntry], family: str) -> list[CacheEntry]:
    index = FAMILIES.index(family)
    return [entry for entry in entries if entry.labels[index] > 0]
