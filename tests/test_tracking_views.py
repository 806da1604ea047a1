"""What a researcher sees in MLflow: the experiment kind, dataset inputs (lineage), system metrics, and the
evaluation report on the pipeline's parent run; all of it also through an outage (fallback file, replay)."""

from __future__ import annotations

import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest

from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.datasets import DatasetRef, labelled_dataset
from lora_moe_core.tracking.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from lora_moe_core.tracking.replay import replay_fallback
from lora_moe_core.tracking.runs import log_to_parent_run, start_parent_run
from lora_moe_core.tracking.system import SystemMetricsTracker
from lora_moe_core.tracking.tracker import FALLBACK_FILE, start_tracker


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_experiment_opens_in_the_training_runs_view(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    start_tracker("stage2", experiment="fresh", tracking_uri=uri, output_dir=tmp_path).close()
    client = _client(uri)
    assert client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # made before the tag existed: tagged on the next run
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    for name in ("old", "chosen"):
        start_tracker("stage2", experiment=name, tracking_uri=uri, output_dir=tmp_path).close()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"  # the user's choice stays


def test_dataset_input_matches_mlflow_data_and_survives_an_outage(tmp_path: Path) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    labels = tmp_path / "labels.jsonl"
    rows = [{"video": "a.mp4", "caption": "电凝钩", "families": ["Hook"]}, {"video": "b.mp4", "families": []}]
    labels.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    ref = labelled_dataset("s3://data/surgical/train", labels, "training")
    assert ref.name == "train" and len(ref.digest) == 16
    assert ref.profile == {"clips": 2, "clips_per_family": {"Hook": 1}}
    assert labelled_dataset("s3://data/surgical/train", labels).digest == ref.digest  # same data, same digest
    expected = MetaDataset(resolve_dataset_source(ref.uri), name=ref.name, digest=ref.digest)._to_mlflow_entity()

    with socket.socket() as sock:  # a closed port: MLflow is down while the step runs
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tracker = start_tracker("label", tracking_uri=down, output_dir=tmp_path)
    tracker.log_dataset(ref)
    tracker.close()
    fallback = tmp_path / FALLBACK_FILE
    assert [json.loads(line)["kind"] for line in fallback.read_text().splitlines()].count("dataset") == 1

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    [report] = replay_fallback(fallback, uri)  # `lora-moe sync-tracking` once the server is back
    [logged] = _client(uri).get_run(report.run_id).inputs.dataset_inputs
    got = logged.dataset
    assert (got.name, got.digest, got.source_type, got.source) == (expected.name, expected.digest,
                                                                   expected.source_type, expected.source)  # fmt: skip
    assert json.loads(got.profile)["clips"] == 2
    assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "training")]


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []
        self.closed = None
        self.run_id = "r1"

    def log_metrics(self, metrics, step):
        self.calls.append((metrics, step))

    def close(self, status="FINISHED"):
        self.closed = status


def test_system_metrics_ride_on_the_training_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = types.SimpleNamespace(used=4e9, total=16e9)
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
                                 nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2e9, total=8e9),
                                 nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
                                 nvmlDeviceGetPowerUsage=lambda h: 350_000)  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # NVML as on a GPU node (nvidia-ml-py in the trainer image)
    monkeypatch.setattr("psutil.virtual_memory", lambda: memory)
    recorder = _Recorder()
    tracker = SystemMetricsTracker(recorder, interval_s=3600, sample_s=3600)
    assert tracker.run_id == "r1"  # everything else passes through
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_metrics({"loss": 0.4}, step=2)  # within the interval: no system metrics
    tracker.close("FINISHED")
    first, second = recorder.calls
    assert first[0]["loss"] == 0.5 and first[0]["system/system_memory_usage_percentage"] == 25.0
    assert first[0]["system/gpu_0_utilization_percentage"] == 87 and first[0]["system/gpu_0_power_usage_watts"] == 350
    assert first[0]["system/gpu_0_memory_usage_percentage"] == 25.0 and "system/cpu_utilization_percentage" in first[0]
    assert second == ({"loss": 0.4}, 2) and recorder.closed == "FINISHED" and tracker._stop.is_set()


def test_system_metrics_on_a_node_booted_seconds_ago(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.monotonic() counts from boot: on a node up for 2 s the first step still carries system metrics,
    the next within interval_s carries none, and the one past interval_s carries them again."""
    clock = iter([2.0, 3.0, 40.0])
    monkeypatch.setattr("lora_moe_core.tracking.system.time.monotonic", lambda: next(clock))
    recorder = _Recorder()
    tracker = SystemMetricsTracker(recorder, interval_s=30, sample_s=3600)
    for step in (1, 2, 3):
        tracker._collect()  # one sample before each step (the thread samples every sample_s)
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.close("FINISHED")
    carried = [any(key.startswith("system/") for key in metrics) for metrics, _ in recorder.calls]
    assert carried == [True, False, True]
    assert recorder.calls[0][0]["system/process_memory_rss_megabytes"] > 0


def test_evaluation_report_goes_to_the_parent_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # removed again by _clean_env
    parent = start_parent_run("lora-moe-training", TrackingContext(experiment="pipe"), output_dir=tmp_path)
    files = []
    for name in ("metrics.json", "report.html", "loss_by_family.png"):
        (tmp_path / name).write_text("x")
        files.append((tmp_path / name, "evaluation"))
    assert log_to_parent_run(TrackingContext(experiment="pipe", parent_run_id=parent), files, tmp_path)
    client = _client(uri)
    assert sorted(a.path for a in client.list_artifacts(parent, "evaluation")) == [
        "evaluation/loss_by_family.png", "evaluation/metrics.json", "evaluation/report.html"]  # fmt: skip
    assert client.get_run(parent).info.status == "RUNNING"  # finish-tracking ends it
    assert not log_to_parent_run(TrackingContext(experiment="pipe"), files, tmp_path)  # no parent: nothing


def test_dataset_ref_limits() -> None:
    ref = DatasetRef.of("/data/heldout/", ["x"], "evaluation")
    entry = ref.entry()
    assert ref.name == "heldout" and entry["source_type"] == "local" and json.loads(entry["source"]) == {
        "uri": "/data/heldout/"}  # fmt: skip
    assert len(entry["digest"]) <= 36 and entry["context"] == "evaluation"
