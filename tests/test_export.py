"""Per-instrument export: an exported standard LoRA, loaded by diffusers itself, reproduces the LoRA-MoE."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from lora_moe_core.adapters.export import export_instrument_lora
from lora_moe_core.data.vocabulary import instrument_logits
from lora_moe_core.formats.lora_files import LoRAModuleWeights, read_lora
from lora_moe_core.model.wan import build_transformer, linear_shapes
from tests.helpers import make_network, randomize_experts, run


def _inputs(timestep: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([timestep]),
            "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator)}  # fmt: skip


@pytest.fixture
def trained(tiny_config, tiny_transformer):
    shapes = linear_shapes(tiny_transformer)
    base = {
        name: LoRAModuleWeights(torch.randn(4, shapes[name][0]), torch.randn(shapes[name][1], 4) * 0.3, 1.0)
        for name in ("blocks.3.attn1.to_q", "blocks.3.attn2.to_q", "blocks.2.ffn.net.2")
    }
    network = make_network(tiny_config, tiny_transformer, base_lora=base)
    randomize_experts(network, std=0.3)
    with torch.no_grad():
        network.router.output.weight.normal_(std=0.5)
        network.timestep_gates.logits.copy_(torch.tensor([[0.3, -0.2, 0.1, 0.0], [-1.0, 0.8, 0.4, 0.2]]))
    return network


@pytest.mark.parametrize("fmt", ["diffusers", "comfy"])
def test_exported_lora_loaded_by_diffusers_reproduces_lora_moe(tmp_path, trained, tiny_transformer, fmt):
    paths, gates = export_instrument_lora(
        trained, ["Hook"], tmp_path, to=fmt, alpha_base=0.7, alpha_expert=1.0, dtype=torch.float32
    )
    assert [p.name for p in paths] == ["Hook_low_noise.safetensors", "Hook_high_noise.safetensors"]
    assert (gates > 0).sum() == 2  # a (randomly) trained router picks two experts
    trained.route.alpha_base, trained.alpha_expert = 0.7, 1.0  # what the export was asked for
    trained.apply_to(tiny_transformer)
    for path, timestep in zip(paths, (300.0, 950.0), strict=True):
        trained.set_routing(instrument_logits(["Hook"]))
        expected = run(tiny_transformer, _inputs(timestep))
        fresh = build_transformer("tiny", seed=0)
        baseline = run(fresh, _inputs(timestep))
        fresh.load_lora_adapter(WanPipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="hook")
        got = run(fresh, _inputs(timestep))
        assert (expected - baseline).norm() > 0.05 * baseline.norm()  # the adapters matter
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-3


def test_export_rank_is_sum_of_active_branches(tmp_path, trained):
    (path,) = export_instrument_lora(trained, ["Suction"], tmp_path, to="musubi", alpha_base=0.7)[0][:1]
    lora = read_lora(path)
    # q: base r4 + two active experts of r8; k: two experts of r4; cross-attn q: base only
    assert lora.modules["blocks.3.attn1.to_q"].rank == 4 + 2 * 8
    assert lora.modules["blocks.3.attn1.to_k"].rank == 2 * 4
    assert lora.modules["blocks.3.attn2.to_q"].rank == 4
    assert lora.modules["blocks.3.attn1.to_q"].alpha == lora.modules["blocks.3.attn1.to_q"].rank


def test_equal_timestep_gates_give_one_file(tmp_path, trained):
    with torch.no_grad():
        trained.timestep_gates.logits.zero_()
    paths, _ = export_instrument_lora(trained, ["Other"], tmp_path, to="comfy")
    assert [p.name for p in paths] == ["Other.safetensors"]


def test_export_leaves_the_network_as_it_was(tmp_path, trained):
    """Export routes and scales a copy: the caller's multipliers, routing and weights are untouched."""
    before = {name: value.clone() for name, value in trained.state_dict().items()}
    trained.route.alpha_base, trained.alpha_expert = 0.25, 2.0
    export_instrument_lora(trained, ["Hook"], tmp_path, to="comfy")
    assert (trained.route.alpha_base, trained.alpha_expert) == (0.25, 2.0)
    assert all(torch.equal(before[name], value) for name, value in trained.state_dict().items())


def test_export_defaults_are_the_seed_inference_multipliers(tmp_path, trained):
    """Without flags, the exported file equals one exported with infer's --alpha_base 0.7 --alpha_expert 1.0."""
    default = read_lora(export_instrument_lora(trained, ["Hook"], tmp_path / "a", to="comfy")[0][0])
    seeded = read_lora(export_instrument_lora(trained, ["Hook"], tmp_path / "b", to="comfy", alpha_base=0.7,
                                              alpha_expert=1.0)[0][0])  # fmt: skip
    one = read_lora(export_instrument_lora(trained, ["Hook"], tmp_path / "c", to="comfy", alpha_base=1.0)[0][0])
    name = "blocks.3.attn1.to_q"
    assert default.modules[name].up.dtype == torch.float32
    assert torch.equal(default.modules[name].up, seeded.modules[name].up)
    assert not torch.allclose(default.modules[name].up, one.modules[name].up)
