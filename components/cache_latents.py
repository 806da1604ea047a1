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
    dit_uri: str,
    dit_high_noise_uri: str,
    vae_uri: str,
    t5_uri: str,
    target_frames: int,
    tracking: dict,
    kfp_task_name: str,
    dataset_role: str = "training",
):
    """Cache every n-th clip from the i-th (``shard`` = ``i/n``) into ``output_uri`` (local folder or s3:// prefix).

    Clips already cached are skipped, so a retried (pre-empted) shard resumes. ``base_model_uri`` is the
    diffusers-layout Wan2.2 folder, ``vae_uri``/``t5_uri`` musubi's single files (empty: not given; ``task=tiny``
    builds what is not given); ``target_frames`` 0 keeps the dataset's own.
    """
    import tempfile

    from lora_moe_core.cache.build import cache_dataset
    from lora_moe_core.cache.writer import CacheSettings
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.datasets import labelled_dataset

    context = TrackingContext.from_step(tracking, kfp_task_name)
    index, count = (int(part) for part in shard.split("/"))
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    settings = CacheSettings(task=task, model=source)
    with context.start_run(f"cache {shard}", "cache", tempfile.mkdtemp(prefix="cache-")) as run:
        run.log_params({"dataset_uri": dataset_uri, "output_uri": output_uri, "shard": shard, "task": task})
        run.log_dataset(labelled_dataset(dataset_uri, labels.path, dataset_role))  # lineage: the clips it encodes
        outcome = cache_dataset(dataset_uri, output_uri, settings, labels.path, (index, count),
                                [target_frames] if target_frames > 0 else None)  # fmt: skip
        print(outcome.line(dataset_uri, output_uri))
