"""Inference cost at WAN2.2-A14B scale: LoRA-MoE DiT step (unmerged / merged) vs the base DiT, and VAE throughput.

    python bench/inference.py            # on the GPU: A14B DiT, 480×832×81 (32,760 tokens), bf16
    python bench/inference.py --smoke    # tiny model on CPU

One denoising step = one DiT forward at batch 1 (WanPipeline calls the DiT separately for the conditional and
unconditional branch, so a CFG step is two of these). ``unmerged`` runs the fused LoRA-MoE branches on every
forward; ``merged`` folds the fixed route into the bf16 weights first (``--merge`` of ``lora-moe infer``).
VAE: encode of one 480×832×81 clip with the Wan2.1 VAE architecture (random weights), the latent-caching cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import build_dit, random_stage1  # noqa: E402
from lora_moe_core.adapters.network import build_network  # noqa: E402
from lora_moe_core.config import load_config  # noqa: E402
from lora_moe_core.data.vocabulary import instrument_logits  # noqa: E402


def _time(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def dit_steps(task: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], args) -> dict:
    frames, height, width = shape
    dit = build_dit(task, device, dtype).eval()
    dit.disable_gradient_checkpointing()
    text_dim = dit.config.text_dim
    latents = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, device=device, dtype=dtype)
    inputs = {"hidden_states": latents, "timestep": torch.tensor([900.0], device=device),
              "encoder_hidden_states": torch.randn(1, 512, text_dim, device=device, dtype=dtype),
              "return_dict": False}  # fmt: skip

    def forward():
        return dit(**inputs)[0]

    results = {"base": _time(forward, args.warmup, args.repeats, device)}
    folder = Path("/tmp/lora_moe_bench")
    folder.mkdir(exist_ok=True)
    config = load_config(None, {"task": task})
    stage1 = random_stage1(task, _shapes(dit), config, folder)
    config = load_config(None, {"task": task, "base_lora_weights": str(stage1)})
    network = build_network(config, dit).to(device)
    for experts in network.experts.values():
        torch.nn.init.normal_(experts.lora_B, std=0.01)
    network.route.alpha_base, network.alpha_expert = 0.7, 1.0
    network.apply_to(dit)
    gates = network.set_routing(instrument_logits(["Hook"]).to(device))
    results["unmerged"] = _time(forward, args.warmup, args.repeats, device)
    unmerged_out = forward().float()
    network.merge_into(dit, gates[0], bucket=1)  # t = 900: the high-noise bucket
    results["merged"] = _time(forward, args.warmup, args.repeats, device)
    merged_out = forward().float()
    results["merged_rel_error"] = float((merged_out - unmerged_out).norm() / unmerged_out.norm())
    return results


def _shapes(dit):
    from lora_moe_core.model.wan import linear_shapes

    return linear_shapes(dit)


@torch.no_grad()
def vae_encode(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], args, tiny: bool) -> float:
    from diffusers import AutoencoderKLWan

    from lora_moe_core.model.loading import TINY_VAE

    frames, height, width = shape
    vae = AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()  # default config = the Wan2.1 VAE
    vae = vae.to(device, dtype).eval()
    video = torch.rand(1, 3, frames, height, width, device=device, dtype=dtype) * 2 - 1
    return _time(lambda: vae.encode(video).latent_dist.mode(), 1, max(1, args.repeats // 2), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    task, device = ("tiny", torch.device("cpu")) if args.smoke else ("t2v-A14B", torch.device("cuda"))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = (9, 32, 32) if args.smoke else (81, 480, 832)
    results = dit_steps(task, device, dtype, shape, args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["vae_encode_s"] = vae_encode(device, dtype, shape, args, tiny=args.smoke)
    results["vae_clips_per_min"] = 60 / results["vae_encode_s"]
    base = results["base"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, {shape[0]}x{shape[1]}x{shape[2]}, torch {torch.__version__}")
    for mode in ("base", "unmerged", "merged"):
        print(f"{mode:9s} {results[mode] * 1000:9.1f} ms/DiT step  overhead {results[mode] / base - 1:+.2%}")
    print(f"merged vs unmerged output: rel. error {results['merged_rel_error']:.1e}")
    print(f"VAE encode {results['vae_encode_s']:.2f} s/clip = {results['vae_clips_per_min']:.1f} clips/min")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "shape": shape, "results": results}, indent=2))


if __name__ == "__main__":
    main()
