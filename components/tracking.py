"""The MLflow parent run of a pipeline run: ``start_tracking`` first, ``finish_tracking`` last (even after a failure).

Every other step receives ``start_tracking``'s output, a dict of environment variables (``MLFLOW_PARENT_RUN_ID``,
``MLFLOW_EXPERIMENT_NAME``, ``KFP_RUN_ID``, ``KFP_RUN_NAME``), sets them, and opens its MLflow run as a child of the
parent (``lora_moe_core.tracking.tracker`` tags it ``kfp.run_id``/``kfp.run_name``/``kfp.task``).
"""

from kfp import dsl

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def start_tracking(experiment: str, pipeline: str, kfp_run_id: str, kfp_run_name: str) -> dict:
    """Create the parent run (tags ``kfp.run_id``, ``kfp.run_name``) and return the environment for every step.

    ``MLFLOW_PARENT_RUN_ID`` is empty when tracking is off (``MLFLOW_TRACKING_URI=none``) or MLflow is unreachable;
    the steps then log top-level runs (or to their fallback file) and the pipeline still runs.
    """
    import os
    import tempfile

    from lora_moe_core.redaction import redact
    from lora_moe_core.tracking.runs import start_parent_run
    from lora_moe_core.tracking.tracker import resolve_tracking_uri

    env = {"KFP_RUN_ID": kfp_run_id, "KFP_RUN_NAME": kfp_run_name, "MLFLOW_EXPERIMENT_NAME": experiment}
    os.environ.update(env)
    run_id = start_parent_run(
        kfp_run_name or pipeline,
        experiment,
        tags={"kfp.pipeline": pipeline, "stage": "pipeline"},
        output_dir=tempfile.mkdtemp(prefix="tracking-"),
    )
    print(f"MLflow parent run {run_id or '(none)'} in experiment {experiment!r} at {redact(resolve_tracking_uri())}")
    return {**env, "MLFLOW_PARENT_RUN_ID": run_id or ""}


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def finish_tracking(tracking: dict = {}, final_stage: str = "register"):  # noqa: B006 - KFP needs a literal default
    """End the parent run: FINISHED when the ``final_stage`` step's run finished and every step's latest run did.

    Runs after the last step even when a step failed (``ignore_upstream_failure``). A step whose pod died leaves
    its run RUNNING: such runs are ended FAILED here (KILLED when a retry of the same step ran after it).
    Tracking never fails the pipeline: an unreachable MLflow gives a warning.
    """
    import os

    parent_id = tracking.get("MLFLOW_PARENT_RUN_ID", "")
    if not parent_id:
        print("no MLflow parent run to finish")
        return
    from mlflow import MlflowClient

    from lora_moe_core.redaction import redact
    from lora_moe_core.tracking.runs import finish_run
    from lora_moe_core.tracking.tracker import HTTP_ENV_DEFAULTS, resolve_tracking_uri

    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = resolve_tracking_uri()
    if redact(uri) != uri:  # MLflow prints "View run … at <the URI>" when a run ends, password included
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]  # a step may log to another experiment
        children = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)
        latest: dict = {}
        for run in sorted(children, key=lambda r: r.info.start_time or 0):  # a retried step: its last attempt counts
            key = (run.data.tags.get("kfp.task", ""), run.info.run_name)
            if key in latest and latest[key].info.status == "RUNNING":
                client.set_terminated(latest[key].info.run_id, status="KILLED")
            latest[key] = run
        for run in latest.values():
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="FAILED")
        failed = sorted(
            f"{run.info.run_name} ({run.info.status})" for run in latest.values() if run.info.status != "FINISHED"
        )
        done = any(r.data.tags.get("stage") == final_stage and r.info.status == "FINISHED" for r in latest.values())
    except Exception as exc:  # noqa: BLE001 - bookkeeping only
        print(f"warning: cannot read the step runs of MLflow run {parent_id}: {redact(str(exc))}")
        return
    status = "FINISHED" if done and not failed else "FAILED"
    finish_run(parent_id, status)
    reason = f"; failed steps: {', '.join(failed)}" if failed else ("" if done else f"; no finished {final_stage} step")
    print(f"MLflow parent run {parent_id}: {status} ({len(latest)} step runs{reason})")
