"""The multi-node Stage-2 TrainJob: the object the launcher builds is valid for the Trainer v2.3.0 CRD (vendored in
tests/data/kubeflow_trainer) and places its pods exactly as the compiled pipeline places the single-pod step."""

from __future__ import annotations

import copy

import pytest
import yaml
from kfp import compiler

from components.k8s import ClusterSettings, Toleration, trainjob_placement
from lora_moe_core.errors import UserError
from lora_moe_core.training.trainjob import Placement, SecretEnv, TrainJobRequest, build_trainjob, trainjob_name
from tests.k8s_api import validate_trainjob


def _request(placement: Placement | None = None, **changes) -> TrainJobRequest:
    values = dict(name="lora-moe-s2-0123456789ab", namespace="kubeflow", num_nodes=2, gpus_per_node=4,
                  command=("lora-moe", "train-node", "--gpus_per_node", "4"),
                  placement=placement or Placement.from_dict(trainjob_placement(ClusterSettings())),
                  env={"MLFLOW_PARENT_RUN_ID": "abc"})  # fmt: skip
    return TrainJobRequest(**{**values, **changes})


def test_the_built_trainjob_is_valid_for_the_trainer_crd():
    body = build_trainjob(_request())
    assert validate_trainjob(body) == []
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}  # fmt: skip
    assert spec["trainer"]["numNodes"] == 2 and spec["activeDeadlineSeconds"] == 3 * 24 * 3600
    assert spec["trainer"]["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "96Gi", "nvidia.com/gpu": "4"},
        "limits": {"nvidia.com/gpu": "4"},
    }
    assert spec["trainer"]["image"] == "registry.example.com/lora-moe-trainer:dev"


def test_the_schema_check_refuses_what_an_api_server_would():
    """The validator is strict: a misspelled field, a wrong type and a bad name all fail (so the test above can)."""
    body = build_trainjob(_request())
    misspelled = copy.deepcopy(body)
    misspelled["spec"]["runtimePatch"] = misspelled["spec"].pop("runtimePatches")
    assert any("runtimePatch" in p for p in validate_trainjob(misspelled))
    wrong_type = copy.deepcopy(body)
    wrong_type["spec"]["trainer"]["numNodes"] = "2"
    assert any("numNodes" in p for p in validate_trainjob(wrong_type))
    deep = copy.deepcopy(body)  # a pod field the runtime patch API does not allow (v2.2 removed podSpecOverrides)
    deep["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["hostNetwork"] = True  # fmt: skip
    assert any("hostNetwork" in p for p in validate_trainjob(deep))
    bad_name = copy.deepcopy(body)
    bad_name["metadata"]["name"] = "Stage2_job"
    assert validate_trainjob(bad_name) == ["metadata.name must match RFC 1035 DNS label format"]


def _pod_patch(body: dict) -> dict:
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


def _compiled(settings: ClusterSettings, tmp_path) -> tuple[dict, dict, dict]:
    """(single-pod Stage-2 executor's Kubernetes config, its container spec, the launcher's placement argument)."""
    from pipelines.training import build_training_pipeline

    path = tmp_path / "training.yaml"
    compiler.Compiler().compile(build_training_pipeline(settings), str(path))
    pipeline, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    container = pipeline["deploymentSpec"]["executors"]["exec-train-stage2"]["container"]
    (launcher,) = [dag["dag"]["tasks"]["train-stage2-trainjob"] for dag in pipeline["components"].values()
                   if "train-stage2-trainjob" in dag.get("dag", {}).get("tasks", {})]  # fmt: skip
    placement = launcher["inputs"]["parameters"]["placement"]["runtimeValue"]["constant"]
    return executors["exec-train-stage2"], container, placement


def test_trainjob_pods_are_placed_as_the_single_pod_stage2_step(tmp_path):
    settings = ClusterSettings(
        gpu_node_selector=(("cloud.example.com/pool", "h100"),),
        gpu_tolerations=(Toleration("nvidia.com/gpu"), Toleration("pool", "NoExecute", "h100")),
        image_tag="v1.2", image_pull_secrets=("regcred",), shm_size="64Gi", s3_secret="store-keys",
    )  # fmt: skip
    single, container, placement = _compiled(settings, tmp_path)
    body = build_trainjob(_request(Placement.from_dict(placement)))
    assert validate_trainjob(body) == []
    pod = _pod_patch(body)
    assert pod["nodeSelector"] == single["nodeSelector"]["labels"] == {"cloud.example.com/pool": "h100"}
    assert pod["tolerations"] == single["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    shm = single["emptyDirMounts"][0]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": shm["medium"], "sizeLimit": shm["sizeLimit"]}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": shm["mountPath"]}]
    uid = int(single["securityContext"]["runAsUser"])
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsNonRoot"]) == (uid, True)
    trainer = body["spec"]["trainer"]
    assert trainer["image"] == container["image"] == "registry.example.com/lora-moe-trainer:v1.2"
    resources = container["resources"]
    assert trainer["resourcesPerNode"]["requests"]["cpu"] == resources["resourceCpuRequest"]
    assert trainer["resourcesPerNode"]["requests"]["memory"] == resources["resourceMemoryRequest"]
    assert resources["accelerator"]["resourceType"] in trainer["resourcesPerNode"]["limits"]
    plain = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
    assert {e["name"]: e["value"] for e in container["env"]}.items() <= plain.items()
    from_secrets = {
        (
            e["name"],
            e["valueFrom"]["secretKeyRef"]["name"],
            e["valueFrom"]["secretKeyRef"]["key"],
            e["valueFrom"]["secretKeyRef"].get("optional", False),
        )
        for e in trainer["env"]
        if "valueFrom" in e
    }
    expected = {(k["envVar"], s["secretName"], k["secretKey"], s["optional"]) for s in single["secretAsEnv"]
                for k in s["keyToEnv"]}  # fmt: skip
    assert from_secrets == expected and ("AWS_ACCESS_KEY_ID", "store-keys", "AWS_ACCESS_KEY_ID", False) in expected
    assert int(single["activeDeadlineSeconds"]) == body["spec"]["activeDeadlineSeconds"]


def test_placement_round_trips_and_bad_values_are_one_line_errors():
    placement = Placement.from_dict(trainjob_placement(ClusterSettings()))
    assert Placement.from_dict(placement.to_dict()) == placement
    assert placement.secret_env[0] == SecretEnv("AWS_ACCESS_KEY_ID", "minio-credentials", "AWS_ACCESS_KEY_ID")
    for values, words in (
        ({**placement.to_dict(), "gpus": 8}, "unknown key(s) gpus"),
        ({**placement.to_dict(), "timeout_s": 0}, "timeout_s 0"),
        ({**placement.to_dict(), "env": {"BAD NAME": "x"}}, "'BAD NAME' is not an environment variable"),
    ):
        with pytest.raises(UserError, match="TrainJob placement") as caught:
            Placement.from_dict(values)
        assert words in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="stage2_num_nodes 0"):
        build_trainjob(_request(num_nodes=0))
    with pytest.raises(UserError, match="RFC 1035"):
        build_trainjob(_request(name="x" * 64))


def test_trainjob_names_are_stable_per_run_and_task():
    first = trainjob_name("3f2c1d4e-0000-4a4a-9b9b-123456789abc", "train-stage2-trainjob")
    assert first == trainjob_name("3f2c1d4e-0000-4a4a-9b9b-123456789abc", "train-stage2-trainjob")
    assert first != trainjob_name("another-run", "train-stage2-trainjob")
    assert first.startswith("lora-moe-s2-") and len(first) == 24
    assert validate_trainjob(build_trainjob(_request(name=first))) == []


def test_train_node_refuses_bad_input_with_one_line(tmp_path, capsys, monkeypatch):
    from tests.helpers import assert_one_line_error

    config = tmp_path / "config.json"
    argv = ["train-node", "--config_uri", str(config), "--stage_uri", str(tmp_path / "stage"),
            "--work_dir", str(tmp_path / "node")]  # fmt: skip
    assert_one_line_error(capsys, [*argv, "--gpus_per_node", "0"], "--gpus_per_node 0 must be at least 1")
    monkeypatch.setenv("PET_NODE_RANK", "one")
    assert_one_line_error(capsys, [*argv, "--gpus_per_node", "1"], "PET_NODE_RANK 'one' is not a node rank")
    monkeypatch.setenv("PET_NODE_RANK", "1")
    assert_one_line_error(capsys, [*argv, "--gpus_per_node", "1"], str(config))  # no config where the launcher put it
    config.write_text('{"training": {"learning_rat": 1}}')
    assert_one_line_error(capsys, [*argv, "--gpus_per_node", "1"], "learning_rat")  # checked before torchrun starts
