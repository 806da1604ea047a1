"""`lora-moe train`: wire the config, the cache, the DiTs, a recipe, tracking and the loop together."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_moe_core.config import Config, TrainingConfig
from lora_moe_core.data.latent_cache import CacheEntry, read_cache
from lora_moe_core.errors import Stopped, UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.guards.files import check_output_folder
from lora_moe_core.model.memory import DiTPlacement
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.training import state as run_state
from lora_moe_core.training.baseline_arm import BaselineArmRecipe, resolve_arm
from lora_moe_core.training.loop import TrainingLoop
from lora_moe_core.training.recipes import Stage1Recipe, Stage2Recipe

FINAL_NAMES = {"stage_a": "lora_final.safetensors", "stage_b": "lora_moe_final.safetensors",
               "stage_c": "lora_moe_final.safetensors"}  # fmt: skip


def family_prior(entries: list[CacheEntry]) -> torch.Tensor:
    """Square-root-tempered family frequencies of the captions: the balance target for imbalanced data."""
    counts = torch.stack([e.labels for e in entries]).sum(dim=0) + 1.0
    tempered = counts.sqrt()
    return tempered / tempered.sum()


def _check_entries(config: Config, entries: list[CacheEntry]) -> None:
    if config.training.training_stage == "stage_a":
        return
    labelled = sum(e.labelled for e in entries)
    if labelled == 0 and not config.loss.classifier_weights:
        raise UserError(f"none of the {len(entries)} cached clips has an instrument label: Stage 2 routes by them "
                        "(label the captions before caching, or give --classifier_weights)")  # fmt: skip


def weights_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype:
    """The frozen DiT weights' dtype: the autocast dtype on a GPU (musubi's bf16 DiT), fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32  # CPU matmuls in bf16 are slow and the tiny model's numbers are pinned in fp32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training.mixed_precision, torch.float32)


def _device(accelerator) -> torch.device:
    return accelerator.device if accelerator is not None else torch.device("cpu")


def run_training(config: Config, context: TrackingContext | None = None) -> Path:
    """Train one stage as configured; returns the final checkpoint path.

    ``context``: the MLflow parent run and KFP tags of a pipeline step (default: this process's environment).
    """
    from accelerate import Accelerator

    from lora_moe_core.model.loading import load_dits
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.tracking.datasets import cache_dataset_ref
    from lora_moe_core.tracking.mlflow_client import resolve_tracking_uri
    from lora_moe_core.tracking.system import SystemMetricsTracker
    from lora_moe_core.tracking.tracker import NullTracker, start_tracker

    config = resolve_arm(config)  # --baseline_arm on a Stage-2 config trains its matched single-LoRA arm
    training = config.training
    resolve_tracking_uri(None, training.output_dir)  # a garbage MLFLOW_TRACKING_URI fails now, not after loading
    check_output_folder(training.output_dir, "output_dir")  # a file there, or read-only: before any model loads
    if not training.cache:
        raise UserError("no latent cache given: pass --cache DIR|s3://… (made by `lora-moe cache`)")
    refuse_inputs_in_run_folder(config)
    torch.manual_seed(training.seed)
    entries = read_cache(training.cache)
    _check_entries(config, entries)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = _device(accelerator)
    dits = load_dits(config.model.task, ModelSource.of(config.model), dtype=weights_dtype(training, device))
    recipe = prepare_recipe(config, dits, device, entries)
    if accelerator.num_processes > 1:
        recipe.gather = accelerator.gather  # gate statistics over every rank's samples
    output_dir = Path(training.output_dir)
    loop = TrainingLoop(config, recipe, entries, output_dir, NullTracker(), device, accelerator.process_index,
                        accelerator.num_processes)  # fmt: skip
    if training.resume:  # the whole saved state is checked and loaded before anything is written or tracked
        marker = run_state.find_resume(output_dir, training.resume)
        if marker is not None:
            loop.resume(marker)
        else:
            print(f"--resume {training.resume}: no earlier save in {output_dir}, starting fresh")
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and (removed := run_state.remove_partial_files(output_dir)):
        print(f"removed {removed} partial file(s) that an interrupted save left in {output_dir}")
    tracker = NullTracker()
    if accelerator.is_main_process:
        stage = "baseline_arm" if training.baseline_arm else training.training_stage
        tracker = start_tracker(run_name=f"{stage}-{output_dir.name}", experiment=training.experiment,
                                output_dir=output_dir, tags={"stage": stage, "task": config.model.task},
                                context=context)  # fmt: skip
        if not isinstance(tracker, NullTracker):  # CPU/GPU/memory in the run's System metrics tab
            tracker = SystemMetricsTracker(tracker)
        tracker.log_dataset(cache_dataset_ref(training.cache, entries, "training"))
    loop.tracker = tracker
    try:
        final = loop.run()
    except Stopped:
        tracker.close("KILLED")  # MLflow's status of a run ended from outside, resumable
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")
    if accelerator.is_main_process:
        for record in loop.state.history:
            print(_epoch_line(record))
        print(f"wrote {final}")
    return final


def refuse_inputs_in_run_folder(config: Config) -> None:
    """The run folder receives checkpoints of fixed names (Stage 3 writes the same ``lora_moe_final`` a Stage-2
    run did): none of the run's inputs may live in it, or be it, before anything is loaded."""
    from lora_moe_core.guards.files import refuse_clobber
    from lora_moe_core.model.sources import ModelSource

    model_files, model_folders = ModelSource.of(config.model).local_inputs()
    moe = config.lora_moe
    inputs = [moe.base_lora_weights, moe.lora_moe_weights, config.loss.classifier_weights, *model_files]
    refuse_clobber([], inputs, "train", output_folders=[config.training.output_dir],
                   input_folders=[config.training.cache, *model_folders])  # fmt: skip


def prepare_recipe(config: Config, dits, device: torch.device, entries: list[CacheEntry],
                   classifier: torch.nn.Module | None = None):  # fmt: skip
    """The DiTs placed as the memory modes ask, the stage's recipe on them (adapters, attention, compiled blocks).

    Args:
        classifier: the instrument classifier, instead of loading ``--classifier_weights`` (benchmarks).
    """
    training = config.training
    placement = DiTPlacement(dits, device, training.offload_inactive_dit, training.fp8_base, training.blocks_to_swap,
                             training.fp8_fast)  # fmt: skip
    recipe = _recipe(config, dits, device, entries, classifier)
    placement.check_backward(training.gradient_checkpointing)
    recipe.step.before_dit = placement.activate
    return recipe


def _recipe(config: Config, dits, device: torch.device, entries: list[CacheEntry], classifier=None):
    if config.training.training_stage == "stage_a" and not config.training.baseline_arm:
        return Stage1Recipe(config, dits, device)
    if classifier is None and config.loss.classifier_weights:
        from lora_moe_core.model.classifier import load_classifier

        classifier = load_classifier(config.loss.classifier_weights)
    if config.training.baseline_arm:
        return BaselineArmRecipe(config, dits, device, classifier=classifier)
    return Stage2Recipe(config, dits, device, classifier=classifier, family_prior=family_prior(entries))


def _epoch_line(record: dict[str, float]) -> str:
    parts = [f"epoch {int(record['epoch'])}", f"loss {record.get('loss', float('nan')):.4f}"]
    if "routing_accuracy" in record:
        usage = " ".join(f"{name[:3]} {record[f'usage.{name}']:.2f}" for name in FAMILIES)
        parts += [f"roi {record['roi_loss']:.4f}", f"routing acc {record['routing_accuracy']:.2f}", f"usage {usage}"]
    return ", ".join(parts)
