"""Router, teacher, top-k gates, timestep gates and gate statistics."""

from __future__ import annotations

import torch

from lora_moe_core.adapters.routing import (
    GateStatistics,
    InstrumentRouter,
    TimestepGates,
    compute_gates,
    teacher_distribution,
    top_k_gates,
)
from lora_moe_core.data.vocabulary import instrument_logits


def test_top2_gates_sum_to_one_with_two_nonzero():
    probs = torch.softmax(torch.randn(64, 4), dim=-1)
    gates = top_k_gates(probs, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(64))
    assert ((gates > 0).sum(-1) == 2).all()
    kept = gates > 0
    # the kept pair keeps its ratio: renormalised, not re-softmaxed
    ratio = probs[kept].view(64, 2)
    torch.testing.assert_close(gates[kept].view(64, 2), ratio / ratio.sum(-1, keepdim=True))


def test_top_k_ties_are_not_broken_towards_low_indices():
    gates = top_k_gates(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.7, 0.1, 0.1]]), 2)
    torch.testing.assert_close(gates, torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]]))


def test_untrained_router_reproduces_rule_based_route():
    router = InstrumentRouter(hidden_dim=64)
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    learned = compute_gates(logits, "learned", router, temperature=1.0, top_k=2)
    rule = compute_gates(logits, "rule_based", None, temperature=1.0, top_k=2)
    torch.testing.assert_close(learned, rule)
    expected_first = torch.softmax(torch.tensor([3.0, 1.0]), -1)
    torch.testing.assert_close(learned[0, 1:3], expected_first)
    assert sum(p.numel() for p in router.parameters()) == 4 * 64 + 64 + 64 * 4 + 4


def test_uniform_mode_and_hint_routing():
    uniform = compute_gates(torch.zeros(3, 4), "uniform", None)
    torch.testing.assert_close(uniform, torch.full((3, 4), 0.25))
    hook = compute_gates(instrument_logits(["Hook"])[None], "rule_based", None, top_k=2)
    torch.testing.assert_close(hook, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    both = compute_gates(instrument_logits(["Hook", "Suction"])[None], "rule_based", None, top_k=2)
    torch.testing.assert_close(both, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


def test_teacher_is_label_smoothed_softmax():
    teacher = teacher_distribution(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), temperature=1.0, label_smoothing=0.1)
    soft = torch.softmax(torch.tensor([0.0, 5.0, 0.0, 0.0]), -1)
    torch.testing.assert_close(teacher[0], 0.9 * soft + 0.025)
    assert teacher.min() > 0.02  # log q stays finite for the KL


def test_timestep_gates_split_at_wan22_boundary():
    gates = TimestepGates([875.0])
    assert gates.bucket(torch.tensor([0.0, 874.9, 875.0, 999.0])).tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(gates(torch.tensor([100.0, 900.0])), torch.ones(2, 4))  # identity at init
    with torch.no_grad():
        gates.logits[1, 2] = 10.0
    assert gates(torch.tensor([900.0]))[0, 2].item() > 1.99
    assert gates(torch.tensor([100.0]))[0, 2].item() == 1.0


def test_gate_statistics_ema_semantics():
    stats = GateStatistics(decay=0.5)
    stats.update(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(stats.usage, torch.tensor([0.625, 0.125, 0.125, 0.125]))
    torch.testing.assert_close(stats.top1, torch.tensor([0.625, 0.125, 0.125, 0.125]))
    gates = torch.tensor([[0.0, 0.6, 0.4, 0.0]], requires_grad=True)
    smoothed = stats.smoothed_usage(gates)
    torch.testing.assert_close(smoothed, 0.5 * stats.usage + 0.5 * gates.detach()[0])
    smoothed[1].backward()
    assert gates.grad[0, 1].item() == 0.5  # only the current batch carries gradient
    assert int(stats.num_updates) == 1
