"""Register a trained LoRA-MoE in the MLflow model registry, with its per-instrument LoRAs beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lora_moe_core.adapters.checkpoint import load_network, read_checkpoint
from lora_moe_core.adapters.export import export_instrument_lora
from lora_moe_core.families import FAMILIES
from lora_moe_core.model.wan import task_linear_shapes


def package_model(checkpoint: str | Path, folder: Path, alpha_base: float = 0.7, alpha_expert: float = 1.0) -> Path:
    """``folder/lora_moe_final.safetensors`` + ``folder/exported/<Family>[_regime].safetensors`` (ComfyUI keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint, folder / "lora_moe_final.safetensors")
    task = read_checkpoint(checkpoint).config.model.task
    network = load_network(checkpoint, task_linear_shapes(task))
    for family in FAMILIES:
        export_instrument_lora(network, [family], folder / "exported", to="comfy", alpha_base=alpha_base,
                               alpha_expert=alpha_expert, dtype=torch.bfloat16)  # fmt: skip
    return folder


def register_checkpoint(checkpoint: str | Path, name: str, work_dir: str | Path, experiment: str = "lora-moe",
                        tracking_uri: str | None = None, alias: str = "candidate") -> str:  # fmt: skip
    """Log the packaged model to an MLflow run and register it as a new version of ``name`` with ``alias``."""
    from lora_moe_core.tracking.runs import register_model
    from lora_moe_core.tracking.tracker import MLflowTracker, start_tracker

    folder = package_model(checkpoint, Path(work_dir) / "model")
    tracker = start_tracker(run_name=f"register-{name}", experiment=experiment, tracking_uri=tracking_uri,
                            tags={"stage": "register"}, output_dir=Path(work_dir))  # fmt: skip
    tracker.log_artifact(folder, "model")
    run_id = tracker.run_id if isinstance(tracker, MLflowTracker) else None
    version = register_model(tracker, name, "model", run_id, alias=alias)
    tracker.close("FINISHED")
    return version
