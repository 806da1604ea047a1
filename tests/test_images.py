"""The images, built and run for real: ``lora-moe pipeline images`` through the Docker SDK on a base image made
here (debootstrap: no registry), then each image checked as the cluster runs it, and the whole training and
inference DAGs run in containers (``lora-moe pipeline run --runner docker``) against SeaweedFS and ``mlflow server``,
with the same outputs as the subprocess run. Skipped, with the reason, where no Docker engine can be started."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.docker_engine import docker_engine  # noqa: F401 - the session's engine
from tests.test_pipeline import lora_moe  # noqa: F401 - the `lora-moe` main with the pipeline command
from tests.test_pipeline_local import TINY, check_mlflow, check_outputs, summary_paths

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "localhost/lora-moe-test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the system bundle: pip behind a TLS-inspecting proxy
pytestmark = pytest.mark.slow


def _cpu_torch_wheel(folder: Path) -> bool:
    """The CPU torch wheel, from wherever this machine's pip finds it (a local wheel here): the builds then need no
    PyTorch index (air-gapped)."""
    import torch

    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                           f"torch=={torch.__version__}"], capture_output=True, check=False)  # fmt: skip
    return done.returncode == 0 and any(folder.glob("torch-*+cpu-*.whl"))


@pytest.fixture(scope="session")
def built(docker_engine, tmp_path_factory):  # noqa: F811
    """The base image (made once per engine) and both images at this commit, trainer with CPU torch."""
    from pipelines.image_build import LOCAL_BASE, TORCH_CPU_INDEX, ImageBuild, build_images, make_base_image

    if not docker_engine.images.list(name=LOCAL_BASE):
        make_base_image(docker_engine)
    wheels = tmp_path_factory.mktemp("wheels")
    local_wheel = _cpu_torch_wheel(wheels)
    build = ImageBuild(context=REPO, registry=REGISTRY, base_image=LOCAL_BASE, torch_variant="cpu",
                       torch_index_url="" if local_wheel else TORCH_CPU_INDEX, wheels=wheels if local_wheel else None,
                       ca_bundle=CA_BUNDLE if CA_BUNDLE.exists() else None)  # fmt: skip
    built = build_images(docker_engine, build, print)  # the build log shows with a failure
    return build, {Path(image.ref).name.partition(":")[0]: image for image in built}


def _in(client, image: str, *command: str) -> str:
    return client.containers.run(image, list(command), network_mode="none", remove=True).decode().strip()


def _lock() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return dict(line.lower().replace("_", "-").split("==") for line in lines if line and not line.startswith("#"))


def test_images_are_tagged_with_the_commit(built):
    build, images = built
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert build.resolved_tag() in (sha, f"{sha}-dirty")
    assert {name: image.ref for name, image in images.items()} == {
        name: f"{REGISTRY}/{name}:{build.resolved_tag()}" for name in ("lora-moe-trainer", "lora-moe-cpu")
    }


@pytest.mark.parametrize("name", ["lora-moe-trainer", "lora-moe-cpu"])
def test_each_image_runs_as_the_cluster_runs_it(built, docker_engine, name):  # noqa: F811
    """uid 10001, the CLI answers, the installed set IS requirements.lock (+ the package), the code imports from
    site-packages (nothing mounted), the labels name the image and the commit."""
    build, images = built
    ref = images[name].ref
    assert _in(docker_engine, ref, "id", "-u") == "10001"
    assert "usage: lora-moe" in _in(docker_engine, ref, "lora-moe", "--help")
    frozen = _in(docker_engine, ref, "pip", "freeze", "--all", "--exclude", "lora-moe-core", "--exclude", "pip")
    installed = dict(line.lower().replace("_", "-").split("==") for line in frozen.splitlines())
    assert installed.pop("torch") == "2.13.0+cpu"
    expected = _lock()
    expected.pop("torch")
    assert installed == expected
    where = _in(docker_engine, ref, "python", "-c", "import lora_moe_core, components, pipelines as p; "
                "print(lora_moe_core.__file__, components.__file__, p.__file__)")  # fmt: skip
    assert all(path.startswith("/opt/venv/lib/python3.11/site-packages/") for path in where.split()), where
    config = docker_engine.images.get(ref).attrs["Config"]
    assert config["Labels"]["org.opencontainers.image.title"] == name
    assert config["Labels"]["org.opencontainers.image.revision"] == build.resolved_tag()
    assert config["User"] == "10001:10001" and "HF_HUB_OFFLINE=1" in config["Env"]


def test_both_images_share_their_file_layers(built, docker_engine):  # noqa: F811
    """A cpu trainer and the CPU image differ only in labels: the second build costs no layer (and no disk)."""
    _, images = built
    layers = {name: docker_engine.images.get(image.ref).attrs["RootFS"]["Layers"] for name, image in images.items()}
    assert layers["lora-moe-trainer"] == layers["lora-moe-cpu"]


def _checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _metric_keys(report: Path) -> set[str]:
    executor_output = json.loads((report.parent / "executor_output.json").read_text())
    return set(executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"])


def test_the_pipelines_run_in_their_containers(built, tmp_path, capsys, lora_moe, s3_env, mlflow_server):  # noqa: F811
    """Training then inference, every step a container of the images as uid 10001 on the host network, S3 and
    MLflow reached from inside; the outputs equal the subprocess run's (keys, shapes, metric names)."""
    build, _ = built
    prefix = f"s3://mlpipeline/docker-{uuid.uuid4().hex[:8]}"
    images = ["--runner", "docker", "--image_registry", REGISTRY, "--image_tag", build.resolved_tag()]
    experiment = ["--param", "mlflow_experiment=lora-moe-docker"]  # the session's server is shared with other tests
    argv = ["pipeline", "run", "--output_dir", str(tmp_path / "docker"), "--store", prefix,
            "--tracking_uri", mlflow_server.uri, *experiment, *TINY, *images]  # fmt: skip
    assert lora_moe(argv) == 0
    out = capsys.readouterr().out
    assert "Found image 'localhost/lora-moe-test/lora-moe-trainer:" in out  # kfp.local's DockerRunner ran them
    docker_paths = summary_paths(out)
    check_outputs(docker_paths, arm=True)  # the pipeline's default: the matched-LoRA arm on
    check_mlflow(mlflow_server.uri, imported_stage1=False, arm=True, experiment_name="lora-moe-docker")
    owners = {p.stat().st_uid for p in (tmp_path / "docker").rglob("*")}
    assert owners == {subprocess.os.getuid()}  # the containers' files are given back to the user who ran it

    assert lora_moe(["pipeline", "run", "--output_dir", str(tmp_path / "subprocess"), "--store", str(tmp_path / "st"),
                     "--tracking_uri", f"sqlite:///{tmp_path / 'sub.db'}", *TINY]) == 0  # fmt: skip
    subprocess_paths = summary_paths(capsys.readouterr().out)
    key = "Stage-2 checkpoint"
    assert _checkpoint_shapes(docker_paths[key]) == _checkpoint_shapes(subprocess_paths[key])
    report = "evaluation report"
    assert _metric_keys(docker_paths[report]) == _metric_keys(subprocess_paths[report])
    assert sorted(p.name for p in docker_paths["sample videos"].iterdir()) == sorted(
        p.name for p in subprocess_paths["sample videos"].iterdir()
    )

    infer = ["pipeline", "run", "--pipeline", "inference", "--output_dir", str(tmp_path / "infer"),
             "--tracking_uri", mlflow_server.uri, "--sample_size", "32", "32", "9", "--sample_steps", "2",
             *experiment, *images]  # fmt: skip
    assert lora_moe(infer) == 0  # the registry's candidate from the training run above
    videos = summary_paths(capsys.readouterr().out)["sample videos"]
    assert any(p.suffix == ".mp4" and p.stat().st_size > 0 for p in videos.iterdir())
