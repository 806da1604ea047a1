"""One home for the names and seed defaults that the CLI, the library and the pipelines share.

Plain values only (no torch, no kfp): the Kubeflow layer imports this module to fill its parameter defaults.
"""

from __future__ import annotations

#: Model families ``--task`` accepts (``lora_moe_core.model.wan.TASKS`` holds their shapes).
TASK_NAMES: tuple[str, ...] = ("t2v-A14B", "tiny")
DEFAULT_TASK = "t2v-A14B"

#: LoRA key layouts ``convert-lora`` and ``export`` read and write.
LORA_FORMATS: tuple[str, ...] = ("musubi", "comfy", "diffusers")
#: Storage dtypes of written tensors, by their command-line names.
DTYPE_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")


def torch_dtype(name: str):
    """The torch dtype of a :data:`DTYPE_NAMES` entry (torch is imported only when this is called)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


#: The seed's inference multipliers (``infer --alpha_base 0.7 --alpha_expert 1.0``); ``export`` uses the same, so
#: an exported per-instrument LoRA reproduces ``infer`` by default. Training runs at 1.0 (config ``alpha_base``).
ALPHA_BASE = 0.7
ALPHA_EXPERT = 1.0

#: The evaluation's budget (``evaluate --eval_clips/--eval_timesteps/--eval_batch``, the pipeline's parameters):
#: held-out clips scored, the timesteps each is scored at (both Wan2.2 regimes, weighted towards high noise as
#: the shift-12 sampler is), samples per DiT forward. With the seed's targets a clip costs about 5 A14B forwards
#: per timestep (base, Stage 1, Stage 2, and the six routes sharing the blocks before the experts): 12 clips × 4
#: timesteps is ~240 forwards (BENCHMARKS.md, "the pipeline at A14B on one GPU").
EVAL_CLIPS = 12
EVAL_TIMESTEPS: tuple[float, ...] = (0.3, 0.6, 0.9, 0.95)
EVAL_BATCH = 4

#: MLflow experiment of every run, and the registered model with the alias a new version gets.
EXPERIMENT = "lora-moe"
REGISTERED_MODEL = "lora-moe-surgical"
REGISTRY_ALIAS = "candidate"
