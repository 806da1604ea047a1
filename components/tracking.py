"""The MLflow parent run of a pipeline run: ``start_tracking`` first, ``finish_tracking`` last (even after a failure).

Every other step receives ``start_tracking``'s output, a dict of environment variables (``MLFLOW_PARENT_RUN_ID``,
``MLFLOW_EXPERIMENT_NAME``, ``KFP_RUN_ID``, ``KFP_RUN_NAME``), sets them, and opens its MLflow run as a child of the
parent (``lora_moe_core.tracking.tracker`` tags it ``kfp.run_id``/``kfp.run_name``/``kfp.task``).
"""

from kfp import dsl

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def start_tracking(experiment: str, pipeline: str, kfp_run_id: str, kfp_run_name: str) -> dict:
    """Create the parent run (tags ``kfp.run_id``, ``kfp.run_name``) and return the context of every step.

    Under KFP's own MLflow integration (``MLFLOW_RUN_ID`` injected) the parent is KFP's run of this pipeline run
    and its experiment, not a second parent run. ``MLFLOW_PARENT_RUN_ID`` is empty when tracking is off
    (``MLFLOW_TRACKING_URI=none``) or MLflow is unreachable; the steps then log top-level runs (or to their fallback
    file) and the pipeline still runs.
    """
    import tempfile

    from lora_moe_core.redaction import redact
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.links import experiment_link
    from lora_moe_core.tracking.mlflow_client import resolve_tracking_uri
    from lora_moe_core.tracking.runs import open_pipeline_run

    context = TrackingContext(experiment=experiment, kfp_run_id=kfp_run_id, kfp_run_name=kfp_run_name)
    context = open_pipeline_run(kfp_run_name or pipeline, context, tags={"kfp.pipeline": pipeline, "stage": "pipeline"},
                                output_dir=tempfile.mkdtemp(prefix="tracking-"))  # fmt: skip
    run_id, uri = context.parent_run_id, resolve_tracking_uri()
    link = experiment_link(uri, context.experiment, run_id) if run_id else None  # the runs view, not GenAI's pages
    print(f"MLflow parent run {run_id or '(none)'} in experiment {context.experiment!r}: {link or redact(uri)}")
    return context.to_dict()


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def finish_tracking(tracking: dict = {}, final_stage: str = "register"):  # noqa: B006 - KFP needs a literal default
    """End the parent run: FINISHED when the ``final_stage`` step's run finished and every step's latest run did.

    Runs after the last step even when a step failed (``ignore_upstream_failure``); see
    ``lora_moe_core.tracking.runs.finish_parent_run``. Tracking never fails the pipeline.
    """
    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.runs import finish_parent_run

    parent_id = TrackingContext.from_mapping(tracking).parent_run_id
    if not parent_id:
        print("no MLflow parent run to finish")
        return
    outcome = finish_parent_run(parent_id, final_stage)
    print(outcome.line(parent_id, final_stage) if outcome else f"warning: MLflow parent run {parent_id} left as it is")
