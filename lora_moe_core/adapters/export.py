"""Export a LoRA-MoE under one fixed routing as standard LoRA files (ComfyUI, diffusers, musubi).

For a fixed route the mixture is linear in its branches, so stacking them (peft's ``cat`` merge) is exact:
``down = [A_0; A_e…]``, ``up = [α_base·s_0·B_0 | g_e·τ_e·α_e·s_e·B_e …]`` with alpha = rank (scale 1). Experts
whose gate is zero are dropped, so the rank is the sum of the active branches' ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_moe_core.adapters.moe import LoRAMoELinear
from lora_moe_core.adapters.network import LoRAMoENetwork, module_key
from lora_moe_core.data.vocabulary import instrument_logits
from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, write_lora
from lora_moe_core.guards.files import refuse_clobber
from lora_moe_core.guards.numbers import check_number


def fixed_route_modules(network: LoRAMoENetwork, expert_scale: torch.Tensor) -> dict[str, LoRAModuleWeights]:
    """The cat-merged LoRA of every adapted module for one ``[E]`` expert scale."""
    modules: dict[str, LoRAModuleWeights] = {}
    for name in network.module_names():
        key = module_key(name)
        base = network.base_loras[key] if key in network.base_loras else None
        experts = network.experts[key] if key in network.experts else None
        reference = base if base is not None else experts
        in_features, out_features = reference.lora_A.shape[-1], reference.lora_B.shape[-2]
        # a meta-device linear: only the adapter arithmetic of LoRAMoELinear is used, no base weight
        layer = LoRAMoELinear(nn.Linear(in_features, out_features, bias=False, device="meta"), network.route,
                              base_lora=base, experts=experts)  # fmt: skip
        scale = expert_scale.reshape(1, -1) if experts is not None else None
        multipliers = layer.rank_multipliers(scale, network.route.alpha_base)[0].detach()  # [R]
        down, up = (weight.detach().float() for weight in layer.stacked_weights())
        active = multipliers != 0
        if not active.any():
            continue
        down, up = down[active], up[:, active] * multipliers[active]
        modules[name] = LoRAModuleWeights(down=down, up=up, alpha=float(down.shape[0]))
    return modules


def regime_names(num_buckets: int, boundaries: list[float]) -> list[str]:
    """File suffix per timestep bucket: Wan2.2's ``low_noise``/``high_noise`` for two buckets."""
    if num_buckets == 2:
        return ["low_noise", "high_noise"]
    edges = [0.0, *boundaries, 1000.0]
    return [f"t{edges[i]:g}-{edges[i + 1]:g}" for i in range(num_buckets)]


@dataclass
class _ExportPlan:
    """The files one hint exports to: a routed copy of the network, its gates, and (path, expert scale) pairs."""

    network: LoRAMoENetwork
    gates: torch.Tensor
    files: list[tuple[Path, torch.Tensor]]
    metadata: dict[str, str]


@torch.no_grad()
def _plan_export(network: LoRAMoENetwork, families: list[str], output_dir: str | Path, alpha_base: float,
                 alpha_expert: float) -> _ExportPlan:  # fmt: skip
    check_number("alpha_base", alpha_base, at_least=0)
    check_number("alpha_expert", alpha_expert, at_least=0)
    network = copy.deepcopy(network)  # routing and multipliers are set on a copy: the caller's network stays as it is
    network.route.alpha_base, network.alpha_expert = alpha_base, alpha_expert
    confidence = network.config.router.hint_confidence
    logits = instrument_logits(families, confidence) if families else None
    gates = network.set_routing(logits)[0].detach()
    scales = [network.fixed_expert_scale(gates, bucket) for bucket in range(network.timestep_gates.num_buckets)]
    stem = "+".join(families) if families else "uniform"
    if all(torch.equal(scales[0], scale) for scale in scales):
        plan = {stem: scales[0]}
    else:
        names = regime_names(len(scales), network.config.gates.timestep_boundaries)
        plan = {f"{stem}_{name}": scale for name, scale in zip(names, scales, strict=True)}
    gate_text = ",".join(f"{family}={gate:.4f}" for family, gate in zip(FAMILIES, gates.tolist(), strict=True))
    metadata = {"lora_moe.route": ",".join(families) or "uniform", "lora_moe.gates": gate_text}
    files = [(Path(output_dir) / f"{file_stem}.safetensors", scale) for file_stem, scale in plan.items()]
    return _ExportPlan(network, gates, files, metadata)


@torch.no_grad()
def _write_plans(
    plans: list[_ExportPlan], to: str, dtype: torch.dtype, protect: Sequence[str | Path | None]
) -> list[Path]:
    """Write every planned file, after checking that none of them would overwrite an input (the checkpoint)."""
    refuse_clobber([path for plan in plans for path, _ in plan.files], protect, "export")
    created: list[Path] = []
    try:
        for plan in plans:
            for path, scale in plan.files:
                lora = LoRAFile(modules=fixed_route_modules(plan.network, scale), format=to, dtype=dtype, metadata={})
                new = not Path(path).exists()
                write_lora(lora, path, to=to, dtype=dtype, metadata=plan.metadata)
                if new:
                    created.append(Path(path))
    except BaseException:  # a full disk at the second file: the first, new one goes too (a half export misleads)
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return [path for plan in plans for path, _ in plan.files]


def export_instrument_lora(
    network: LoRAMoENetwork,
    families: list[str],
    output_dir: str | Path,
    to: str = "comfy",
    alpha_base: float = ALPHA_BASE,
    alpha_expert: float = ALPHA_EXPERT,
    dtype: torch.dtype = torch.float32,
    protect: Sequence[str | Path | None] = (),
) -> tuple[list[Path], torch.Tensor]:
    """Write the per-instrument LoRA(s) of a hint; one file per noise regime when the timestep gates differ.

    Args:
        network: the trained LoRA-MoE.
        families: the hinted families (e.g. ``["Hook"]``).
        output_dir: folder for the files.
        to: ``comfy``, ``diffusers`` or ``musubi`` keys.
        alpha_base: base-branch multiplier (default: the seed's inference value, as ``infer``).
        alpha_expert: expert multiplier (default: the seed's inference value, as ``infer``).
        dtype: stored dtype (default fp32: bf16 storage costs ~2e-3 relative error in ΔW).
        protect: input files (the checkpoint) that no written file may replace.

    Returns:
        The written paths and the router gates ``[E]`` used.

    Raises:
        UserError: when a file to write is one of ``protect`` (nothing is written then).
    """
    plan = _plan_export(network, families, output_dir, alpha_base, alpha_expert)
    return _write_plans([plan], to, dtype, protect), plan.gates


def export_family_loras(checkpoint: str | Path, output_dir: str | Path, to: str = "comfy",
                        alpha_base: float = ALPHA_BASE, alpha_expert: float = ALPHA_EXPERT,
                        dtype: torch.dtype = torch.float32) -> list[Path]:  # fmt: skip
    """One standard LoRA per family (per noise regime where the timestep gates differ) of a Stage-2 checkpoint."""
    from lora_moe_core.adapters.checkpoint import load_network, read_checkpoint
    from lora_moe_core.model.wan import task_linear_shapes

    network = load_network(checkpoint, task_linear_shapes(read_checkpoint(checkpoint).config.model.task))
    plans = [_plan_export(network, [family], output_dir, alpha_base, alpha_expert) for family in FAMILIES]
    return _write_plans(plans, to, dtype, [checkpoint])
