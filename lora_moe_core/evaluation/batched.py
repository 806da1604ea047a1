"""The DiT forwards of held-out scoring, batched and placed on the DiTs' device.

One clip is scored at every evaluation timestep, and (for the misrouting matrix) under every route of the
LoRA-MoE. At A14B size each forward is seconds of GPU time, so they are grouped:

* the timesteps a DiT serves (Wan2.2: the high-noise one for t ≥ 0.875) run as one batch;
* the routes share everything before the first block that holds an expert, which runs once per clip and
  timestep; only the adapted blocks run per route, all routes of a clip as one batch
  (:mod:`lora_moe_core.model.wan_forward`). With the seed's targets (experts in blocks 32-39 of 40) six routes
  cost 0.8 + 6 × 0.2 = 2 forwards instead of 6.

Batches hold at most ``batch_size`` samples (GPU memory grows with it). The noise of a clip is drawn by the
caller, in the same order for every model, so each score sees exactly the ``(t, noise)`` pairs of the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lora_moe_core.defaults import EVAL_BATCH
from lora_moe_core.model.wan_forward import BlockInputs, repeat_samples, run_prefix, run_suffix
from lora_moe_core.training import flow_matching as fm
from lora_moe_core.training import losses
from lora_moe_core.training.batches import Batch

#: Samples per DiT forward in evaluation: 4 of 480×832×81 (32,760 tokens) fit beside both A14B DiTs on 80 GB
DEFAULT_BATCH = EVAL_BATCH


def draw_noises(batch: Batch, generator: torch.Generator, timesteps: Sequence[float]) -> list[torch.Tensor]:
    """One noise per timestep, in timestep order: the draws every scored model of a clip shares."""
    return [torch.randn(batch.latents.shape, generator=generator) for _ in timesteps]


def first_expert_block(network) -> int:
    """Index of the first DiT block with an expert adapter: the blocks before it are the same for every route."""
    blocks = [int(m[1]) for key in network.experts if (m := re.match(r"blocks__(\d+)__", key))]
    return min(blocks, default=0)


@torch.no_grad()
def score_clip(dits: dict[str, nn.Module], boundary: float, batch: Batch, noises: list[torch.Tensor],
               timesteps: Sequence[float], batch_size: int = DEFAULT_BATCH, routes: list[torch.Tensor] | None = None,
               network=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Diffusion and ROI loss of one clip ``[routes, timesteps]`` (one row without ``routes``).

    Args:
        dits: ``{"high", "low"}`` with their adapters applied.
        batch: the one-clip batch.
        noises: :func:`draw_noises` of this clip.
        routes: router gates ``[1, E]`` per route of ``network`` (shared-prefix batching); None runs the DiTs as
            they are (a LoRA-MoE's routing set beforehand, its forward hook reads the timesteps).
    """
    rows = 1 if routes is None else len(routes)
    diffusion, roi = np.zeros((rows, len(timesteps))), np.zeros((rows, len(timesteps)))
    for regime in ("high", "low"):
        columns = [i for i, t in enumerate(timesteps) if (t >= boundary) == (regime == "high")]
        if not columns:
            continue
        dit = dits[regime]
        weight = next(dit.parameters())
        latents = batch.latents.to(weight.device).float()
        noise = torch.cat([noises[i] for i in columns]).to(weight.device)
        t = torch.tensor([float(timesteps[i]) for i in columns], device=weight.device)
        x_t = fm.noisy_latents(latents, noise, t).to(weight.dtype)
        dit_t, goal = fm.dit_timestep(t), noise - latents
        text = batch.text.to(weight.device, weight.dtype).expand(len(columns), -1, -1)
        weights = batch.roi_weights.to(weight.device)
        pairs = [(c, r) for c in range(len(columns)) for r in range(rows)]
        if routes is None:
            velocities = _plain(dit, x_t, dit_t, text, batch_size)
        else:
            velocities = _routed(dit, x_t, dit_t, text, pairs, routes, network, batch_size)
        for (c, r), velocity in zip(pairs, velocities, strict=True):
            diffusion[r, columns[c]] = losses.diffusion_loss(velocity[None], goal[c : c + 1]).item()
            roi[r, columns[c]] = losses.roi_loss(velocity[None], goal[c : c + 1], weights).item()
    return diffusion, roi


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, max(1, size))]


def _plain(dit, x_t, dit_t, text, batch_size) -> list[torch.Tensor]:
    out = []
    for part in _chunks(len(x_t), batch_size):
        out.extend(dit(hidden_states=x_t[part], timestep=dit_t[part], encoder_hidden_states=text[part],
                       return_dict=False)[0])  # fmt: skip
    return out


def _routed(dit, x_t, dit_t, text, pairs, routes, network, batch_size) -> list[torch.Tensor]:
    """Prefix once per timestep, then the adapted blocks on (timestep, route) pairs, ``batch_size`` at a time.

    A DiT that is not a Wan DiT (a test's stand-in) runs whole on the same batches of pairs.
    """
    if not hasattr(dit, "condition_embedder"):
        return _routed_whole(dit, x_t, dit_t, text, pairs, routes, network, batch_size)
    stop = first_expert_block(network)
    prefixes = []
    for part in _chunks(len(x_t), batch_size):
        network.router_gates = routes[0].expand(part.stop - part.start, -1)  # prefix blocks hold no expert
        network.route.expert_scale = network.expert_scale(dit_t[part])
        prefixes.append(run_prefix(dit, x_t[part], dit_t[part], text[part], stop))
    prefix = _concat(prefixes)
    out = []
    for part in _chunks(len(pairs), batch_size):
        chosen = pairs[part]
        index = torch.tensor([c for c, _ in chosen], device=x_t.device)
        network.router_gates = torch.cat([routes[r] for _, r in chosen]).to(network.timestep_gates.logits.device)
        network.route.expert_scale = network.expert_scale(dit_t[index])
        out.extend(run_suffix(dit, repeat_samples(prefix, index)))
    return out


def _routed_whole(dit, x_t, dit_t, text, pairs, routes, network, batch_size) -> list[torch.Tensor]:
    out = []
    for part in _chunks(len(pairs), batch_size):
        chosen = pairs[part]
        index = torch.tensor([c for c, _ in chosen], device=x_t.device)
        network.router_gates = torch.cat([routes[r] for _, r in chosen]).to(network.timestep_gates.logits.device)
        out.extend(_plain(dit, x_t[index], dit_t[index], text[index], len(chosen)))  # its hook reads the timesteps
    return out


def _concat(parts: list[BlockInputs]) -> BlockInputs:
    first = parts[0]
    if len(parts) == 1:
        return first
    return BlockInputs(torch.cat([p.hidden for p in parts]), torch.cat([p.text for p in parts]),
                       torch.cat([p.timestep_proj for p in parts]), torch.cat([p.temb for p in parts]),
                       first.rotary, first.grid, first.start)  # fmt: skip
