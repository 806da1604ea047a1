"""Memory modes (fp8 base, block swap, inactive-DiT offload): same numbers as the plain path, real bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lora_moe_core.adapters.moe import LoRAMoELinear
from lora_moe_core.cli.main import main
from lora_moe_core.config import load_config
from lora_moe_core.model.memory import FP8_DTYPE, DiTPlacement, FP8Linear, quantize_blocks_fp8
from lora_moe_core.model.wan import build_transformer
from lora_moe_core.training.batches import Batch
from lora_moe_core.training.monitor import EpochStats
from lora_moe_core.training.recipes import Stage2Recipe
from tests.helpers import assert_one_line_error

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def test_fp8_linear_stays_within_e4m3_rounding_of_the_linear():
    linear = nn.Linear(64, 32)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.shape == (32,)
    weight = linear.weight.detach()
    row_max = weight.abs().amax(dim=1, keepdim=True)
    error = (fp8.dequantized_weight(torch.float32) - weight).abs()
    scale = row_max / 448
    # round to nearest with 3 mantissa bits: relative error ≤ 2^-4, subnormals (spacing 2^-9 · scale) absolute
    assert (error <= weight.abs() / 16 + scale * 2**-10 + 1e-9).all()
    x = torch.randn(5, 64)
    reference, out = linear(x), fp8(x)
    assert ((out - reference).norm() / reference.norm()).item() < 0.03
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16


def test_fp8_blocks_keep_the_dit_close_and_take_adapters(tiny_config):
    config = load_config(None, {"task": "tiny", "mixed_precision": "no", "use_base_lora": False})
    dit = build_transformer("tiny", seed=0)
    reference = build_transformer("tiny", seed=0)
    assert quantize_blocks_fp8(dit) == 4 * 10  # ten linears per block: attn1 q/k/v/o, attn2 q/k/v/o, ffn in/out
    inputs = _inputs()
    with torch.no_grad():
        out, ref = dit(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    recipe = Stage2Recipe(config, {"high": dit, "low": dit}, torch.device("cpu"))
    loss, _ = recipe.loss_step(_batch(), torch.Generator().manual_seed(0), 0.0, EpochStats())
    loss.backward()
    grads = [p.grad for p in recipe.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    adapted = next(m for m in dit.modules() if isinstance(m, LoRAMoELinear) and m.experts is not None)
    with pytest.raises(ValueError, match="fp8"):
        adapted.merge(torch.tensor([1.0, 0.0, 0.0, 0.0]), 1.0)


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=generator),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator)}  # fmt: skip


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 2, 8, 8, generator=generator)
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    return Batch(latents, torch.ones(2, 2, 8, 8), labels, labels.clone(), torch.randn(2, 8, 16, generator=generator),
                 ["a", "b"])  # fmt: skip


def _step(dits: dict[str, nn.Module], placement: DiTPlacement | None, checkpointing: bool = True):
    config = load_config(
        None, {"task": "tiny", "mixed_precision": "no", "gradient_checkpointing": checkpointing, "use_base_lora": False}
    )
    torch.manual_seed(0)
    recipe = Stage2Recipe(config, dits, torch.device("cpu"))
    if placement is not None:
        placement.check_backward(checkpointing)
        recipe.step.before_dit = placement.activate
    losses = []
    for seed in range(8):  # both noise regimes get drawn (70% high)
        loss, _ = recipe.loss_step(_batch(), torch.Generator().manual_seed(seed), 0.0, EpochStats())
        loss.backward()
        losses.append(loss.item())
    grads = {name: p.grad.clone() for name, p in recipe.network.named_parameters() if p.grad is not None}
    return losses, grads


def _two_dits() -> dict[str, nn.Module]:
    return {"high": build_transformer("tiny", seed=0), "low": build_transformer("tiny", seed=1)}


def test_block_swap_and_offload_reproduce_the_resident_step_exactly():
    reference = _step(_two_dits(), None)
    dits = _two_dits()
    placement = DiTPlacement(dits, torch.device("cpu"), offload_inactive_dit=True, blocks_to_swap=2)
    losses, grads = _step(dits, placement)
    assert losses == reference[0]
    assert grads.keys() == reference[1].keys() and all(torch.equal(grads[k], reference[1][k]) for k in grads)
    assert placement.switches >= 2  # the draws visited both regimes, each visit loaded that DiT
    swapper = placement.swappers[id(dits["high"])]
    # the tiny task trains all 4 blocks: each forward streams blocks 0-1 in and each recompute streams them again
    assert swapper.loads >= 4
    resident = [c.loaded for c in swapper.copies]
    assert sum(resident) <= 2


def test_offload_keeps_only_the_active_dit_on_the_device():
    dits = _two_dits()
    placement = DiTPlacement(dits, torch.device("cpu"), offload_inactive_dit=True)
    high, low = placement.resident[id(dits["high"])], placement.resident[id(dits["low"])]
    assert not high.loaded and not low.loaded
    placement.activate("high")
    assert high.loaded and not low.loaded
    placement.activate("high")
    assert placement.switches == 1
    placement.activate("low")
    assert low.loaded and not high.loaded and placement.switches == 2


def test_swapping_trained_blocks_needs_gradient_checkpointing():
    dits = _two_dits()
    placement = DiTPlacement(dits, torch.device("cpu"), blocks_to_swap=1)
    with pytest.raises(Exception, match="blocks_to_swap 1 reaches block 0"):
        _step(dits, placement, checkpointing=False)
    with pytest.raises(Exception, match="between 1 and 3"):
        DiTPlacement(_two_dits(), torch.device("cpu"), blocks_to_swap=4)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_train_cli_memory_modes_match_the_plain_run(tiny_cache, tmp_path, capsys):
    common = ["train", "--config", str(DEMO / "lora_moe_stage_b_merged.toml"), "--cache", tiny_cache,
              "--no-use_base_lora", "--max_train_steps", "2"]  # fmt: skip
    assert main([*common, "--output_dir", str(tmp_path / "plain")]) == 0
    modes = ["--offload_inactive_dit", "--blocks_to_swap", "2", "--gradient_checkpointing"]
    assert main([*common, "--output_dir", str(tmp_path / "modes"), *modes]) == 0
    plain = _tensors(tmp_path / "plain" / "lora_moe_final.safetensors")
    moved = _tensors(tmp_path / "modes" / "lora_moe_final.safetensors")
    assert plain.keys() == moved.keys() and all(torch.equal(plain[k], moved[k]) for k in plain)
    assert main([*common, "--output_dir", str(tmp_path / "fp8"), "--fp8_base"]) == 0
    assert (tmp_path / "fp8" / "lora_moe_final.safetensors").is_file()
    capsys.readouterr()
    assert_one_line_error(capsys, [*common, "--output_dir", str(tmp_path / "bad"), "--blocks_to_swap", "9"],
                          "blocks_to_swap", "between 1 and 3")  # fmt: skip
