"""Rectified-flow training targets as WAN and musubi-tuner define them.

``x_t = (1 − t)·x0 + t·ε``, the DiT predicts ``ε − x0`` and sees ``t·1000``. Wan2.2-A14B runs its high-noise
DiT for ``t ≥ boundary`` (0.875) and the low-noise DiT below; a batch stays on one side.
"""

from __future__ import annotations

import torch

SAMPLERS = ("uniform", "sigma", "logit_normal", "shift")
NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·t / (1 + (s−1)·t)``: the flow-matching time shift (s > 1 moves mass to high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(count: int, method: str, shift: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` timesteps in (0, 1).

    Args:
        count: how many.
        method: ``uniform``; ``sigma`` (uniform over the 1000 shifted discrete sigmas of the scheduler);
            ``logit_normal`` (sigmoid of a standard normal); ``shift`` (logit-normal, then shifted).
        shift: the shift for ``sigma`` and ``shift`` (12 = A14B inference: ~70% of samples at t ≥ 0.875).
        generator: the RNG, so that a resumed run draws the same timesteps.
    """
    if method == "uniform":
        return torch.rand(count, generator=generator)
    if method == "sigma":
        index = torch.randint(0, NUM_TRAIN_TIMESTEPS, (count,), generator=generator)
        return shift_timesteps(1 - index.float() / NUM_TRAIN_TIMESTEPS, shift)
    normal = torch.sigmoid(torch.randn(count, generator=generator))
    if method == "logit_normal":
        return normal
    if method == "shift":
        return shift_timesteps(normal, shift)
    raise ValueError(f"unknown timestep sampling '{method}'; valid: {', '.join(SAMPLERS)}")


def sample_batch_timesteps(
    count: int, method: str, shift: float, generator: torch.Generator, boundary: float | None
) -> tuple[torch.Tensor, bool]:
    """Timesteps for one batch, all on the first sample's side of ``boundary`` (musubi's rule).

    Returns:
        ``(t [count], high_noise)``; ``high_noise`` is False when there is no boundary.
    """
    first = sample_timesteps(1, method, shift, generator)
    if boundary is None:
        rest = sample_timesteps(count - 1, method, shift, generator)
        return torch.cat([first, rest]), False
    high = bool(first.item() >= boundary)
    values = [first]
    for _ in range(10_000):  # rejection sampling; each side holds > 5% of the mass for every sampler here
        if sum(len(v) for v in values) >= count:
            break
        draw = sample_timesteps(count, method, shift, generator)
        values.append(draw[(draw >= boundary) == high])
    return torch.cat(values)[:count], high


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 − t)·x0 + t·ε`` with ``t`` broadcast over ``[B, C, F, H, W]``."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def predicted_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0 = x_t − t·v`` for a velocity prediction ``v = ε − x0``."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * velocity


def high_noise_fraction(method: str, shift: float, boundary: float, samples: int = 200_000) -> float:
    """Monte-Carlo share of samples at ``t ≥ boundary`` (for reports and tests)."""
    t = sample_timesteps(samples, method, shift, torch.Generator().manual_seed(0))
    return float((t >= boundary).float().mean())


def dit_timestep(t: torch.Tensor) -> torch.Tensor:
    """What the DiT sees: ``t·1000`` (diffusers' scheduler convention, also the timestep gates')."""
    return t * NUM_TRAIN_TIMESTEPS
