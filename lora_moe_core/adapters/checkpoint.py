"""The Stage-2 checkpoint: one safetensors file holding the whole LoRA-MoE and its config.

Keys (module names are diffusers', e.g. ``blocks.39.attn1.to_q``)::

    base_lora_A.<module>  [r0, in]      base_lora_B.<module>  [out, r0]      base_lora_alpha.<module>  []
    expert_lora_A.<module> [E, r, in]   expert_lora_B.<module> [E, out, r]   expert_lora_alpha.<module> []
    router_hidden.weight, router_hidden.bias, router_output.weight, router_output.bias
    timestep_gate_logits [buckets, E], timestep_gate_boundaries [buckets-1]
    gate_stats_usage [E], gate_stats_top1 [E], gate_stats_num_updates []

Metadata: ``format_version``, ``lora_moe.config`` (the full config as JSON), ``lora_moe.families``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from lora_moe_core.adapters.network import LoRAMoENetwork, check_module_shape, module_name
from lora_moe_core.config import Config, config_to_dict
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.lora_files import LoRAModuleWeights
from lora_moe_core.formats.safetensors_io import metadata_json, read_safetensors, write_safetensors

FORMAT_VERSION = "1"
_GATE_KEYS = {"timestep_gate_logits": "logits", "timestep_gate_boundaries": "boundaries"}
_STAT_KEYS = {"gate_stats_usage": "usage", "gate_stats_top1": "top1", "gate_stats_num_updates": "num_updates"}


def network_state(network: LoRAMoENetwork) -> dict[str, torch.Tensor]:
    """Flatten a network into checkpoint keys (see the module docstring)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, bank in (("base_lora", network.base_loras), ("expert_lora", network.experts)):
        for key, weights in bank.items():
            name = module_name(key)
            state[f"{prefix}_A.{name}"] = weights.lora_A.detach()
            state[f"{prefix}_B.{name}"] = weights.lora_B.detach()
            state[f"{prefix}_alpha.{name}"] = torch.tensor(weights.alpha, dtype=torch.float32)
    for key, value in network.router.state_dict().items():
        state[f"router_{key}"] = value
    for key, attribute in _GATE_KEYS.items():
        state[key] = getattr(network.timestep_gates, attribute).detach()
    for key, attribute in _STAT_KEYS.items():
        state[key] = getattr(network.gate_stats, attribute).detach()
    return state


def save_checkpoint(network: LoRAMoENetwork, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the network and its config atomically to ``path``."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "lora_moe.config": json.dumps(config_to_dict(network.config)),
        "lora_moe.families": json.dumps(list(FAMILIES)),
        **(extra_metadata or {}),
    }
    return write_safetensors(network_state(network), path, metadata)


@dataclass
class Checkpoint:
    """A checkpoint read from disk, not yet bound to a model."""

    path: Path
    config: Config
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{module name: tensor}`` for keys ``<prefix>.<module>``."""
        start = prefix + "."
        return {key[len(start) :]: value for key, value in self.tensors.items() if key.startswith(start)}

    def expert_targets(self) -> dict[str, int]:
        return {name: tensor.shape[1] for name, tensor in self.prefixed("expert_lora_A").items()}

    def base_lora(self) -> dict[str, LoRAModuleWeights]:
        downs, ups, alphas = (self.prefixed(f"base_lora_{part}") for part in ("A", "B", "alpha"))
        return {name: LoRAModuleWeights(downs[name], ups[name], float(alphas[name])) for name in downs}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a Stage-2 checkpoint's keys, families and config (not yet its shapes)."""
    tensors, metadata = read_safetensors(path, what="LoRA-MoE checkpoint")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: not a lora-moe checkpoint of format {FORMAT_VERSION} (format_version={version!r})")
    families = metadata_json(metadata, "lora_moe.families", path)
    if families != list(FAMILIES):
        raise UserError(f"{path}: experts are ordered {families}, expected {list(FAMILIES)}")
    try:
        config = Config.model_validate(metadata_json(metadata, "lora_moe.config", path))
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise UserError(f"{path}: stored config is invalid at '{where}': {exc.errors()[0]['msg']}") from None
    checkpoint = Checkpoint(Path(path), config, tensors, metadata)
    _check_keys(checkpoint)
    return checkpoint


def _check_keys(checkpoint: Checkpoint) -> None:
    known_prefixes = tuple(f"{p}_{part}." for p in ("base_lora", "expert_lora") for part in ("A", "B", "alpha"))
    fixed = {*_GATE_KEYS, *_STAT_KEYS, *(f"router_{k}" for k in ("hidden.weight", "hidden.bias"))}
    fixed |= {"router_output.weight", "router_output.bias"}
    for key in checkpoint.tensors:
        if not key.startswith(known_prefixes) and key not in fixed:
            raise UserError(f"{checkpoint.path}: unexpected key '{key}' (not a lora-moe checkpoint?)")
    missing = sorted(fixed - checkpoint.tensors.keys())
    if missing:
        raise UserError(f"{checkpoint.path}: missing key '{missing[0]}'")
    for prefix in ("base_lora", "expert_lora"):
        names = [set(checkpoint.prefixed(f"{prefix}_{part}")) for part in ("A", "B", "alpha")]
        if not names[0] == names[1] == names[2]:
            odd = sorted(names[0] ^ names[1] | names[0] ^ names[2])[0]
            raise UserError(f"{checkpoint.path}: {prefix} of module '{odd}' lacks its A, B or alpha tensor")


def load_network(path: str | Path, shapes: dict[str, tuple[int, int]], config: Config | None = None) -> LoRAMoENetwork:
    """Rebuild a :class:`LoRAMoENetwork` from a checkpoint, validated against the model's linear shapes.

    Args:
        path: the checkpoint file.
        shapes: ``{module: (in, out)}`` of the target model (see :func:`wan.linear_shapes`).
        config: config to run with (e.g. other α's); defaults to the stored one. Routing structure (router
            width, timestep buckets) always comes from the checkpoint.

    Raises:
        UserError: on any mismatch between checkpoint and model, with the module named.
    """
    checkpoint = read_checkpoint(path)
    config = _stored_structure(checkpoint, (config or checkpoint.config).model_copy(deep=True))
    experts_B = checkpoint.prefixed("expert_lora_B")
    for name, down in checkpoint.prefixed("expert_lora_A").items():
        check_module_shape(name, shapes, down.shape[-1], experts_B[name].shape[1])
    network = LoRAMoENetwork(config, checkpoint.expert_targets(), shapes, base_lora=checkpoint.base_lora())
    _load_tensors(network, checkpoint)
    return network


def _stored_structure(checkpoint: Checkpoint, config: Config) -> Config:
    """``config`` with the router width, timestep boundaries and expert alpha the checkpoint's tensors hold, each
    checked by the config's own limits: a tampered file (boundary 1500, width 0, alpha -4) is a one-line error."""
    hidden, edges = checkpoint.tensors["router_hidden.weight"], checkpoint.tensors["timestep_gate_boundaries"]
    if hidden.dim() != 2 or edges.dim() != 1:
        raise UserError(f"{checkpoint.path}: 'router_hidden.weight' must be 2-d and 'timestep_gate_boundaries' 1-d, "
                        f"got shapes {list(hidden.shape)} and {list(edges.shape)}")  # fmt: skip
    alphas = {float(alpha) for alpha in checkpoint.prefixed("expert_lora_alpha").values()}
    if len(alphas) > 1:
        raise UserError(f"{checkpoint.path}: experts with different alphas per module are not supported")
    values = {("router", "router_hidden_dim"): hidden.shape[0], ("gates", "timestep_boundaries"): edges.tolist(),
              ("lora_moe", "expert_alpha"): alphas.pop() if alphas else None}  # fmt: skip
    for (section, name), value in values.items():
        try:
            setattr(getattr(config, section), name, value)
        except ValidationError as exc:
            raise UserError(f"{checkpoint.path}: stored {section}.{name} {value!r} is invalid: "
                            f"{exc.errors()[0]['msg']} (a damaged or tampered checkpoint)") from None  # fmt: skip
    return config


def _load_tensors(network: LoRAMoENetwork, checkpoint: Checkpoint) -> None:
    state = network_state(network)
    for key, target in state.items():
        source = checkpoint.tensors[key]
        if source.shape != target.shape:
            raise UserError(f"{checkpoint.path}: '{key}' has shape {list(source.shape)}, expected {list(target.shape)}")
        with torch.no_grad():
            target.copy_(source.to(target.dtype))
