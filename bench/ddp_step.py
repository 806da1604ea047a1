"""Data-parallel scaling of the Stage-2 trainer at WAN2.2-A14B scale (one process per GPU, NCCL).

    torchrun --nproc_per_node 1 bench/ddp_step.py --json ddp1.json
    torchrun --nproc_per_node 2 bench/ddp_step.py --json ddp2.json
    python bench/ddp_step.py --compare ddp1.json ddp2.json       # scaling efficiency
    torchrun --nproc_per_node 2 bench/ddp_step.py --smoke        # tiny model, gloo on CPU (CI)

Every rank builds the A14B DiT with random bf16 weights on its GPU and runs the trainer's own
``TrainingLoop`` (rank-sharded micro-batches, gradient all-reduce, all-gathered gate statistics) over an
in-memory latent cache of the given shape. Per-rank work per step is the same at any world size, so the
scaling efficiency is ``t_step(1 GPU) / t_step(N GPUs)``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import _overrides, build_dit, random_stage1, shape_parser  # noqa: E402

from lora_moe_core.config import load_config  # noqa: E402
from lora_moe_core.data.latent_cache import CacheEntry  # noqa: E402
from lora_moe_core.model.wan import get_task, linear_shapes  # noqa: E402


class StepTimes:
    """A tracker that keeps the loop's per-step wall times (the Tracker protocol, nothing sent anywhere)."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.trainable = 0

    def log_params(self, params) -> None: ...
    def log_artifact(self, path, artifact_path=None) -> None: ...
    def set_tags(self, tags) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "step/step_time_s" in metrics:
            self.step_times.append(metrics["step/step_time_s"])
            self.losses.append(metrics["step/loss"])


def synthetic_entries(task: str, count: int, frames: int, height: int, width: int) -> list[CacheEntry]:
    text_dim = get_task(task).transformer_config["text_dim"]
    generator = torch.Generator().manual_seed(0)
    latent_frames = 1 + (frames - 1) // 4
    entries = []
    for index in range(count):
        labels = torch.zeros(4)
        labels[index % 4] = 1.0
        entries.append(CacheEntry(f"clip{index}", torch.randn(16, latent_frames, height // 8, width // 8,
                                                               generator=generator),
                                  torch.ones(latent_frames, height // 8, width // 8), labels.clone(), labels,
                                  torch.randn(512, text_dim, generator=generator), "bench"))  # fmt: skip
    return entries


def run_rank(args) -> dict | None:
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    task = "tiny" if args.smoke else "t2v-A14B"
    dit = build_dit(task, device, torch.bfloat16 if cuda else torch.float32)
    tracker = train_with_loop(task, dit, {}, args, device, rank, world)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    timed = tracker.step_times[args.warmup :]
    seconds = statistics.median(timed)
    samples = world * args.accumulation / seconds
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"world {world}: {seconds:.3f} s/step (median of {len(timed)}), {samples:.3f} clips/s, {name}")
    return {"world_size": world, "s_per_step": seconds, "clips_per_s": samples, "device": name,
            "step_times": tracker.step_times, "accumulation": args.accumulation}  # fmt: skip


def train_with_loop(task: str, dit, options: dict, args, device: torch.device, rank: int = 0,
                    world: int = 1) -> StepTimes:  # fmt: skip
    """``warmup + steps`` optimizer steps of the trainer's own code: ``run.prepare_recipe`` and ``TrainingLoop``.

    Args:
        options: trainer config overrides (memory modes, ``compile_blocks``, ``attention_backend``).
    """
    from lora_moe_core.model.classifier import InstrumentClassifier
    from lora_moe_core.training import loop as loop_module
    from lora_moe_core.training.loop import TrainingLoop
    from lora_moe_core.training.run import prepare_recipe

    cuda = device.type == "cuda"
    base = load_config(None, {"task": task, "mixed_precision": "bf16" if cuda else "no"})
    folder = Path(tempfile.mkdtemp(prefix=f"ddp_bench_{rank}_"))
    stage1 = random_stage1(task, linear_shapes(dit), base, folder)
    accumulation = getattr(args, "accumulation", 1)
    config = load_config(None, {**_overrides(base), "base_lora_weights": str(stage1), "batch_size": 1,
                                "gradient_accumulation_steps": accumulation, "num_train_epochs": 1,
                                "max_train_steps": args.warmup + args.steps, "output_dir": str(folder),
                                **options})  # fmt: skip
    micro_batches = (args.warmup + args.steps) * accumulation * world
    entries = synthetic_entries(task, micro_batches, args.frames, args.height, args.width)
    recipe = prepare_recipe(config, {"high": dit, "low": dit}, device, entries, InstrumentClassifier().to(device))
    if world > 1:
        recipe.gather = _all_gather
    tracker = StepTimes()
    loop_module.plot_history = lambda history, folder: []  # end-of-run PNGs are no part of a step (no matplotlib)
    TrainingLoop(config, recipe, entries, folder, tracker, device, rank, world).run()
    tracker.trainable = sum(p.numel() for p in recipe.trainable_parameters())
    return tracker


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    parts[dist.get_rank()] = tensor  # keeps this rank's autograd path
    return torch.cat(parts)


def compare(files: list[str]) -> None:
    runs = sorted((json.loads(Path(f).read_text()) for f in files), key=lambda r: r["world_size"])
    single = runs[0]
    for run in runs:
        efficiency = single["s_per_step"] / run["s_per_step"]
        speedup = run["clips_per_s"] / single["clips_per_s"]
        print(f"{run['world_size']} GPU: {run['s_per_step']:.3f} s/step, {run['clips_per_s']:.3f} clips/s, "
              f"speed-up {speedup:.2f}x, scaling efficiency {efficiency:.1%}")  # fmt: skip


def main() -> None:
    parser = shape_parser(__doc__, steps=4, warmup=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step and rank")
    parser.add_argument("--json", help="rank 0 writes its result here")
    parser.add_argument("--compare", nargs="+", help="print scaling from earlier --json results")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare)
        return
    if args.smoke:
        args.frames, args.height, args.width, args.steps = 5, 32, 32, 2
    result = run_rank(args)
    if result is not None and args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
