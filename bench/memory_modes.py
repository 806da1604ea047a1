"""The seed's memory modes at WAN2.2-A14B scale: both DiTs resident, inactive DiT offloaded, fp8 + block swap.

    python bench/memory_modes.py                 # two A14B DiTs, 480×832×81, bf16, one GPU
    python bench/memory_modes.py --smoke         # tiny model on CPU: keeps the script working in CI

Each mode trains our full Stage-2 step (base LoRA + experts + router + gates, every loss) through the trainer's
own placement code (``memory.DiTPlacement``), the noise regime drawn per step as in training (shift 12: ~70%
high-noise), so the offload mode pays its real DiT switches. A GPU memory cap
(``torch.cuda.set_per_process_memory_fraction``) stands in for the smaller card:

  resident   both DiTs on the GPU, no cap (80 GB card)
  offload    offload_inactive_dit, capped at 40 GiB
  fp8_swap   fp8_base + offload_inactive_dit + blocks_to_swap N, capped at 24 GiB
  swap       blocks_to_swap N alone (bf16, no cap): must match resident's loss exactly (not in the default set)
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import _inputs, _overrides, build_dit, random_stage1, shape_parser  # noqa: E402

from lora_moe_core.config import load_config  # noqa: E402
from lora_moe_core.model.memory import DiTPlacement  # noqa: E402
from lora_moe_core.model.wan import linear_shapes  # noqa: E402

MODES = {  # name: (memory-mode flags, GPU cap in GiB or None)
    "resident": ({}, None),
    "offload": ({"offload_inactive_dit": True}, 40),
    "fp8_swap": ({"offload_inactive_dit": True, "fp8_base": True}, 24),
    "swap": ({}, None),  # blocks_to_swap alone, bf16: same numbers as resident, its own time cost
}


def host_dits(task: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Two random DiTs with their weights in host memory, as ``load_dits`` returns them."""
    dits = {}
    for name in ("high", "low"):
        dits[name] = build_dit(task, device, dtype).to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dits


def run_mode(name: str, args, task: str, device: torch.device, dtype: torch.dtype) -> dict:
    from lora_moe_core.model.classifier import InstrumentClassifier
    from lora_moe_core.training.batches import Batch
    from lora_moe_core.training.monitor import EpochStats
    from lora_moe_core.training.recipes import Stage2Recipe

    flags, cap_gib = MODES[name]
    if name in ("fp8_swap", "swap"):
        flags = {**flags, "blocks_to_swap": args.blocks_to_swap}
    dits = host_dits(task, device, dtype)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total) if cap_gib else 1.0)
        torch.cuda.reset_peak_memory_stats()
    base = load_config(None, {"task": task, "mixed_precision": "bf16" if device.type == "cuda" else "no"})
    stage1 = random_stage1(task, linear_shapes(dits["high"]), base, Path("/tmp/lora_moe_bench"))
    config = load_config(None, {**_overrides(base), "base_lora_weights": str(stage1), **flags})
    started = time.perf_counter()
    placement = DiTPlacement(dits, device, **flags)
    recipe = Stage2Recipe(config, dits, device, classifier=InstrumentClassifier().to(device))
    placement.check_backward(True)
    recipe.step.before_dit = placement.activate
    setup_s = time.perf_counter() - started
    latents, text = _inputs(task, args.frames, args.height, args.width, device)
    roi = torch.ones(1, *latents.shape[2:], device=device)
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]], device=device)
    batch = Batch(latents, roi, labels, labels.clone(), text, ["bench"])
    optimizer = torch.optim.AdamW(recipe.trainable_parameters(), lr=1e-5)
    times, switched, loss = [], [], 0.0
    for step in range(args.warmup + args.steps):
        switches = placement.switches
        start = time.perf_counter()
        total, _ = recipe.loss_step(batch, torch.Generator().manual_seed(step), 0.5, EpochStats())
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = total.item()  # synchronises
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            switched.append(placement.switches > switches)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    plain = [t for t, s in zip(times, switched, strict=True) if not s] or times
    result = {"s_per_step_mean": statistics.mean(times), "s_per_step_no_switch": statistics.median(plain),
              "switch_fraction": sum(switched) / len(switched), "peak_gib": peak, "cap_gib": cap_gib,
              "setup_s": setup_s, "loss": loss, "flags": flags}  # fmt: skip
    print(f"{name:9s} mean {result['s_per_step_mean']:7.3f} s/step  no-switch {result['s_per_step_no_switch']:7.3f} "
          f"s/step  switches {sum(switched)}/{len(switched)}  peak {peak:6.1f} GiB (cap {cap_gib})  "
          f"setup {setup_s:5.1f} s  loss {loss:.4f}", flush=True)  # fmt: skip
    del recipe, placement, dits, optimizer, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # pinned host copies go back before the next mode
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def main() -> None:
    parser = shape_parser(__doc__, steps=6, warmup=2)
    parser.add_argument("--blocks_to_swap", type=int, default=20, help="swapped blocks in the fp8_swap mode")
    parser.add_argument("--modes", default="resident,offload,fp8_swap")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    task, device = ("tiny", torch.device("cpu")) if args.smoke else ("t2v-A14B", torch.device("cuda"))
    if args.smoke:
        args.frames, args.height, args.width, args.steps, args.warmup, args.blocks_to_swap = 5, 32, 32, 3, 1, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    Path("/tmp/lora_moe_bench").mkdir(exist_ok=True)
    results = {mode: run_mode(mode, args, task, device, dtype) for mode in args.modes.split(",")}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tokens = (1 + (args.frames - 1) // 4) * (args.height // 16) * (args.width // 16)
    print(f"\ndevice {name}, task {task}, {args.frames}x{args.height}x{args.width} = {tokens} tokens, "
          f"torch {torch.__version__}")  # fmt: skip
    if "resident" in results:
        for mode, result in results.items():
            cost = result["s_per_step_mean"] / results["resident"]["s_per_step_mean"]
            print(f"{mode:9s} step-time cost vs resident: {cost:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "tokens": tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
