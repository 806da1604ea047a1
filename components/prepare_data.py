"""First data step: write the synthetic demo datasets when asked, check both datasets, and lay out the run's URIs."""

from typing import NamedTuple

from kfp import dsl

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def prepare_data(
    dataset_uri: str,
    eval_dataset_uri: str,
    work_uri: str,
    cache_uri: str,
    synthetic_clips: int,
    synthetic_eval_clips: int,
    synthetic_size: list,
    seed: int,
    tracking: dict,
    kfp_task_name: str,
) -> NamedTuple("RunLayout", [("run_uri", str), ("train_cache_uri", str), ("eval_cache_uri", str), ("clips", int)]):
    """Fail fast (before any GPU starts) when a dataset is missing; with ``synthetic_clips > 0`` write procedural
    clips to ``dataset_uri`` (and ``synthetic_eval_clips`` held-out ones, another seed, to ``eval_dataset_uri``).

    Returns the run folder ``<work_uri>/<KFP run id>``, the latent-cache URIs (``<cache_uri or run folder/cache>/
    train`` and ``/heldout``) and the number of training clips.
    """
    import tempfile
    from collections import namedtuple

    from lora_moe_core.data.prepare import DatasetRequest, prepare_datasets
    from lora_moe_core.storage.store import join
    from lora_moe_core.tracking.context import TrackingContext

    context = TrackingContext.from_step(tracking, kfp_task_name)
    requests = [DatasetRequest("train", dataset_uri, synthetic_clips, seed),
                DatasetRequest("heldout", eval_dataset_uri, synthetic_eval_clips, seed + 1000)]  # fmt: skip
    with context.start_run("prepare-data", "data", tempfile.mkdtemp(prefix="prepare-data-")) as run:
        counts = prepare_datasets(requests, tuple(int(value) for value in synthetic_size))
        run.log_params(
            {"dataset_uri": dataset_uri, "eval_dataset_uri": eval_dataset_uri, "synthetic_clips": synthetic_clips}
        )
        run.log_metrics({"clips.train": counts["train"], "clips.heldout": counts["heldout"]}, step=0)
    run_uri = join(work_uri, context.kfp_run_id or "run")
    cache_root = cache_uri or join(run_uri, "cache")
    layout = namedtuple("RunLayout", ["run_uri", "train_cache_uri", "eval_cache_uri", "clips"])
    return layout(run_uri, join(cache_root, "train"), join(cache_root, "heldout"), counts["train"])


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def plan_shards(clips: int, cache_shards: int, train_cache_uri: str, tracking: dict) -> list[dict]:
    """The latent-cache fan-out: ``min(cache_shards, clips)`` items ``{shard: "i/n", output_uri, tracking}``.

    Each item carries everything a shard task needs from upstream steps: ``kfp.local`` 2.17.3 replaces any
    task-output argument of a task inside ``dsl.ParallelFor`` by the loop item, so only item fields, pipeline
    parameters and constants are safe there.
    """
    count = max(1, min(int(cache_shards), int(clips)))
    return [
        {"shard": f"{index}/{count}", "output_uri": train_cache_uri, "tracking": tracking} for index in range(count)
    ]
