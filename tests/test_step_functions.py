"""Library functions behind the pipeline steps: tracking context, parent-run ending, registry round trip,
self-contained report, prompt entries. Real MLflow (a local sqlite store), no mocks."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest

from lora_moe_core.errors import UserError
from lora_moe_core.evaluation.report import inline_assets
from lora_moe_core.inference.prompts import Job, jobs_from_entries
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.runs import finish_parent_run, open_pipeline_run, start_parent_run

STEP_OUTPUT = {"MLFLOW_EXPERIMENT_NAME": "exp", "MLFLOW_PARENT_RUN_ID": "abc", "KFP_RUN_ID": "r1", "KFP_RUN_NAME": "n"}


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch) -> str:
    for key in ("MLFLOW_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "KFP_RUN_ID", "KFP_RUN_NAME", "KFP_TASK_NAME"):
        monkeypatch.delenv(key, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def stage2_checkpoint(tmp_path, tiny_config, tiny_transformer) -> Path:
    from lora_moe_core.adapters.checkpoint import save_checkpoint
    from tests.helpers import make_network, randomize_experts

    network = make_network(tiny_config, tiny_transformer)
    randomize_experts(network)
    return save_checkpoint(network, tmp_path / "stage2" / "lora_moe_final.safetensors")


def test_context_round_trips_between_steps_and_processes(monkeypatch):
    context = TrackingContext.from_step(STEP_OUTPUT, "train-stage2")
    assert context == TrackingContext("exp", "abc", "r1", "n", "train-stage2")
    assert TrackingContext.from_mapping(context.to_dict()) == context
    assert context.tags() == {"kfp.run_id": "r1", "kfp.run_name": "n", "kfp.task": "train-stage2"}
    for key, value in context.environ().items():
        monkeypatch.setenv(key, value)
    assert TrackingContext.from_env() == context
    assert TrackingContext().environ() == {"MLFLOW_EXPERIMENT_NAME": "lora-moe"}  # empty fields stay out


def test_a_step_run_is_a_child_with_the_kfp_tags(sqlite_uri, tmp_path):
    from mlflow import MlflowClient

    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    parent = start_parent_run("pipeline", TrackingContext(experiment=experiment, kfp_run_id="r7"), output_dir=tmp_path)
    context = TrackingContext(experiment=experiment, parent_run_id=parent, kfp_run_id="r7", kfp_task="label")
    with context.start_run("label", "label", tmp_path) as run:
        run.log_metrics({"clips.total": 3}, step=0)
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["kfp.task"] == "label" and tags["kfp.run_id"] == "r7"
    assert tags["stage"] == "label"


def _child(context: TrackingContext, name: str, stage: str, tmp_path: Path, status: str | None):
    run = context.start_run(name, stage, tmp_path)
    if status is not None:
        run.close(status)
    return run.run_id


def test_parent_run_ends_by_its_steps(sqlite_uri, tmp_path):
    """FINISHED only when the final stage finished and every step's latest run did; a dead pod's run is FAILED,
    and an earlier attempt of a retried step is KILLED."""
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    parent = start_parent_run("ok", TrackingContext(experiment=experiment), output_dir=tmp_path)
    context = TrackingContext(experiment=experiment, parent_run_id=parent)
    _child(context, "label", "label", tmp_path, "FINISHED")
    _child(context, "register", "register", tmp_path, "FINISHED")
    outcome = finish_parent_run(parent, "register")
    assert (outcome.status, outcome.step_runs, outcome.failed) == ("FINISHED", 2, [])
    assert client.get_run(parent).info.status == "FINISHED"

    parent = start_parent_run("broken", TrackingContext(experiment=experiment), output_dir=tmp_path)
    context = TrackingContext(experiment=experiment, parent_run_id=parent, kfp_task="train")
    first = _child(context, "stage_b", "stage_b", tmp_path, None)  # its pod died: left RUNNING
    second = _child(context, "stage_b", "stage_b", tmp_path, None)  # the retry died too
    outcome = finish_parent_run(parent, "register")
    assert outcome.status == "FAILED" and outcome.failed == ["stage_b (RUNNING)"]
    assert "failed steps: stage_b (RUNNING)" in outcome.line(parent, "register")
    assert client.get_run(first).info.status == "KILLED" and client.get_run(second).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"


def test_unreachable_server_leaves_the_parent_run_alone(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert finish_parent_run("abc", "register", tracking_uri="http://127.0.0.1:9") is None


def test_register_then_fetch_the_checkpoint_back(sqlite_uri, tmp_path, stage2_checkpoint):
    from lora_moe_core.tracking.registry import fetch_checkpoint, register_checkpoint

    name = f"model-{uuid.uuid4().hex[:6]}"
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "Hook.safetensors").write_bytes(b"not read")
    version = register_checkpoint(stage2_checkpoint, name, tmp_path / "work", exported=exported)
    assert version == "1"
    local = fetch_checkpoint(f"models:/{name}@candidate", tmp_path / "fetched")
    assert local.read_bytes() == Path(stage2_checkpoint).read_bytes()
    assert (local.parent / "exported" / "Hook.safetensors").read_bytes() == b"not read"  # copied, not re-exported
    assert fetch_checkpoint(str(stage2_checkpoint), tmp_path) == Path(stage2_checkpoint)
    with pytest.raises(UserError, match=f"models:/{name}@nope"):
        fetch_checkpoint(f"models:/{name}@nope", tmp_path / "missing")


def test_report_inlines_its_files(tmp_path):
    png, mp4 = b"\x89PNG-bytes", b"mp4-bytes"
    (tmp_path / "plot.png").write_bytes(png)
    (tmp_path / "clip.mp4").write_bytes(mp4)
    page = tmp_path / "report.html"
    page.write_text('<img src="plot.png"><video src="clip.mp4"></video><a href="#top">x</a>'
                    '<img src="https://example.org/a.png"><img src="gone.png">')  # fmt: skip
    inlined = inline_assets(page)
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in inlined
    assert f'src="data:video/mp4;base64,{base64.b64encode(mp4).decode()}"' in inlined
    assert 'href="#top"' in inlined and 'src="https://example.org/a.png"' in inlined and 'src="gone.png"' in inlined


def test_prompt_entries_are_checked_like_a_prompts_file(tmp_path):
    template = Job("", tmp_path / "unused.mp4", seed=3)
    entries = [{"prompt": "电凝钩切割组织", "instrument_hint": "Hook", "seed": 7},
               {"prompt": "吸引器吸除积血", "output_path": "b.mp4"}]  # fmt: skip
    jobs = jobs_from_entries(entries, tmp_path, template, "prompts")
    assert [(job.seed, job.instrument_hint, job.output_path.name) for job in jobs] == [
        (7, "Hook", "000_电凝钩切割组织.mp4"), (3, None, "b.mp4")]  # fmt: skip
    with pytest.raises(UserError, match=r'prompts:2: "seed" must be a int'):
        jobs_from_entries([{"prompt": "a"}, {"prompt": "b", "seed": 1.5}], tmp_path, template, "prompts")
    with pytest.raises(UserError, match="prompts: no prompts"):
        jobs_from_entries([], tmp_path, template, "prompts")


def test_under_kfps_mlflow_integration_the_steps_nest_under_kfps_runs(sqlite_uri, tmp_path, monkeypatch):
    """KFP >= 2.17 with its MLflow plugin on creates a parent run per pipeline run and a nested run per task, and
    gives each task ``MLFLOW_RUN_ID``: start-tracking adopts KFP's parent (and experiment) instead of opening a
    second one, each step's run nests under its task's run, and finish-tracking leaves KFP's parent to KFP."""
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_uri)
    kfp_experiment = client.create_experiment(f"kfp-{uuid.uuid4().hex[:6]}")
    kfp_parent = client.create_run(kfp_experiment, tags={"kfp.pipeline_run_id": "run-9"}).info.run_id

    def kfp_task_run() -> str:
        return client.create_run(kfp_experiment, tags={"mlflow.parentRunId": kfp_parent}).info.run_id

    monkeypatch.setenv("MLFLOW_RUN_ID", kfp_task_run())  # the start-tracking task's run
    context = open_pipeline_run("lora-moe-training", TrackingContext(kfp_run_id="run-9"), {"stage": "pipeline"},
                                tmp_path)  # fmt: skip
    assert context.parent_run_id == kfp_parent
    assert context.experiment == client.get_experiment(kfp_experiment).name  # not our default "lora-moe"
    assert client.get_run(kfp_parent).data.tags["kfp.run_id"] == "run-9"
    assert client.search_experiments(filter_string="name = 'lora-moe'") == []  # no second parent run anywhere

    task_run = kfp_task_run()
    monkeypatch.setenv("MLFLOW_RUN_ID", task_run)  # the register task's run
    step = TrackingContext.from_step(context.to_dict(), "register")
    _child(step, "register", "register", tmp_path, "FINISHED")
    [ours] = client.search_runs([kfp_experiment], f"tags.`mlflow.parentRunId` = '{task_run}'")
    assert ours.data.tags["stage"] == "register" and ours.data.tags["kfp.task"] == "register"
    outcome = finish_parent_run(kfp_parent, "register")
    assert (outcome.status, outcome.step_runs) == ("FINISHED", 1)  # our step run, found under its task's run
    assert client.get_run(kfp_parent).info.status == "RUNNING"  # KFP ends its own run


def test_without_kfps_integration_start_tracking_opens_the_parent(sqlite_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    context = open_pipeline_run("p", TrackingContext(experiment=experiment), {"stage": "pipeline"}, tmp_path)
    parent = MlflowClient(sqlite_uri).get_run(context.parent_run_id)
    assert (context.experiment, parent.data.tags["stage"], parent.info.status) == (experiment, "pipeline", "RUNNING")
    assert "lora_moe.parent_owner" not in parent.data.tags
