"""Stage 2: four expert LoRAs + router on the frozen Stage-1 LoRA (``lora-moe train --training_stage stage_b``)."""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def train_stage2(
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
    lora_moe: Output[Model],
    metrics: Output[Metrics],
    tracking: dict,
    kfp_task_name: str,
):
    """Train the LoRA-MoE; writes ``lora_moe_final.safetensors`` as the ``lora_moe`` artifact (and to
    ``<run_uri>/stage2/``) and the last epoch's losses, routing accuracy and expert usage as ``metrics``.

    ``config`` and ``gpus`` work as in ``train_stage1``; the MLflow child run is opened by the trainer.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.config import load_config, resolve_config_path
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.storage.store import Storage, is_s3, join
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.training.launch import launch_training

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    scratch = Path(tempfile.mkdtemp(prefix="stage2-"))
    base_lora = stage1_lora_uri
    if is_s3(stage1_lora_uri):
        base_lora = str(Storage().download(stage1_lora_uri, scratch / "stage1" / "lora_final.safetensors"))
    out = scratch / "lora_moe_stage_b"
    overrides = {"training_stage": "stage_b", "task": task, "cache": cache_uri, "base_lora_weights": base_lora,
                 "output_dir": str(out), "num_train_epochs": num_train_epochs, "learning_rate": learning_rate,
                 "seed": seed, "experiment": context.experiment,
                 **source.overrides()}  # fmt: skip
    history = launch_training(load_config(resolve_config_path(config), overrides), gpus, context)
    shutil.copyfile(out / "lora_moe_final.safetensors", lora_moe.path)
    for key, value in (history[-1] if history else {}).items():
        if isinstance(value, int | float) and not key.startswith("gate_mean."):
            metrics.log_metric(key, float(value))
    stage_uri = join(run_uri, "stage2")
    Storage().sync_dir_to(out, stage_uri)
    lora_moe.metadata.update(
        {"stage": "stage_b", "stage1_lora_uri": stage1_lora_uri, "uri": join(stage_uri, "lora_moe_final.safetensors")}
    )
