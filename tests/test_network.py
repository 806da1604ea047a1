"""LoRA-MoE injected into a tiny diffusers WanTransformer3DModel: targets, routing, trainability, merge."""

from __future__ import annotations

import torch

from lora_moe_core.adapters.lora import LoRAWeights
from lora_moe_core.adapters.moe import LoRAMoELinear
from lora_moe_core.adapters.network import LoRAMoENetwork, LoRANetwork
from lora_moe_core.data.vocabulary import instrument_logits
from lora_moe_core.formats.lora_files import LoRAModuleWeights
from lora_moe_core.model.wan import build_transformer, linear_shapes, resolve_targets, task_linear_shapes
from tests.helpers import make_network, randomize_experts, run


def test_seed_targets_on_a14b_shapes():
    shapes = task_linear_shapes("t2v-A14B")
    from lora_moe_core.config import load_config

    targets = resolve_targets(load_config(None).lora, 40)
    assert len(targets) == 8 * 4 + 3
    assert targets["blocks.39.attn1.to_q"] == 8 and targets["blocks.32.attn1.to_k"] == 4
    assert "blocks.31.attn1.to_q" not in targets and "blocks.36.ffn.net.0.proj" not in targets
    assert targets["blocks.37.ffn.net.0.proj"] == 4
    network = LoRAMoENetwork(load_config(None), targets, shapes)
    per_expert = sum(e.lora_A[0].numel() + e.lora_B[0].numel() for e in network.experts.values())
    # 8 blocks × (q r8 + k,v,o r4) × (5120+5120) + 3 blocks × r4 × (5120+13824): the reference's "≈ 1.87 M"
    assert per_expert == 8 * (8 + 3 * 4) * 10240 + 3 * 4 * 18944 == 1_865_728


def test_injection_wraps_only_targets_and_starts_as_identity(tiny_config, tiny_transformer, tiny_inputs):
    before = run(tiny_transformer, tiny_inputs)
    network = make_network(tiny_config, tiny_transformer)
    network.apply_to(tiny_transformer)
    wrapped = {n for n, m in tiny_transformer.named_modules() if isinstance(m, LoRAMoELinear)}
    assert wrapped == set(resolve_targets(tiny_config.lora, 4))
    network.set_routing(torch.stack([instrument_logits(["Hook"]), instrument_logits(["Scissors"])]))
    torch.testing.assert_close(run(tiny_transformer, tiny_inputs), before, rtol=0, atol=0)
    assert network.remove_from(tiny_transformer) == len(wrapped)
    assert not any(isinstance(m, LoRAMoELinear) for m in tiny_transformer.modules())


def test_one_adapter_set_serves_both_dits(tiny_config, tiny_inputs):
    high, low = build_transformer("tiny", seed=1), build_transformer("tiny", seed=2)
    network = make_network(tiny_config, high)
    randomize_experts(network)
    network.apply_to(high)
    network.apply_to(low)
    assert high.blocks[3].attn1.to_q.experts is low.blocks[3].attn1.to_q.experts
    assert high.blocks[3].attn1.to_q.base_layer is not low.blocks[3].attn1.to_q.base_layer
    network.set_routing(instrument_logits(["Hook"]))
    delta_high = run(high, tiny_inputs) - _without(network, high, tiny_inputs)
    assert delta_high.abs().max() > 1e-3


def _without(network, transformer, inputs):
    saved = network.alpha_expert
    network.alpha_expert = 0.0
    out = run(transformer, inputs)
    network.alpha_expert = saved
    return out


def test_stage_b_gradients_reach_only_experts_router_and_gates(tiny_config, tiny_transformer, tiny_inputs):
    base = {"blocks.3.attn2.to_q": LoRAModuleWeights(torch.randn(4, 24), torch.randn(24, 4), 1.0)}
    network = make_network(tiny_config, tiny_transformer, base_lora=base)
    randomize_experts(network)
    network.set_trainable("stage_b")
    network.apply_to(tiny_transformer)
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 1.5, 0.0]])
    network.set_routing(logits)
    run(tiny_transformer, tiny_inputs).square().mean().backward()
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    assert all(name.startswith(("experts.", "router.", "timestep_gates.")) for name in trainable)
    assert not any(p.requires_grad for p in tiny_transformer.parameters() if not _is_adapter(tiny_transformer, p))
    assert network.base_loras["blocks__3__attn2__to_q"].lora_B.grad is None
    assert all(network.experts[k].lora_B.grad.abs().sum() > 0 for k in network.experts)
    assert network.timestep_gates.logits.grad.abs().sum() > 0
    assert network.router.output.weight.grad.abs().sum() > 0  # the router learns through the gates


def _is_adapter(transformer, param):
    return any(param is q for m in transformer.modules() if isinstance(m, LoRAMoELinear) for q in m.parameters()
               if q is not m.base_layer.weight and q is not m.base_layer.bias)  # fmt: skip


def test_stage_c_trains_router_only(tiny_config, tiny_transformer):
    network = make_network(tiny_config, tiny_transformer)
    network.set_trainable("stage_c")
    assert {n.split(".")[0] for n, p in network.named_parameters() if p.requires_grad} == {"router"}


def test_timestep_gate_applies_per_sample(tiny_config, tiny_transformer, tiny_inputs):
    network = make_network(tiny_config, tiny_transformer)
    network.set_routing(instrument_logits(["Hook"]))
    with torch.no_grad():
        network.timestep_gates.logits[1] = -30.0  # high-noise bucket: experts off
    scale = network.expert_scale(tiny_inputs["timestep"])  # samples at t=950 and t=300
    torch.testing.assert_close(scale[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert scale[0].abs().max() < 1e-6


def test_merge_into_high_noise_dit_equals_unmerged(tiny_config, tiny_transformer):
    network = make_network(tiny_config, tiny_transformer, base_lora=_random_base(tiny_transformer))
    randomize_experts(network)
    network.apply_to(tiny_transformer)
    with torch.no_grad():
        network.timestep_gates.logits[1] = torch.tensor([0.5, -0.5, 1.0, 0.0])
    gates = network.set_routing(torch.tensor([0.0, 3.0, 2.0, 0.0]))
    inputs = _high_noise_inputs()
    unmerged = run(tiny_transformer, inputs)
    network.merge_into(tiny_transformer, gates, bucket=1)
    torch.testing.assert_close(run(tiny_transformer, inputs), unmerged, rtol=0, atol=1e-5)
    network.unmerge_from(tiny_transformer)
    torch.testing.assert_close(run(tiny_transformer, inputs), unmerged, rtol=0, atol=1e-5)


def _random_base(transformer) -> dict[str, LoRAModuleWeights]:
    shapes = linear_shapes(transformer)
    names = ["blocks.2.attn1.to_q", "blocks.3.attn1.to_q", "blocks.3.attn2.to_k", "blocks.3.ffn.net.2"]
    return {n: LoRAModuleWeights(torch.randn(4, shapes[n][0]), torch.randn(shapes[n][1], 4) * 0.1, 1.0) for n in names}


def _high_noise_inputs():
    generator = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 3, 8, 8, generator=generator), "timestep": torch.tensor([960.0]),
            "encoder_hidden_states": torch.randn(1, 12, 16, generator=generator)}  # fmt: skip


def test_vanilla_lora_network_wraps_and_exports_modules(tiny_config, tiny_transformer, tiny_inputs):
    before = run(tiny_transformer, tiny_inputs)
    targets = resolve_targets(tiny_config.lora, 4)
    network = LoRANetwork(targets, linear_shapes(tiny_transformer), alpha=1.0)
    network.apply_to(tiny_transformer)
    torch.testing.assert_close(run(tiny_transformer, tiny_inputs), before, rtol=0, atol=0)
    modules = network.to_modules()
    assert modules["blocks.3.attn1.to_q"].rank == 8 and modules["blocks.3.attn1.to_q"].alpha == 1.0
    assert isinstance(next(iter(network.loras.values())), LoRAWeights)
    assert LoRANetwork.remove_from(tiny_transformer) == len(targets)
