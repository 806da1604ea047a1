"""WAN VAE + UMT5 encoding of one shard of a dataset into the musubi-compatible latent cache: ``lora-moe cache``."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def cache_latents(
    dataset_uri: str,
    labels: Input[Dataset],
    output_uri: str,
    shard: str,
    task: str,
    base_model_uri: str,
    target_frames: int,
    tracking: dict,
    kfp_task_name: str,
):
    """Cache every n-th clip from the i-th (``shard`` = ``i/n``) into ``output_uri`` (local folder or s3:// prefix).

    Clips already cached are skipped, so a retried (pre-empted) shard resumes. ``base_model_uri`` is the
    diffusers-layout Wan2.2 folder (empty for ``task=tiny``); ``target_frames`` 0 keeps the dataset's own.
    """
    import os
    import tempfile

    from lora_moe_core.cli.main import main
    from lora_moe_core.tracking.tracker import start_tracker

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    argv = [
        "cache",
        "--dataset",
        dataset_uri,
        "--labels",
        labels.path,
        "--task",
        task,
        "--output",
        output_uri,
        "--shard",
        shard,
    ]
    argv += ["--model", base_model_uri] if base_model_uri else []
    argv += ["--target_frames", str(target_frames)] if target_frames > 0 else []
    with start_tracker(
        f"cache {shard}",
        tracking.get("MLFLOW_EXPERIMENT_NAME", "lora-moe"),
        tags={"stage": "cache"},
        parent_run_id=tracking.get("MLFLOW_PARENT_RUN_ID"),
        output_dir=tempfile.mkdtemp(prefix="cache-"),
    ) as run:
        run.log_params({"dataset_uri": dataset_uri, "output_uri": output_uri, "shard": shard, "task": task})
        code = main(argv)
        if code != 0:
            raise SystemExit(f"lora-moe cache failed with exit code {code} (see the error above)")
