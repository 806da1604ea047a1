"""Training end to end on the tiny model: stages 1-3, exact resume after SIGKILL, NaN stop, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_moe_core.cli.main import main
from lora_moe_core.config import load_config
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, read_lora, write_lora
from lora_moe_core.model.wan import build_transformer
from lora_moe_core.training.recipes import Stage2Recipe
from tests.helpers import assert_one_line_error, unlabelled_copy

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _stage1(cache: str, out: Path) -> Path:
    argv = ["train", "--config", str(DEMO / "vanilla_lora.toml"), "--cache", cache, "--output_dir", str(out),
            "--num_train_epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    return out / "lora_final.safetensors"


@pytest.fixture(scope="module")
def stage1(tiny_cache, tmp_path_factory) -> Path:
    return _stage1(tiny_cache, tmp_path_factory.mktemp("stage1"))


def _stage2_argv(cache: str, stage1: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(DEMO / "lora_moe_stage_b_merged.toml"), "--cache", cache,
            "--base_lora_weights", str(stage1), "--output_dir", str(out), *extra]  # fmt: skip


def test_stage1_writes_a_musubi_lora_on_the_seed_targets(stage1):
    lora = read_lora(stage1)
    assert lora.format == "musubi"
    assert lora.modules["blocks.3.attn1.to_q"].rank == 8 and lora.modules["blocks.1.ffn.net.0.proj"].rank == 4
    assert "blocks.0.ffn.net.0.proj" not in lora.modules
    assert any(m.up.abs().sum() > 0 for m in lora.modules.values())  # trained away from B = 0
    assert json.loads((stage1.parent / "training_state_final.json").read_text())["step"] == 4


def test_stage2_keeps_base_frozen_and_trains_experts_router_gates(tiny_cache, stage1, tmp_path, capsys):
    assert main(_stage2_argv(tiny_cache, stage1, tmp_path, "--num_train_epochs", "2")) == 0
    printed = capsys.readouterr().out
    assert "epoch 2," in printed and "routing acc" in printed
    checkpoint = _tensors(tmp_path / "lora_moe_final.safetensors")
    stage1_lora = read_lora(stage1).modules["blocks.3.attn1.to_q"]
    torch.testing.assert_close(checkpoint["base_lora_B.blocks.3.attn1.to_q"], stage1_lora.up.float())
    assert checkpoint["expert_lora_B.blocks.3.attn1.to_q"].abs().sum() > 0
    assert checkpoint["router_output.weight"].abs().sum() > 0 and checkpoint["timestep_gate_logits"].abs().sum() > 0
    state = json.loads((tmp_path / "training_state_final.json").read_text())
    assert state["history"][-1]["routing_accuracy"] == 1.0  # the router follows the caption labels


def test_stage3_and_rule_based_leave_what_they_must_untouched(tiny_cache, stage1, tmp_path):
    assert main(_stage2_argv(tiny_cache, stage1, tmp_path / "b", "--num_train_epochs", "1")) == 0
    stage_b = _tensors(tmp_path / "b" / "lora_moe_final.safetensors")
    argv = _stage2_argv(tiny_cache, stage1, tmp_path / "c", "--num_train_epochs", "1", "--training_stage", "stage_c",
                        "--lora_moe_weights", str(tmp_path / "b" / "lora_moe_final.safetensors"))  # fmt: skip
    assert main(argv) == 0
    stage_c = _tensors(tmp_path / "c" / "lora_moe_final.safetensors")
    assert not torch.equal(stage_c["router_output.weight"], stage_b["router_output.weight"])
    for key in stage_b:
        if key.startswith(("expert_lora_", "base_lora_", "timestep_gate_")):
            assert torch.equal(stage_c[key], stage_b[key]), key
    argv = _stage2_argv(tiny_cache, stage1, tmp_path / "r", "--num_train_epochs", "1", "--routing_mode", "rule_based")
    assert main(argv) == 0
    rule = _tensors(tmp_path / "r" / "lora_moe_final.safetensors")
    assert rule["router_output.weight"].abs().sum() == 0  # router frozen at its initial (teacher) route
    assert rule["expert_lora_B.blocks.3.attn1.to_q"].abs().sum() > 0


def _run_cli(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_moe_core", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_cache, stage1, tmp_path):
    common = ["--max_train_steps", "12", "--save_every_n_steps", "4", "--seed", "1", "--num_train_epochs", "20"]
    assert main(_stage2_argv(tiny_cache, stage1, tmp_path / "full", *common)) == 0
    killed = tmp_path / "killed"
    process = _run_cli(_stage2_argv(tiny_cache, stage1, killed, *common))
    deadline = time.monotonic() + 240
    while not (killed / "training_state_step_4.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no step-4 save appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for late in [*killed.glob("*_step_8*"), *killed.glob("*_step_12*"), *killed.glob("*final*")]:
        late.unlink()  # if the run outpaced the kill, make it as if it had died right after step 4
    assert (killed / "lora_moe_step_4.safetensors").exists()
    assert main(_stage2_argv(tiny_cache, stage1, killed, *common, "--resume", "auto")) == 0
    full, resumed = (
        _tensors(tmp_path / "full" / "lora_moe_final.safetensors"),
        _tensors(killed / "lora_moe_final.safetensors"),
    )
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)  # bit-identical
    assert json.loads((killed / "training_state_final.json").read_text())["step"] == 12


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_cache, stage1, tmp_path, capsys):
    poisoned = tmp_path / "cache"
    shutil.copytree(tiny_cache, poisoned)
    for path in sorted(poisoned.glob("*_wan.safetensors"))[:8]:
        tensors = _tensors(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        key = next(k for k in tensors if k.startswith("latents_"))
        tensors[key] = tensors[key].float().mul(1e30).to(torch.bfloat16)  # overflows to inf in the loss
        save_file(tensors, path, metadata=metadata)
    argv = _stage2_argv(str(poisoned), stage1, tmp_path / "run", "--num_train_epochs", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "last good checkpoint" in err and err.count("\n") == 1


def test_no_backward_through_blocks_without_adapters(tiny_cache, stage1):
    overrides = {"base_lora_weights": str(stage1), "ffn_target_blocks": "last_1", "target_blocks": "2-3"}
    config = load_config(DEMO / "lora_moe_stage_b_merged.toml", overrides)
    dits = {"high": build_transformer("tiny", seed=0), "low": build_transformer("tiny", seed=1)}
    recipe = Stage2Recipe(config, dits, torch.device("cpu"))
    reached = []
    for dit in dits.values():
        for index, block in enumerate(dit.blocks):
            block.register_full_backward_hook(lambda *args, index=index: reached.append(index))
    from lora_moe_core.data.latent_cache import read_cache
    from lora_moe_core.training.batches import collate
    from lora_moe_core.training.monitor import EpochStats

    loss, _ = recipe.loss_step(collate(read_cache(tiny_cache)[:1]), torch.Generator().manual_seed(0), 0.0, EpochStats())
    loss.backward()
    assert set(reached) == {2, 3}  # blocks 0-1 hold only frozen weights (base LoRA included): never differentiated


def test_bad_training_inputs_fail_with_one_line(tiny_cache, stage1, tmp_path, capsys):
    def fails(argv, *words):
        assert_one_line_error(capsys, argv, *words)

    big = tmp_path / "a14b_stage1.safetensors"
    write_lora(
        LoRAFile(modules={"blocks.39.attn1.to_q": LoRAModuleWeights(torch.zeros(4, 5120), torch.zeros(5120, 4), 1.0)}),
        big,
        to="musubi",
    )
    fails(_stage2_argv(tiny_cache, big, tmp_path / "x"), "does not fit this model")
    other_blocks = tmp_path / "other_blocks.safetensors"
    write_lora(
        LoRAFile(modules={"blocks.7.attn1.to_q": LoRAModuleWeights(torch.zeros(4, 24), torch.zeros(24, 4), 1.0)}),
        other_blocks,
        to="comfy",
    )
    fails(_stage2_argv(tiny_cache, other_blocks, tmp_path / "x"), "blocks.7.attn1.to_q")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[training]\nlearning_rat = 1e-4\n")
    fails(["train", "--config", str(bad_config), "--cache", tiny_cache], "unknown config key 'training.learning_rat'")
    (tmp_path / "empty").mkdir()
    fails(_stage2_argv(str(tmp_path / "empty"), stage1, tmp_path / "x"), "holds no latent files")
    fails(["train", "--config", str(DEMO / "vanilla_lora.toml")], "no latent cache given")
    unlabelled = unlabelled_copy(tiny_cache, tmp_path / "unlabelled")
    fails(_stage2_argv(unlabelled, stage1, tmp_path / "x"), "has an instrument label")


def test_two_process_data_parallel_training(tiny_cache, stage1, tmp_path):
    """torchrun with 2 CPU processes (gloo): shared gradients and gathered gate statistics, one writer."""
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--nproc_per_node", "2", "-m", "lora_moe_core",
            *_stage2_argv(tiny_cache, stage1, tmp_path, "--num_train_epochs", "1")]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = json.loads((tmp_path / "training_state_final.json").read_text())
    assert state["step"] == 2  # 8 clips / 2 ranks / 2 accumulation steps
    assert state["history"][0]["routed_clips"] == 8  # the epoch summary merges both ranks' 4 clips
    assert result.stdout.count("wrote ") == 1
    weights = _tensors(tmp_path / "lora_moe_final.safetensors")
    assert all(torch.isfinite(tensor.float()).all() for tensor in weights.values())


def test_epoch_statistics_of_two_ranks_merge_to_those_of_one():
    from lora_moe_core.training.monitor import EpochStats

    generator = torch.Generator().manual_seed(0)
    gates = torch.softmax(torch.randn(8, 4, generator=generator), dim=1)
    soft = torch.softmax(torch.randn(8, 4, generator=generator), dim=1)
    labels = torch.eye(4).repeat(2, 1)
    whole, halves = EpochStats(), [EpochStats(), EpochStats()]
    whole.add_routing(gates, soft, labels)
    for index, half in enumerate(halves):
        rows = slice(4 * index, 4 * index + 4)
        half.add_routing(gates[rows], soft[rows], labels[rows])
        half.add({"loss": float(index + 1)})
    whole.add({"loss": 1.0})
    whole.add({"loss": 2.0})
    merged, reference = EpochStats.merge(halves).summary(), whole.summary()
    assert merged.keys() == reference.keys() and merged["routed_clips"] == 8 and merged["loss"] == 1.5
    assert all(abs(merged[k] - reference[k]) < 1e-12 for k in merged)
