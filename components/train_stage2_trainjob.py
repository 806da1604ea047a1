"""Stage 2 on several nodes: a launcher that runs ``lora-moe train --training_stage stage_b`` as a Kubeflow Trainer
v2 TrainJob (ClusterTrainingRuntime ``torch-distributed``) and hands its checkpoint on as ``train_stage2`` does."""

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def train_stage2_trainjob(
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
    num_nodes: int,
    gpus_per_node: int,
    run_uri: str,
    placement: dict,
    ttl_s: int,
    lora_moe: Output[Model],
    metrics: Output[Metrics],
    tracking: dict,
    kfp_task_name: str,
):
    """Train the LoRA-MoE on ``num_nodes`` × ``gpus_per_node`` GPUs; same outputs as ``train_stage2``.

    ``placement`` (compiled from the cluster settings) places the TrainJob's pods as a GPU step is placed; the
    step log follows the TrainJob and ends with its nodes' logs. ``ttl_s``: 0 deletes the finished TrainJob, < 0
    keeps it, > 0 keeps it that many seconds. The saves live under ``<run_uri>/stage2``, so a retried step resumes.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.config import load_config, resolve_config_path
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.storage.store import join
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.training.launch import launch_trainjob
    from lora_moe_core.training.trainjob import Placement, trainjob_name
    from lora_moe_core.training.trainjob_client import WaitSettings, current_namespace

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    out = Path(tempfile.mkdtemp(prefix="stage2-")) / "lora_moe_stage_b"
    overrides = {"training_stage": "stage_b", "task": task, "cache": cache_uri, "base_lora_weights": stage1_lora_uri,
                 "output_dir": str(out), "num_train_epochs": num_train_epochs, "learning_rate": learning_rate,
                 "seed": seed, "experiment": context.experiment,
                 **source.overrides()}  # fmt: skip
    nodes = Placement.from_dict(placement)
    history = launch_trainjob(
        load_config(resolve_config_path(config), overrides),
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        placement=nodes,
        run_uri=run_uri,
        name=trainjob_name(context.kfp_run_id or run_uri, kfp_task_name),
        namespace=current_namespace(),
        wait=WaitSettings(timeout_s=nodes.timeout_s + 900, ttl_s=ttl_s),  # sees the TrainJob's own deadline pass
        context=context,
    )
    shutil.copyfile(out / "lora_moe_final.safetensors", lora_moe.path)
    for key, value in (history[-1] if history else {}).items():
        if isinstance(value, int | float) and not key.startswith("gate_mean."):
            metrics.log_metric(key, float(value))
    stage_uri = join(run_uri, "stage2")
    lora_moe.metadata.update(
        {
            "stage": "stage_b",
            "stage1_lora_uri": stage1_lora_uri,
            "uri": join(stage_uri, "lora_moe_final.safetensors"),
            "trainjob_nodes": num_nodes,
        }  # fmt: skip
    )
