"""Tracking against real MLflow stores: a local sqlite file, a real ``mlflow server``, and a closed port."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from lora_moe_core.errors import UserError
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.mlflow_client import HTTP_ENV_DEFAULTS
from lora_moe_core.tracking.runs import finish_run, register_model, start_parent_run
from lora_moe_core.tracking.tracker import (
    FALLBACK_FILE,
    MAX_PARAM_VALUE,
    MLflowTracker,
    NullTracker,
    Tracker,
    flatten_params,
    start_tracker,
)
from tests.mlflow_server import MlflowServer, mlflow_s3_server, mlflow_server  # noqa: F401 (fixtures)

ENV_KEYS = (*HTTP_ENV_DEFAULTS, "MLFLOW_TRACKING_URI", "KFP_RUN_ID", "KFP_RUN_NAME", "KFP_TASK_NAME")
ORIGINAL_ENV = {key: os.environ.get(key) for key in ENV_KEYS}  # the developer's shell, before any test
CONFIG = {"router": {"top_k": 2, "experts": ["Scissors", "Hook"]}, "optimizer": {"lr": 1e-4}, "seed": 0}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without these variables, and whatever start_tracker sets is removed afterwards.

    setenv-then-delenv makes monkeypatch record the original state; a bare delenv of an unset variable
    records nothing, so a value set later by the code under test would leak into other tests.
    """
    for key in ENV_KEYS:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _closed_port_uri() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here once the socket is closed


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lora_moe_core.tracking.tracker" and r.levelno >= 30]


def _write_checkpoint(folder: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lora_moe_final.safetensors"
    save_file({"router_weight": np.zeros((4, 8), dtype=np.float32)}, str(path), metadata={"format_version": "1"})
    return path


def test_flatten_params_nested_lists_and_long_values() -> None:
    flat = flatten_params({**CONFIG, "empty": {}, "long": "x" * (MAX_PARAM_VALUE + 10)})
    assert flat["router.top_k"] == "2"
    assert flat["router.experts"] == '["Scissors", "Hook"]'
    assert flat["optimizer.lr"] == "0.0001"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == MAX_PARAM_VALUE


def test_tracking_off_gives_null_tracker(tmp_path: Path) -> None:
    tracker = start_tracker("x", tracking_uri="none", output_dir=tmp_path)
    assert isinstance(tracker, NullTracker) and isinstance(tracker, Tracker)
    with tracker as t:
        t.log_params(CONFIG)
        t.log_metrics({"loss": 1.0}, step=0)
    assert list(tmp_path.iterdir()) == []


def test_default_is_local_sqlite_next_to_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in the current directory
    out = tmp_path / "out"
    ckpt = _write_checkpoint(out / "ckpt")
    with start_tracker("stage1", output_dir=out) as tracker:
        assert isinstance(tracker, MLflowTracker) and tracker.run_id
        tracker.log_params(CONFIG)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        tracker.log_artifact(ckpt.parent, "checkpoints")
    assert tracker.tracking_uri == f"sqlite:///{(out / 'mlruns.db').resolve()}"
    client = _client(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["router.top_k"] == "2" and run.data.params["seed"] == "0"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1, 2]
    assert run.info.artifact_uri.startswith(str((out / "mlartifacts" / "lora-moe").resolve()))
    assert (Path(run.info.artifact_uri) / "checkpoints" / ckpt.name).is_file()
    assert list(elsewhere.iterdir()) == [] and not (out / FALLBACK_FILE).exists()
    # The registry works on the same sqlite file (MLflow 3 has no registry on a plain file store).
    assert register_model(tracker.tracking_uri, "local-lora", "checkpoints", tracker.run_id) == "1"


def test_server_run_params_metrics_artifacts_tags_and_parent(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    print(f"mlflow server ready in {mlflow_server.start_seconds:.1f} s")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-1234")
    monkeypatch.setenv("KFP_RUN_NAME", "nightly")
    experiment = f"exp-{uuid.uuid4().hex[:8]}"
    parent_id = start_parent_run(
        "pipeline", TrackingContext(experiment, kfp_run_id="kfp-1234", kfp_run_name="nightly"), output_dir=tmp_path
    )
    assert parent_id
    report = tmp_path / "metrics.json"
    report.write_text('{"fid": 1.5}')
    with start_tracker(
        "stage2", experiment, parent_run_id=parent_id, tags={"step": "stage2"}, output_dir=tmp_path
    ) as t:
        t.log_params(CONFIG)
        for step in range(5):
            t.log_metrics({"loss": 5.0 - step, "router/entropy": 0.5}, step=step)
        t.log_artifact(report, "eval")
        t.set_tags({"phase": "done"})
    assert finish_run(parent_id)

    client = _client(mlflow_server.uri)
    child = client.get_run(t.run_id)
    assert child.data.params["router.experts"] == '["Scissors", "Hook"]'
    assert [(m.step, m.value) for m in client.get_metric_history(t.run_id, "loss")] == [(s, 5.0 - s) for s in range(5)]
    tags = child.data.tags
    assert tags["kfp.run_id"] == "kfp-1234" and tags["kfp.run_name"] == "nightly"
    assert tags["mlflow.parentRunId"] == parent_id and tags["step"] == "stage2" and tags["phase"] == "done"
    assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    assert [a.path for a in client.list_artifacts(t.run_id, "eval")] == ["eval/metrics.json"]
    local = client.download_artifacts(t.run_id, "eval/metrics.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == '{"fid": 1.5}'
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp.run_id"] == "kfp-1234"
    children = client.search_runs([child.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert [r.info.run_id for r in children] == [t.run_id]
    assert not (tmp_path / FALLBACK_FILE).exists()


def test_unreachable_server_does_not_stop_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    uri = _closed_port_uri()
    started = time.monotonic()
    tracker = start_tracker("stage2", tracking_uri=uri, output_dir=tmp_path)
    start_s = time.monotonic() - started
    assert start_s < 10, f"start_tracker blocked {start_s:.1f} s"
    assert tracker.run_id is None
    loop_started = time.monotonic()
    tracker.log_params(CONFIG)
    for step in range(20):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.log_artifact(tmp_path / "missing.safetensors")
    loop_s = time.monotonic() - loop_started
    with pytest.raises(UserError, match="unreachable"):
        register_model(tracker, "lora-moe", "checkpoints", tracker.run_id)
    tracker.close("FINISHED")
    print(f"start_tracker against a closed port: {start_s:.2f} s; 22 calls: {loop_s:.3f} s")
    assert loop_s < 1.0  # within the retry interval the server is not contacted at all

    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 2 and uri in warnings[0]  # one for the outage, one at close pointing to the file
    assert f"lora-moe sync-tracking {tmp_path / FALLBACK_FILE}" in warnings[1]
    lines = [json.loads(line) for line in (tmp_path / FALLBACK_FILE).read_text().splitlines()]
    metrics = [line for line in lines if line["kind"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(20))
    assert metrics[3]["metrics"] == {"loss": 0.25}
    assert lines[0]["kind"] == "run" and lines[0]["tracking_uri"] == uri
    assert {line["kind"] for line in lines} == {"run", "start", "params", "metrics", "artifact", "close"}


def test_mid_run_outage_queues_and_replays(
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.exceptions import MlflowException

    caplog.set_level(logging.WARNING)
    tracker = start_tracker("stage2", tracking_uri=mlflow_server.uri, output_dir=tmp_path)
    tracker.retry_interval_s = 0.3
    tracker.log_metrics({"loss": 0.0}, step=0)
    real_log_batch = tracker.client.log_batch

    def broken(*args, **kwargs):
        raise MlflowException(f"API request to {mlflow_server.uri} failed with exception ConnectionError")

    monkeypatch.setattr(tracker.client, "log_batch", broken)
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)
    monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
    tracker.log_metrics({"loss": 4.0}, step=4)  # still inside the retry interval: queued, not sent
    time.sleep(0.35)
    tracker.log_metrics({"loss": 5.0}, step=5)  # server tried again: queue replayed in order
    tracker.log_params({"a": 1})
    tracker.log_params({"a": 2})  # MLflow refuses changing a param: a warning, not an outage
    tracker.log_metrics({"loss": 6.0}, step=6)
    tracker.close()

    history = _client(mlflow_server.uri).get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(7))
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 2 and "unreachable" in warnings[0] and "refused" in warnings[1]
    lines = [json.loads(line) for line in (tmp_path / FALLBACK_FILE).read_text().splitlines()]
    assert [line.get("step") for line in lines if line["kind"] == "metrics"] == [1, 2, 3, 4]
    assert lines[-1]["kind"] == "params" and lines[-1]["params"] == {"a": "2"} and "refused" in lines[-1]


def test_register_model_candidate_alias(mlflow_server: MlflowServer, tmp_path: Path) -> None:  # noqa: F811
    ckpt = _write_checkpoint(tmp_path / "out")
    name = f"lora-moe-{uuid.uuid4().hex[:8]}"
    with start_tracker("stage2", tracking_uri=mlflow_server.uri, output_dir=tmp_path) as tracker:
        tracker.log_artifact(ckpt.parent, "checkpoints")
        version = register_model(tracker, name, "checkpoints", tracker.run_id, tags={"format": "safetensors"})
    assert version == "1"
    client = _client(mlflow_server.uri)
    model_version = client.get_model_version_by_alias(name, "candidate")
    assert model_version.version == "1" and model_version.run_id == tracker.run_id
    assert model_version.source.endswith("/checkpoints") and model_version.tags == {"format": "safetensors"}
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        model_version.source, dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server.uri
    )
    assert (Path(local) / ckpt.name).read_bytes() == ckpt.read_bytes()
    # A second registration (runs:/ form) becomes version 2 and takes the alias.
    assert register_model(mlflow_server.uri, name, f"runs:/{tracker.run_id}/checkpoints", tracker.run_id) == "2"
    assert client.get_model_version_by_alias(name, "candidate").version == "2"
    with pytest.raises(UserError, match="no run_id"):
        register_model(mlflow_server.uri, name, "checkpoints", None)


def test_http_defaults_set_only_when_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    start_tracker("x", tracking_uri=_closed_port_uri(), output_dir=tmp_path).close()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"  # the operator's value wins
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    monkeypatch.undo()  # what _clean_env does after every test: nothing set by start_tracker survives
    assert {key: os.environ.get(key) for key in ENV_KEYS} == ORIGINAL_ENV


def test_artifacts_on_s3(mlflow_s3_server: MlflowServer, s3_server, tmp_path: Path) -> None:  # noqa: F811
    from minio import Minio

    ckpt = _write_checkpoint(tmp_path / "out")
    with start_tracker("s3", tracking_uri=mlflow_s3_server.uri, output_dir=tmp_path) as tracker:
        tracker.log_artifact(ckpt.parent, "checkpoints")
        version = register_model(tracker, f"s3-lora-{uuid.uuid4().hex[:8]}", "checkpoints", tracker.run_id)
    assert version == "1"
    minio = Minio(s3_server.endpoint_url.split("://", 1)[1], s3_server.access_key, s3_server.secret_key, secure=False)
    keys = [o.object_name for o in minio.list_objects("mlflow", prefix="artifacts/", recursive=True)]
    assert any(key.endswith(f"{tracker.run_id}/artifacts/checkpoints/{ckpt.name}") for key in keys), keys
