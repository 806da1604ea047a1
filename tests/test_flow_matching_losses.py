"""Flow-matching sampling and the Stage-2 loss terms, with pinned values."""

from __future__ import annotations

import pytest
import torch

from lora_moe_core.training import flow_matching as fm
from lora_moe_core.training import losses
from lora_moe_core.training.monitor import EarlyStopping, EpochStats


def test_shift_12_puts_70_percent_on_the_high_noise_side():
    assert fm.high_noise_fraction("shift", 12.0, 0.875) == pytest.approx(0.705, abs=0.005)
    assert fm.high_noise_fraction("uniform", 1.0, 0.875) == pytest.approx(0.125, abs=0.005)
    assert fm.high_noise_fraction("shift", 3.0, 0.875) == pytest.approx(0.20, abs=0.01)


@pytest.mark.parametrize("method", fm.SAMPLERS)
def test_samplers_stay_in_the_unit_interval(method):
    t = fm.sample_timesteps(10_000, method, 5.0, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1 and t.std() > 0.05


def test_a_batch_stays_on_one_side_of_the_boundary():
    generator = torch.Generator().manual_seed(3)
    sides = set()
    for _ in range(50):
        t, high = fm.sample_batch_timesteps(4, "shift", 12.0, generator, boundary=0.875)
        assert len(t) == 4 and bool((t >= 0.875).all()) == high and bool((t < 0.875).all()) == (not high)
        sides.add(high)
    assert sides == {True, False}


def test_flow_matching_identities():
    x0, noise, t = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4), torch.tensor([0.25, 0.9])
    x_t = fm.noisy_latents(x0, noise, t)
    torch.testing.assert_close(x_t[1], 0.1 * x0[1] + 0.9 * noise[1])
    torch.testing.assert_close(fm.predicted_x0(x_t, noise - x0, t), x0)  # the exact velocity recovers x0
    torch.testing.assert_close(fm.dit_timestep(t), torch.tensor([250.0, 900.0]))


def test_roi_loss_is_the_tip_error():
    prediction, target = torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 2, 1, 2, 2)
    prediction[0, :, 0, 0, 0] = 2.0  # error 4 on a tip cell
    prediction[0, :, 0, 1, 1] = 10.0  # a large error off the tips does not count
    weights = torch.ones(1, 1, 2, 2)
    weights[0, 0, 0, 0] = 4.0
    assert losses.roi_loss(prediction, target, weights).item() == pytest.approx(4.0)
    assert losses.roi_loss(prediction, target, torch.ones(1, 1, 2, 2)).item() == 0.0


def test_balance_entropy_teacher_terms():
    uniform = torch.full((4,), 0.25)
    assert losses.load_balance_loss(uniform, uniform).item() == pytest.approx(1.0)
    collapsed = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert losses.load_balance_loss(collapsed, collapsed).item() == pytest.approx(4.0)
    assert losses.load_balance_loss(uniform, uniform, prior=uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.routing_entropy_loss(uniform).item() == pytest.approx(-torch.log(torch.tensor(4.0)).item())
    student = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    teacher = torch.tensor([[0.4, 0.4, 0.1, 0.1]])
    expected = 0.7 * torch.log(torch.tensor(0.7 / 0.4)) + 0.3 * torch.log(torch.tensor(0.3 / 0.4))
    assert losses.teacher_kl_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert [losses.teacher_phase_scale(p) for p in (0.0, 0.24, 0.25, 0.74, 0.75, 1.0)] == [1, 1, 0.5, 0.5, 0.1, 0.1]


def test_temporal_and_identity_terms():
    x0 = torch.zeros(1, 1, 3, 1, 1)
    moving = x0.clone()
    moving[0, 0, :, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    assert losses.temporal_loss(moving, x0).item() == pytest.approx(1.0)
    assert losses.temporal_loss(x0[:, :, :1], x0[:, :, :1]).item() == 0.0
    logits, labels = torch.zeros(2, 4), torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 0]])
    assert losses.identity_loss(logits, labels).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def _summary(usage, roi=1.0, entropy=1.3):
    summary = {"roi_loss": roi, "routing_entropy": entropy}
    summary.update(
        {f"usage.{name}": value for name, value in zip(("Scissors", "Hook", "Suction", "Other"), usage, strict=True)}
    )
    return summary


def test_early_stopping_rules_of_the_seed():
    balanced = [0.25, 0.25, 0.25, 0.25]
    stopper = EarlyStopping()
    assert stopper.check(_summary(balanced, roi=1.0)) is None
    reasons = [stopper.check(_summary(balanced, roi=1.0)) for _ in range(5)]
    assert reasons[:4] == [None] * 4 and "plateaued for 5 epochs" in reasons[4]
    assert "collapse" in EarlyStopping().check(_summary(balanced, entropy=0.4))
    assert "expert Hook takes 72%" in EarlyStopping().check(_summary([0.1, 0.72, 0.1, 0.08]))


def test_epoch_stats_routing_metrics():
    stats = EpochStats()
    gates = torch.tensor([[0.0, 0.8, 0.2, 0.0], [0.6, 0.0, 0.0, 0.4]])
    stats.add_routing(gates, gates, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]))
    stats.add({"loss": 2.0})
    summary = stats.summary()
    assert summary["routing_accuracy"] == 0.5  # the second clip is Other but routed to Scissors first
    assert summary["usage.Scissors"] == pytest.approx(0.3) and summary["gate_mean.Hook.Hook"] == pytest.approx(0.8)
