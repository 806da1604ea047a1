"""Evaluation at A14B cost (issue 21): the split DiT forward, batched scoring that equals route-by-route scoring,
the clip budget and its checks. Tiny Wan DiT on the CPU, the code path of the 14B one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_moe_core.adapters.network import build_network
from lora_moe_core.config import load_config
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.errors import UserError
from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.evaluation.batched import first_expert_block
from lora_moe_core.evaluation.metrics import held_out_losses
from lora_moe_core.evaluation.run import EvaluationSettings, select_clips
from lora_moe_core.families import FAMILIES
from lora_moe_core.model.wan import build_transformer
from lora_moe_core.model.wan_forward import repeat_samples, run_prefix, run_suffix


@pytest.mark.parametrize("stop", [0, 1, 3, 4])
def test_prefix_then_suffix_is_the_whole_forward(tiny_inputs, stop):
    dit = build_transformer("tiny", seed=0)
    inputs = dict(tiny_inputs)
    with torch.no_grad():
        whole = dit(**inputs, return_dict=False)[0]
        prefix = run_prefix(dit, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], stop)
        split = run_suffix(dit, prefix)
        swapped = run_suffix(dit, repeat_samples(prefix, torch.tensor([1, 0, 1])))
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped, whole[[1, 0, 1]], rtol=0, atol=1e-6)


def _network(dit):
    """A Stage-2 network on the last two of the tiny DiT's four blocks, experts that differ (random B)."""
    config = load_config(
        None, {"task": "tiny", "use_base_lora": False, "target_blocks": [2, 3], "ffn_target_blocks": [3]}
    )
    network = build_network(config, dit)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for bank in network.experts.values():
            bank.lora_B.copy_(torch.randn(bank.lora_B.shape, generator=generator) * 0.5)
    return network


def _entries(count: int) -> list[CacheEntry]:
    generator = torch.Generator().manual_seed(3)
    entries = []
    for index in range(count):
        labels = torch.eye(len(FAMILIES))[index % len(FAMILIES)]
        roi = torch.ones(3, 4, 4)
        roi[:, :2, :2] = 4.0
        entries.append(CacheEntry(f"clip_{index}", torch.randn(16, 3, 4, 4, generator=generator), roi, labels,
                                  labels, torch.randn(7, 16, generator=generator), FAMILIES[index % 4]))  # fmt: skip
    return entries


def test_batched_routes_share_the_prefix_and_equal_route_by_route_scoring():
    dits = {"high": build_transformer("tiny", seed=0), "low": build_transformer("tiny", seed=1)}
    network = _network(dits["high"])
    assert first_expert_block(network) == 2  # blocks 0-1 run once per clip and timestep
    entries = _entries(4)
    timesteps = (0.3, 0.6, 0.9, 0.95)
    for dit in dits.values():
        network.apply_to(dit)
    routes = spec.standard_routes(network)
    one_by_one = spec.clip_losses(entries, dits, 0.875, routes, seed=2, timesteps=timesteps)
    batched = spec.clip_losses(entries, dits, 0.875, routes, seed=2, timesteps=timesteps, network=network,
                               batch_size=5)  # fmt: skip
    assert one_by_one.keys() == batched.keys()
    for name in routes:
        np.testing.assert_allclose(batched[name], one_by_one[name], rtol=1e-5)
    forced = np.stack([one_by_one[f"expert.{name}"] for name in FAMILIES])
    assert np.ptp(forced, axis=0).min() > 1e-3  # the experts really differ: the comparison can fail


def test_timesteps_batched_per_dit_give_the_same_losses():
    dits = {"high": build_transformer("tiny", seed=0), "low": build_transformer("tiny", seed=1)}
    entries = _entries(3)
    one = held_out_losses(entries, dits, 0.875, seed=1, timesteps=(0.2, 0.5, 0.9, 0.99), batch_size=1)
    four = held_out_losses(entries, dits, 0.875, seed=1, timesteps=(0.2, 0.5, 0.9, 0.99), batch_size=4)
    for got, expected in zip(four, one, strict=True):
        assert got.keys() == expected.keys() and "all" in got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5)
    fewer = held_out_losses(entries, dits, 0.875, seed=1, timesteps=(0.9,), batch_size=4)[0]["all"]
    assert fewer != pytest.approx(one[0]["all"], rel=1e-3)  # the timesteps are really what is scored


def test_the_clip_budget_takes_each_family_in_turn():
    entries = _entries(10)  # families 0,1,2,3,0,1,2,3,0,1
    chosen = select_clips(entries, 6)
    assert [e.name for e in chosen] == ["clip_0", "clip_1", "clip_2", "clip_3", "clip_4", "clip_5"]
    unbalanced = [entries[i] for i in (0, 4, 8, 1, 2, 3)]  # three Scissors clips first
    assert {e.name for e in select_clips(unbalanced, 4)} == {"clip_0", "clip_1", "clip_2", "clip_3"}
    assert select_clips(entries, 0) is entries and select_clips(entries, 50) is entries


@pytest.mark.parametrize(("field", "value", "message"), [
    ("eval_timesteps", (), "eval_timesteps is empty"), ("eval_timesteps", (0.5, 1.5), "eval_timesteps"),
    ("eval_clips", -1, "eval_clips must be"), ("eval_batch", 0, "eval_batch must be"),
    ("samples_per_family", -2, "samples_per_family must be"),
])  # fmt: skip
def test_bad_budgets_are_one_line(field, value, message):
    with pytest.raises(UserError, match=message):
        EvaluationSettings(task="tiny", lora_moe_weights="x", base_lora_weights=None, cache="c", output_dir="o",
                           **{field: value})  # fmt: skip
