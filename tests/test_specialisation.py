"""Misrouting matrix and specialisation score: positive controls (a known family-specific latent offset that each
expert corrects), null controls (identical experts; experts that differ but not by family), the pure maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lora_moe_core.adapters.network import LoRAMoENetwork
from lora_moe_core.config import load_config
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.families import FAMILIES

LATENT = (16, 2, 2, 2)  # [C, F, H, W]


class OffsetDiT(nn.Module):
    """A stand-in DiT whose velocity is one adapted linear applied to a constant: ``v = (W + Σ_e g_e ΔW_e)·1``.

    With ``W = 0`` and expert e's ``ΔW_e·1 = −μ_e``, forcing expert e on a clip with latents ``μ_f + noise``
    gives an expected loss of ``1 + σ² + ‖μ_e − μ_f‖²/C``: the misrouting matrix is known in closed form.
    """

    def __init__(self):
        super().__init__()
        self.offset = nn.Linear(1, LATENT[0], bias=False)
        nn.init.zeros_(self.offset.weight)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        velocity = self.offset(torch.ones(hidden_states.shape[0], 1, 1))  # [B, 1, C]
        return (velocity.view(hidden_states.shape[0], -1, 1, 1, 1).expand_as(hidden_states),)


def _entries(offsets: torch.Tensor, per_family: int, seed: int, sigma: float = 0.3) -> list[CacheEntry]:
    """``per_family`` clips per family with latents ``offsets[f] + σ·noise``, labelled with that family."""
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for index in range(per_family * len(FAMILIES)):
        family = index % len(FAMILIES)
        latents = offsets[family].view(-1, 1, 1, 1) + sigma * torch.randn(LATENT, generator=generator)
        labels = torch.eye(len(FAMILIES))[family]
        entries.append(CacheEntry(f"clip_{index}", latents, torch.ones(LATENT[1:]), labels, labels,
                                  torch.zeros(2, 16), FAMILIES[family]))  # fmt: skip
    return entries


def _network(expert_outputs: torch.Tensor) -> LoRAMoENetwork:
    """A LoRA-MoE over ``OffsetDiT.offset`` whose expert e adds ``expert_outputs[e]`` to the velocity."""
    config = load_config(None, {"task": "tiny"})
    network = LoRAMoENetwork(config, {"offset": 1}, {"offset": (1, LATENT[0])})
    bank = network.experts["offset"]
    with torch.no_grad():
        bank.lora_A.fill_(1.0)
        bank.lora_B.copy_(expert_outputs[:, :, None] / bank.scaling)
    return network


def _measure(offsets, expert_outputs, per_family=12, seed=0):
    dits = {"high": OffsetDiT(), "low": OffsetDiT()}
    return spec.specialisation_metrics(_network(expert_outputs), _entries(offsets, per_family, seed), dits, 0.875)


def _family_offsets(scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return scale * torch.randn(len(FAMILIES), LATENT[0], generator=generator)


def test_positive_control_each_expert_corrects_its_familys_offset():
    offsets = _family_offsets(0.5)
    metrics, matrix = _measure(offsets, -offsets)  # expert e predicts family e's mean velocity
    assert (matrix.argmin(axis=1) == np.arange(len(FAMILIES))).all()
    expected = ((offsets[None, :, :] - offsets[:, None, :]) ** 2).mean(-1).numpy()  # ‖μ_e − μ_f‖²/C
    np.testing.assert_allclose(matrix - np.diag(matrix)[:, None], expected, atol=0.05)
    assert metrics["specialisation.ci_high"] < 0 and metrics["specialisation.score"] < 0
    for family in FAMILIES:
        assert metrics[f"misrouting.wrong_expert_increase.{family}"] > 0.05
        assert metrics[f"misrouting.{family}.{family}"] == pytest.approx(matrix[FAMILIES.index(family)].min())
    assert metrics["gates.learned.val_loss"] < metrics["gates.uniform.val_loss"]  # routed to its own expert


def test_positive_control_found_when_one_expert_is_best_for_every_family():
    """The issue's failure mode, made on purpose: expert 0 has the lowest raw loss in every row (the others carry
    an extra error, orthogonal to the family offsets), yet each expert still fits its own family best relative
    to its overall quality. The score removes the column effect and finds the specialisation."""
    offsets = torch.zeros(len(FAMILIES), LATENT[0])
    offsets[:, :8] = _family_offsets(0.3)[:, :8]
    outputs = -offsets.clone()
    outputs[1:, 8:] = 1.0  # experts 1..3: worse for everyone by the same amount
    metrics, matrix = _measure(offsets, outputs, per_family=16)
    assert (matrix.argmin(axis=1) == 0).all()
    assert metrics["specialisation.ci_high"] < 0


def test_null_control_identical_experts_score_zero():
    offsets = _family_offsets(0.5)
    shared = -offsets.mean(0, keepdim=True).expand(len(FAMILIES), -1)
    metrics, _ = _measure(offsets, shared)
    assert metrics["specialisation.score"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["specialisation.ci_low"] <= 0 <= metrics["specialisation.ci_high"]


def test_null_control_experts_that_differ_but_not_by_family():
    """No family offsets (every family's clips come from one distribution) and four different experts: the
    expert effects are real but the same for every family, so the interval must contain 0."""
    offsets = torch.zeros(len(FAMILIES), LATENT[0])
    outputs = 0.5 * torch.randn(len(FAMILIES), LATENT[0], generator=torch.Generator().manual_seed(5))
    metrics, matrix = _measure(offsets, outputs, per_family=16)
    assert metrics["specialisation.ci_low"] <= 0 <= metrics["specialisation.ci_high"]
    assert np.ptp(matrix.mean(axis=0)) > 0.1  # the experts do differ in overall quality


def test_score_of_a_known_interaction():
    delta = 0.4
    rows, columns = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.0, 0.2, 0.1])
    matrix = rows[:, None] + columns[None, :] - delta * np.eye(4)
    assert spec.specialisation_score(matrix) == pytest.approx(-0.75 * delta)  # −δ(1 − 1/F) with F = 4
    increase = spec.wrong_expert_increase(matrix)
    diagonal = np.diag(matrix)
    np.testing.assert_allclose(increase, ((matrix.sum(1) - diagonal) / 3 - diagonal) / diagonal)


def test_bootstrap_interval_is_reproducible_and_covers_the_estimate():
    rng = np.random.default_rng(0)
    per_clip = rng.normal(1.0, 0.1, size=(40, 4))
    members = [np.arange(f, 40, 4) for f in range(4)]
    first, second = spec.bootstrap_interval(per_clip, members), spec.bootstrap_interval(per_clip, members)
    assert first == second
    score = spec.specialisation_score(spec.misrouting_matrix(per_clip, members))
    assert first[0] < score < first[1]


def _runs_with_interactions(deltas: list[float], clips: int = 40, noise: float = 0.01) -> list[np.ndarray]:
    """Per-clip losses ``[N, E]`` of several runs on the same clips; run r's own-expert advantage is ``deltas[r]``."""
    rng = np.random.default_rng(1)
    family = np.arange(clips) % 4
    return [1.0 + rng.normal(0, noise, size=(clips, 4)) - delta * np.eye(4)[family] for delta in deltas]


def test_seed_clip_interval_contains_zero_for_runs_whose_small_interactions_flip_sign():
    """What shuffled labels produce: every run's own clip interval excludes 0 (a real, tiny interaction of that
    checkpoint), but the sign is the run's accident, so the procedure's interval contains 0."""
    runs = _runs_with_interactions([0.02, -0.02, 0.015, -0.01, 0.005], noise=0.002)
    members = [np.arange(f, 40, 4) for f in range(4)]
    for per_clip in runs:
        low, high = spec.bootstrap_interval(per_clip, members)
        assert high < 0 or low > 0
    low, high = spec.seed_clip_interval(runs, members)
    assert low < 0 < high


def test_seed_clip_interval_excludes_zero_when_every_run_specialises():
    runs = _runs_with_interactions([0.2, 0.15, 0.25])
    members = [np.arange(f, 40, 4) for f in range(4)]
    low, high = spec.seed_clip_interval(runs, members)
    scores = [spec.specialisation_score(spec.misrouting_matrix(r, members)) for r in runs]
    assert high < 0
    assert min(scores) - 0.01 < low < np.mean(scores) < high < max(scores) + 0.01  # spans the runs' spread
    assert spec.seed_clip_interval(runs, members) == (low, high)  # fixed seed: reproducible
