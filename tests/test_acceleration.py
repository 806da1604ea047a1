"""compile_blocks: one compiled graph per kind of block, never per block; attention backend selection."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lora_moe_core.config import load_config
from lora_moe_core.errors import UserError
from lora_moe_core.model.acceleration import VARIANTS_PER_KIND, block_kind, compile_blocks, set_attention_backend
from lora_moe_core.model.memory import DiTPlacement, FP8Linear
from lora_moe_core.model.wan import get_task
from lora_moe_core.training.batches import Batch
from lora_moe_core.training.monitor import EpochStats
from lora_moe_core.training.recipes import Stage2Recipe

# the tiny task with widths divisible by 16, so that fp8_fast applies as on the A14B (it skips other shapes)
WIDE_TINY = {**get_task("tiny").transformer_config, "attention_head_dim": 16, "ffn_dim": 64}


def _dit(num_layers: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**WIDE_TINY, "num_layers": num_layers}).eval().requires_grad_(False)


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    return Batch(torch.randn(1, 16, 2, 8, 8, generator=generator), torch.ones(1, 2, 8, 8), labels, labels.clone(),
                 torch.randn(1, 8, 16, generator=generator), ["a"])  # fmt: skip


def _train(num_layers: int, compiled: bool, **memory_modes) -> tuple[list[float], int, torch.nn.Module]:
    """Two Stage-2 steps on a fresh ``num_layers``-block DiT; returns losses, compiled graphs and the DiT.

    Adapters sit in the last 3 blocks (the FFN one in the last), the seed's layout in miniature: blocks without
    adapters, a first adapted block with a constant input, adapted blocks whose input carries gradients, and
    one with the FFN adapter too.
    """
    torch._dynamo.reset()
    counters.clear()
    dit = _dit(num_layers)
    overrides = {"task": "tiny", "mixed_precision": "no", "use_base_lora": False, "target_blocks": "last_3",
                 "ffn_target_blocks": "last_1", "compile_blocks": False, **memory_modes}  # fmt: skip
    config = load_config(None, overrides)
    training = config.training
    placement = DiTPlacement({"high": dit, "low": dit}, torch.device("cpu"), fp8_base=training.fp8_base,
                             fp8_fast=training.fp8_fast, blocks_to_swap=training.blocks_to_swap)  # fmt: skip
    torch.manual_seed(0)
    recipe = Stage2Recipe(config, {"high": dit, "low": dit}, torch.device("cpu"))
    placement.check_backward(True)
    if compiled:
        compile_blocks(dit, backend="eager")  # Dynamo's guards and graphs, without Inductor's C++ build on CPU
    losses = []
    for seed in range(2):
        loss, _ = recipe.loss_step(_batch(), torch.Generator().manual_seed(seed), 0.0, EpochStats())
        loss.backward()
        losses.append(loss.item())
    return losses, counters["stats"]["unique_graphs"], dit


@pytest.mark.parametrize("modes", [{}, {"fp8_base": True, "fp8_fast": True}, {"blocks_to_swap": 3}],
                         ids=["bf16", "fp8_fast", "block_swap"])  # fmt: skip
def test_compiled_graphs_do_not_grow_with_the_number_of_blocks(modes):
    losses4, graphs4, dit4 = _train(4, True, **modes)
    losses8, graphs8, dit8 = _train(8, True, **modes)
    kinds = {block_kind(block) for block in dit8.blocks}
    assert graphs4 == graphs8 > 0
    assert graphs8 <= VARIANTS_PER_KIND * len(kinds) <= torch._dynamo.config.recompile_limit
    if modes.get("fp8_base"):
        assert any(isinstance(m, FP8Linear) and m.fast for m in dit8.modules())
    # compiled or not, the same numbers (block swap's hooks run eagerly around the compiled forward)
    assert losses8 == pytest.approx(_train(8, False, **modes)[0], rel=1e-5)


def test_gpu_attention_kernels_refuse_the_cpu_and_compile_combines_with_block_swap():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        set_attention_backend(_dit(1), "cudnn", torch.device("cpu"))
    with pytest.raises(UserError, match="bad value for 'training.attention_backend'"):
        load_config(None, {"attention_backend": "xformers"})
    assert load_config(None, {"compile_blocks": True, "blocks_to_swap": 20}).training.blocks_to_swap == 20


def test_frozen_attention_runs_its_kernel_only_where_no_gradient_flows():
    from lora_moe_core.model.frozen_attention import set_frozen_attention

    calls = []

    def kernel(query, key, value):  # [B, S, H, D]: the processor's layout for FlashAttention-3
        calls.append(query.shape)
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)))
        return out.transpose(1, 2)

    dit, reference = _dit(2), _dit(2)
    with pytest.raises(UserError, match="needs a Hopper GPU"):
        set_frozen_attention(dit, "fa3_fp8", torch.device("cpu"))
    set_frozen_attention(dit, "fa3", torch.device("cpu"), kernel=kernel)
    generator = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=generator), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator)}  # fmt: skip
    with torch.no_grad():
        out, ref = dit(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]
    assert len(calls) == 2  # both blocks' self-attention (cross-attention keeps its processor)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    inputs["hidden_states"].requires_grad_(True)  # now every block is differentiated: the kernel must not run
    dit(**inputs, return_dict=False)[0].sum().backward()
    assert len(calls) == 2 and inputs["hidden_states"].grad is not None
