"""Step-time settings of the trainer: regional compilation of the DiT blocks and the attention kernel.

``compile_blocks`` compiles the block class's ``forward`` once, as one function shared by every block of every
DiT, and leaves each block's ``nn.Module.__call__`` (and so its hooks) eager:

* Dynamo keeps its compiled variants per code object, for the whole process. Blocks are not all alike (plain
  ones, fp8 ones, ones with adapters in attention, in the FFN too), so the shared ``forward`` gets one graph per
  *kind* of block and per grad state of its input, never one per block: the recompile limit is raised to cover
  the kinds actually present (``VARIANTS_PER_KIND`` each), with no dependence on the depth of the DiT.
* Forward pre-hooks stay outside the graph. Block swap (``memory.BlockSwapper``) loads a block's weights from a
  hook; traced, the hook's per-block state would specialise every block's graph (a recompile per block) and its
  copies would break the graph. Run eagerly, it only points the parameters at other storage of the same shape,
  which the compiled graph takes as inputs.

diffusers' ``compile_repeated_blocks`` compiles each block's ``_call_impl`` instead, whose cache is shared with
every other compiled module of the process, hooks included; a peft and an fp8 run in one process then exhaust
Dynamo's default limit of 8 and the remaining blocks silently run uncompiled (issue 16).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from lora_moe_core.errors import UserError

# Graphs one kind of block can need: its input with or without requires_grad (the first adapted block gets a
# constant input, the next ones an input that carries gradients) × grad mode on or off (training, evaluation).
VARIANTS_PER_KIND = 4

# attention_backend → diffusers' attention dispatcher name. All of them differentiate (trained blocks need it).
ATTENTION_BACKENDS = {"sdpa": "native", "cudnn": "_native_cudnn", "flash": "_native_flash",
                      "efficient": "_native_efficient"}  # fmt: skip
_kinds: set[tuple] = set()  # every block kind compiled in this process (Dynamo's cache is process-wide)
_compiled: dict[tuple, Callable] = {}  # one compiled forward per block class and compile options


def block_kind(block: nn.Module) -> tuple:
    """What Dynamo specialises a block's graph on: its module types and its parameters' shapes/dtypes/grads.

    Two blocks of one kind share every guard of the shared compiled ``forward``; indices and ids are not part
    of it, so the number of kinds does not grow with the number of blocks.
    """
    modules = tuple((name, type(module).__qualname__) for name, module in block.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in block.named_parameters())
    return modules, params


def compile_blocks(dit: nn.Module, **compile_options) -> int:
    """Compile ``dit.blocks`` through one shared compiled ``forward``; returns the recompile limit now in force.

    Call it after adapters and fp8 linears are in place (they decide the block kinds). Compilation itself
    happens lazily, at the first forward of each kind.

    Args:
        dit: a model with a ``blocks`` ``ModuleList`` of one class (diffusers' ``WanTransformer3DModel``).
        compile_options: passed to ``torch.compile`` (tests use ``backend="eager"`` on CPU).
    """
    blocks = list(dit.blocks)
    block_class = type(blocks[0])
    if any(type(block) is not block_class for block in blocks):
        raise UserError(f"compile_blocks needs blocks of one class, got {sorted({type(b).__name__ for b in blocks})}")
    key = (block_class, tuple(sorted(compile_options.items())))
    if key not in _compiled:
        _compiled[key] = torch.compile(block_class.forward, **compile_options)
    for block in blocks:
        # an instance attribute: nn.Module.__call__ runs the hooks eagerly, then this compiled forward
        block.forward = types.MethodType(_compiled[key], block)
        _kinds.add(block_kind(block))
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, VARIANTS_PER_KIND * len(_kinds))
    return config.recompile_limit


def set_attention_backend(dit: nn.Module, name: str, device: torch.device) -> None:
    """Force every attention of ``dit`` through the SDPA kernel ``name`` ("sdpa": let PyTorch choose).

    On the H200 with torch 2.11, PyTorch's own choice already is cuDNN's kernel, and forcing it adds a copy of
    q/k/v (BENCHMARKS.md, issue 16); the other kernels are there to compare and for other cards.
    """
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention_backend '{name}'; valid: {', '.join(ATTENTION_BACKENDS)}")
    if name != "sdpa" and device.type != "cuda":
        raise UserError(f"attention_backend {name} needs a CUDA GPU; use sdpa on {device.type}")
    if name != "sdpa":  # diffusers' default already is plain SDPA
        dit.set_attention_backend(ATTENTION_BACKENDS[name])
