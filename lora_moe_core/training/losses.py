"""The Stage-2 loss terms of the seed, each a small function of tensors.

``L = L_diff + 3.0·L_roi + 0.5·L_identity + 0.5·L_temporal + 0.02·L_entropy + 0.1·L_balance + w_t·L_teacher``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE, computed in fp32."""
    return F.mse_loss(prediction.float(), target.float())


def roi_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Squared error restricted to the ROI: ``Σ (w−1)·err² / Σ (w−1)`` over ``[B, C, F, H, W]``.

    ``weights`` ``[B, F, H, W]`` are 1 off the tool tips and 3–5 on them, so this is the error on the tips,
    weighted by how much each cell counts; it is 0 for a clip without ROI.
    """
    excess = (weights.float() - 1).clamp_min(0).unsqueeze(1)  # [B, 1, F, H, W]
    error = (prediction.float() - target.float()).square()
    total = excess.sum() * prediction.shape[1]
    return (error * excess).sum() / total.clamp_min(EPS)


def temporal_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and true frame differences along latent time (0 for one-frame clips)."""
    if x0.shape[2] < 2:
        return x0_pred.new_zeros(())
    return F.mse_loss(torch.diff(x0_pred.float(), dim=2), torch.diff(x0.float(), dim=2))


def identity_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE of the instrument classifier on predicted x0 against the caption's families (labelled clips only)."""
    labelled = labels.sum(dim=1) > 0
    if not labelled.any():
        return logits.new_zeros(())
    return F.binary_cross_entropy_with_logits(logits[labelled].float(), labels[labelled].float())


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probs * probs.clamp_min(EPS).log()).sum(dim=dim)


def routing_entropy_loss(usage: torch.Tensor) -> torch.Tensor:
    """``−H(ū)`` of the windowed expert usage: rewards spread over experts, the seed's collapse guard."""
    return -entropy(usage)


def load_balance_loss(usage: torch.Tensor, top1: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style ``E·Σ f_e·P_e`` over the window (min 1 at uniform), or ``KL(P‖π)`` towards a prior.

    Args:
        usage: windowed soft usage ``P`` (carries the current batch's gradient).
        top1: windowed hard usage ``f`` (no gradient).
        prior: family frequencies ``π`` to balance towards instead of uniform (real data is imbalanced).
    """
    if prior is not None:
        return (usage * (usage.clamp_min(EPS).log() - prior.clamp_min(EPS).log())).sum()
    return usage.shape[-1] * (top1.detach() * usage).sum()


def teacher_kl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(learned ‖ rule) = Σ g·(log g − log q)``, averaged over the batch (seed: soft guidance)."""
    return (student * (student.clamp_min(EPS).log() - teacher.clamp_min(EPS).log())).sum(dim=-1).mean()


def teacher_phase_scale(progress: float) -> float:
    """Teacher-KL multiplier by training phase (seed, scaled to the run length).

    Bootstrap (epochs 1–5 of 20, progress < 0.25): 1.0, the router follows the teacher closely;
    specialisation (epochs 6–15): 0.5; refinement (epochs 16–20): 0.1, so the router may deviate.
    """
    if progress < 0.25:
        return 1.0
    return 0.5 if progress < 0.75 else 0.1
