"""The matched single-LoRA arm beside Stage 2 (``lora-moe train --baseline_arm`` on the Stage-2 config), or its skip.

Both return the arm's URI in the run's store ("" when skipped), so that ``dsl.OneOf`` merges the two branches into
the evaluation's optional input (a string: ``kfp.local`` cannot merge artifacts).
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components.images import LIGHT_IMAGE, TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_baseline_arm(
    cache_uri: str,
    stage1_lora_uri: str,
    config: str,
    task: str,
    base_model_uri: str,
    dit_uri: str,
    dit_high_noise_uri: str,
    vae_uri: str,
    t5_uri: str,
    num_train_epochs: int,
    learning_rate: float,
    seed: int,
    gpus: int,
    run_uri: str,
    matched_lora: Output[Model],
    metrics: Output[Metrics],
    tracking: dict,
    kfp_task_name: str,
) -> str:
    """Train one LoRA matched to the Stage-2 run that ``config`` and these arguments describe (the same ones
    ``train_stage2`` gets): the experts' total rank over the same frozen Stage-1 LoRA, same clips and steps.

    Writes ``lora_final.safetensors`` as the ``matched_lora`` artifact and to ``<run_uri>/matched_lora/``, the last
    epoch's losses as ``metrics``; returns that file's URI. The trainer opens the step's MLflow run.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.config import load_config, resolve_config_path
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.storage.store import Storage, is_s3, join
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.training.baseline_arm import ARM, matched_lora_config
    from lora_moe_core.training.launch import launch_training

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    scratch = Path(tempfile.mkdtemp(prefix="baseline-arm-"))
    base_lora = stage1_lora_uri
    if is_s3(stage1_lora_uri):
        base_lora = str(Storage().download(stage1_lora_uri, scratch / "stage1" / "lora_final.safetensors"))
    overrides = {"training_stage": "stage_b", "task": task, "cache": cache_uri, "base_lora_weights": base_lora,
                 "output_dir": str(scratch / "lora_moe_stage_b"), "num_train_epochs": num_train_epochs,
                 "learning_rate": learning_rate, "seed": seed, "experiment": context.experiment,
                 **source.overrides()}  # fmt: skip
    arm = matched_lora_config(load_config(resolve_config_path(config), overrides))
    history = launch_training(arm, gpus, context)
    out = Path(arm.training.output_dir)
    shutil.copyfile(out / "lora_final.safetensors", matched_lora.path)
    for key, value in (history[-1] if history else {}).items():
        if isinstance(value, int | float):
            metrics.log_metric(key, float(value))
    arm_uri = join(run_uri, ARM)
    Storage().sync_dir_to(out, arm_uri)
    uri = join(arm_uri, "lora_final.safetensors")
    matched_lora.metadata.update({"stage": "baseline_arm", "stage1_lora_uri": stage1_lora_uri, "uri": uri})
    return uri


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def skip_baseline_arm() -> str:
    """``baseline_arm`` is off: no arm, so the evaluation compares nothing (an empty URI)."""
    print("baseline_arm is off: no matched single-LoRA arm is trained")
    return ""
