"""Per-sample routing: learned MLP router, rule-based teacher, top-k gates, timestep gates, gate statistics.

Gates are per sample (``[B, E]``), not per token: per-token routing in image/video DiTs causes spatial
artifacts (InstructMoLE, 2512.21788), and one instrument family describes a whole clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_moe_core.families import NUM_FAMILIES

ROUTING_MODES = ("learned", "rule_based", "uniform")


class InstrumentRouter(nn.Module):
    """MLP router over instrument logits: ``logits + W2 · silu(W1 · logits)``.

    The output layer starts at zero, so an untrained router reproduces the rule-based route (softmax of
    the instrument logits) instead of a random top-2 pick; Stage 2's bootstrap phase starts where the
    teacher is and the MLP learns only the deviation.

    Args:
        num_families: width of the instrument logits (4).
        num_experts: number of experts E (4).
        hidden_dim: hidden width (seed: 64).
    """

    def __init__(self, num_families: int = NUM_FAMILIES, num_experts: int = NUM_FAMILIES, hidden_dim: int = 64):
        super().__init__()
        if num_families != num_experts:
            raise ValueError("the residual router needs one expert per instrument family")
        self.hidden = nn.Linear(num_families, hidden_dim)
        self.output = nn.Linear(hidden_dim, num_experts)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, instrument_logits: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` instrument logits → ``[B, E]`` router logits."""
        return instrument_logits + self.output(F.silu(self.hidden(instrument_logits)))


def top_k_gates(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep at most the ``k`` largest gates per row and renormalise them to sum to 1.

    Ties are never broken arbitrarily (that would favour low expert indices): an entry is kept when it is
    strictly larger than the (k+1)-th largest value, so ``[a, b, a, a]`` keeps only ``b``. A row whose values
    are all equal carries no preference and stays dense (uniform). Gradients flow through the kept entries.
    """
    num_experts = probs.shape[-1]
    if k >= num_experts:
        return probs / probs.sum(dim=-1, keepdim=True)
    next_best = probs.topk(k + 1, dim=-1).values[..., -1:]  # [B, 1], the (k+1)-th largest
    keep = probs > next_best
    keep = keep | ~keep.any(dim=-1, keepdim=True)  # all tied: keep the whole row
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def teacher_distribution(instrument_logits: torch.Tensor, temperature: float, label_smoothing: float) -> torch.Tensor:
    """Rule-based teacher ``q = (1-ε)·softmax(logits/T) + ε/E``; smoothing keeps ``log q`` finite."""
    probs = torch.softmax(instrument_logits.float() / temperature, dim=-1)
    return (1 - label_smoothing) * probs + label_smoothing / probs.shape[-1]


def router_probabilities(
    instrument_logits: torch.Tensor, mode: str, router: InstrumentRouter | None, temperature: float = 1.0
) -> torch.Tensor:
    """Dense routing distribution ``[B, E]`` before top-k (what the teacher KL and balance terms see)."""
    if mode == "uniform":
        return torch.full((instrument_logits.shape[0], NUM_FAMILIES), 1.0 / NUM_FAMILIES,
                          device=instrument_logits.device)  # fmt: skip
    if mode == "learned":
        if router is None:
            raise ValueError("learned routing needs a router")
        scores = router(instrument_logits.float())
    elif mode == "rule_based":
        scores = instrument_logits.float()
    else:
        raise ValueError(f"unknown routing mode '{mode}'; valid: {', '.join(ROUTING_MODES)}")
    return torch.softmax(scores / temperature, dim=-1)


def compute_gates(
    instrument_logits: torch.Tensor,
    mode: str,
    router: InstrumentRouter | None,
    temperature: float = 1.0,
    top_k: int = 2,
) -> torch.Tensor:
    """Per-sample gates ``[B, E]`` that sum to 1.

    Args:
        instrument_logits: ``[B, F]`` from a hint, caption keywords or the instrument classifier.
        mode: ``learned`` (router MLP), ``rule_based`` (softmax of the instrument logits) or ``uniform``.
        router: the router; required for ``learned``.
        temperature: softmax temperature.
        top_k: experts kept per sample (uniform routing is dense).
    """
    probs = router_probabilities(instrument_logits, mode, router, temperature)
    return probs if mode == "uniform" else top_k_gates(probs, top_k)


class TimestepGates(nn.Module):
    """A learned gate per (timestep bucket, expert) that multiplies the router gates.

    Buckets are split at ``boundaries`` (default ``[875]``: Wan2.2's high-noise DiT runs t ≥ 875, the
    low-noise DiT below). ``gate = 2·sigmoid(logit)``: 1 at initialisation (no effect), free to fade an
    expert out of a regime or to double it.
    """

    def __init__(self, boundaries: list[float], num_experts: int = NUM_FAMILIES):
        super().__init__()
        self.register_buffer("boundaries", torch.tensor(boundaries, dtype=torch.float32), persistent=True)
        self.logits = nn.Parameter(torch.zeros(len(boundaries) + 1, num_experts))

    @property
    def num_buckets(self) -> int:
        return self.logits.shape[0]

    def bucket(self, timestep: torch.Tensor) -> torch.Tensor:
        """Bucket index per sample for diffusers-convention timesteps in [0, 1000]."""
        return torch.bucketize(timestep.float(), self.boundaries.to(timestep.device), right=True)

    def bucket_gates(self) -> torch.Tensor:
        """``[num_buckets, E]`` gate values."""
        return 2 * torch.sigmoid(self.logits)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` timesteps → ``[B, E]`` gates."""
        return self.bucket_gates()[self.bucket(timestep)]


class GateStatistics(nn.Module):
    """Exponential moving averages of expert usage, the window the load-balance loss sees.

    Semantics: after each micro-batch, ``usage ← d·usage + (1−d)·mean_b g_b`` (soft usage) and
    ``top1 ← d·top1 + (1−d)·mean_b onehot(argmax g_b)`` (hard usage), both starting at uniform, so no bias
    correction is needed. :meth:`smoothed_usage` mixes the detached EMA with the current batch's gates; the
    gradient flows only through the current batch but the balance target is judged over the window. With a
    micro-batch of 1 that is what keeps the loss from pushing every sample to uniform gates.
    """

    def __init__(self, num_experts: int = NUM_FAMILIES, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("usage", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("top1", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, gates: torch.Tensor) -> None:
        """Fold a ``[B, E]`` batch of gates (already gathered across ranks, if any) into the averages."""
        gates = gates.detach().float()
        hard = F.one_hot(gates.argmax(dim=-1), gates.shape[-1]).float()
        self.usage.mul_(self.decay).add_((1 - self.decay) * gates.mean(dim=0))
        self.top1.mul_(self.decay).add_((1 - self.decay) * hard.mean(dim=0))
        self.num_updates += 1

    def smoothed_usage(self, gates: torch.Tensor) -> torch.Tensor:
        """``d·usage.detach() + (1−d)·mean_b g_b``: windowed usage that still carries this batch's gradient."""
        # clone: update() changes the buffer in place before backward runs
        return self.decay * self.usage.detach().clone() + (1 - self.decay) * gates.float().mean(dim=0)
