"""The matched single-LoRA arm: would one ordinary LoRA with the same budget have done as well as the mixture?

Beside Stage 2, one plain LoRA is trained from the same Stage-1 LoRA (frozen, unmerged, at ``alpha_base``: what
Stage 2's base branch is), on the same latent cache, for the same optimizer steps (same epochs, batch size,
accumulation, ``max_train_steps`` and seed, hence the same clip order and (t, noise) draws), with the same
optimizer settings and the same non-routing losses (:func:`recipes.reconstruction_terms`). Its trainable
parameters match the experts': per module, ``NUM_FAMILIES`` × an expert's rank at the experts' per-rank scale
(alpha / rank), as ``bench/method.py``'s vanilla arm. Only the router MLP and the timestep gates (588 parameters at
the seed's sizes) are Stage 2's alone; the evaluation reports both counts. Stage 2 may stop early (the seed's
rules); the arm, a stage_a run, never does, so the evaluation also reports both step counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from lora_moe_core.adapters.network import LoRANetwork
from lora_moe_core.config import Config, _format_error, config_to_dict
from lora_moe_core.errors import UserError
from lora_moe_core.families import NUM_FAMILIES
from lora_moe_core.formats.lora_files import LoRAModuleWeights, read_lora
from lora_moe_core.model.wan import RANK_FIELDS, linear_shapes
from lora_moe_core.training.batches import Batch
from lora_moe_core.training.monitor import EpochStats
from lora_moe_core.training.recipes import Stage1Recipe, reconstruction_terms

#: the arm's name in metrics, MLflow runs and pipeline outputs
ARM = "matched_lora"


def arm_output_dir(stage2_output_dir: str) -> str:
    """Where the arm of a Stage-2 run writes: a sibling folder, so that neither run's files replace the other's."""
    return f"{Path(stage2_output_dir)}_{ARM}"


def matched_lora_config(stage2: Config, experts: int = NUM_FAMILIES) -> Config:
    """The arm's config from a Stage-2 (stage_b) config.

    ``[lora]`` gets ``experts`` × the experts' ranks (0 stays 0: not adapted) and alpha, so each module's scale
    is the experts' and its parameters are ``experts`` experts' worth; ``[training]`` becomes a stage_a run with
    ``baseline_arm`` set, writing to :func:`arm_output_dir`; everything else is kept (the Stage-1 file and
    ``alpha_base`` of ``[lora_moe]``, the loss weights, the data, steps and optimizer settings).

    Args:
        stage2: the Stage-2 config the arm is matched to.
        experts: how many experts' ranks the one LoRA holds (``bench/method.py``'s per-family oracle: 1).

    Raises:
        UserError: when ``stage2`` is not a stage_b config, or its matched ranks exceed the rank limit.
    """
    if stage2.training.training_stage != "stage_b":
        raise UserError(f"the baseline arm is matched to a stage_b config, got {stage2.training.training_stage}")
    data = config_to_dict(stage2)
    lora, moe = stage2.lora, stage2.lora_moe
    default_rank = moe.lora_dim or lora.lora_dim  # the experts' rank where a rank_* is unset
    data["lora"].update({field: None if getattr(lora, field) is None else getattr(lora, field) * experts
                         for field in RANK_FIELDS})  # fmt: skip
    data["lora"].update(lora_dim=default_rank * experts, lora_alpha=(moe.expert_alpha or lora.lora_alpha) * experts)
    data["training"].update(training_stage="stage_a", baseline_arm=True,
                            output_dir=arm_output_dir(stage2.training.output_dir))  # fmt: skip
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(exc, "the matched LoRA of this Stage-2 config")) from None


def resolve_arm(config: Config) -> Config:
    """The config ``lora-moe train`` runs: a stage_b config with ``baseline_arm`` becomes its arm's; an arm's own
    config (stage_a with ``baseline_arm``, as a multi-GPU launch hands it to its workers) and any other stay."""
    if config.training.baseline_arm and config.training.training_stage == "stage_b":
        return matched_lora_config(config)
    return config


def frozen_stage1(config: Config, transformer: nn.Module) -> LoRANetwork | None:
    """The arm's frozen Stage-1 LoRA (``base_lora_weights``), or None when Stage 2 has no base branch.

    Raises:
        UserError: when the file is not given, unreadable, or made for another model.
    """
    if not config.lora_moe.use_base_lora:
        return None
    path = config.lora_moe.base_lora_weights
    if path is None:
        raise UserError("the baseline arm continues from Stage 1: give --base_lora_weights (or --no-use_base_lora)")
    try:
        # building the frozen copy draws initial weights it then overwrites: keep them off the global RNG, so that
        # the arm's own LoRA starts from the draws a LoRA of the same seed and targets would get
        with torch.random.fork_rng(devices=[]):
            return LoRANetwork.from_modules(read_lora(path).modules, linear_shapes(transformer))
    except UserError as exc:
        raise UserError(f"base LoRA {path} does not fit this model: {exc}") from None


def lora_parameter_count(modules: dict[str, LoRAModuleWeights]) -> int:
    """Trainable parameters of a LoRA: ``rank × (in + out)`` summed over its modules."""
    return sum(weights.down.numel() + weights.up.numel() for weights in modules.values())


def stage2_parameter_count(network) -> int:
    """Parameters a stage_b run of ``network``'s config trains: experts, plus router and timestep gates when they
    learn (counted without changing which parameters of ``network`` require gradients)."""
    router, gates = network.config.router, network.config.gates
    parts = [network.experts, *([network.router] if router.trains_router else []),
             *([network.timestep_gates] if gates.train_timestep_gates else [])]  # fmt: skip
    return sum(param.numel() for part in parts for param in part.parameters())


class BaselineArmRecipe(Stage1Recipe):
    """The arm's training: a Stage-1 style LoRA over the frozen Stage-1 LoRA, minimising Stage 2's non-routing
    objective; saved as a plain LoRA file (musubi keys) whose metadata holds the arm's config."""

    def __init__(self, config: Config, dits: dict[str, nn.Module], device: torch.device,
                 classifier: nn.Module | None = None) -> None:  # fmt: skip
        if config.loss.use_identity_loss and classifier is None:
            raise UserError("use_identity_loss needs --classifier_weights (train one with `lora-moe train-classifier`)")
        base = frozen_stage1(config, dits["high"])
        super().__init__(config, dits, device, frozen_base=base, base_multiplier=config.lora_moe.alpha_base)
        self.classifier = classifier.to(device).requires_grad_(False) if classifier is not None else None

    def loss_step(self, batch: Batch, generator: torch.Generator, progress: float, stats: EpochStats):
        out = self.step.predict(batch, generator)
        terms, weights = reconstruction_terms(self.config, self.classifier, batch, out)
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {"loss": total.item(), **{name: value.item() for name, value in terms.items()}}
