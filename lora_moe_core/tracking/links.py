"""Browsable MLflow links that open the training-runs view, for everything we print or write.

MLflow 3.17's UI picks its view from the URL parameter ``workflowType`` (``genai`` or ``machine_learning``), else
from the browser's local storage (``mlflow.workflowType``), else ``genai``: a fresh browser opens an experiment in
its GenAI Overview/Traces pages whatever the ``mlflow.experimentKind`` tag says (read from the shipped
``mlflow/server/js/build`` bundle; checked in headless Chromium). Every link therefore names the runs page and
carries ``?workflowType=machine_learning``. The UI routes with the URL fragment (``/#/experiments/...``).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from lora_moe_core.redaction import redact

WORKFLOW_QUERY = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def is_server(tracking_uri: str) -> bool:
    """True for an ``http(s)://`` tracking server (the only stores a browser can open directly)."""
    return tracking_uri.lower().startswith(("http://", "https://"))


def runs_fragment(experiment_id: str, run_id: str | None = None) -> str:
    """``#/experiments/<id>/runs[/<run_id>]?workflowType=machine_learning``."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{page}?{WORKFLOW_QUERY}"


@dataclass(frozen=True)
class MlflowLink:
    """Where to look at an experiment's runs (or one run) in the MLflow UI."""

    url: str  # opens the runs view; for a local store, once ``command`` serves it
    command: str | None = None  # for a local store: ``mlflow ui --backend-store-uri <store>``

    def __str__(self) -> str:
        return self.url if self.command is None else f"{self.command}, then open {self.url}"


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> MlflowLink:
    """The runs view of an experiment (or a run's page) under ``tracking_uri``.

    A server URL loses any ``user:password@`` (a browser asks for them; a printed link must not hold them). Any
    other store (sqlite, a folder) has no UI of its own: the link says which ``mlflow ui`` serves it.
    """
    fragment = runs_fragment(experiment_id, run_id)
    if is_server(tracking_uri):
        parts = urllib.parse.urlsplit(tracking_uri)
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl().rstrip("/")
        return MlflowLink(redact(f"{base}/{fragment}"))
    return MlflowLink(f"{LOCAL_UI}/{fragment}", f"mlflow ui --backend-store-uri {redact(tracking_uri)}")


def experiment_link(tracking_uri: str, experiment: str, run_id: str | None = None) -> MlflowLink | None:
    """:func:`mlflow_link` for an experiment named ``experiment``; None when tracking is off, the store cannot be
    reached or holds no such experiment (a link is an extra and never fails a command)."""
    from lora_moe_core.tracking.mlflow_client import DISABLED_URIS, _make_client, _set_http_defaults, _sqlite_file

    if tracking_uri.strip().lower() in DISABLED_URIS:
        return None
    db_file = _sqlite_file(tracking_uri)
    if db_file is not None and not db_file.is_file():  # opening it would create an empty store
        return None
    _set_http_defaults()
    try:
        found = _make_client(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - an unreachable store only leaves the link out
        return None
    return None if found is None else mlflow_link(tracking_uri, found.experiment_id, run_id)
