"""Training-step benchmark at WAN2.2-A14B scale: our Stage-2 step vs diffusers+peft vanilla LoRA vs full backprop.

    python bench/train_step.py                    # A14B DiT, 480×832×81 (32,760 tokens), bf16, on the GPU
    python bench/train_step.py --smoke            # tiny model on CPU: keeps the script working in CI

Modes (each on a freshly built DiT with random bf16 weights, gradient checkpointing on, batch 1):
  full   the seed's targets with peft, but backward through all 40 blocks (input requires grad: musubi-tuner)
  peft   diffusers + peft vanilla LoRA on the seed's targets (backward stops at the first adapted block)
  ours   our Stage-2 step: base LoRA + 4 fused experts + router + timestep gates, every loss of the seed on
  loop   ours with a per-expert Python loop instead of the fused product pair (the design we rejected)
  trainer  ours through the trainer's own code (run.prepare_recipe + TrainingLoop over an in-memory cache);
         its batches differ from ours', so only its time compares
Options join a mode with "+" (e.g. ``ours+compile+fp8fast``), each through the trainer's own config:
  compile   torch.compile of the DiT blocks, one graph per kind of block (compile_blocks); peft+compile
            uses diffusers' compile_repeated_blocks, as a peft user would
  fp8       frozen block linears stored in fp8 e4m3, per-channel scales (fp8_base)
  fp8fast   fp8 + fp8 tensor-core matmuls in the blocks before the first adapter (fp8_fast)
  swap      stream the first 20 blocks' weights from host memory (blocks_to_swap 20)
  nockpt    no gradient checkpointing (peak memory grows with the adapted blocks' activations)
  fa3, fa3fp8  FlashAttention-3 forward (bf16, or fp8 q/k/v) in the blocks before the first adapter
            (frozen_attention)
  sdpa, cudnn, flash, efficient   the attention kernel (attention_backend; ours and trainer default to sdpa
            here, PyTorch's own choice, so that plain ours stays the reference of the loss comparison)
("compiled" and "peft_compiled" are the older names of ours+compile and peft+compile.)
Prints s/step (median), peak GiB, achieved TFLOP/s on the FLOPs that must be done, compiled graphs, ratios,
and each ours variant's loss against plain ours on the same batches. Dynamo is reset between modes and a
recompile-limit hit is an error, so no figure can come from blocks that silently ran uncompiled.
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

from lora_moe_core.config import load_config  # noqa: E402
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, write_lora  # noqa: E402
from lora_moe_core.model.wan import get_task, linear_shapes, resolve_targets  # noqa: E402


def build_dit(task: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A14B-sized (or tiny) DiT with random weights created directly on the device in ``dtype``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dit = WanTransformer3DModel(**get_task(task).transformer_config)
    finally:
        torch.set_default_dtype(previous)
    dit.requires_grad_(False).train()
    dit.enable_gradient_checkpointing()
    return dit


def flops_per_step(task: str, tokens: int, text_tokens: int, trained_blocks: int) -> float:
    """FLOPs that must be done: forward of every block, recompute + backward (2× forward) of the adapted ones."""
    cfg = get_task(task).transformer_config
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, text = cfg["ffn_dim"], cfg["text_dim"]
    # self-attention qkvo, cross-attention q/o, FFN on image tokens; cross-attention k/v on text tokens
    linear = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * ffn) + 2 * text_tokens * 2 * d * d
    attention = 4 * tokens * tokens * d + 4 * tokens * text_tokens * d
    per_block = linear + attention
    embed = 2 * text_tokens * (text * d + d * d)
    return cfg["num_layers"] * per_block + embed + trained_blocks * 3 * per_block


def random_stage1(task: str, shapes: dict, config, folder: Path) -> Path:
    targets = resolve_targets(config.lora, get_task(task).transformer_config["num_layers"])
    generator = torch.Generator().manual_seed(1)
    modules = {name: LoRAModuleWeights(torch.randn(rank, shapes[name][0], generator=generator) * 0.01,
                                       torch.randn(shapes[name][1], rank, generator=generator) * 0.01, 1.0)
               for name, rank in targets.items()}  # fmt: skip
    path = folder / "stage1.safetensors"
    write_lora(LoRAFile(modules=modules), path, to="musubi")
    return path


def _inputs(task: str, frames: int, height: int, width: int, device: torch.device):
    cfg = get_task(task).transformer_config
    generator = torch.Generator().manual_seed(2)
    latent_shape = (1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
    latents = torch.randn(latent_shape, generator=generator).to(device)
    text = torch.randn(1, 512, cfg["text_dim"], generator=generator).to(device)
    return latents, text


def run_peft(task, dit, config, latents, text, full_backprop: bool, dtype):
    from peft import LoraConfig

    targets = resolve_targets(config.lora, len(dit.blocks))
    lora = LoraConfig(r=config.lora.lora_dim, lora_alpha=config.lora.lora_alpha, target_modules=list(targets),
                      rank_pattern={name: rank for name, rank in targets.items()}, init_lora_weights=True)  # fmt: skip
    dit.add_adapter(lora)
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(3)

    def step():
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.rand(1, generator=generator).to(latents.device)
        x_t = (1 - t) * latents + t * noise
        if full_backprop:
            x_t.requires_grad_(True)  # musubi: backward through every block
        with torch.autocast(latents.device.type, dtype=dtype, enabled=latents.device.type == "cuda"):
            pred = dit(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in params)


OPTIONS = {"compile": {"compile_blocks": True}, "fp8": {"fp8_base": True},
           "fp8fast": {"fp8_base": True, "fp8_fast": True}, "nockpt": {"gradient_checkpointing": False},
           "swap": {"blocks_to_swap": 20}}  # fmt: skip
OPTIONS.update({name: {"attention_backend": name} for name in ("sdpa", "cudnn", "flash", "efficient")})
OPTIONS.update({"fa3": {"frozen_attention": "fa3"}, "fa3fp8": {"frozen_attention": "fa3_fp8"}})
ALIASES = {"compiled": "ours+compile", "peft_compiled": "peft+compile"}


def parse_mode(mode: str) -> tuple[str, dict]:
    """``"ours+compile+fp8fast"`` → ``("ours", {config overrides})``."""
    base, *options = ALIASES.get(mode, mode).split("+")
    overrides: dict = {"attention_backend": "sdpa"} if base in ("ours", "loop", "trainer") else {}
    for option in options:
        overrides.update(OPTIONS[option])
    return base, overrides


def run_ours(task, dit, config, latents, text, loop_experts: bool, folder: Path, options: dict | None = None):
    from lora_moe_core.model.classifier import InstrumentClassifier
    from lora_moe_core.model.memory import DiTPlacement
    from lora_moe_core.training.batches import Batch
    from lora_moe_core.training.monitor import EpochStats
    from lora_moe_core.training.recipes import Stage2Recipe

    device = latents.device
    stage1 = random_stage1(task, linear_shapes(dit), config, folder)
    config = load_config(None, {**_overrides(config), "base_lora_weights": str(stage1), **(options or {})})
    training = config.training
    placement = DiTPlacement({"high": dit, "low": dit}, device, fp8_base=training.fp8_base,
                             fp8_fast=training.fp8_fast, blocks_to_swap=training.blocks_to_swap)  # fmt: skip
    if not training.gradient_checkpointing:
        dit.disable_gradient_checkpointing()
    classifier = InstrumentClassifier().to(device)
    recipe = Stage2Recipe(config, {"high": dit, "low": dit}, device, classifier=classifier)
    placement.check_backward(training.gradient_checkpointing)
    if loop_experts:
        _use_expert_loop(dit)
    optimizer = torch.optim.AdamW(recipe.trainable_parameters(), lr=1e-5)
    roi = torch.ones(latents.shape[0], *latents.shape[2:], device=device)
    roi[..., : latents.shape[-2] // 4, : latents.shape[-1] // 4] = 4.0
    batch = Batch(latents, roi, torch.tensor([[0.0, 1.0, 0.0, 0.0]], device=device),
                  torch.tensor([[0.0, 1.0, 0.0, 0.0]], device=device), text, ["bench"])  # fmt: skip
    counter = iter(range(10**9))

    def step():
        loss, _ = recipe.loss_step(batch, torch.Generator().manual_seed(next(counter)), 0.5, EpochStats())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in recipe.trainable_parameters())


def _overrides(config) -> dict:
    return {"task": config.model.task, "mixed_precision": config.training.mixed_precision, "use_identity_loss": True,
            "use_temporal_loss": True, "gradient_checkpointing": True}  # fmt: skip


def _use_expert_loop(dit) -> None:
    """Swap the fused expert product for a per-expert loop (same function, E small GEMM pairs)."""
    from lora_moe_core.adapters.moe import LoRAMoELinear

    def looped(self, x):
        y = self.base_layer(x)
        scale = self.rank_multipliers(self.route.expert_scale, self.route.alpha_base)
        offset = 0
        if self.base_lora is not None:
            r = self.base_lora.rank
            y = y + (x @ self.base_lora.lora_A.to(x.dtype).T) @ self.base_lora.lora_B.to(x.dtype).T * scale[0, 0]
            offset = r
        experts = self.experts
        for e in range(experts.num_experts):
            gate = scale[:, offset + e * experts.rank].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            y = y + gate * ((x @ experts.lora_A[e].to(x.dtype).T) @ experts.lora_B[e].to(x.dtype).T)
        return y

    for module in dit.modules():
        if isinstance(module, LoRAMoELinear) and module.experts is not None:
            module.forward = looped.__get__(module)


def measure(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float, float]:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, loss


def shape_parser(doc: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The arguments every benchmark shares: --smoke, the clip shape (default 480×832×81) and step counts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and shape on CPU")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=warmup)
    return parser


def run_mode(mode: str, args, task: str, device: torch.device, dtype: torch.dtype, config, folder: Path) -> dict:
    """One mode on a freshly built DiT and a fresh Dynamo cache: s/step, peak GiB, loss, compiled graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs of the previous mode must not count against this one's recompile limit
    counters.clear()
    base, options = parse_mode(mode)
    dit = build_dit(task, device, dtype)
    latents, text = _inputs(task, args.frames, args.height, args.width, device)
    if base == "trainer":
        from ddp_step import train_with_loop

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tracker = train_with_loop(task, dit, options, args, device)
        seconds, loss = statistics.median(tracker.step_times[args.warmup :]), tracker.losses[-1]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        trainable = tracker.trainable
    else:
        if base in ("full", "peft"):
            step, trainable = run_peft(task, dit, config, latents, text, base == "full", torch.bfloat16)
            if options.get("compile_blocks"):
                dit.compile_repeated_blocks()  # diffusers' regional torch.compile, as a peft user would
            if options.get("gradient_checkpointing") is False:
                dit.disable_gradient_checkpointing()
        else:
            step, trainable = run_ours(task, dit, config, latents, text, base == "loop", folder, options)
        seconds, peak, loss = measure(step, args.warmup, args.steps, device)
        del step
    result = {"s_per_step": seconds, "peak_gib": peak, "trainable_params": trainable, "loss": loss,
              "compiled_graphs": counters["stats"]["unique_graphs"], "blocks": len(dit.blocks),
              "options": options}  # fmt: skip
    del dit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = shape_parser(__doc__, steps=5, warmup=2)
    parser.add_argument("--modes", default="full,peft,ours,loop")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    task, device = ("tiny", torch.device("cpu")) if args.smoke else ("t2v-A14B", torch.device("cuda"))
    if args.smoke:
        args.frames, args.height, args.width, args.steps, args.warmup = 5, 32, 32, 2, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_config(None, {"task": task, "mixed_precision": "bf16" if device.type == "cuda" else "no"})
    tokens = (1 + (args.frames - 1) // 4) * (args.height // 16) * (args.width // 16)
    folder = Path("/tmp/lora_moe_bench")
    folder.mkdir(exist_ok=True)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time blocks that fell back to eager
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args, task, device, dtype, config, folder)
        result, seconds = results[mode], results[mode]["s_per_step"]
        flops = flops_per_step(task, tokens, 512, min(40 if mode.startswith("full") else 8, result["blocks"]))
        result["tflops"] = flops / seconds / 1e12
        print(f"{mode:30s} {seconds:8.3f} s/step  peak {result['peak_gib']:6.1f} GiB  {result['tflops']:7.1f} TFLOP/s  "
              f"trainable {result['trainable_params'] / 1e6:6.2f} M  graphs {result['compiled_graphs']:3d}  "
              f"loss {result['loss']:.4f}", flush=True)  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    size = f"{args.frames}x{args.height}x{args.width}"
    print(f"\ndevice {name}, task {task}, {size} = {tokens} tokens, torch {torch.__version__}")
    if "ours" in results and "peft" in results:
        print(f"ours / peft      = {results['ours']['s_per_step'] / results['peft']['s_per_step']:.3f}")
    if "ours" in results and "full" in results:
        print(f"full / ours      = {results['full']['s_per_step'] / results['ours']['s_per_step']:.2f}x faster")
    if "loop" in results and "ours" in results:
        print(f"loop / ours      = {results['loop']['s_per_step'] / results['ours']['s_per_step']:.3f}")
    for mode, result in results.items():
        if mode.startswith(("ours+", "compiled", "trainer", "peft+")) and "peft" in results:
            ratio = result["s_per_step"] / results["peft"]["s_per_step"]
            same_batches = mode.startswith(("ours+", "compiled")) and "ours" in results
            change = f"{result['loss'] / results['ours']['loss'] - 1:+.3%}" if same_batches else "n/a"
            print(f"{mode} / peft = {ratio:.3f}; loss vs plain bf16 ours on the same batches: {change}")
    if args.json:
        import diffusers

        versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
        payload = {"device": name, "tokens": tokens, "versions": versions, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
