"""The whole training DAG through ``kfp.local`` (``lora-moe pipeline run``) on the tiny model, kept as small as the
pipeline's parameters allow: a local folder + sqlite MLflow (what ``make run`` does, here with the matched LoRA arm
off: the ``skip-baseline-arm`` branch), then MinIO-compatible S3 (SeaweedFS) + a real ``mlflow server`` with the
user's own Stage-1 LoRA (the ``import-stage1`` branch) and the arm on (issue 25)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import lora_moe  # noqa: F401 - the `lora-moe` main with the pipeline command

TINY = ["--clips", "6", "--eval_clips", "4", "--clip_size", "64", "48", "17", "--cache_shards", "2",
        "--stage1_epochs", "1", "--stage2_epochs", "1", "--sample_size", "32", "32", "9",
        "--sample_steps", "2"]  # fmt: skip
STEP_STAGES = {"data", "label", "cache", "stage_b", "evaluate", "infer", "register"}


def summary_paths(out: str) -> dict[str, Path]:
    """The paths of the summary ``lora-moe pipeline run`` prints at the end."""
    lines = out[out.index("done in ") :].splitlines()[1:]
    return {key.strip(): Path(value.strip()) for key, _, value in (line.partition(":") for line in lines)}


def check_outputs(paths: dict[str, Path], arm: bool) -> None:
    from lora_moe_core.adapters.checkpoint import read_checkpoint
    from lora_moe_core.families import FAMILIES

    assert read_checkpoint(paths["Stage-2 checkpoint"]).config.model.task == "tiny"
    report = paths["evaluation report"].read_text()
    assert "data:image/png;base64," in report and "data:video/mp4;base64," in report  # one self-contained file
    videos = sorted(p.name for p in paths["sample videos"].iterdir())
    assert videos == ["00_Hook_Electrocautery.gates.json", "00_Hook_Electrocautery.mp4"]
    loras = [p.name for p in paths["per-instrument LoRAs"].iterdir()]
    assert all(any(name.startswith(family) for name in loras) for family in FAMILIES), loras
    # KFP Metrics of the evaluation (kfp.local keeps them in the task's executor output)
    executor_output = json.loads((paths["evaluation report"].parent / "executor_output.json").read_text())
    metrics = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 <= metrics["routing.accuracy"] <= 1.0 and "val_loss.all.stage2" in metrics
    assert ("vs_matched_lora.all.difference" in metrics) == arm  # LoRA-MoE vs the matched LoRA: with the arm only
    assert ('<h2>LoRA-MoE vs matched LoRA</h2><p class="arms">Over all' in report) == arm


def check_mlflow(tracking_uri: str, imported_stage1: bool, arm: bool, experiment_name: str = "lora-moe") -> dict:
    """One FINISHED parent run tagged with the KFP run, a child run per step, and a registered version; with the
    arm, its training run and one run per arm (same metric names, for MLflow's compare view)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    kfp_run_id = parent.data.tags["kfp.run_id"]
    assert kfp_run_id and parent.data.tags["kfp.run_name"].startswith("lora-moe-training-")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # every other run is a step of this pipeline run
    assert all(r.info.status == "FINISHED" and r.data.tags["kfp.run_id"] == kfp_run_id for r in children)
    stages = {r.data.tags.get("stage") for r in children}
    assert STEP_STAGES | {"stage_a"} | ({"baseline_arm", "arm"} if arm else set()) == stages
    arms = {r.data.tags["arm"]: r for r in children if r.data.tags.get("stage") == "arm"}
    assert set(arms) == ({"lora_moe", "matched_lora"} if arm else set())
    if arm:
        keys = set(arms["lora_moe"].data.metrics)
        assert keys == set(arms["matched_lora"].data.metrics)  # the same names: MLflow's compare view lines them up
        always = {"val_loss.all", "trainable_parameters", "train_steps"}
        families = {f"val_loss.{family}" for family in ("Scissors", "Hook", "Suction", "Other")}
        assert always <= keys <= always | families and keys & families  # the families with held-out clips
        assert arms["lora_moe"].data.metrics["train_steps"] == arms["matched_lora"].data.metrics["train_steps"]
        assert all(r.data.tags["kfp.task"] == "evaluate" for r in arms.values())
    names = {r.info.run_name for r in children}
    assert {"cache 0/2", "cache 1/2", "cache 0/1"} <= names
    assert ("import-stage1" in names) == imported_stage1 and ("stage_a-vanilla_lora" in names) != imported_stage1
    version = client.get_model_version_by_alias("lora-moe-surgical", "candidate")
    assert version.run_id in {r.info.run_id for r in children}
    return {"kfp_run_id": kfp_run_id}


@pytest.mark.slow
def test_local_run_folder_store_and_sqlite(tmp_path, capsys, lora_moe):  # noqa: F811
    from mlflow import MlflowClient

    assert lora_moe(["pipeline", "run", "--output_dir", str(tmp_path), "--param", "baseline_arm=false", *TINY]) == 0
    out = capsys.readouterr().out
    paths = summary_paths(out)
    check_outputs(paths, arm=False)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = MlflowClient(tracking_uri).get_experiment_by_name("lora-moe").experiment_id
    assert (f"MLflow runs:          mlflow ui --backend-store-uri {tracking_uri}, then open http://127.0.0.1:5000/"
            f"#/experiments/{experiment_id}/runs?workflowType=machine_learning") in out  # fmt: skip
    kfp_run_id = check_mlflow(tracking_uri, imported_stage1=False, arm=False)["kfp_run_id"]
    run = tmp_path / "store" / "runs" / kfp_run_id  # big data in the folder store, by run
    assert (run / "stage1" / "lora_final.safetensors").is_file()
    assert (run / "stage2" / "lora_moe_final.safetensors").is_file()
    assert len(list((run / "cache" / "train").glob("*.safetensors"))) >= 6
    assert (tmp_path / "store" / "datasets" / "heldout" / "manifest.jsonl").is_file()

    # the inference pipeline on the model the training run registered (models:/lora-moe-surgical@candidate)
    prompts = json.dumps(["吸引器吸除积血", {"prompt": "剪刀", "instrument_hint": "Scissors"}], ensure_ascii=False)
    argv = ["pipeline", "run", "--pipeline", "inference", "--output_dir", str(tmp_path), "--sample_size", "32", "32",
            "9", "--sample_steps", "2", "--param", f"prompts={prompts}"]  # fmt: skip
    assert lora_moe(argv) == 0
    paths = summary_paths(capsys.readouterr().out)
    assert set(paths) == {"sample videos", "per-instrument LoRAs", "MLflow runs"}
    assert sorted(p.name for p in paths["sample videos"].glob("*.mp4")) == ["00_prompt.mp4", "01_Scissors.mp4"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lora-moe").experiment_id],
                              "tags.`kfp.pipeline` = 'lora-moe-inference'")  # fmt: skip
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.fixture
def stage1_lora(tmp_path) -> Path:
    """A user's Stage-1 LoRA for the tiny model in musubi keys (the seed's users trained it with musubi-tuner)."""
    from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, write_lora
    from lora_moe_core.model.wan import build_transformer, linear_shapes

    generator = torch.Generator().manual_seed(3)
    modules = {}
    for name, (fan_in, fan_out) in linear_shapes(build_transformer("tiny")).items():
        if name.endswith(("attn1.to_q", "attn1.to_v", "ffn.net.2")):  # another module set than ours: allowed
            modules[name] = LoRAModuleWeights(torch.randn(4, fan_in, generator=generator) * 0.01,
                                              torch.randn(fan_out, 4, generator=generator) * 0.01, 4.0)  # fmt: skip
    path = tmp_path / "user_stage1.safetensors"
    write_lora(LoRAFile(modules=modules), path, to="musubi")
    return path


@pytest.mark.slow
def test_local_run_on_s3_and_mlflow_server(tmp_path, capsys, lora_moe, s3_env, mlflow_server, stage1_lora, monkeypatch):  # noqa: F811
    """Also the secret grep (tests/test_security.py): the S3 secret key and an MLflow password, given as a cluster
    gives them (environment; the password also in the tracking URI; the test server ignores it), are in no output:
    the printed lines, the run folder with KFP's pipeline root and the steps' temporary files, every object the
    run stored, and the MLflow server's store, artifacts and log."""
    from lora_moe_core.storage.store import Storage
    from tests.test_security import MLFLOW_PASSWORD, find_leaks

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "lora-moe")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the steps' scratch files land where the grep looks
    storage = Storage()
    prefix = f"s3://mlpipeline/test-{uuid.uuid4().hex[:8]}"
    storage.upload(stage1_lora, f"{prefix}/user/stage1.safetensors")
    tracking_uri = mlflow_server.uri.replace("://", f"://lora-moe:{MLFLOW_PASSWORD}@")
    argv = ["pipeline", "run", "--output_dir", str(tmp_path), "--store", prefix, "--tracking_uri", tracking_uri,
            "--param", f"stage1_lora_uri={prefix}/user/stage1.safetensors", *TINY]  # fmt: skip
    assert lora_moe(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    from mlflow import MlflowClient

    experiment_id = MlflowClient(mlflow_server.uri).get_experiment_by_name("lora-moe").experiment_id
    link = f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"  # no user:pw@
    assert f"MLflow runs:          {link}" in out and not (tmp_path / "mlflow.db").exists()
    check_outputs(summary_paths(out), arm=True)
    kfp_run_id = check_mlflow(mlflow_server.uri, imported_stage1=True, arm=True)["kfp_run_id"]
    objects = set(storage.list(prefix))
    run = f"{prefix}/runs/{kfp_run_id}"
    assert f"{prefix}/datasets/train/manifest.jsonl" in objects
    assert f"{run}/stage2/lora_moe_final.safetensors" in objects
    assert f"{run}/matched_lora/lora_final.safetensors" in objects  # the arm, beside Stage 2
    assert sum(o.startswith(f"{run}/cache/train/") for o in objects) >= 6
    assert not any(o.startswith(f"{run}/stage1/") for o in objects)  # Stage 1 was imported, not trained
    assert not (tmp_path / "store").exists()  # nothing big went to the local folder
    texts = {"stdout": out, "stderr": captured.err}
    assert find_leaks([s3_env.secret_key, MLFLOW_PASSWORD], texts, [tmp_path, mlflow_server.root], [prefix]) == []


@pytest.mark.slow
def test_a_failed_step_fails_the_run_and_its_mlflow_parent(tmp_path, capsys, lora_moe):  # noqa: F811
    from mlflow import MlflowClient

    empty = tmp_path / "empty-dataset"  # there, so the run starts (a missing one is refused before any step)
    empty.mkdir()
    argv = ["pipeline", "run", "--output_dir", str(tmp_path), "--param", "synthetic_clips=0",
            "--param", f"dataset_uri={empty}"]  # fmt: skip
    assert lora_moe(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "prepare-data" in err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {
        r.data.tags.get("stage"): r
        for r in client.search_runs([client.get_experiment_by_name("lora-moe").experiment_id])
    }
    assert set(runs) == {"pipeline", "data"}
    assert runs["data"].info.status == "FAILED"  # the step's own run
    assert runs["pipeline"].info.status == "FAILED"  # ended by finish-tracking, which runs after failures too
