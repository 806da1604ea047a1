"""Config files, flag overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_moe_core.config import flag_table, load_config
from lora_moe_core.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_seed_values():
    stage1 = load_config(CONFIGS / "vanilla_lora.toml")
    assert (stage1.training.num_train_epochs, stage1.training.learning_rate) == (10, 1e-4)
    assert (stage1.training.gradient_accumulation_steps, stage1.lora.rank_q, stage1.lora.rank_k) == (8, 8, 4)
    stage2 = load_config(CONFIGS / "lora_moe_stage_b_merged.toml")
    assert (stage2.training.num_train_epochs, stage2.training.learning_rate) == (20, 5e-5)
    assert (stage2.loss.weight_routing_entropy, stage2.loss.weight_routing_load_balance) == (0.02, 0.1)
    assert (stage2.loss.weight_roi_recon, stage2.router.teacher_kl_weight, stage2.router.router_hidden_dim) == (
        3.0, 1.0, 64)  # fmt: skip
    assert stage2.lora_moe.num_experts == 4 and stage2.router.top_k == 2


def test_every_config_line_is_commented():
    for path in CONFIGS.rglob("*.toml"):
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}: uncommented knob: {line}"


def test_flags_override_file_values():
    config = load_config(
        CONFIGS / "lora_moe_stage_b_merged.toml",
        {"num_train_epochs": 3, "routing_mode": "rule_based", "expert_dim": 8, "timestep_boundaries": [500.0, 875.0]},
    )
    assert config.training.num_train_epochs == 3 and config.lora_moe.lora_dim == 8
    assert config.router.routing_mode == "rule_based" and not config.router.trains_router
    assert config.gates.timestep_boundaries == [500.0, 875.0]
    assert config.training.learning_rate == 5e-5  # untouched


def test_flag_names_are_unique_and_cover_the_seed_flags():
    table = flag_table()
    for flag in ("training_stage", "base_lora_weights", "train_router", "use_teacher_guidance", "routing_mode",
                 "num_train_epochs", "lora_dim", "lora_alpha", "target_blocks", "task"):  # fmt: skip
        assert flag in table


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[router]\nfoo = 1\n", "unknown config key 'router.foo'"),
        ("[routerz]\n", "unknown config key 'routerz'"),
        ("[router]\ntop_k = 9\n", "bad value for 'router.top_k'"),
        ("[training]\nlearning_rate = -1\n", "bad value for 'training.learning_rate'"),
        ("[lora]\ntarget_blocks = 'last8'\n", "bad value for 'lora.target_blocks'"),
        ("[lora_moe]\nnum_experts = 3\n", "must be 4"),
        ("[gates]\ntimestep_boundaries = [900.0, 100.0]\n", "strictly increasing"),
        ("[training\n", "invalid TOML"),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="config file nope.toml does not exist"):
        load_config("nope.toml")
