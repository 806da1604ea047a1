"""Stage-2 checkpoint: round trip, key layout, validation against the model, Stage-1 input formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_moe_core.adapters.checkpoint import load_network, save_checkpoint
from lora_moe_core.adapters.network import build_network
from lora_moe_core.config import load_config
from lora_moe_core.data.vocabulary import instrument_logits
from lora_moe_core.errors import UserError
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, read_lora, write_lora
from lora_moe_core.model.wan import linear_shapes, task_linear_shapes
from tests.helpers import make_network, randomize_experts, run


def _trained_network(config, transformer):
    base = {"blocks.3.attn1.to_q": LoRAModuleWeights(torch.randn(4, 24), torch.randn(24, 4), 2.0)}
    network = make_network(config, transformer, base_lora=base)
    randomize_experts(network)
    with torch.no_grad():
        network.router.output.weight.normal_()
        network.timestep_gates.logits.normal_()
    network.gate_stats.update(torch.tensor([[0.0, 0.7, 0.3, 0.0]]))
    return network


def test_round_trip_restores_every_tensor_and_the_output(tmp_path, tiny_config, tiny_transformer, tiny_inputs):
    network = _trained_network(tiny_config, tiny_transformer)
    path = save_checkpoint(network, tmp_path / "lora_moe_final.safetensors")
    loaded = load_network(path, linear_shapes(tiny_transformer))
    for (name, a), (_, b) in zip(network.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    logits = torch.stack([instrument_logits(["Hook"]), instrument_logits(["Suction", "Other"])])
    network.apply_to(tiny_transformer)
    network.set_routing(logits)
    expected = run(tiny_transformer, tiny_inputs)
    network.remove_from(tiny_transformer)
    loaded.apply_to(tiny_transformer)
    loaded.set_routing(logits)
    torch.testing.assert_close(run(tiny_transformer, tiny_inputs), expected, rtol=0, atol=0)


def test_key_layout_and_metadata(tmp_path, tiny_config, tiny_transformer):
    path = save_checkpoint(_trained_network(tiny_config, tiny_transformer), tmp_path / "ckpt.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        assert handle.get_tensor("expert_lora_A.blocks.3.attn1.to_q").shape == (4, 8, 24)  # [E, r, in]
        assert handle.get_tensor("expert_lora_B.blocks.3.ffn.net.0.proj").shape == (4, 32, 4)  # [E, out, r]
    assert {"base_lora_A.blocks.3.attn1.to_q", "base_lora_B.blocks.3.attn1.to_q", "router_hidden.weight"} <= keys
    assert {"timestep_gate_logits", "gate_stats_usage"} <= keys
    assert all(k.startswith(("base_lora_", "expert_lora_", "router_", "timestep_gate_", "gate_stats_")) for k in keys)
    assert metadata["format_version"] == "1"
    assert json.loads(metadata["lora_moe.families"]) == ["Scissors", "Hook", "Suction", "Other"]
    assert json.loads(metadata["lora_moe.config"])["router"]["router_hidden_dim"] == 64


def test_checkpoint_for_another_model_size_fails_clearly(tmp_path, tiny_config, tiny_transformer):
    path = save_checkpoint(_trained_network(tiny_config, tiny_transformer), tmp_path / "ckpt.safetensors")
    with pytest.raises(UserError, match="24->24 but the model's linear is 5120->5120"):
        load_network(path, task_linear_shapes("t2v-A14B"))


def test_tampered_checkpoints_fail_with_one_line(tmp_path, tiny_config, tiny_transformer):
    path = save_checkpoint(_trained_network(tiny_config, tiny_transformer), tmp_path / "ckpt.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    cases = {
        "unexpected key": ({**tensors, "mystery": torch.zeros(1)}, metadata),
        "missing key 'router_output.bias'": ({k: v for k, v in tensors.items() if k != "router_output.bias"}, metadata),
        "lacks its A, B or alpha": (
            {k: v for k, v in tensors.items() if k != "expert_lora_B.blocks.0.attn1.to_q"}, metadata),
        "format_version": (tensors, {**metadata, "format_version": "0"}),
        "has shape": ({**tensors, "timestep_gate_logits": torch.zeros(3, 4)}, metadata),
    }  # fmt: skip
    for expected, (state, meta) in cases.items():
        bad = tmp_path / "bad.safetensors"
        save_file(state, bad, metadata=meta)
        with pytest.raises(UserError, match=expected) as info:
            load_network(bad, linear_shapes(tiny_transformer))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["musubi", "comfy", "diffusers"])
def test_stage2_accepts_stage1_lora_in_every_format(tmp_path, fmt, tiny_transformer):
    shapes = linear_shapes(tiny_transformer)
    names = ["blocks.2.attn1.to_q", "blocks.3.attn1.to_v", "blocks.3.attn2.to_k", "blocks.3.ffn.net.2"]
    modules = {n: LoRAModuleWeights(torch.randn(4, shapes[n][0]), torch.randn(shapes[n][1], 4), 1.0) for n in names}
    path = tmp_path / f"stage1_{fmt}.safetensors"
    write_lora(LoRAFile(modules=modules), path, to=fmt)
    config = load_config(None, {"task": "tiny", "base_lora_weights": str(path)})
    network = build_network(config, tiny_transformer)
    assert set(network.base_loras) == {n.replace(".", "__") for n in names}
    for name in names:
        ours = network.base_loras[name.replace(".", "__")].delta_weight()
        torch.testing.assert_close(ours, modules[name].delta_weight(), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in network.base_loras.parameters())


def test_stage1_lora_for_another_model_fails_clearly(tmp_path, tiny_transformer):
    big = {"blocks.39.attn1.to_q": LoRAModuleWeights(torch.randn(4, 5120), torch.zeros(5120, 4), 1.0)}
    path = tmp_path / "a14b_stage1.safetensors"
    write_lora(LoRAFile(modules=big), path, to="musubi")
    assert read_lora(path).format == "musubi"
    config = load_config(None, {"task": "tiny", "base_lora_weights": str(path)})
    with pytest.raises(UserError, match="does not fit this model: adapter module 'blocks.39.attn1.to_q' does not"):
        build_network(config, tiny_transformer)


def test_written_safetensors_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    import os

    from lora_moe_core.formats.safetensors_io import write_safetensors

    previous = os.umask(0o002)  # a shared volume's group-writable setting
    try:
        path = write_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors", None)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o664
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it
