"""MLflow runs beyond one tracker: the pipeline's parent run and model registration.

The trainer's per-run logging is :mod:`lora_moe_core.tracking.tracker`; this module holds what a pipeline does around
it: open a parent run for the child steps, end it from the exit handler, and register a logged folder as a model
version with an alias.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lora_moe_core.errors import UserError
from lora_moe_core.redaction import redact
from lora_moe_core.tracking.tracker import (
    DEFAULT_EXPERIMENT,
    MLflowTracker,
    _make_client,
    _set_http_defaults,
    _short,
    resolve_tracking_uri,
    start_tracker,
)

log = logging.getLogger(__name__)


def start_parent_run(
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    output_dir: str | Path | None = None,
) -> str | None:
    """Create the pipeline run's parent run and leave it RUNNING; its id goes to every step as ``parent_run_id``.

    Returns ``None`` when tracking is off or the server is unreachable: the steps then run without a parent.
    End it with ``finish_run`` from the pipeline's last step or exit handler.
    """
    tracker = start_tracker(run_name, experiment, tracking_uri, tags, output_dir=output_dir)
    return tracker.run_id


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
