"""The command line: happy paths and one-line errors with exit code 2 for every bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.adapters.checkpoint import save_checkpoint
from lora_moe_core.cli.main import main
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, read_lora, write_lora
from tests.helpers import assert_one_line_error, make_network, randomize_experts

_fails_with = assert_one_line_error  # exit 2, one `error:` line naming the words


@pytest.fixture
def musubi_lora(tmp_path):
    modules = {"blocks.3.attn1.to_q": LoRAModuleWeights(torch.randn(4, 24), torch.randn(24, 4), 1.0)}
    path = tmp_path / "stage1.safetensors"
    write_lora(LoRAFile(modules=modules), path, to="musubi")
    return path


@pytest.fixture
def checkpoint(tmp_path, tiny_config, tiny_transformer):
    network = make_network(tiny_config, tiny_transformer)
    randomize_experts(network)
    return save_checkpoint(network, tmp_path / "lora_moe_final.safetensors")


def test_convert_lora_round_trip(tmp_path, capsys, musubi_lora):
    out = tmp_path / "comfy.safetensors"
    assert main(["convert-lora", "--input", str(musubi_lora), "--to", "comfy", "--output", str(out)]) == 0
    assert "musubi, 1 modules" in capsys.readouterr().out
    assert read_lora(out).format == "comfy"


def test_export_writes_per_regime_files(tmp_path, capsys, checkpoint):
    argv = ["export", "--lora_moe_weights", str(checkpoint), "--instrument_hint", "Hook/Electrocautery",
            "--alpha_base", "0.7", "--alpha_expert", "1.0", "--to", "comfy",
            "--output_dir", str(tmp_path / "x")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Hook=1.000" in out and "Hook.safetensors" in out  # untrained timestep gates are equal: one file
    assert read_lora(tmp_path / "x" / "Hook.safetensors").modules["blocks.3.attn1.to_q"].rank == 8


def test_show_config_applies_flags(capsys):
    assert main(["show-config", "--config", "configs/lora_moe_stage_b_merged.toml", "--learning_rate", "1e-3",
                 "--no-train_router", "--target_blocks", "2,3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert '"learning_rate": 0.001' in out and '"train_router": false' in out and "[\n      2,\n      3\n" in out


def test_bad_lora_inputs(tmp_path, capsys, musubi_lora):
    out = str(tmp_path / "out.safetensors")
    convert = ["convert-lora", "--to", "diffusers", "--output", out, "--input"]
    _fails_with(capsys, [*convert, str(tmp_path / "missing.safetensors")], "does not exist")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(musubi_lora.read_bytes()[:200])
    _fails_with(capsys, [*convert, str(truncated)], "truncated")
    nan = tmp_path / "nan.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.full((2, 4), float("nan")),
               "lora_unet_blocks_0_ffn_0.lora_up.weight": torch.zeros(4, 2)}, nan)  # fmt: skip
    _fails_with(capsys, [*convert, str(nan)], "NaN")
    odd = tmp_path / "odd.safetensors"
    save_file({"model.layers.0.q_proj.weight": torch.zeros(2, 2)}, odd)
    _fails_with(capsys, [*convert, str(odd)], "unrecognised LoRA key layout")
    pickle_file = tmp_path / "stage1.pt"
    torch.save({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(2, 2)}, pickle_file)
    _fails_with(capsys, [*convert, str(pickle_file)], "pickle")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_export_inputs(tmp_path, capsys, checkpoint, musubi_lora):
    export = ["export", "--output_dir", str(tmp_path / "x"), "--lora_moe_weights"]
    _fails_with(capsys, [*export, str(checkpoint), "--instrument_hint", "Stapler9"], "unknown instrument hint",
                "Scissors", "Hook")  # fmt: skip
    _fails_with(capsys, [*export, str(checkpoint), "--instrument_hint", "Hook", "--task", "t2v-A14B"],
                "another model size")  # fmt: skip
    _fails_with(capsys, [*export, str(musubi_lora), "--instrument_hint", "Hook"], "not a lora-moe checkpoint")


def test_bad_flags_and_config(tmp_path, capsys):
    _fails_with(capsys, ["show-config", "--learning_rate", "-1"], "training.learning_rate")
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nfoo = 1\n")
    _fails_with(capsys, ["show-config", "--config", str(bad)], "unknown config key 'router.foo'")
    with pytest.raises(SystemExit) as info:
        main(["convert-lora", "--input", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_console_entry_point_exit_code_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_moe_core",
            "convert-lora",
            "--input",
            str(tmp_path / "none.safetensors"),
            "--to",
            "comfy",
            "--output",
            str(tmp_path / "o.safetensors"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
