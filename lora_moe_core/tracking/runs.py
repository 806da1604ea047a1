"""MLflow runs beyond one tracker: the pipeline's parent run and model registration.

The trainer's per-run logging is :mod:`lora_moe_core.tracking.tracker`; this module holds what a pipeline does around
it: open a parent run for the child steps, end it from the exit handler, and register a logged folder as a model
version with an alias.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lora_moe_core.errors import UserError
from lora_moe_core.redaction import redact
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.mlflow_client import (
    DISABLED_URIS,
    _make_client,
    _set_http_defaults,
    _short,
    resolve_tracking_uri,
)
from lora_moe_core.tracking.tracker import KFP_TASK_RUN_ENV, PARENT_RUN_TAG, MLflowTracker, start_tracker

log = logging.getLogger(__name__)
OWNER_TAG = "lora_moe.parent_owner"  # "kfp": the parent run is KFP's (its MLflow integration); KFP ends it


def open_pipeline_run(
    run_name: str,
    context: TrackingContext,
    tags: dict[str, str] | None = None,
    output_dir: str | Path | None = None,
    tracking_uri: str | None = None,
) -> TrackingContext:
    """The context every step of a pipeline run logs under: its ``parent_run_id`` is KFP's own run of this
    pipeline run when KFP's MLflow integration is on (``MLFLOW_RUN_ID`` in the environment: no second parent run),
    else a parent run created here (empty when tracking is off or the server is unreachable)."""
    adopted = _kfp_parent_run(context, tags or {}, tracking_uri)
    if adopted is not None:
        return adopted
    run_id = start_parent_run(run_name, context, tracking_uri, tags, output_dir)
    return replace(context, parent_run_id=run_id or "")


def _kfp_parent_run(context: TrackingContext, tags: dict[str, str], tracking_uri: str | None) -> TrackingContext | None:
    """KFP's parent run (the parent of this task's ``MLFLOW_RUN_ID``) and its experiment, tagged like ours."""
    task_run = os.environ.get(KFP_TASK_RUN_ENV)
    uri = resolve_tracking_uri(tracking_uri)
    if not task_run or uri.strip().lower() in DISABLED_URIS:
        return None
    _set_http_defaults()
    try:
        client = _make_client(uri)
        run = client.get_run(task_run)
        parent = run.data.tags.get(PARENT_RUN_TAG) or task_run
        experiment = client.get_experiment(run.info.experiment_id).name
        for key, value in {**context.tags(), **tags, OWNER_TAG: "kfp"}.items():
            client.set_tag(parent, key, value)
    except Exception as exc:  # noqa: BLE001 - tracking never stops the pipeline
        log.warning("tracking: cannot read KFP's MLflow run %s: %s", task_run, redact(str(exc)))
        return None
    return replace(context, experiment=experiment, parent_run_id=parent)


def start_parent_run(
    run_name: str,
    context: TrackingContext,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    output_dir: str | Path | None = None,
) -> str | None:
    """Create the pipeline run's parent run and leave it RUNNING; its id goes to every step as ``parent_run_id``.

    Returns ``None`` when tracking is off or the server is unreachable: the steps then run without a parent.
    End it with ``finish_parent_run`` from the pipeline's exit step.
    """
    tracker = start_tracker(run_name, tracking_uri=tracking_uri, tags=tags, output_dir=output_dir, context=context)
    return tracker.run_id


def log_to_parent_run(
    context: TrackingContext, files: list[tuple[Path, str]], output_dir: str | Path, tracking_uri: str | None = None
) -> bool:
    """Upload ``(file, artifact folder)`` pairs to the pipeline's parent run as well (the report and plots are what
    a reader of the pipeline run looks for first). The parent stays RUNNING: ``finish-tracking`` ends it.

    Returns False when there is no parent, tracking is off, or MLflow is away: the calls then wait in
    ``<output_dir>/tracking_fallback.jsonl`` for ``lora-moe sync-tracking``, as every other call does.
    """
    from lora_moe_core.tracking.tracker import FALLBACK_FILE

    uri = resolve_tracking_uri(tracking_uri, output_dir)
    if not context.parent_run_id or uri.strip().lower() in DISABLED_URIS:
        return False
    _set_http_defaults()
    parent = MLflowTracker(uri, "parent", context.experiment, fallback_path=Path(output_dir) / FALLBACK_FILE,
                           run_id=context.parent_run_id)  # fmt: skip
    for path, folder in files:
        parent.log_artifact(path, folder)
    return parent.flush()


def finish_run(
    run_id: str, status: str = "FINISHED", tracking_uri: str | None = None, output_dir: str | Path | None = None
) -> bool:
    """End a run started elsewhere (the parent run); False, with a warning, if the server cannot be reached."""
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    _set_http_defaults()
    try:
        _make_client(uri).set_terminated(run_id, status=status)
        return True
    except Exception as exc:  # noqa: BLE001 - ending the parent run is bookkeeping, never fatal
        log.warning("tracking: cannot end run %s at %s: %s", run_id, redact(uri), _short(exc))
        return False


def register_model(
    tracker_or_uri: MLflowTracker | str | None,
    model_name: str,
    source_dir_or_uri: str,
    run_id: str | None,
    alias: str = "candidate",
    tags: dict[str, str] | None = None,
) -> str:
    """Register a logged folder (e.g. safetensors files) as a new version of ``model_name`` and alias it.

    ``source_dir_or_uri`` is a URI (``runs:/<id>/<path>`` is resolved to the run's artifact URI, since MLflow 3
    resolves ``runs:/`` to LoggedModels only) or a path inside ``run_id``'s artifacts such as ``"checkpoints"``.
    Uses ``create_model_version`` (``mlflow.register_model`` fails for a plain folder). Returns the version
    number as a string. Raises ``UserError`` (one line) if the registry refuses or cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(tracker_or_uri, MLflowTracker):
        uri, client = tracker_or_uri.tracking_uri, tracker_or_uri.client
        if not tracker_or_uri.flush():  # the files to register may still sit in the offline queue
            raise UserError(f"cannot register model {model_name!r}: MLflow at {uri} is unreachable")
    else:
        uri, client = resolve_tracking_uri(tracker_or_uri), None
    _set_http_defaults()
    try:
        client = client or _make_client(uri)
        source = _model_source(client, source_dir_or_uri, run_id)
        try:
            client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(model_name, source, run_id=run_id, tags=tags)
        client.set_registered_model_alias(model_name, alias, version.version)
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot register model {model_name!r} at {uri}: {_short(exc)}") from exc
    return str(version.version)


def _model_source(client, source: str, run_id: str | None) -> str:
    if source.startswith("runs:/"):
        source_run, _, path = source.removeprefix("runs:/").partition("/")
        return f"{client.get_run(source_run).info.artifact_uri}/{path}".rstrip("/")
    if re.match(r"^[A-Za-z][\w+.-]*:", source):  # any other URI scheme: s3://, mlflow-artifacts:/, file:/…
        return source
    if run_id is None:
        raise UserError(f"model source {source!r} is a path inside a run's artifacts, but no run_id was given")
    return f"{client.get_run(run_id).info.artifact_uri}/{source.strip('/')}"


@dataclass
class ParentRunOutcome:
    """How ``finish_parent_run`` ended a pipeline's parent run."""

    status: str  # FINISHED or FAILED
    step_runs: int  # the latest run of each step
    failed: list[str]  # "<run name> (<status>)" of every step run that did not finish
    final_stage_done: bool

    def line(self, parent_id: str, final_stage: str) -> str:
        reason = f"; failed steps: {', '.join(self.failed)}" if self.failed else ""
        if not self.failed and not self.final_stage_done:
            reason = f"; no finished {final_stage} step"
        return f"MLflow parent run {parent_id}: {self.status} ({self.step_runs} step runs{reason})"


def finish_parent_run(parent_id: str, final_stage: str, tracking_uri: str | None = None) -> ParentRunOutcome | None:
    """End a pipeline's parent run: FINISHED when the ``final_stage`` step finished and every step's latest run did.

    A step whose pod died leaves its run RUNNING: such runs are ended FAILED (KILLED when a later attempt of the
    same step ran after it). Returns None, with a warning, when the server cannot be read; never raises.
    """
    uri = resolve_tracking_uri(tracking_uri)
    _set_http_defaults()
    try:
        client = _make_client(uri)
        kfp_owned = client.get_run(parent_id).data.tags.get(OWNER_TAG) == "kfp"
        children = _step_runs(client, parent_id, kfp_owned)
        latest: dict = {}
        for run in sorted(children, key=lambda r: r.info.start_time or 0):  # a retried step: its last attempt counts
            key = (run.data.tags.get("kfp.task", ""), run.info.run_name)
            if key in latest and latest[key].info.status == "RUNNING":
                client.set_terminated(latest[key].info.run_id, status="KILLED")
            latest[key] = run
        for run in latest.values():
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as exc:  # noqa: BLE001 - bookkeeping only
        log.warning("tracking: cannot read the step runs of MLflow run %s: %s", parent_id, redact(str(exc)))
        return None
    failed = sorted(f"{r.info.run_name} ({r.info.status})" for r in latest.values() if r.info.status != "FINISHED")
    done = any(r.data.tags.get("stage") == final_stage and r.info.status == "FINISHED" for r in latest.values())
    outcome = ParentRunOutcome("FINISHED" if done and not failed else "FAILED", len(latest), failed, done)
    if not kfp_owned:  # KFP's own parent run is ended by KFP when the pipeline run ends
        finish_run(parent_id, outcome.status, uri)
    return outcome


def _step_runs(client, parent_id: str, kfp_owned: bool) -> list:
    """Our step runs under ``parent_id``: its children; under KFP's MLflow integration (``kfp_owned``) the
    children of its task runs (ours nest under each task's run), never KFP's own runs (no ``stage`` tag: KFP's to
    end)."""
    experiments = [e.experiment_id for e in client.search_experiments()]  # a step may log to another experiment

    def children(run_id: str) -> list:
        return client.search_runs(experiments, f"tags.`{PARENT_RUN_TAG}` = '{run_id}'", max_results=5000)

    if not kfp_owned:
        return children(parent_id)
    runs = []
    for run in children(parent_id):
        runs += [run] if "stage" in run.data.tags else children(run.info.run_id)
    return [run for run in runs if "stage" in run.data.tags]
