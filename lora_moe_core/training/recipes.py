"""Stage recipes: Stage 1 (vanilla LoRA) and Stages 2/3 (LoRA-MoE: experts + router, or router only).

Each owns its adapters on the two Wan2.2 DiTs, the loss of one micro-batch and its checkpoint format; the
shared :class:`loop.TrainingLoop` does the rest.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from lora_moe_core.adapters.checkpoint import load_network, network_state, save_checkpoint
from lora_moe_core.adapters.network import LoRANetwork, build_network, module_key
from lora_moe_core.adapters.routing import teacher_distribution
from lora_moe_core.config import Config
from lora_moe_core.errors import UserError
from lora_moe_core.formats.lora_files import LoRAFile, read_lora, write_lora
from lora_moe_core.model.acceleration import compile_blocks, set_attention_backend
from lora_moe_core.model.frozen_attention import set_frozen_attention
from lora_moe_core.model.wan import get_task, linear_shapes, resolve_targets
from lora_moe_core.training import flow_matching as fm
from lora_moe_core.training import losses
from lora_moe_core.training.batches import Batch
from lora_moe_core.training.monitor import EpochStats


class _FlowMatchingStep:
    """Noise, timesteps and the DiT call common to every stage."""

    def __init__(self, config: Config, dits: dict[str, nn.Module], device: torch.device):
        self.config, self.dits, self.device = config, dits, device
        task = get_task(config.model.task)
        two_dits = dits["high"] is not dits["low"]
        self.boundary = (config.model.timestep_boundary or task.boundary_ratio) if two_dits else None
        self.autocast = config.training.mixed_precision
        self.before_dit = lambda name: None  # memory.DiTPlacement.activate when a memory mode moves DiTs
        for dit in self.unique_dits():
            if config.training.gradient_checkpointing:
                dit.enable_gradient_checkpointing()
            set_attention_backend(dit, config.training.attention_backend, device)
            set_frozen_attention(dit, config.training.frozen_attention, device)

    def compile(self) -> None:
        """Compile the DiT blocks if configured; call once adapters are in place (they set the block kinds)."""
        if self.config.training.compile_blocks:
            for dit in self.unique_dits():
                compile_blocks(dit)

    def unique_dits(self) -> list[nn.Module]:
        return list({id(d): d for d in self.dits.values()}.values())

    def predict(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample t and ε, run the DiT of that noise regime; returns the tensors the losses need."""
        training = self.config.training
        x0 = batch.latents
        t, high = fm.sample_batch_timesteps(x0.shape[0], training.timestep_sampling, training.discrete_flow_shift,
                                            generator, self.boundary)  # fmt: skip
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)  # CPU RNG: same draws on any device
        t = t.to(x0.device)
        x_t = fm.noisy_latents(x0, noise, t)
        regime = "high" if high else "low"
        self.before_dit(regime)
        dit = self.dits[regime]
        with self._autocast():
            velocity = dit(hidden_states=x_t, timestep=fm.dit_timestep(t), encoder_hidden_states=batch.text,
                           return_dict=False)[0]  # fmt: skip
        return {"x0": x0, "x_t": x_t, "t": t, "target": noise - x0, "velocity": velocity.float()}

    def _autocast(self):
        if self.autocast == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def reconstruction_terms(config: Config, classifier: nn.Module | None, batch: Batch,
                         out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:  # fmt: skip
    """Stage 2's objective without its routing terms, as ``(terms, weights)``: the flow-matching loss, the
    ROI-weighted reconstruction and, when on, the identity and temporal losses of the predicted x0.

    The matched single-LoRA arm (:mod:`training.baseline_arm`) trains on exactly these, so that the two arms differ
    only by the mixture and its routing.
    """
    loss_config = config.loss
    terms = {"diffusion_loss": losses.diffusion_loss(out["velocity"], out["target"]),
             "roi_loss": losses.roi_loss(out["velocity"], out["target"], batch.roi_weights)}  # fmt: skip
    weights = {"diffusion_loss": 1.0, "roi_loss": loss_config.weight_roi_recon}
    if not (loss_config.use_identity_loss or loss_config.use_temporal_loss):
        return terms, weights
    x0_pred = fm.predicted_x0(out["x_t"], out["velocity"], out["t"])
    if loss_config.use_identity_loss:
        terms["identity_loss"] = losses.identity_loss(classifier(x0_pred), batch.labels)
        weights["identity_loss"] = loss_config.weight_identity
    if loss_config.use_temporal_loss:
        terms["temporal_loss"] = losses.temporal_loss(x0_pred, out["x0"])
        weights["temporal_loss"] = loss_config.weight_temporal
    return terms, weights


class Stage1Recipe:
    """Vanilla LoRA on the seed targets, one LoRA for both DiTs (musubi's dual mode); saved with musubi keys.

    Args:
        frozen_base: a LoRA applied, frozen, at ``base_multiplier`` below the trained one (the matched single-LoRA
            arm continues from Stage 1 this way: unmerged, as Stage 2's base branch, so bf16 weights lose nothing).
    """

    checkpoint_prefix = "lora"

    def __init__(self, config: Config, dits: dict[str, nn.Module], device: torch.device,
                 frozen_base: LoRANetwork | None = None, base_multiplier: float = 1.0) -> None:  # fmt: skip
        self.step = _FlowMatchingStep(config, dits, device)
        targets = resolve_targets(config.lora, len(dits["high"].blocks))
        self.network = LoRANetwork(targets, linear_shapes(dits["high"]), config.lora.lora_alpha).to(device)
        self.frozen_base = frozen_base.to(device).requires_grad_(False) if frozen_base is not None else None
        for dit in self.step.unique_dits():
            if self.frozen_base is not None:
                self.frozen_base.apply_to(dit, base_multiplier)
            self.network.apply_to(dit, inside=self.frozen_base is not None)
        self.step.compile()
        self.config = config

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def loss_step(self, batch: Batch, generator: torch.Generator, progress: float, stats: EpochStats):
        out = self.step.predict(batch, generator)
        diffusion = losses.diffusion_loss(out["velocity"], out["target"])
        roi = losses.roi_loss(out["velocity"].detach(), out["target"], batch.roi_weights)  # monitored only
        return diffusion, {"loss": diffusion.item(), "diffusion_loss": diffusion.item(), "roi_loss": roi.item()}

    def after_optimizer_step(self) -> None:
        pass

    def save(self, path: Path) -> Path:
        lora = self.config.lora
        metadata = {"ss_network_module": "networks.lora_wan", "ss_network_dim": str(lora.lora_dim),
                    "ss_network_alpha": str(lora.lora_alpha), "ss_base_model_version": "wan",
                    "lora_moe.config": json.dumps(self.config.model_dump(mode="json"))}  # fmt: skip
        write_lora(LoRAFile(modules=self.network.to_modules()), path, to="musubi", metadata=metadata)
        return path

    def load(self, path: Path) -> None:
        modules = read_lora(path).modules
        for name, weights in modules.items():  # all checked before any weight is copied
            lora = self.network.loras.get(module_key(name))
            if lora is None or (weights.down.shape, weights.up.shape) != (lora.lora_A.shape, lora.lora_B.shape):
                raise UserError(f"{path}: module {name} does not match this run's Stage-1 LoRA (another config, "
                                "stage or model)")  # fmt: skip
        with torch.no_grad():
            for name, weights in modules.items():
                lora = self.network.loras[module_key(name)]
                lora.lora_A.copy_(weights.down)
                lora.lora_B.copy_(weights.up)


class Stage2Recipe:
    """Experts + router + timestep gates over the frozen Stage-1 LoRA (stage_b), or the router only (stage_c)."""

    checkpoint_prefix = "lora_moe"

    def __init__(self, config: Config, dits: dict[str, nn.Module], device: torch.device,
                 classifier: nn.Module | None = None, family_prior: torch.Tensor | None = None) -> None:  # fmt: skip
        self.config, self.step = config, _FlowMatchingStep(config, dits, device)
        stage = config.training.training_stage
        if stage == "stage_c":
            if not config.lora_moe.lora_moe_weights:
                raise UserError("stage_c fine-tunes a Stage-2 router: give --lora_moe_weights")
            self.network = load_network(config.lora_moe.lora_moe_weights, linear_shapes(dits["high"]), config)
        else:
            self.network = build_network(config, dits["high"])
        self.network.to(device).set_trainable(stage)
        for dit in self.step.unique_dits():
            self.network.apply_to(dit)
        self.step.compile()
        self.classifier = classifier.to(device).requires_grad_(False) if classifier is not None else None
        if config.loss.use_identity_loss and self.classifier is None:
            raise UserError("use_identity_loss needs --classifier_weights (train one with `lora-moe train-classifier`)")
        use_prior = family_prior is not None and config.loss.balance_target == "dataset"
        self.prior = family_prior.to(device) if use_prior else None
        self.gather = lambda tensor: tensor  # replaced by an all-gather under multi-process training

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.trainable_parameters())

    def instrument_logits(self, batch: Batch) -> torch.Tensor:
        """Caption families → logits; captions naming nothing get the classifier's logits (else uniform)."""
        logits = batch.labels * self.config.router.hint_confidence
        unlabelled = batch.labels.sum(dim=1) == 0
        if unlabelled.any() and self.classifier is not None:
            with torch.no_grad():
                logits[unlabelled] = self.classifier(batch.latents[unlabelled]).float()
        return logits

    def loss_step(self, batch: Batch, generator: torch.Generator, progress: float, stats: EpochStats):
        logits = self.instrument_logits(batch)
        gates = self.network.set_routing(logits)
        out = self.step.predict(batch, generator)
        terms, weights = reconstruction_terms(self.config, self.classifier, batch, out)
        self._routing_terms(logits, gates, progress, terms, weights)
        total = sum(weights[name] * value for name, value in terms.items())
        stats.add_routing(gates, self.network.router_probs, batch.labels)
        return total, {"loss": total.item(), **{name: value.item() for name, value in terms.items()}}

    def _routing_terms(self, logits, gates, progress: float, terms: dict, weights: dict) -> None:
        router, stats = self.config.router, self.network.gate_stats
        all_gates = self.gather(gates)  # the balance window spans every rank's samples
        if router.trains_router or self.config.training.training_stage == "stage_c":
            usage = stats.smoothed_usage(all_gates)
            terms["entropy_loss"] = losses.routing_entropy_loss(usage)
            terms["balance_loss"] = losses.load_balance_loss(usage, stats.top1.clone(), self.prior)
            weights["entropy_loss"] = self.config.loss.weight_routing_entropy
            weights["balance_loss"] = self.config.loss.weight_routing_load_balance
            if router.use_teacher_guidance:
                teacher = teacher_distribution(logits, router.teacher_temperature, router.teacher_label_smoothing)
                terms["teacher_kl"] = losses.teacher_kl_loss(self.network.router_probs, teacher)
                weights["teacher_kl"] = router.teacher_kl_weight * losses.teacher_phase_scale(progress)
        stats.update(all_gates)

    def after_optimizer_step(self) -> None:
        pass

    def save(self, path: Path) -> Path:
        return save_checkpoint(self.network, path)

    def load(self, path: Path) -> None:
        loaded = network_state(load_network(path, linear_shapes(self.step.dits["high"]), self.config))
        with torch.no_grad():
            for key, tensor in network_state(self.network).items():
                tensor.copy_(loaded[key])  # detached views of the live parameters and buffers
