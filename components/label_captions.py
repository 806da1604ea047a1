"""Caption keyword labelling (zh/en) into the four instrument families: ``lora-moe label``."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def label_captions(
    dataset_uri: str, labels: Output[Dataset], tracking: dict, kfp_task_name: str, dataset_role: str = "training"
):
    """Label every caption of ``dataset_uri`` (local or s3://); writes ``labels.jsonl`` as the ``labels`` artifact
    with per-family counts in its metadata and in the step's MLflow run, which logs the dataset as an input
    (context ``dataset_role``: training or evaluation)."""
    import tempfile

    from lora_moe_core.data.labeling import label_dataset
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.datasets import labelled_dataset

    context = TrackingContext.from_step(tracking, kfp_task_name)
    with context.start_run("label", "label", tempfile.mkdtemp(prefix="label-")) as run:
        summary = label_dataset(dataset_uri, labels.path)
        print("\n".join(summary.lines()))
        labels.metadata.update({**summary.metrics(), "dataset_uri": dataset_uri})
        run.log_params({"dataset_uri": dataset_uri})
        run.log_metrics(summary.metrics(), step=0)
        run.log_artifact(labels.path, "labels")
        run.log_dataset(labelled_dataset(dataset_uri, labels.path, dataset_role))
