"""The Kubeflow pipelines offline: compiled IR checked against the KFP protos and asserted on (DAG, images, GPUs,
node pools, secrets, defaults), SDK submit/schedule against a mocked ``kfp.Client``, and one-line errors.

The local ``kfp.local`` runs of the whole DAG are in ``test_pipeline_local.py``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {"cache-latents", "cache-latents-2", "train-stage1", "train-stage2", "train-baseline-arm", "evaluate",
             "infer-export"}  # fmt: skip


@pytest.fixture
def lora_moe():
    """``lora-moe`` as installed: the ``pipeline`` command comes from the ``lora_moe.commands`` entry point."""
    from lora_moe_core.cli import main as cli

    return cli.main


def test_pipeline_command_comes_from_the_entry_point():
    from importlib.metadata import entry_points

    from lora_moe_core.cli.main import build_parser

    assert [e.value for e in entry_points(group="lora_moe.commands")] == ["pipelines.cli:add_pipeline_parser"]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "pipeline" in commands.choices


def fails_with(capsys, main, argv, *words):
    """Exit code 2 and exactly one ``error:`` line on stderr naming ``words``."""
    return assert_one_line_error(capsys, argv, *words, main=main)


def load(path: Path):
    """Both YAML documents, parsed strictly into the KFP protos (unknown fields raise)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    executors = {}
    for name, config in platform.platforms["kubernetes"].deployment_spec.executors.items():
        executors[name] = json_format.ParseDict(
            json_format.MessageToDict(config), kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        )
    return docs[0], spec, executors


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The default compile of both pipelines (the handler ``lora-moe pipeline compile`` runs)."""
    from pipelines.cli import add_pipeline_parser

    parser = argparse.ArgumentParser()
    add_pipeline_parser(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("compiled")
    args = parser.parse_args(["pipeline", "compile", "--output_dir", str(out)])
    settings_env = [key for key in os.environ if key.startswith(("LORA_MOE_IMAGE_", "LORA_MOE_GPU_"))]
    with mock.patch.dict(os.environ, {}):  # the defaults, whatever this shell exports
        for key in settings_env:
            del os.environ[key]
        assert args.handler(args) == 0
    return {name: load(out / f"lora_moe_{name}.yaml") for name in ("training", "inference")}


def executor_of(ir: dict, component: str) -> str:
    return ir["components"][component]["executorLabel"]


def tasks_by_name(ir: dict) -> dict[str, tuple[str, dict]]:
    """Every task of every DAG: name -> (its DAG component, task spec)."""
    tasks = {}
    dags = {"root": ir["root"], **ir["components"]}
    for dag_name, dag in dags.items():
        for name, task in dag.get("dag", {}).get("tasks", {}).items():
            tasks[name] = (dag_name, task)
    return tasks


# -- the compiled training pipeline ------------------------------------------------------------------------------
def test_training_ir_dag(compiled):
    ir, spec, _ = compiled["training"]
    assert spec.pipeline_info.name == "lora-moe-training"
    tasks = tasks_by_name(ir)
    steps = {"start-tracking", "prepare-data", "label-captions", "label-captions-2", "plan-shards", "cache-latents",
             "cache-latents-2", "train-stage1", "import-stage1", "train-stage2", "train-baseline-arm",
             "skip-baseline-arm", "evaluate", "infer-export", "register-model", "finish-tracking"}  # fmt: skip
    assert steps <= set(tasks)
    root = ir["root"]["dag"]["tasks"]
    loop = next(name for name, task in root.items() if "parameterIterator" in task)
    branches, stage2 = _branches_of(tasks, "train-stage1"), _branches_of(tasks, "train-stage2")
    assert tasks["cache-latents"][0] == f"comp-{loop}"  # the shards fan out over dsl.ParallelFor
    assert root[loop]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-shards-Output"

    def deps(name):
        return set(tasks[name][1].get("dependentTasks", []))

    assert deps("prepare-data") == {"start-tracking"}
    assert {"prepare-data", "start-tracking"} <= deps("label-captions")
    assert deps(loop) == {"plan-shards", "label-captions"}
    assert deps(branches) >= {loop, "prepare-data"}  # Stage 1 starts once every shard is cached
    assert deps(stage2) >= {branches, loop, "prepare-data"}  # one node or a TrainJob: the same place in the DAG
    assert deps("evaluate") >= {stage2, "cache-latents-2"}
    assert deps("register-model") >= {"evaluate", "infer-export", stage2}
    assert deps("finish-tracking") == {"register-model", "start-tracking"}
    assert root["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # after failures too


def test_stage1_is_conditional_on_the_lora_uri(compiled):
    ir, _, _ = compiled["training"]
    tasks = tasks_by_name(ir)
    # train-stage1 and import-stage1 sit in the two branches of one dsl.If/Else
    branch_of = {step: tasks[step][0].removeprefix("comp-") for step in ("train-stage1", "import-stage1")}
    conditions = {step: tasks[branch][1]["triggerPolicy"]["condition"] for step, branch in branch_of.items()}
    assert "pipelinechannel--stage1_lora_uri" in conditions["train-stage1"] and "== ''" in conditions["train-stage1"]
    assert conditions["import-stage1"].startswith("!(")  # the Else branch
    group = tasks[branch_of["train-stage1"]][0]
    assert group == tasks[branch_of["import-stage1"]][0] and group.startswith("comp-condition-branches-")
    # Stage 2 (both of its branches) and evaluation take Stage 1's URI from whichever branch ran (dsl.OneOf)
    stage2 = tasks[_branches_of(tasks, "train-stage2")][1]
    for task in (stage2, tasks["evaluate"][1]):
        producers = [p["taskOutputParameter"]["producerTask"] for p in task["inputs"]["parameters"].values()
                     if "taskOutputParameter" in p]  # fmt: skip
        assert group.removeprefix("comp-") in producers
    uri = tasks["evaluate"][1]["inputs"]["parameters"]["stage1_lora_uri"]["taskOutputParameter"]
    assert uri["producerTask"] == group.removeprefix("comp-")
    for step in ("train-stage2", "train-stage2-trainjob"):  # handed down from the Stage-2 group's OneOf input
        inner = tasks[step][1]["inputs"]["parameters"]["stage1_lora_uri"]["componentInputParameter"]
        assert inner.endswith(f"{group.removeprefix('comp-')}-oneof-1"), inner


def _branches_of(tasks: dict, step: str) -> str:
    """The ``condition-branches-N`` group (dsl.If/Else) that holds ``step`` in one of its branches."""
    branch = tasks[step][0].removeprefix("comp-")
    return tasks[branch][0].removeprefix("comp-")


def test_stage2_runs_in_one_pod_or_as_a_trainjob_launcher(compiled):
    ir, _, executors = compiled["training"]
    tasks = tasks_by_name(ir)
    branch = {step: tasks[step][0].removeprefix("comp-") for step in ("train-stage2", "train-stage2-trainjob")}
    conditions = {step: tasks[name][1]["triggerPolicy"]["condition"] for step, name in branch.items()}
    assert "pipelinechannel--stage2_num_nodes" in conditions["train-stage2"] and "== 1" in conditions["train-stage2"]
    assert conditions["train-stage2-trainjob"].startswith("!(")  # the Else branch
    group = _branches_of(tasks, "train-stage2")
    assert group == _branches_of(tasks, "train-stage2-trainjob")
    for step in ("evaluate", "infer-export", "register-model"):  # the checkpoint of whichever branch ran (OneOf)
        lora_moe = tasks[step][1]["inputs"]["artifacts"]["lora_moe"]["taskOutputArtifact"]
        assert lora_moe["producerTask"] == group
    containers = ir["deploymentSpec"]["executors"]
    single, launcher = (
        containers["exec-train-stage2"]["container"],
        containers["exec-train-stage2-trainjob"]["container"],
    )
    assert single["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "accelerator" not in launcher["resources"]  # the GPUs are the TrainJob's, not the launcher pod's
    assert launcher["image"].split("/")[-1].startswith("lora-moe-cpu:")
    config = executors["exec-train-stage2-trainjob"]
    assert not config.node_selector.labels and not config.tolerations  # a CPU pod, anywhere
    # the launcher outwaits the TrainJob's own deadline (the single-pod step's timeout)
    assert config.active_deadline_seconds > executors["exec-train-stage2"].active_deadline_seconds
    params = tasks["train-stage2-trainjob"][1]["inputs"]["parameters"]
    assert params["num_nodes"] == {"componentInputParameter": "pipelinechannel--stage2_num_nodes"}
    assert params["gpus_per_node"] == {"componentInputParameter": "pipelinechannel--gpus_per_step"}
    placement = params["placement"]["runtimeValue"]["constant"]
    assert placement["image"].split("/")[-1].startswith("lora-moe-trainer:")


def test_baseline_arm_runs_beside_stage2_and_feeds_the_evaluation(compiled):
    """The matched single-LoRA arm: a dsl.If/Else on baseline_arm (default on) in parallel with Stage 2, from the
    same Stage-1 URI and cache; the evaluation takes its URI from whichever branch ran ("" when skipped)."""
    ir, _, _ = compiled["training"]
    tasks = tasks_by_name(ir)
    branch_of = {step: tasks[step][0].removeprefix("comp-") for step in ("train-baseline-arm", "skip-baseline-arm")}
    conditions = {step: tasks[branch][1]["triggerPolicy"]["condition"] for step, branch in branch_of.items()}
    assert "pipelinechannel--baseline_arm" in conditions["train-baseline-arm"]
    assert conditions["skip-baseline-arm"].startswith("!(")
    group = tasks[branch_of["train-baseline-arm"]][0]
    assert group == tasks[branch_of["skip-baseline-arm"]][0] and group.startswith("comp-condition-branches-")
    arm, stage2 = tasks["train-baseline-arm"][1], tasks["train-stage2"][1]
    assert "train-stage2" not in arm.get("dependentTasks", []) and "train-baseline-arm" not in stage2.get(
        "dependentTasks", []
    )  # side by side
    assert set(arm["inputs"]["parameters"]) == set(stage2["inputs"]["parameters"])  # the same arguments as Stage 2
    uri = tasks["evaluate"][1]["inputs"]["parameters"]["matched_lora_uri"]
    assert uri["taskOutputParameter"]["producerTask"] == group.removeprefix("comp-")
    assert ir["root"]["inputDefinitions"]["parameters"]["baseline_arm"]["defaultValue"] is True


def test_images_and_resources(compiled):
    ir, spec, executors = compiled["training"]
    images = {name: e["container"]["image"] for name, e in ir["deploymentSpec"]["executors"].items()}
    assert set(images.values()) == {
        "registry.example.com/lora-moe-trainer:dev",
        "registry.example.com/lora-moe-cpu:dev",
    }
    gpu = {
        name
        for name, e in ir["deploymentSpec"]["executors"].items()
        if "accelerator" in e["container"].get("resources", {})
    }
    assert gpu == {f"exec-{step}" for step in GPU_STEPS} and len(gpu) >= 4
    for name in gpu:
        assert images[name].endswith("lora-moe-trainer:dev")
        resources = ir["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["resourceCpuRequest"] == "8" and resources["resourceMemoryRequest"] == "96Gi"
        config = executors[name]
        assert dict(config.node_selector.labels) == {"lora-moe/pool": "gpu"}
        assert [(t.key, t.operator, t.effect) for t in config.tolerations] == [
            ("nvidia.com/gpu", "Exists", "NoSchedule")
        ]
        assert [(m.mount_path, m.medium) for m in config.empty_dir_mounts] == [("/dev/shm", "Memory")]
        assert config.active_deadline_seconds > 0
    for name in set(images) - gpu:  # CPU steps: no GPU pool, no toleration
        assert not executors[name].node_selector.labels and not executors[name].tolerations
    trains = ("exec-train-stage1", "exec-train-stage2", "exec-train-baseline-arm")
    for name in trains:  # GPUs per training step come from the run form
        count = ir["deploymentSpec"]["executors"][name]["container"]["resources"]["accelerator"]["resourceCount"]
        assert "pipelinechannel--gpus_per_step" in count
        assert executors[name].active_deadline_seconds == 3 * 24 * 3600
    tasks = tasks_by_name(ir)
    for step in GPU_STEPS:
        task = tasks[step][1]
        assert task["retryPolicy"]["maxRetryCount"] == 2
        assert not task.get("cachingOptions", {}).get("enableCache", False)  # caching off (training above all)


def test_credentials_only_from_secrets(compiled):
    ir, _, executors = compiled["training"]
    for name, config in executors.items():
        secrets = {s.secret_name: s for s in config.secret_as_env}
        if name in ("exec-plan-shards", "exec-skip-baseline-arm"):
            assert not secrets  # touches neither MinIO nor MLflow
            continue
        assert "mlflow-credentials" in secrets and secrets["mlflow-credentials"].optional, name
        env = {e["name"]: e["value"] for e in ir["deploymentSpec"]["executors"][name]["container"].get("env", [])}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        if name not in ("exec-start-tracking", "exec-finish-tracking"):  # every step that reads or writes MinIO
            keys = {k.env_var for k in secrets["minio-credentials"].key_to_env}
            assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and not secrets["minio-credentials"].optional
            assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in parameters if any(w in p.lower() for w in ("secret", "password", "token", "access_key"))]


def test_parameter_defaults(compiled):
    ir, _, _ = compiled["training"]
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    with_defaults = {name: p["defaultValue"] for name, p in parameters.items() if "defaultValue" in p}
    assert len(with_defaults) >= 5 and set(with_defaults) == set(parameters)  # every field pre-filled in the UI
    assert with_defaults["dataset_uri"].startswith("s3://")
    assert with_defaults["stage1_lora_uri"] == ""
    assert with_defaults["base_model_uri"].startswith("s3://")
    assert with_defaults["cache_shards"] == 4 and with_defaults["gpus_per_step"] == 1
    assert (with_defaults["stage1_epochs"], with_defaults["stage1_learning_rate"]) == (10, 1e-4)  # the seed's
    assert (with_defaults["stage2_epochs"], with_defaults["stage2_learning_rate"]) == (20, 5e-5)
    assert with_defaults["alpha_base"] == 0.7 and len(with_defaults["prompts"]) == 4


@pytest.mark.parametrize("name", ["training", "inference"])
def test_every_parameter_has_a_description_in_form_order(compiled, name):
    """The KFP UI shows each parameter's IR description; the IR sorts parameters by name, so each description
    starts with its form group's number, and the signature (the SDK's order) runs through the groups in order."""
    import inspect

    from pipelines.compile import build

    ir, _, _ = compiled[name]
    described = {key: p.get("description", "") for key, p in ir["root"]["inputDefinitions"]["parameters"].items()}
    assert all(len(text) > 20 for text in described.values()), [k for k, text in described.items() if len(text) <= 20]
    signature = list(inspect.signature(build(name).pipeline_func).parameters)
    assert set(signature) == set(described)
    groups = [int(described[key].split(" ", 1)[0]) for key in signature]
    assert groups == sorted(groups) and groups[0] == 1, list(zip(signature, groups, strict=True))
    assert described["dit_uri"].startswith("2 model") and "--dit" in described["dit_uri"]


def test_inference_ir(compiled):
    ir, spec, executors = compiled["inference"]
    assert spec.pipeline_info.name == "lora-moe-inference"
    assert set(ir["root"]["dag"]["tasks"]) == {"start-tracking", "import-lora-moe", "infer-export", "finish-tracking"}
    assert dict(executors["exec-infer-export"].node_selector.labels) == {"lora-moe/pool": "gpu"}
    assert ir["root"]["inputDefinitions"]["parameters"]["lora_moe_uri"]["defaultValue"].startswith("models:/")
    assert ir["root"]["dag"]["tasks"]["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_compile_flags_and_environment(tmp_path, lora_moe, monkeypatch):
    monkeypatch.setenv("LORA_MOE_GPU_NODE_SELECTOR", "cloud.google.com/gke-accelerator=nvidia-h100-80gb")
    argv = ["pipeline", "compile", "--output_dir", str(tmp_path), "--image_tag", "abc1234", "--image_registry",
            "ghcr.io/acme", "--gpu_toleration", "pool=a100:NoExecute", "--s3_secret", "team-minio",
            "--mlflow_secret", "team-mlflow", "--image_pull_secret", "regcred"]  # fmt: skip
    assert lora_moe(argv) == 0
    ir, _, executors = load(tmp_path / "lora_moe_training.yaml")
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/acme/lora-moe-trainer:abc1234", "ghcr.io/acme/lora-moe-cpu:abc1234"}
    stage2 = executors["exec-train-stage2"]
    assert dict(stage2.node_selector.labels) == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert [(t.key, t.operator, t.value, t.effect) for t in stage2.tolerations] == [
        ("pool", "Equal", "a100", "NoExecute")
    ]
    assert {s.secret_name for s in stage2.secret_as_env} == {"team-minio", "team-mlflow"}
    assert [s.secret_name for s in stage2.image_pull_secret] == ["regcred"]


def test_compile_needs_no_torch_and_is_fast(tmp_path):
    code = ("import sys, time; t = time.monotonic(); from pipelines.compile import compile_all; "
            f"compile_all({str(tmp_path)!r}); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(time.monotonic() - t)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) < 20


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--s3_secret", ""], ["MinIO credentials secret", "DNS-1123"]),
        (["--mlflow_secret", "MLflow_Creds"], ["MLflow credentials secret", "'MLflow_Creds'"]),
        (["--image_tag", "bad tag!"], ["image tag"]),
        (["--gpu_node_selector", "pool"], ["key=value"]),
        (["--gpu_node_selector", "bad key!=x"], ["node label key"]),
        (["--gpu_toleration", "nvidia.com/gpu:Sometimes"], ["toleration", "NoSchedule"]),
        (["--shm_size", "lots"], ["shm size"]),
        (["--mlflow_tracking_uri", "mlflow:5000"], ["MLflow tracking URI"]),
    ],
)
def test_bad_compile_settings(tmp_path, capsys, lora_moe, flags, words):
    fails_with(capsys, lora_moe, ["pipeline", "compile", "--output_dir", str(tmp_path), *flags], *words)
    assert not list(tmp_path.iterdir())  # nothing half-written


# -- submit and schedule against a mocked kfp.Client --------------------------------------------------------------
class FakeKfp(http.server.BaseHTTPRequestHandler):
    """Answers the health probe with ``status``; remembers the headers it got."""

    status = 200
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        FakeKfp.seen.append(dict(self.headers))
        self.send_response(FakeKfp.status)
        if FakeKfp.status == 302:
            self.send_header("Location", "/dex/auth")
        self.end_headers()
        self.wfile.write(b'{"multi_user": false}')

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_host(monkeypatch):
    """A loopback server standing in for the KFP API's health endpoint (kfp.Client itself is mocked)."""
    FakeKfp.status, FakeKfp.seen = 200, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for key in ("KFP_HOST", "KF_PIPELINES_ENDPOINT", "KFP_TOKEN", "KFP_COOKIES", "KFP_NAMESPACE",
                "KF_PIPELINES_SA_TOKEN_PATH"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client():
    with mock.patch("kfp.Client") as factory:
        instance = factory.return_value
        instance.create_run_from_pipeline_package.return_value.run_id = "run-1"
        instance.create_experiment.return_value.experiment_id = "exp-1"
        instance.get_pipeline_id.return_value = None
        instance.upload_pipeline.return_value.pipeline_id = "pipe-1"
        instance.upload_pipeline_version.return_value.pipeline_version_id = "ver-1"
        instance.run_pipeline.return_value.run_id = "run-2"
        instance.create_recurring_run.return_value.recurring_run_id = "rec-1"
        yield factory


@pytest.fixture(scope="module")
def package(compiled, tmp_path_factory):
    from pipelines.compile import compile_pipeline

    return compile_pipeline("training", tmp_path_factory.mktemp("pkg") / "training.yaml")


def test_submit_run(capsys, lora_moe, kfp_host, client, package, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "t0ken")
    argv = ["pipeline", "submit", "--host", kfp_host, "--package", str(package), "--experiment", "retrain",
            "--run_name", "nightly", "--param", "cache_shards=8", "--param", "dataset_uri=s3://lora-moe-data/new",
            "--param", 'prompts=[{"prompt": "电凝钩切割组织"}]']  # fmt: skip
    assert lora_moe(argv) == 0
    assert client.call_args.kwargs == {"host": kfp_host, "existing_token": "t0ken"}
    call = client.return_value.create_run_from_pipeline_package.call_args
    assert call.args == (str(package),)
    assert call.kwargs["arguments"] == {"cache_shards": 8, "dataset_uri": "s3://lora-moe-data/new",
                                        "prompts": [{"prompt": "电凝钩切割组织"}]}  # fmt: skip
    assert (call.kwargs["experiment_name"], call.kwargs["run_name"], call.kwargs["enable_caching"]) == (
        "retrain", "nightly", False)  # fmt: skip
    assert FakeKfp.seen[0]["Authorization"] == "Bearer t0ken"
    assert f"started run run-1 in experiment 'retrain': {kfp_host}/#/runs/details/run-1" in capsys.readouterr().out


def test_submit_compiles_and_uploads_a_version(tmp_path, capsys, lora_moe, kfp_host, client, monkeypatch):
    monkeypatch.setenv("KFP_HOST", kfp_host)
    monkeypatch.setenv("KFP_COOKIES", "authservice_session=abc")
    argv = ["pipeline", "submit", "--pipeline", "inference", "--version", "v2", "--image_tag", "f00d",
            "--namespace", "team-a"]  # fmt: skip
    kfp_client = client.return_value
    uploaded_text = []  # the package compiled on the fly is removed once submitted: read it while it is uploaded
    version = kfp_client.upload_pipeline_version.return_value
    kfp_client.upload_pipeline_version.side_effect = lambda path, **_: (
        uploaded_text.append(Path(path).read_text()) or version
    )
    assert lora_moe(argv) == 0
    assert client.call_args.kwargs == {"host": kfp_host, "namespace": "team-a", "cookies": "authservice_session=abc"}
    upload = kfp_client.upload_pipeline_version.call_args
    assert upload.kwargs == {"pipeline_version_name": "v2", "pipeline_id": "pipe-1"}
    assert "lora-moe-trainer:f00d" in uploaded_text[0]  # compiled on the fly with the flags
    assert not Path(upload.args[0]).exists()  # nothing left behind in TMPDIR
    assert kfp_client.upload_pipeline.call_args.kwargs == {"pipeline_name": "lora-moe-inference"}
    run = kfp_client.run_pipeline.call_args.kwargs
    assert (run["experiment_id"], run["pipeline_id"], run["version_id"]) == ("exp-1", "pipe-1", "ver-1")
    assert FakeKfp.seen[0]["Cookie"] == "authservice_session=abc"
    out = capsys.readouterr().out
    assert "uploaded pipeline version v2 (ver-1)" in out and "started run run-2" in out


def test_schedule(capsys, lora_moe, kfp_host, client, package):
    argv = ["pipeline", "schedule", "--host", kfp_host, "--package", str(package), "--cron", "0 0 3 * * MON-FRI",
            "--job_name", "weekday-retrain", "--max_concurrency", "2", "--param", "stage2_epochs=30"]  # fmt: skip
    assert lora_moe(argv) == 0
    kfp_client = client.return_value
    assert kfp_client.create_experiment.call_args.args == ("lora-moe",)
    call = kfp_client.create_recurring_run.call_args.kwargs
    assert call["cron_expression"] == "0 0 3 * * MON-FRI" and call["job_name"] == "weekday-retrain"
    assert (call["experiment_id"], call["max_concurrency"], call["params"]) == ("exp-1", 2, {"stage2_epochs": 30})
    assert call["pipeline_package_path"] == str(package) and call["enable_caching"] is False and call["enabled"]
    assert "created recurring run rec-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("0 3 * * *", ["5 fields", "6"]),
        ("0 0 3 * * * *", ["7 fields"]),
        ("0 61 3 * * *", ["minute field '61'"]),
        ("0 0 25 * * *", ["hour field"]),
        ("0 0 3 0 * *", ["day of month"]),
        ("0 0 3 * 13 *", ["month"]),
        ("0 0 3 * * MON-XYZ", ["day of week"]),
        ("0 */0 * * * *", ["minute"]),
        ("@sometimes", ["descriptor"]),
    ],
)
def test_bad_cron(capsys, lora_moe, client, package, cron, words):
    fails_with(capsys, lora_moe, ["pipeline", "schedule", "--package", str(package), "--cron", cron], "cron", *words)
    assert not client.called  # found before any connection


def test_good_crons():
    from pipelines.submit import validate_cron

    for cron in ("0 0 3 * * *", "*/30 * * ? * *", "0 0 2 1,15 JAN-JUN ?", "0 5-10/5 * * * 0", "@daily", "@every 6h"):
        assert validate_cron(cron) == cron


def test_unreachable_host_fails_fast(capsys, lora_moe, client, package):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", f"http://127.0.0.1:{port}", "--package",
                                  str(package)], "cannot reach KFP", f"127.0.0.1:{port}")  # fmt: skip
    assert time.monotonic() - started < 30
    assert not client.called  # kfp.Client would retry its health check for ~25 s


def test_silent_host_times_out_within_30s(capsys, lora_moe, client, package):
    with socket.socket() as sock:  # accepts the connection (kernel backlog) and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", host, "--package", str(package)],
                   "cannot reach KFP", "timed out")  # fmt: skip
    assert time.monotonic() - started < 30
    assert not client.called


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, ["refused the credentials", "KFP_TOKEN"]), (302, ["login page", "KFP_COOKIES"]), (404, ["no KFP API"])],
)
def test_host_that_is_not_usable(capsys, lora_moe, kfp_host, client, package, status, words):
    FakeKfp.status = status
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", kfp_host, "--package", str(package)], *words)
    assert not client.called


def test_submit_input_errors(tmp_path, capsys, lora_moe, kfp_host, client, package):
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--package", str(package)], "no KFP host", "KFP_HOST")
    submit = ["pipeline", "submit", "--host", kfp_host, "--package"]
    fails_with(capsys, lora_moe, [*submit, str(package), "--param", "epochs=3"], "epochs", "not a parameter")
    fails_with(capsys, lora_moe, [*submit, str(package), "--param", "epochs"], "name=value")
    fails_with(capsys, lora_moe, [*submit, str(tmp_path / "missing.yaml")], "cannot read pipeline package")
    junk = tmp_path / "junk.yaml"
    junk.write_text("hello: [world]\n")
    fails_with(capsys, lora_moe, [*submit, str(junk)], "not a KFP v2 pipeline package")
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", "ftp://kfp", "--package", str(package)], "http")
    fails_with(capsys, lora_moe, ["pipeline", "schedule", "--host", kfp_host, "--package", str(package), "--cron",
                                  "0 0 3 * * *", "--max_concurrency", "0"], "max_concurrency")  # fmt: skip
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", kfp_host, "--s3_secret", "Bad"], "DNS-1123")
    assert not client.called


def test_api_errors_become_one_line(capsys, lora_moe, kfp_host, client, package):
    from kfp_server_api.exceptions import ApiException

    error = ApiException(status=409, reason="Conflict")
    error.body = json.dumps({"message": "pipeline version v1 already exists"})
    client.return_value.create_run_from_pipeline_package.side_effect = error
    fails_with(capsys, lora_moe, ["pipeline", "submit", "--host", kfp_host, "--package", str(package)],
               "HTTP 409", "already exists")  # fmt: skip


def test_local_run_rejects_unknown_parameters_and_bad_store(tmp_path, capsys, lora_moe):
    run = ["pipeline", "run", "--output_dir", str(tmp_path / "run")]
    fails_with(capsys, lora_moe, [*run, "--param", "epochs=2"], "unknown pipeline parameter", "epochs")
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails_with(capsys, lora_moe, [*run, "--store", str(blocker / "store")], "cannot create the store folder")
    fails_with(capsys, lora_moe, [*run, "--param", "stage2_num_nodes=2"], "Kubeflow Trainer TrainJob on a cluster")


def test_the_local_build_keeps_the_single_stage2_step(tmp_path):
    """kfp.local resolves no dsl.OneOf of artifacts: its build has today's Stage-2 step, outside any condition."""
    from kfp import compiler

    from components.k8s import ClusterSettings
    from pipelines.training import build_training_pipeline

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_training_pipeline(ClusterSettings(trainjob_stage2=False)), str(path))
    ir = next(yaml.safe_load_all(path.read_text()))
    tasks = tasks_by_name(ir)
    assert tasks["train-stage2"][0] == "root" and "train-stage2-trainjob" not in tasks
    assert (
        tasks["evaluate"][1]["inputs"]["artifacts"]["lora_moe"]["taskOutputArtifact"]["producerTask"] == "train-stage2"
    )


def test_defaults_match_the_manifests_and_images():
    """The compile defaults name what manifests/ and images/ create: secret and keys, services, GPU pool, images."""
    from components import images
    from components.k8s import S3_SECRET_KEYS, ClusterSettings

    base = REPO / "manifests" / "base"
    secret = yaml.safe_load((base / "minio-credentials.secret.yaml").read_text())
    defaults = ClusterSettings()
    assert secret["metadata"]["name"] == defaults.s3_secret and set(S3_SECRET_KEYS) <= set(secret["stringData"])
    pool = yaml.safe_load((base / "gpu-pool.configmap.yaml").read_text())["data"]
    assert ClusterSettings.from_env(pool) == defaults  # the ConfigMap's values are the defaults
    services = {doc["metadata"]["name"]: doc for f in ("minio.yaml", "mlflow.yaml")
                for doc in yaml.safe_load_all((base / f).read_text()) if doc and doc["kind"] == "Service"}  # fmt: skip
    for url in (defaults.s3_endpoint_url, defaults.mlflow_tracking_uri):
        host, port = url.removeprefix("http://").split(":")
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    from pipelines.image_build import IMAGES

    assert IMAGES == (images.TRAINER, images.LIGHT)  # the names `lora-moe pipeline images` builds and tags


def test_submit_with_the_in_cluster_service_account_token(tmp_path, lora_moe, kfp_host, client, package, monkeypatch):
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert lora_moe(["pipeline", "submit", "--host", kfp_host, "--package", str(package)]) == 0
    credentials = client.call_args.kwargs["credentials"]
    assert type(credentials).__name__ == "ServiceAccountTokenVolumeCredentials"
    assert FakeKfp.seen[0]["Authorization"] == "Bearer sa-token"


def test_local_run_on_a_missing_bucket(tmp_path, capsys, lora_moe, s3_env):
    argv = ["pipeline", "run", "--output_dir", str(tmp_path), "--store", "s3://no-such-bucket/demo"]
    fails_with(capsys, lora_moe, argv, "no-such-bucket")
    assert not (tmp_path / "kfp").exists()  # nothing ran
