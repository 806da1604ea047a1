"""The MLflow client plumbing behind the trackers: which store, how to reach it, its experiments, its errors.

MLflow 3.17 reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from ``os.environ`` on
every request and ``MlflowClient`` has no per-client knob, so :func:`_set_http_defaults` sets short defaults there
(see :mod:`lora_moe_core.tracking.tracker` for why).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lora_moe_core.guards.urls import check_tracking_uri
from lora_moe_core.redaction import redact

# Read by MLflow per request from os.environ (see the module doc); set only where the user has not.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
# The MLflow 3 UI opens an experiment in its training-runs view ("Machine learning") when this experiment tag says
# custom_model_development; untagged ones it guesses, and may open as GenAI (traces). Key and value as the UI's
# own (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT; mlflow/demo/generators/traces.py sets the tag).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DISABLED_URIS = frozenset({"none", "off", "disabled"})
# Error codes meaning "the server answered and refused this data": not an outage, so no retry either.
_REJECTED_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}
)


def resolve_tracking_uri(tracking_uri: str | None = None, output_dir: str | Path | None = None) -> str:
    """Explicit URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir or cwd>/mlruns.db``.

    Raises:
        UserError: a URI MLflow has no store for (:func:`~lora_moe_core.guards.urls.check_tracking_uri`).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:  # an unknown scheme would be taken for a server that is down: refused here, before any run starts
        return check_tracking_uri(uri, "MLflow tracking URI" if tracking_uri else "MLFLOW_TRACKING_URI")
    folder = Path(output_dir) if output_dir is not None else Path.cwd()
    return f"sqlite:///{(folder / 'mlruns.db').resolve()}"


def local_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """For a sqlite file store: ``<db folder>/mlartifacts/<experiment>``. ``None`` for servers and ``:memory:``.

    Without an explicit location MLflow's sqlite store puts artifacts under ``./mlruns`` of the *current*
    directory, which scatters them wherever the trainer happened to be started.
    """
    db_file = _sqlite_file(tracking_uri)
    if db_file is None:
        return None
    safe_name = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "default"
    return str((db_file.parent / "mlartifacts" / safe_name).resolve())


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative with three slashes, absolute with four)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def _set_http_defaults() -> None:
    """Short MLflow HTTP timeout/retries (read per request from os.environ); keeps values set by the user."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _make_client(tracking_uri: str):
    from mlflow import MlflowClient  # slow import (~1.5 s): only when tracking is used

    level = os.environ.get("MLFLOW_LOGGING_LEVEL")
    if level:  # MLflow reads it once, at its import: apply it even when something imported MLflow earlier
        logging.getLogger("mlflow").setLevel(level.upper())
    db_file = _sqlite_file(tracking_uri)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    # MLflow prints "View run … at <server>/#/experiments/<id>/runs/<run>" when a run ends: a link that opens the
    # GenAI view in a fresh browser, with any password of the URI in it. The tracker prints its own (tracking.links).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    """Get or create the experiment (restoring a deleted one); safe when parallel steps race to create it."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before this tag existed; a kind the user chose stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


class _Rejected(Exception):
    """A call that can never succeed (e.g. the artifact file is gone): dropped, not retried."""


def _short(exc: BaseException) -> str:
    text = redact(" ".join(str(exc).split()) or type(exc).__name__)  # MLflow puts URLs in its messages
    return text if len(text) <= 300 else text[:300] + "…"
