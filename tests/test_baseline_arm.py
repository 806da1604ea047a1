"""The matched single-LoRA arm (issue 25): its config holds the experts' parameters (pinned counts), a fresh arm is
exactly Stage 1, and the comparison's numbers (a model against itself: exactly 0; a known offset: that offset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_moe_core.adapters.network import LoRANetwork, build_network
from lora_moe_core.config import load_config
from lora_moe_core.errors import UserError
from lora_moe_core.evaluation import arms
from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, read_lora, write_lora
from lora_moe_core.model.wan import build_transformer, linear_shapes, resolve_targets, task_linear_shapes
from lora_moe_core.training.baseline_arm import (
    BaselineArmRecipe,
    lora_parameter_count,
    matched_lora_config,
    resolve_arm,
    stage2_parameter_count,
)
from tests.helpers import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _arm_parameters(config, shapes: dict, blocks: int) -> int:
    return sum(rank * sum(shapes[name]) for name, rank in resolve_targets(config.lora, blocks).items())


def test_the_demo_arm_holds_the_experts_parameters():
    stage2 = load_config(CONFIGS / "demo" / "lora_moe_stage_b_merged.toml", {"use_base_lora": False})
    arm = matched_lora_config(stage2)
    lora = arm.lora
    assert (lora.rank_q, lora.rank_k, lora.rank_v, lora.rank_o, lora.rank_ffn) == (32, 16, 16, 16, 16)
    assert lora.lora_alpha / lora.lora_dim == stage2.lora.lora_alpha / stage2.lora.lora_dim == 1.0  # experts' scale
    assert (lora.target_blocks, lora.ffn_target_blocks) == (stage2.lora.target_blocks, stage2.lora.ffn_target_blocks)
    assert arm.training.training_stage == "stage_a" and arm.training.baseline_arm
    assert arm.training.output_dir == "outputs/demo/lora_moe_stage_b_matched_lora"
    same = ("num_train_epochs", "max_train_steps", "batch_size", "gradient_accumulation_steps", "seed",
            "learning_rate", "weight_decay", "timestep_sampling", "discrete_flow_shift", "cache")  # fmt: skip
    assert {key: getattr(arm.training, key) for key in same} == {key: getattr(stage2.training, key) for key in same}
    assert arm.loss == stage2.loss and arm.lora_moe == stage2.lora_moe  # same losses, same Stage 1 and alpha_base
    dit = build_transformer("tiny")
    network = build_network(stage2, dit)
    network.set_trainable("stage_b")
    trained = sum(p.numel() for p in network.parameters() if p.requires_grad)
    # 4 experts × 4,512 = 18,048 LoRA parameters; the router MLP (4→64→4: 580) and timestep gates (4 × 2) on top
    assert stage2_parameter_count(network) == trained == 18_636
    assert sum(p.numel() for p in network.experts.parameters()) == _arm_parameters(arm, linear_shapes(dit), 4)
    assert _arm_parameters(arm, linear_shapes(dit), 4) == 18_048
    assert _arm_parameters(matched_lora_config(stage2, experts=1), linear_shapes(dit), 4) == 4_512  # bench's oracle
    assert resolve_arm(stage2) is stage2  # without --baseline_arm a Stage-2 config trains Stage 2
    stage2.training.baseline_arm = True
    assert resolve_arm(stage2) == arm and resolve_arm(arm) is arm  # an arm's own config stays as it is


def test_the_seed_arm_on_wan22_a14b_holds_the_experts_parameters():
    stage2 = load_config(CONFIGS / "lora_moe_stage_b_merged.toml")
    shapes = task_linear_shapes("t2v-A14B")  # meta device: no weights
    arm = matched_lora_config(stage2)
    assert _arm_parameters(arm, shapes, 40) == 4 * _arm_parameters(matched_lora_config(stage2, 1), shapes, 40)
    assert _arm_parameters(arm, shapes, 40) == 7_462_912  # the experts' 1,865,728 each; router + gates add 588


def test_a_baseline_arm_is_matched_to_stage_b_only(tmp_path):
    with pytest.raises(UserError, match="matched to a stage_b run"):
        load_config(None, {"training_stage": "stage_c", "baseline_arm": True})
    with pytest.raises(UserError, match="matched to a stage_b config"):
        matched_lora_config(load_config(None, {"training_stage": "stage_a"}))
    with pytest.raises(UserError, match="lora_dim"):  # 4 × 512 exceeds the rank limit: one line naming the key
        matched_lora_config(load_config(None, {"expert_dim": 512, "rank_q": None}))


def _stage1_file(tmp_path: Path) -> Path:
    """A non-zero Stage-1 LoRA on another module set than the arm's (musubi trains all ten linears)."""
    generator = torch.Generator().manual_seed(3)
    modules = {name: LoRAModuleWeights(torch.randn(4, fan_in, generator=generator) * 0.05,
                                       torch.randn(fan_out, 4, generator=generator) * 0.05, 2.0)
               for name, (fan_in, fan_out) in linear_shapes(build_transformer("tiny")).items()
               if name.endswith(("attn1.to_q", "ffn.net.2"))}  # fmt: skip
    path = tmp_path / "stage1.safetensors"
    write_lora(LoRAFile(modules=modules), path, to="musubi")
    return path


def test_a_fresh_arm_is_exactly_stage1_and_trains_only_its_own_lora(tmp_path, tiny_inputs):
    stage1 = _stage1_file(tmp_path)
    config = matched_lora_config(load_config(CONFIGS / "demo" / "lora_moe_stage_b_merged.toml",
                                             {"base_lora_weights": str(stage1), "alpha_base": 0.7}))  # fmt: skip
    dit = build_transformer("tiny")
    bare = run(dit, tiny_inputs)
    reference = build_transformer("tiny")
    LoRANetwork.from_modules(read_lora(stage1).modules, linear_shapes(reference)).apply_to(reference, 0.7)
    expected = run(reference, tiny_inputs)
    torch.manual_seed(0)
    recipe = BaselineArmRecipe(config, {"high": dit, "low": dit}, torch.device("cpu"))
    assert not torch.equal(expected, bare)
    assert torch.equal(run(dit, tiny_inputs), expected)  # zero-initialised B: the arm starts as Stage 1 exactly
    trainable = recipe.trainable_parameters()
    assert sum(p.numel() for p in trainable) == 18_048 and all(p.requires_grad for p in trainable)
    assert lora_parameter_count(recipe.network.to_modules()) == 18_048  # what the evaluation counts in the file
    assert not any(p.requires_grad for p in recipe.frozen_base.parameters())
    assert dit.blocks[3].attn1.to_q.base_layer.lora is recipe.network.loras["blocks__3__attn1__to_q"]  # inside
    torch.manual_seed(0)
    plain = LoRANetwork(resolve_targets(config.lora, 4), linear_shapes(dit), config.lora.lora_alpha)
    key = "blocks__0__attn1__to_q"
    assert torch.equal(recipe.network.loras[key].lora_A, plain.loras[key].lora_A)  # same init draws as a plain LoRA
    assert LoRANetwork.remove_from(dit) == 19 + 8  # the arm's 19 wrappers and Stage 1's 8, innermost first
    assert torch.equal(run(dit, tiny_inputs), bare)


def test_comparing_an_arm_with_itself_gives_exactly_zero():
    losses = np.random.default_rng(0).uniform(2.0, 3.0, size=10)
    members = [np.array([0, 1, 2, 3]), np.array([4, 5]), np.array([], dtype=int), np.array([6, 7, 8, 9])]
    metrics = arms.comparison_metrics({"lora_moe": losses, "matched_lora": losses.copy()}, members)
    for group in ("Scissors", "Hook", "Other", "all"):
        assert metrics[f"vs_matched_lora.{group}.difference"] == 0.0
        assert metrics[f"vs_matched_lora.{group}.ci_low"] == metrics[f"vs_matched_lora.{group}.ci_high"] == 0.0
        assert metrics[f"vs_matched_lora.{group}.relative"] == 0.0
    assert "vs_matched_lora.Suction.difference" not in metrics  # no clips, no row
    assert metrics["vs_matched_lora.all.clips"] == 10 and metrics["vs_matched_lora.Hook.clips"] == 2
    assert "cannot tell the two apart" in arms.headline(metrics)


def test_the_comparison_of_a_known_offset():
    """The mixture 0.05 better on Scissors clips only: that family's difference is exactly −0.05 (a constant
    difference has a point interval), the others 0, and "all" the share of Scissors clips."""
    lora = np.linspace(2.0, 2.9, 10)
    moe = lora.copy()
    moe[:4] -= 0.05
    members = [np.arange(4), np.arange(4, 7), np.arange(7, 10), np.array([], dtype=int)]
    metrics = arms.comparison_metrics({"lora_moe": moe, "matched_lora": lora}, members)
    assert metrics["vs_matched_lora.Scissors.difference"] == pytest.approx(-0.05, abs=1e-12)
    assert metrics["vs_matched_lora.Scissors.ci_high"] == pytest.approx(-0.05, abs=1e-12)
    assert metrics["vs_matched_lora.Scissors.relative"] == pytest.approx(-0.2 / lora[:4].sum(), rel=1e-9)
    assert metrics["vs_matched_lora.Hook.difference"] == 0.0
    assert metrics["vs_matched_lora.all.difference"] == pytest.approx(-0.02, abs=1e-12)
    assert metrics["vs_matched_lora.all.ci_low"] < -0.02 < metrics["vs_matched_lora.all.ci_high"] < 0  # resampled
    assert metrics["val_loss.all.matched_lora"] == pytest.approx(2.45)
    section = arms.report_section({**metrics, "params.trainable.stage2": 18636.0, "params.trainable.matched_lora":
                                   18048.0, "steps.stage2": 12.0, "steps.matched_lora": 16.0})  # fmt: skip
    assert "LoRA-MoE better" in section and "18,636" in section and "stopped early" in section
    assert "the mixture is worth it" in arms.headline(metrics)


def test_the_paired_bootstrap_interval_is_reproducible():
    values = np.random.default_rng(1).normal(0.1, 0.05, size=40)
    index = np.arange(40)
    low, high = spec.mean_interval(values, index)
    assert (low, high) == spec.mean_interval(values, index)  # fixed seed
    assert low < values.mean() < high and high - low < 0.05
