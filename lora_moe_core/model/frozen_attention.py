"""A faster self-attention for the DiT blocks where no gradient flows (those before the first adapter).

With truncated backprop, blocks 0-31 of the A14B run forward only, and their self-attention over 32,760 tokens
is the largest single cost of a Stage-2 step (about 38 ms a block with cuDNN on an H200, BENCHMARKS.md).
Forward-only kernels can be used there: FlashAttention-3's forward (``fa3``, bf16) or the same kernel on
float8 e4m3 ``q``/``k``/``v`` with per-head scales (``fa3_fp8``, Hopper's fp8 tensor cores, as ``fp8_fast``
does for the linears). Whether a call is forward-only is decided per call, as ``memory.FP8Linear`` does:
when autograd needs the attention (adapted blocks, their recompute in backward), the trainer's
differentiable ``attention_backend`` runs instead, so gradients stay exact.

The kernels come from the ``fa3-fwd`` package (FlashAttention-3's forward, built for Hopper), imported only
when asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_moe_core.errors import UserError

FROZEN_ATTENTION = ("off", "fa3", "fa3_fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def flash3(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward on ``[B, S, H, D]`` bf16 tensors."""
    from fa3_fwd_interface import flash_attn_func

    dtype = value.dtype  # the projections' autocast dtype; q and k leave the RMS norms in fp32
    return flash_attn_func(query.to(dtype), key.to(dtype), value)


def flash3_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 forward on e4m3 copies of ``[B, S, H, D]`` tensors, one scale per (sample, head)."""
    from fa3_fwd_interface import flash_attn_func

    quantised, descales = zip(*(_quantize_per_head(t) for t in (query, key, value)), strict=True)
    return flash_attn_func(*quantised, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])


def _quantize_per_head(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = tensor.abs().amax(dim=(1, 3)).float().clamp(min=1e-12) / FP8_MAX  # [B, H]
    return (tensor / scale[:, None, :, None].to(tensor.dtype)).to(FP8_DTYPE), scale


KERNELS: dict[str, Callable] = {"fa3": flash3, "fa3_fp8": flash3_fp8}


def _rotate(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding on interleaved pairs (``WanAttnProcessor.apply_rotary_emb``)."""
    x1, x2 = hidden.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(hidden)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden)


class ForwardOnlyAttention:
    """Self-attention processor: ``kernel`` where nothing needs a gradient, the block's own processor else.

    Args:
        fallback: the attention's original processor (its ``_attention_backend`` stays the trainer's choice).
        kernel: ``(q, k, v) -> out`` on ``[B, S, H, D]`` tensors, forward only.
    """

    def __init__(self, fallback, kernel: Callable) -> None:
        self.fallback, self.kernel = fallback, kernel

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, rotary_emb=None) -> torch.Tensor:  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None or attn.fused_projections:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(query, key, value, backend=self.fallback._attention_backend)
        else:
            out = self.kernel(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_frozen_attention(dit: nn.Module, name: str, device: torch.device, kernel: Callable | None = None) -> None:
    """Give every block's self-attention a :class:`ForwardOnlyAttention` running ``name``'s kernel.

    Args:
        kernel: use this instead of ``name``'s kernel (tests run SDPA on CPU through the same processor).
    """
    if name == "off":
        return
    if kernel is None:
        if device.type != "cuda":
            raise UserError(f"frozen_attention {name} needs a Hopper GPU; use off on {device.type}")
        try:
            import fa3_fwd_interface  # noqa: F401
        except ImportError:
            raise UserError(f"frozen_attention {name} needs FlashAttention-3's forward: pip install fa3-fwd") from None
        kernel = KERNELS[name]
    for block in dit.blocks:
        block.attn1.set_processor(ForwardOnlyAttention(block.attn1.processor, kernel))
