"""A deterministic encoder for the ``tiny`` task: the Wan VAE class with hand-set weights (patch-average colour).

Why: a randomly initialised ``AutoencoderKLWan`` scrambles what tells the synthetic instrument families apart
(a linear probe on its latents was at chance, 23–26%, where one on the pixels reached 71–76%), so nothing a
LoRA-MoE learns on the tiny task could be family-specific. Here every encoder weight is set by rule instead:

* ``conv_in`` copies R, G, B of the current frame into channels 0–2 and puts a constant 1 in channel 3;
* residual blocks and the mid attention add nothing (their last projections are zero), so they are identities;
* each spatial downsample averages 2×2 cells (three of them: 8×8 patches); each temporal downsample averages
  frame pairs, so latent frame 0 is pixel frame 0 and latent frame k the mean of pixel frames 4k-3..4k,
  Wan's causal layout;
* the head's RMS norm over (R, G, B, 1) is invertible thanks to the constant channel, and ``conv_out`` mixes the
  four normalised values into the 16 latent channels with a fixed seeded matrix.

So a latent cell is a smooth, invertible function of its 8×8 patch's mean colour. The class, the causal chunked
encode, the saved diffusers folder and the latent normalisation are all the ones the A14B VAE uses; only the
numbers differ. The decoder keeps its seeded random weights: generated tiny clips are noise either way (the
tiny DiTs are random), and nothing evaluated is decoded.
"""

from __future__ import annotations

import torch
from torch import nn

CONSTANT = 1.0  # value of the constant channel: makes the head's RMS norm invertible
HEAD_GAIN = 0.5  # norm gain: keeps normalised values inside SiLU's monotone range (> -1.28)


def _conv_tap(conv: nn.Module) -> tuple[int, ...]:
    """Index of the current-frame, centre tap of a (causal) conv kernel: the last time tap, middle in space."""
    kernel = conv.weight.shape[2:]
    return (kernel[0] - 1, *(size // 2 for size in kernel[1:]))


@torch.no_grad()
def make_patch_average_encoder(vae: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite ``vae``'s encoder weights in place (see the module docstring); returns ``vae``.

    Expects the non-residual Wan 2.1 layout with ``base_dim >= 4`` (``models.TINY_VAE``).
    """
    encoder = vae.encoder
    for module in [encoder, vae.quant_conv]:
        for param in module.parameters():
            param.zero_()
    dim = encoder.conv_in.weight.shape[0]
    if dim < 4:
        raise ValueError(f"the patch-average encoder needs base_dim >= 4, got {dim}")
    tap = _conv_tap(encoder.conv_in)
    for channel in range(3):
        encoder.conv_in.weight[(channel, channel, *tap)] = 1.0
    encoder.conv_in.bias[3] = CONSTANT
    for module in encoder.modules():
        if hasattr(module, "norm1") or hasattr(module, "to_qkv"):  # residual and attention blocks: keep gains
            for name, param in module.named_parameters():
                if "gamma" in name:
                    param.fill_(1.0)
        if getattr(module, "mode", None) in ("downsample2d", "downsample3d"):
            spatial = module.resample[1]  # after ZeroPad2d((0, 1, 0, 1)): taps 0..1 cover the 2×2 cell
            for channel in range(dim):
                spatial.weight[channel, channel, :2, :2] = 0.25
            if module.mode == "downsample3d":  # causal stride-2 time conv over (previous, a, b): mean of a, b
                for channel in range(dim):
                    module.time_conv.weight[channel, channel, 1:, 0, 0] = 0.5
    encoder.norm_out.gamma.fill_(HEAD_GAIN)
    generator = torch.Generator().manual_seed(seed)
    out_channels = encoder.conv_out.weight.shape[0]
    z_dim = out_channels // 2
    mixing = torch.randn(z_dim, 4, generator=generator) / 2.0  # [16, 4]: R, G, B, constant → mean channels
    tap = _conv_tap(encoder.conv_out)
    encoder.conv_out.weight[(slice(0, z_dim), slice(0, 4), *tap)] = mixing
    encoder.conv_out.bias[z_dim:] = -6.0  # log-variance: a near-deterministic posterior (mode() is the mean)
    for channel in range(out_channels):
        vae.quant_conv.weight[channel, channel, 0, 0, 0] = 1.0
    return vae
