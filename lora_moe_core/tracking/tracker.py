"""Experiment tracking behind a small interface: the trainer calls a ``Tracker`` and never imports MLflow.

``start_tracker`` returns an ``MLflowTracker`` bound to one MLflow run (by run id, through ``MlflowClient``:
no fluent global active run, so several trackers can live in one process). The tracking URI is the explicit
argument, else ``MLFLOW_TRACKING_URI``, else a sqlite file ``<output_dir>/mlruns.db`` whose artifacts go to
``<output_dir>/mlartifacts`` (MLflow 3 needs a database store for the model registry). ``"none"`` gives a
``NullTracker``.

Tracking never stops training. When the server cannot be reached (at start or mid-run) the tracker logs one
warning naming the URI, appends every call to ``<output_dir>/tracking_fallback.jsonl`` (one JSON object per
line), keeps the unsent calls in memory and tries the server again at most every ``retry_interval_s``
(60 s); once it answers, the run is created if needed and the queued calls are replayed in order. Data the
server refuses (e.g. a param changed on resume) is written to the fallback file with a warning and dropped.
Calls still unsent when the run closes stay in the file, with a warning that points to it; ``lora-moe
sync-tracking <file>`` (:mod:`lora_moe_core.tracking.replay`) sends them once the server is back. Each line
names its tracker and a sequence number, and a ``replayed`` line records what reached the server, so replaying
twice sends nothing twice.

MLflow 3.17 reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from ``os.environ`` on
every request (``mlflow.utils.rest_utils.http_request``) and ``MlflowClient`` has no per-client knob, so
``start_tracker`` sets short defaults there: 10 s timeout, 1 retry (the first retry has no backoff sleep).
MLflow's own defaults, 120 s and 7 retries with exponential backoff, would block a step for minutes. They are
process-wide and set only when unset, so an operator's explicit values win. A refused connection (server pod
down) fails at once; a black-holed host costs at most ~20 s per attempt, once per retry interval.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lora_moe_core.defaults import EXPERIMENT
from lora_moe_core.redaction import redact, redact_mapping
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.datasets import DatasetRef
from lora_moe_core.tracking.links import MlflowLink, is_server, mlflow_link
from lora_moe_core.tracking.mlflow_client import (
    _REJECTED_CODES,
    DISABLED_URIS,
    _experiment_id,
    _make_client,
    _Rejected,
    _set_http_defaults,
    _short,
    local_artifact_root,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

FALLBACK_FILE = "tracking_fallback.jsonl"
RETRY_INTERVAL_S = 60.0
PARENT_RUN_TAG = "mlflow.parentRunId"
KFP_TASK_RUN_ENV = "MLFLOW_RUN_ID"  # set by KFP >= 2.17 in each task when its MLflow integration is on
# MLflow 3.17 limits (mlflow/utils/validation.py): values beyond these make the whole batch fail.
MAX_PARAM_VALUE, MAX_TAG_VALUE, MAX_KEY = 6000, 8000, 250
PARAMS_TAGS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_PENDING = 10_000  # unsent calls kept for replay; older ones survive only in the fallback file


@runtime_checkable
class Tracker(Protocol):
    """What the trainer logs to. Implementations never raise because tracking failed."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(self, dataset: DatasetRef) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class _TrackerContext:
    """``with start_tracker(...) as t:`` closes the run FINISHED, or FAILED when the block raised."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


class NullTracker(_TrackerContext):
    """Tracking switched off (``tracking_uri="none"``): every method does nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(self, dataset: DatasetRef) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"router": {"top_k": 2}}`` → ``{"router.top_k": "2"}``; lists as JSON, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple | dict):
            flat[name] = json.dumps(value, default=str, ensure_ascii=False)[:MAX_PARAM_VALUE]
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE]
    return flat


class MLflowTracker(_TrackerContext):
    """One MLflow run, addressed by run id; degrades to a JSONL file while the server is away (see module doc)."""

    def __init__(
        self,
        tracking_uri: str,
        run_name: str,
        experiment: str = EXPERIMENT,
        tags: dict[str, str] | None = None,
        fallback_path: str | Path = FALLBACK_FILE,
        retry_interval_s: float = RETRY_INTERVAL_S,
        run_id: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        self.experiment = experiment
        self.tags = redact_mapping({k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()})
        self.fallback_path = Path(fallback_path)
        self.retry_interval_s = retry_interval_s
        self.run_id = run_id  # None until the run exists on the server
        self.experiment_id: str | None = None  # known once this tracker created the run
        self.client = None
        self.tracker_id = uuid.uuid4().hex[:12]  # tags this tracker's lines in a fallback file shared by several
        self._seq = 0
        self._in_fallback: set[int] = set()  # sequence numbers of queued calls already written to the file
        self._pending: deque[dict[str, Any]] = deque()
        self._offline = False
        self._retry_at = 0.0  # time.monotonic() before which the server is not tried again
        self._fallback_started = False
        self._closed = False

    # -- the Tracker interface -------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log a (nested) config: keys flattened with dots, values stringified."""
        self._submit({"kind": "params", "params": redact_mapping(flatten_params(params))})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log several metrics at one step in one request; values that are not numbers are skipped."""
        values: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                log.warning("tracking: metric %r has a non-numeric value %r; skipped", key, value)
        if values:
            self._submit({"kind": "metrics", "metrics": values, "step": int(step), "timestamp": _now_ms()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` of the run."""
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dataset(self, dataset: DatasetRef) -> None:
        """Log a dataset input of the run (``MlflowClient.log_inputs``), shown in the run's Datasets and lineage."""
        self._submit(dataset.entry())

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values stringified)."""
        self._submit({"kind": "tags", "tags": redact_mapping({k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()})})

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED, KILLED); tries the server once more to flush the queue."""
        if self._closed:
            return
        self._retry_at = 0.0  # the last chance to replay what is queued, whatever the retry clock says
        self._submit({"kind": "close", "status": status})
        self._closed = True
        if self._pending:
            steps = {entry["step"] for entry in self._pending if entry["kind"] == "metrics"}
            log.warning(
                "tracking: %d calls (metrics of %d steps) were not sent to MLflow at %s; they are kept in %s: "
                "send them with `lora-moe sync-tracking %s` once the server is back",
                len(self._pending),
                len(steps),
                redact(self.tracking_uri),
                self.fallback_path,
                self.fallback_path,
            )

    def link(self) -> MlflowLink | None:
        """Where this run's page opens in the MLflow UI (runs view); None until the run exists."""
        if self.run_id is None or self.experiment_id is None:
            return None
        return mlflow_link(self.tracking_uri, self.experiment_id, self.run_id)

    @property
    def unsent(self) -> int:
        """How many calls are queued, not yet accepted by the server (all of them are in the fallback file)."""
        return len(self._pending)

    # -- connection and queue --------------------------------------------------------------------------------
    def flush(self) -> bool:
        """Try to send the queued calls now, whatever the retry clock says; True if nothing is left queued."""
        self._flush()
        return not self._pending

    def connect(self) -> bool:
        """Create the client, the experiment and the run now; False (after one warning) if unreachable."""
        try:
            self._ensure_run()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure here means "offline", never a crash
            self._go_offline(exc)
            self._write_fallback({"kind": "start"})
            return False

    def _ensure_run(self) -> None:
        if self.client is None:
            self.client = _make_client(self.tracking_uri)
        if self.run_id is None:
            location = local_artifact_root(self.tracking_uri, self.experiment)
            self.experiment_id = _experiment_id(self.client, self.experiment, location)
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id

    def _submit(self, entry: dict[str, Any]) -> None:
        """Queue one call and send the queue, or only record it while offline. Never raises."""
        if self._closed:
            log.warning("tracking: %s logged after close(); ignored", entry["kind"])
            return
        self._seq += 1
        entry["seq"] = self._seq
        self._pending.append(entry)
        if len(self._pending) > MAX_PENDING:
            dropped = self._pending.popleft()  # in the fallback file already: written when it could not be sent
            self._in_fallback.discard(dropped["seq"])
        if not (self._offline and time.monotonic() < self._retry_at):
            self._flush()
        if self._pending and self._pending[-1] is entry:
            self._write_fallback(entry)
            self._in_fallback.add(entry["seq"])

    def _flush(self) -> None:
        """Send queued calls in order; stop at the first outage, drop (and record) refused ones."""
        try:
            self._ensure_run()
        except Exception as exc:  # noqa: BLE001
            self._go_offline(exc)
            return
        replayed = None  # the last call sent that the fallback file holds as unsent
        try:
            while self._pending:
                entry = self._pending[0]
                try:
                    self._send(entry)
                except Exception as exc:  # noqa: BLE001
                    if not (isinstance(exc, _Rejected) or getattr(exc, "error_code", None) in _REJECTED_CODES):
                        self._go_offline(exc)
                        return
                    log.warning("tracking: %s refused by %s: %s", entry["kind"], redact(self.tracking_uri), _short(exc))
                    self._write_fallback({**entry, "refused": _short(exc)})
                self._pending.popleft()
                if entry["seq"] in self._in_fallback:
                    self._in_fallback.discard(entry["seq"])
                    replayed = entry["seq"]
        finally:
            if replayed is not None:  # so that `lora-moe sync-tracking` does not send these again
                self._write_fallback({"kind": "replayed", "upto": replayed})
        if self._offline:
            self._offline = False
            log.info("tracking: MLflow at %s reachable again; queued calls replayed", redact(self.tracking_uri))

    def _send(self, entry: dict[str, Any]) -> None:
        kind, client, run_id = entry["kind"], self.client, self.run_id
        if kind in ("params", "tags", "metrics"):
            items, size = _entities(entry)
            for i in range(0, len(items), size):  # log_batch caps: 100 params/tags, 1000 metrics per request
                client.log_batch(run_id, **{kind: items[i : i + size]}, synchronous=True)
        elif kind == "artifact":
            path = Path(entry["path"])
            if path.is_dir():
                client.log_artifacts(run_id, str(path), entry["artifact_path"])
            elif path.is_file():
                client.log_artifact(run_id, str(path), entry["artifact_path"])
            else:
                raise _Rejected(f"no such file or folder: {path}")
        elif kind == "dataset":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            from lora_moe_core.tracking.datasets import DATASET_CONTEXT_TAG

            dataset = Dataset(entry["name"], entry["digest"], entry["source_type"], entry["source"],
                              profile=entry.get("profile"))  # fmt: skip
            client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(DATASET_CONTEXT_TAG, entry["context"])])])
        elif kind == "close":
            client.set_terminated(run_id, status=entry["status"])
            if self.experiment_id is not None and is_server(self.tracking_uri):  # in place of MLflow's own line
                print(f"MLflow run {self.run_name}: {self.link()}", flush=True)

    def _go_offline(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_interval_s
        if not self._offline:  # one warning per outage, not one per step
            self._offline = True
            log.warning(
                "tracking: MLflow at %s unreachable (%s); training continues, logging to %s and retrying "
                "at most every %.0f s",
                redact(self.tracking_uri),
                _short(exc),
                self.fallback_path,
                self.retry_interval_s,
            )

    def _write_fallback(self, entry: dict[str, Any]) -> None:
        """Append one JSON line; the first line of a tracker says which run the following lines belong to."""
        lines = []
        if not self._fallback_started:
            header = {"kind": "run", "tracker": self.tracker_id, "run_name": self.run_name, "run_id": self.run_id}
            lines.append(
                {**header, "experiment": self.experiment, "tracking_uri": redact(self.tracking_uri), "tags": self.tags}
            )
            self._fallback_started = True
        lines.append({"time_ms": _now_ms(), "tracker": self.tracker_id, "run_name": self.run_name,
                      "run_id": self.run_id, **entry})  # fmt: skip
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(line, default=str, ensure_ascii=False) + "\n" for line in lines)
        except OSError as exc:  # a full or read-only disk must not stop training either
            log.warning("tracking: cannot write %s: %s", self.fallback_path, exc)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _entities(entry: dict[str, Any]) -> tuple[list, int]:
    """MLflow entities for a params/tags/metrics entry, and how many of them fit in one ``log_batch``."""
    from mlflow.entities import Metric, Param, RunTag

    if entry["kind"] == "metrics":
        step, stamp = entry["step"], entry["timestamp"]
        return [Metric(k[:MAX_KEY], v, stamp, step) for k, v in entry["metrics"].items()], METRICS_PER_BATCH
    entity = Param if entry["kind"] == "params" else RunTag
    return [entity(k[:MAX_KEY], v) for k, v in entry[entry["kind"]].items()], PARAMS_TAGS_PER_BATCH


def start_tracker(
    run_name: str,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    output_dir: str | Path | None = None,
    context: TrackingContext | None = None,
) -> MLflowTracker | NullTracker:
    """Start a run tagged with the KFP linkage of ``context``; see the module doc.

    ``context`` (default: the one this process was started with, :meth:`TrackingContext.from_env`) gives the
    experiment, the parent run and the KFP tags; ``experiment`` and ``parent_run_id`` override it.
    """
    context = context if context is not None else TrackingContext.from_env()
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    if uri.strip().lower() in DISABLED_URIS:
        return NullTracker()
    _set_http_defaults()
    all_tags = {**context.tags(), **(tags or {})}
    # KFP's MLflow integration (KEP-12862) gives each task a run of its own: ours nests under it
    parent = parent_run_id or os.environ.get(KFP_TASK_RUN_ENV) or context.parent_run_id
    if parent:
        all_tags[PARENT_RUN_TAG] = parent
    folder = Path(output_dir) if output_dir is not None else Path.cwd()
    tracker = MLflowTracker(uri, run_name, experiment or context.experiment, all_tags,
                            fallback_path=folder / FALLBACK_FILE)  # fmt: skip
    tracker.connect()
    return tracker
