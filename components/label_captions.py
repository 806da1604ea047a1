"""Caption keyword labelling (zh/en) into the four instrument families: ``lora-moe label``."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def label_captions(dataset_uri: str, labels: Output[Dataset], tracking: dict, kfp_task_name: str):
    """Label every caption of ``dataset_uri`` (local or s3://); writes ``labels.jsonl`` as the ``labels`` artifact
    with per-family counts in its metadata and in the step's MLflow run."""
    import json
    import os
    import tempfile

    from lora_moe_core.cli.main import main
    from lora_moe_core.families import FAMILIES
    from lora_moe_core.tracking.tracker import start_tracker

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    scratch = tempfile.mkdtemp(prefix="label-")
    with start_tracker(
        "label",
        tracking.get("MLFLOW_EXPERIMENT_NAME", "lora-moe"),
        tags={"stage": "label"},
        parent_run_id=tracking.get("MLFLOW_PARENT_RUN_ID"),
        output_dir=scratch,
    ) as run:
        code = main(["label", "--dataset", dataset_uri, "--output", labels.path])
        if code != 0:
            raise SystemExit(f"lora-moe label failed with exit code {code} (see the error above)")
        with open(labels.path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        counts = {f"clips.{family}": sum(family in r["families"] for r in records) for family in FAMILIES}
        counts.update({"clips.total": len(records), "clips.unlabelled": sum(not r["families"] for r in records)})
        labels.metadata.update({**counts, "dataset_uri": dataset_uri})
        run.log_params({"dataset_uri": dataset_uri})
        run.log_metrics(counts, step=0)
        run.log_artifact(labels.path, "labels")
