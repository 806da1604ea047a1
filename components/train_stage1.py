"""Stage 1: train the vanilla LoRA (``lora-moe train --training_stage stage_a``), or import the user's own.

Both return the Stage-1 LoRA's URI in the run's store (a string, so ``dsl.OneOf`` can merge the two branches:
``kfp.local`` cannot merge artifacts) and also write it as a ``Model`` artifact for lineage and the UI.
"""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components.images import LIGHT_IMAGE, TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_stage1(
    cache_uri: str,
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
    lora: Output[Model],
    metrics: Output[Metrics],
    tracking: dict,
    kfp_task_name: str,
) -> str:
    """Train the vanilla LoRA on the latent cache; returns ``<run_uri>/stage1/lora_final.safetensors``.

    ``config`` is a TOML path relative to the working directory (the images' ``/app``, holding ``configs/``) or
    to the folder holding ``lora_moe_core``; the other arguments override it. ``gpus`` > 1 launches one process
    per GPU with ``torchrun`` (as manifests/optional/pytorchjob-stage2.yaml). The trainer opens the step's MLflow
    run, a child of the pipeline's (``MLFLOW_PARENT_RUN_ID``).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.config import load_config, resolve_config_path
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.storage.store import Storage, join
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.training.launch import launch_training

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    out = Path(tempfile.mkdtemp(prefix="stage1-")) / "vanilla_lora"
    overrides = {"training_stage": "stage_a", "task": task, "cache": cache_uri, "output_dir": str(out),
                 "num_train_epochs": num_train_epochs, "learning_rate": learning_rate, "seed": seed,
                 "experiment": context.experiment, **source.overrides()}  # fmt: skip
    history = launch_training(load_config(resolve_config_path(config), overrides), gpus, context)
    shutil.copyfile(out / "lora_final.safetensors", lora.path)
    for key, value in (history[-1] if history else {}).items():
        if isinstance(value, int | float):
            metrics.log_metric(key, float(value))
    stage_uri = join(run_uri, "stage1")
    Storage().sync_dir_to(out, stage_uri)
    lora.metadata.update({"stage": "stage_a", "format": "musubi", "uri": join(stage_uri, "lora_final.safetensors")})
    return join(stage_uri, "lora_final.safetensors")


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def import_stage1(stage1_lora_uri: str, lora: Output[Model], tracking: dict, kfp_task_name: str) -> str:
    """Check the user's Stage-1 LoRA (musubi, ComfyUI or diffusers keys; local or s3://) and pass its URI on."""
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.formats.lora_files import read_lora
    from lora_moe_core.storage.store import Storage, is_s3
    from lora_moe_core.tracking.context import TrackingContext

    context = TrackingContext.from_step(tracking, kfp_task_name)
    scratch = Path(tempfile.mkdtemp(prefix="import-stage1-"))
    with context.start_run("import-stage1", "stage_a", scratch) as run:
        local = Storage().download(stage1_lora_uri, scratch / "stage1.safetensors") if is_s3(stage1_lora_uri) else None
        weights = read_lora(str(local or stage1_lora_uri))  # UserError (one line) on a file that is not a Wan LoRA
        ranks = sorted({module.rank for module in weights.modules.values()})
        shutil.copyfile(local or stage1_lora_uri, lora.path)
        info = {"stage": "stage_a", "format": weights.format, "modules": len(weights.modules), "uri": stage1_lora_uri}
        lora.metadata.update({**info, "ranks": ranks})
        run.log_params({**info, "ranks": ranks, "imported": True})
        print(f"Stage-1 LoRA {stage1_lora_uri}: {weights.format} keys, {len(weights.modules)} modules, ranks {ranks}")
    return stage1_lora_uri
