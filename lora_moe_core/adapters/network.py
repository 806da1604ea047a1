"""The adapter sets: :class:`LoRANetwork` (Stage 1) and :class:`LoRAMoENetwork` (Stages 2 and 3).

One network holds the adapter weights once and can be applied to several transformers: Wan2.2-A14B's
``transformer`` (high noise) and ``transformer_2`` (low noise) share the same LoRA, as musubi trains it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lora_moe_core.adapters.inject import unwrap_linears, wrap_linears
from lora_moe_core.adapters.lora import LoRALinear, LoRAWeights
from lora_moe_core.adapters.moe import ExpertLoRAWeights, LoRAMoELinear, RouteState
from lora_moe_core.adapters.routing import (
    GateStatistics,
    InstrumentRouter,
    TimestepGates,
    router_probabilities,
    top_k_gates,
)
from lora_moe_core.config import Config
from lora_moe_core.errors import UserError
from lora_moe_core.families import NUM_FAMILIES
from lora_moe_core.formats.lora_files import LoRAModuleWeights


def module_key(name: str) -> str:
    """ModuleDict-safe key for a dotted module name (diffusers names never contain '__')."""
    return name.replace(".", "__")


def module_name(key: str) -> str:
    return key.replace("__", ".")


def check_module_shape(name: str, shapes: dict[str, tuple[int, int]], in_features: int, out_features: int) -> None:
    """Raise a one-line UserError unless the model has a linear ``name`` of exactly this shape."""
    if name not in shapes:
        raise UserError(f"adapter module '{name}' does not exist in this model (is it for another model size?)")
    if shapes[name] != (in_features, out_features):
        raise UserError(
            f"adapter module '{name}' is {in_features}->{out_features} but the model's linear is "
            f"{shapes[name][0]}->{shapes[name][1]} (a checkpoint or LoRA for another model size?)"
        )


def _find(root: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` of ``root``, or None (``wrap_linears`` then names the missing target)."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


class LoRANetwork(nn.Module):
    """Vanilla LoRA over a set of target linears (Stage 1).

    Args:
        targets: ``{module name: rank}``.
        shapes: ``{module name: (in, out)}`` of the model (see :func:`wan.linear_shapes`).
        alpha: LoRA alpha shared by all modules (musubi ``--network_alpha``).
    """

    def __init__(self, targets: dict[str, int], shapes: dict[str, tuple[int, int]], alpha: float):
        super().__init__()
        self.loras = nn.ModuleDict()
        for name, rank in targets.items():
            check_module_shape(name, shapes, *shapes.get(name, (0, 0)))
            self.loras[module_key(name)] = LoRAWeights(*shapes[name], rank=rank, alpha=alpha)

    @classmethod
    def from_modules(cls, modules: dict[str, LoRAModuleWeights], shapes: dict[str, tuple[int, int]]) -> LoRANetwork:
        """A network holding a LoRA file's weights (any subset of modules, per-module rank and alpha)."""
        network = cls({}, shapes, alpha=1.0)
        for name, weights in modules.items():
            rank, in_features = weights.down.shape
            check_module_shape(name, shapes, in_features, weights.up.shape[0])
            lora = LoRAWeights(in_features, weights.up.shape[0], rank, weights.alpha)
            with torch.no_grad():
                lora.lora_A.copy_(weights.down.float())
                lora.lora_B.copy_(weights.up.float())
            network.loras[module_key(name)] = lora
        return network.requires_grad_(False)

    def apply_to(self, transformer: nn.Module, multiplier: float = 1.0, inside: bool = False) -> None:
        """Wrap the target linears of ``transformer`` with :class:`LoRALinear` sharing this network's weights.

        Args:
            inside: where a target already is a :class:`LoRALinear` (a frozen LoRA applied first), wrap the linear
                inside it, so that both branches add up: ``W x + ΔW_frozen x + ΔW_this x``. Otherwise an adapted
                target is refused (applying the same network twice is a bug).
        """
        names = [module_name(key) for key in self.loras]
        if inside:
            names = [f"{name}.base_layer" if isinstance(_find(transformer, name), LoRALinear) else name
                     for name in names]  # fmt: skip

        def factory(name: str, linear: nn.Linear) -> LoRALinear:
            return LoRALinear(linear, self.loras[module_key(name.removesuffix(".base_layer"))], multiplier)

        wrap_linears(transformer, names, factory)

    @staticmethod
    def remove_from(transformer: nn.Module) -> int:
        return unwrap_linears(transformer, (LoRALinear,))

    def to_modules(self) -> dict[str, LoRAModuleWeights]:
        """The weights as format-neutral LoRA modules (for writing musubi/ComfyUI/diffusers files)."""
        return {
            module_name(key): LoRAModuleWeights(down=lora.lora_A.detach(), up=lora.lora_B.detach(), alpha=lora.alpha)
            for key, lora in self.loras.items()
        }


class LoRAMoENetwork(nn.Module):
    """Frozen base LoRA + E gated expert LoRAs + router + timestep gates + gate statistics.

    Forward protocol: call :meth:`set_routing` with the batch's instrument logits, then run the
    transformer(s); a forward pre-hook reads each call's ``timestep`` and folds the timestep gates and
    α_expert into the per-sample expert scale that every :class:`LoRAMoELinear` reads.

    Args:
        config: the run config (router, gates, α's).
        expert_targets: ``{module name: rank}`` for the experts.
        shapes: ``{module name: (in, out)}`` of the model.
        base_lora: frozen Stage-1 modules (any subset of the model's linears), or None.
    """

    def __init__(
        self,
        config: Config,
        expert_targets: dict[str, int],
        shapes: dict[str, tuple[int, int]],
        base_lora: dict[str, LoRAModuleWeights] | None = None,
    ):
        super().__init__()
        self.config = config
        expert_alpha = config.lora_moe.expert_alpha or config.lora.lora_alpha
        self.experts = nn.ModuleDict()
        for name, rank in expert_targets.items():
            check_module_shape(name, shapes, *shapes.get(name, (0, 0)))
            self.experts[module_key(name)] = ExpertLoRAWeights(*shapes[name], rank, NUM_FAMILIES, expert_alpha)
        self.base_loras = nn.ModuleDict()
        for name, weights in (base_lora or {}).items():
            rank, in_features = weights.down.shape
            check_module_shape(name, shapes, in_features, weights.up.shape[0])
            lora = LoRAWeights(in_features, weights.up.shape[0], rank, weights.alpha)
            lora.lora_A.data.copy_(weights.down.float())
            lora.lora_B.data.copy_(weights.up.float())
            self.base_loras[module_key(name)] = lora.requires_grad_(False)
        self.router = InstrumentRouter(hidden_dim=config.router.router_hidden_dim)
        self.timestep_gates = TimestepGates(config.gates.timestep_boundaries)
        self.gate_stats = GateStatistics(decay=config.gates.gate_ema_decay)
        self.route = RouteState(alpha_base=config.lora_moe.alpha_base)
        self.alpha_expert = config.lora_moe.alpha_expert
        self.router_gates: torch.Tensor | None = None  # [B, E] top-k gates of the current routing
        self.router_probs: torch.Tensor | None = None  # [B, E] the dense distribution they came from
        self._hooks: dict[int, RemovableHandle] = {}

    # -- attaching to transformers -------------------------------------------------------------------------
    def module_names(self) -> list[str]:
        return sorted({module_name(key) for key in [*self.experts, *self.base_loras]})

    def apply_to(self, transformer: nn.Module) -> None:
        """Wrap the adapted linears of ``transformer`` and hook its forward to read the timestep."""

        def factory(name: str, linear: nn.Linear) -> LoRAMoELinear:
            key = module_key(name)
            base = self.base_loras[key] if key in self.base_loras else None
            experts = self.experts[key] if key in self.experts else None
            return LoRAMoELinear(linear, self.route, base_lora=base, experts=experts)

        wrap_linears(transformer, self.module_names(), factory)
        self._hooks[id(transformer)] = transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def remove_from(self, transformer: nn.Module) -> int:
        """Restore the plain linears (unmerging first) and drop the timestep hook."""
        handle = self._hooks.pop(id(transformer), None)
        if handle is not None:
            handle.remove()
        return unwrap_linears(transformer, (LoRAMoELinear,))

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.route.expert_scale = self.expert_scale(timestep)

    # -- routing ---------------------------------------------------------------------------------------------
    def set_routing(self, instrument_logits: torch.Tensor | None = None, mode: str | None = None) -> torch.Tensor:
        """Compute and hold the per-sample router gates ``[B, E]`` for the following forwards.

        Args:
            instrument_logits: ``[B, 4]`` or ``[4]``; None routes uniformly.
            mode: routing mode; defaults to the config's ``routing_mode``.

        Returns:
            The gates (with autograd to the router when it is trainable).
        """
        mode = mode or self.config.router.routing_mode
        if instrument_logits is None:
            instrument_logits, mode = torch.zeros(1, NUM_FAMILIES), "uniform"
        instrument_logits = instrument_logits.reshape(-1, NUM_FAMILIES).to(self.timestep_gates.logits.device)
        router = self.config.router
        self.router_probs = router_probabilities(instrument_logits, mode, self.router, router.router_temperature)
        self.router_gates = self.router_probs if mode == "uniform" else top_k_gates(self.router_probs, router.top_k)
        self.route.expert_scale = None  # recomputed from the timestep at the next forward
        return self.router_gates

    def expert_scale(self, timestep: torch.Tensor | float | None) -> torch.Tensor:
        """``[B, E]`` = router gates × timestep gates(t) × α_expert for diffusers-convention timesteps."""
        if self.router_gates is None:
            raise RuntimeError("no routing set: call set_routing(...) before running the transformer")
        scale = self.router_gates * self.alpha_expert
        if timestep is None:
            return scale
        timestep = torch.as_tensor(timestep, device=scale.device).float()
        if timestep.dim() == 2:  # [B, L] per-token timesteps (Wan2.2 TI2V): the clip's noise level is the max
            timestep = timestep.amax(dim=1)
        return scale * self.timestep_gates(timestep.reshape(-1))

    # -- training helpers ----------------------------------------------------------------------------------
    def set_trainable(self, stage: str) -> None:
        """Freeze everything, then unfreeze what ``stage`` trains (stage_b: experts, router, gates; stage_c:
        router only). The Stage-1 base branch is always frozen here."""
        self.requires_grad_(False)
        if stage == "stage_b":
            self.experts.requires_grad_(True)
            self.router.requires_grad_(self.config.router.trains_router)
            self.timestep_gates.requires_grad_(self.config.gates.train_timestep_gates)
        elif stage == "stage_c":
            self.router.requires_grad_(True)
        else:
            raise ValueError(f"LoRAMoENetwork trains stage_b or stage_c, not {stage}")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (param for param in self.parameters() if param.requires_grad)

    # -- fixed-route merge -----------------------------------------------------------------------------------
    def fixed_expert_scale(self, gates: torch.Tensor, bucket: int) -> torch.Tensor:
        """``[E]`` expert scale for one fixed routing in one timestep bucket."""
        return gates.reshape(-1).float() * self.timestep_gates.bucket_gates()[bucket].detach() * self.alpha_expert

    @torch.no_grad()
    def merge_into(self, transformer: nn.Module, gates: torch.Tensor, bucket: int) -> None:
        """Fold the adapters into ``transformer``'s base weights for one route and timestep bucket.

        Valid when that transformer only ever runs in that bucket (Wan2.2-A14B: ``transformer`` in the
        high-noise bucket, ``transformer_2`` in the low-noise one with the default two buckets).
        """
        scale = self.fixed_expert_scale(gates, bucket)
        for module in transformer.modules():
            if isinstance(module, LoRAMoELinear):
                module.merge(scale if module.experts is not None else None, self.route.alpha_base)

    @staticmethod
    def unmerge_from(transformer: nn.Module) -> None:
        for module in transformer.modules():
            if isinstance(module, LoRAMoELinear):
                module.unmerge()


def build_network(config: Config, transformer: nn.Module) -> LoRAMoENetwork:
    """A fresh Stage-2 network for ``transformer``: experts on the config's targets and, when
    ``use_base_lora``, the frozen Stage-1 LoRA read from ``base_lora_weights`` (musubi, ComfyUI or diffusers).

    Raises:
        UserError: when the Stage-1 file is missing, unreadable or made for another model or other blocks.
    """
    from lora_moe_core.formats.lora_files import read_lora
    from lora_moe_core.model.wan import linear_shapes, resolve_targets

    shapes = linear_shapes(transformer)
    num_layers = len(transformer.blocks)
    targets = resolve_targets(config.lora, num_layers, default_rank=config.lora_moe.lora_dim)
    base_lora = None
    if config.lora_moe.use_base_lora:
        path = config.lora_moe.base_lora_weights
        if path is None:
            raise UserError("use_base_lora is on but no --base_lora_weights was given (Stage-1 LoRA file)")
        base_lora = read_lora(path).modules
        for name, weights in base_lora.items():
            try:
                check_module_shape(name, shapes, weights.down.shape[1], weights.up.shape[0])
            except UserError as exc:
                raise UserError(f"base LoRA {path} does not fit this model: {exc}") from None
    return LoRAMoENetwork(config, targets, shapes, base_lora=base_lora)
