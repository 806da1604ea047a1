"""Run a pipeline on this machine with ``kfp.local``: the whole training DAG (what ``make run`` does) or inference.

The same components run as on the cluster, each in its own Python process (``SubprocessRunner(use_venv=False)``:
this interpreter, no pip) or, with ``runner="docker"``, each in its own container from the images the cluster runs
(:mod:`pipelines.docker_run`), on the tiny random WAN2.2 (``task=tiny``) and synthetic clips. Big data goes to the
*store*: a local folder by default (the components take local paths where the cluster passes ``s3://`` URIs) or
``s3://bucket/prefix`` on MinIO/SeaweedFS (``S3_ENDPOINT_URL`` and ``AWS_*`` in the environment). MLflow logs to
``MLFLOW_TRACKING_URI`` or, by default, a sqlite file in the output folder. kfp-kubernetes settings (GPUs, node
pools, secrets) have no effect locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_moe_core.defaults import EXPERIMENT, REGISTERED_MODEL, REGISTRY_ALIAS
from lora_moe_core.errors import UserError
from lora_moe_core.redaction import redact
from lora_moe_core.tracking.links import experiment_link, is_server
from pipelines.defaults import DEMO_PROMPTS, DEMO_STAGE1_CONFIG, DEMO_STAGE2_CONFIG, training_section


@dataclass
class LocalRun:
    """What one local run is made of; ``arguments()`` turns it into the pipeline's arguments."""

    pipeline: str = "training"  # or "inference" (default model: the registry's lora-moe-surgical@candidate)
    output_dir: Path = Path("outputs/pipeline")
    store: str | None = None  # local folder or s3://bucket/prefix; default <output_dir>/store
    tracking_uri: str | None = None  # default MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    clips: int = 24
    eval_clips: int = 8
    clip_size: tuple[int, int, int] = (128, 96, 33)  # width, height, frames of the synthetic clips
    cache_shards: int = 2
    stage1_epochs: int = training_section(DEMO_STAGE1_CONFIG)["num_train_epochs"]
    stage2_epochs: int = training_section(DEMO_STAGE2_CONFIG)["num_train_epochs"]
    sample_size: tuple[int, int, int] = (64, 48, 17)  # evaluation and inference clips: width, height, frames
    sample_steps: int = 4
    overrides: dict[str, Any] = field(default_factory=dict)  # any other pipeline parameter
    runner: str = "subprocess"  # or "docker": every step in its own container (images from `make images`)
    image_registry: str | None = None  # the docker runner's images: <registry>/<name>:<tag> (components/images.py)
    image_tag: str | None = None

    def __post_init__(self) -> None:
        """Refuse counts and sizes the pipeline cannot use before any step runs (``--clips -1`` used to run the
        whole pipeline and fail in its last step with a traceback)."""
        from lora_moe_core.guards.numbers import check_int

        if self.runner not in ("subprocess", "docker"):
            raise UserError(f"--runner {self.runner!r}: subprocess or docker")
        for name in ("clips", "eval_clips", "cache_shards", "stage1_epochs", "stage2_epochs", "sample_steps"):
            check_int(f"--{name}", getattr(self, name), 1, 100_000)
        for name in ("clip_size", "sample_size"):
            width, height, frames = getattr(self, name)
            check_int(f"--{name} width", width, 16, 4096)
            check_int(f"--{name} height", height, 16, 4096)
            check_int(f"--{name} frames", frames, 1, 1025)
            if width % 16 or height % 16 or (frames - 1) % 4:
                raise UserError(f"--{name} {width} {height} {frames}: width and height multiples of 16, frames 4k+1")

    @property
    def store_uri(self) -> str:
        return self.store or str((self.output_dir / "store").resolve())

    def resolved_tracking_uri(self) -> str:
        return (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"
        )

    def arguments(self) -> dict[str, Any]:
        from lora_moe_core.storage.store import join

        width, height, frames = self.sample_size
        if self.pipeline == "inference":
            arguments = {"lora_moe_uri": f"models:/{REGISTERED_MODEL}@{REGISTRY_ALIAS}", "base_model_uri": "",
                         "task": "tiny", "prompts": DEMO_PROMPTS, "num_frames": frames, "height": height,
                         "width": width,
                         "num_inference_steps": self.sample_steps}  # fmt: skip
            return self._with_overrides(arguments)
        store = self.store_uri
        arguments = {
            "dataset_uri": join(store, "datasets", "train"),
            "eval_dataset_uri": join(store, "datasets", "heldout"),
            "work_uri": join(store, "runs"),
            "base_model_uri": "",
            "task": "tiny",
            "synthetic_clips": self.clips,
            "synthetic_eval_clips": self.eval_clips,
            "synthetic_size": list(self.clip_size),
            "cache_shards": self.cache_shards,
            "stage1_config": DEMO_STAGE1_CONFIG,
            "stage1_epochs": self.stage1_epochs,
            "stage1_learning_rate": training_section(DEMO_STAGE1_CONFIG)["learning_rate"],
            "stage2_config": DEMO_STAGE2_CONFIG,
            "stage2_epochs": self.stage2_epochs,
            "stage2_learning_rate": training_section(DEMO_STAGE2_CONFIG)["learning_rate"],
            "seed": 0,
            "samples_per_family": 1,
            "sample_steps": self.sample_steps,
            "sample_width": width,
            "sample_height": height,
            "sample_frames": frames,
            "prompts": DEMO_PROMPTS,
        }
        return self._with_overrides(arguments)

    def _with_overrides(self, arguments: dict[str, Any]) -> dict[str, Any]:
        known = pipeline_parameters(self.pipeline)
        unknown = sorted(set(self.overrides) - set(known))
        if unknown:
            raise UserError(f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return {**arguments, **self.overrides}


@dataclass
class LocalResult:
    """Where a finished local run put its outputs."""

    seconds: float
    outputs: dict[str, str]  # output name -> local path
    tracking_uri: str
    store: str | None  # None for the inference pipeline
    experiment: str = EXPERIMENT

    def summary(self) -> list[str]:
        """The lines printed at the end of ``lora-moe pipeline run``."""
        labels = {"lora_moe": "Stage-2 checkpoint", "report": "evaluation report", "videos": "sample videos",
                  "instrument_loras": "per-instrument LoRAs"}  # fmt: skip
        lines = [f"done in {self.seconds:.0f} s."]
        lines += [f"  {label + ':':<22}{self.outputs[key]}" for key, label in labels.items() if key in self.outputs]
        if self.store:
            lines.append(f"  {'big data (store):':<22}{self.store}")
        link = experiment_link(self.tracking_uri, self.experiment)  # opens the runs view, not GenAI's
        if link is None:  # store unreachable or without the experiment: say where it is
            shown = redact(self.tracking_uri)  # a server URL may carry user:password@
            link = (
                f"{shown} (experiment {self.experiment})"
                if is_server(shown)
                else f"mlflow ui --backend-store-uri {shown}"
            )
        lines.append(f"  {'MLflow runs:':<22}{link}")
        return lines


def pipeline_parameters(name: str = "training") -> dict[str, Any]:
    """A pipeline's parameters and their defaults."""
    import inspect

    from pipelines.compile import build

    return {key: p.default for key, p in inspect.signature(build(name).pipeline_func).parameters.items()}


def _pipeline_root(run: LocalRun) -> Path:
    return (run.output_dir / "kfp").resolve()  # absolute: the docker runner mounts it at the same path


@contextlib.contextmanager
def _runner(run: LocalRun, settings, env: dict[str, str]) -> Iterator[Any]:
    """The kfp.local runner of ``run``: this interpreter's subprocesses, or containers of the pipeline's images."""
    from kfp import local

    if run.runner == "subprocess":
        yield local.SubprocessRunner(use_venv=False)
        return
    from pipelines.docker_run import DockerPlan, container_environment, docker_runner, local_folders

    plan = DockerPlan(images=(settings.trainer_image, settings.light_image),
                      folders=local_folders(run.output_dir, run.store_uri, env["MLFLOW_TRACKING_URI"]),
                      environment=container_environment({**os.environ, **env}),
                      pipeline_root=_pipeline_root(run))  # fmt: skip
    with docker_runner(plan) as runner:
        yield runner


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_store(store: str) -> None:
    """Fail before any step runs when the store cannot be written (one line, no traceback)."""
    from lora_moe_core.storage.store import Storage, is_s3, join

    if not is_s3(store):
        try:
            Path(store).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store folder {store}: {exc.strerror}") from None
        return
    probe = join(store, ".lora-moe-write-probe")
    storage = Storage()
    storage.write_bytes(probe, b"")
    storage.delete(probe)


#: pipeline parameters naming one weights file, and the musubi flag each one is
MODEL_FILE_PARAMETERS = {"dit_uri": "dit", "dit_high_noise_uri": "dit_high_noise", "vae_uri": "vae", "t5_uri": "t5"}


def check_inputs(arguments: dict[str, Any]) -> None:
    """Every model file, model folder, checkpoint and dataset the steps will read is there, before any step runs
    or any folder is made: a missing ``--param vae_uri`` used to fail in the cache step, after the run folder,
    its store and the first steps' outputs were written. Local files are checked as the steps will open them
    (a regular file; a weights file whose name agrees with its content, holding the part it is given for), a
    local model folder as a diffusers layout with bounded configs; ``s3://`` ones are looked up.

    Raises:
        UserError: one line naming the parameter and the path.
    """
    from lora_moe_core.defaults import TASK_NAMES
    from lora_moe_core.guards.files import check_regular_file
    from lora_moe_core.storage.store import Storage, is_s3, join

    storage = Storage()

    def uri_of(name: str) -> str:
        value = arguments.get(name) or ""
        if not isinstance(value, str):
            raise UserError(f"--param {name} must be a path or an s3:// URI, got {value!r}")
        return value

    def missing(name: str, uri: str, what: str) -> UserError:
        return UserError(f"--param {name} {uri}: no such {what}{' in the bucket' if is_s3(uri) else ''}")

    task = arguments.get("task")
    if not isinstance(task, str) or task not in TASK_NAMES:
        raise UserError(f"--param task {task!r}: one of {', '.join(TASK_NAMES)}")
    folder = uri_of("base_model_uri")
    if is_s3(folder):
        if not any(storage.exists(join(folder, part)) for part in ("model_index.json", "vae")):
            raise missing("base_model_uri", folder, "diffusers-layout model folder (model_index.json or vae/)")
    elif folder:
        from lora_moe_core.model.loading import check_model_folder

        if not os.path.isdir(folder):  # os.path: False, not an OSError, for a name too long to stat
            raise missing("base_model_uri", folder, "folder")
        check_model_folder(Path(folder), f"--param base_model_uri {folder}")
    files = {name: uri_of(name) for name in MODEL_FILE_PARAMETERS}
    if task != "tiny" and not folder and not all(files[name] for name in ("dit_uri", "vae_uri", "t5_uri")):
        raise UserError(f"--param task {task} needs base_model_uri (a diffusers-layout Wan2.2 folder) or the single "
                        "files dit_uri, vae_uri and t5_uri")  # fmt: skip
    checkpoints = {"stage1_lora_uri": "Stage-1 LoRA", "lora_moe_uri": "LoRA-MoE checkpoint"}
    for name, uri in [*files.items(), *((name, uri_of(name)) for name in checkpoints if name in arguments)]:
        if not uri or uri.startswith("models:/"):
            continue
        what = checkpoints.get(name, "weights file")
        if is_s3(uri):
            if not storage.exists(uri):
                raise missing(name, uri, what)
            continue
        if not os.path.exists(uri):
            raise missing(name, uri, what)
        check_regular_file(uri, f"--param {name}")
        if name in MODEL_FILE_PARAMETERS:
            from lora_moe_core.model.sources import require_kind

            require_kind(Path(uri), f"param {name}", MODEL_FILE_PARAMETERS[name])
    for name, count in (("dataset_uri", "synthetic_clips"), ("eval_dataset_uri", "synthetic_eval_clips")):
        uri = uri_of(name)
        if uri and not arguments.get(count) and not (storage.exists(uri) if is_s3(uri) else os.path.exists(uri)):
            raise missing(name, uri, "dataset")


def run_local(run: LocalRun) -> LocalResult:
    """Run the pipeline with ``kfp.local`` and return where its outputs are.

    Raises:
        UserError: for bad settings (store, parameters, a missing model file, checkpoint or dataset) before
            anything runs or any folder is made.
        RuntimeError: when a step fails (its log and error are printed above by kfp.local).
    """
    from kfp import local

    from components.k8s import ClusterSettings, SettingsError
    from pipelines.compile import build

    arguments = run.arguments()
    check_inputs(arguments)  # before any folder is made: a failed check leaves nothing behind
    if arguments.get("stage2_num_nodes", 1) != 1:  # the local build has no TrainJob branch (components/k8s.py)
        raise UserError("stage2_num_nodes > 1 runs Stage 2 as a Kubeflow Trainer TrainJob on a cluster "
                        "(lora-moe pipeline compile/submit); a local run trains it here, on one node")  # fmt: skip
    # endpoints from this process's environment, not the cluster's service names; a failed step fails at once
    images = {"image_registry": run.image_registry, "image_tag": run.image_tag}
    try:
        local_settings = ClusterSettings.from_env(s3_endpoint_url="", mlflow_tracking_uri="", gpu_retries=0,
                                                  cpu_retries=0, trainjob_stage2=False,
                                                  **images).validate()  # fmt: skip
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    if run.pipeline == "training":
        _check_store(run.store_uri)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = run.resolved_tracking_uri()
    (run.output_dir / "arguments.json").write_text(json.dumps(arguments, indent=2, ensure_ascii=False))
    started = time.monotonic()
    # every step is a child process of this one: they read the tracking URI and S3 settings from the environment.
    # One OpenMP thread per step: the tiny model's ops are too small to split, and shards run side by side.
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    with _environment(env), _runner(run, local_settings, env) as runner:
        local.init(runner=runner, pipeline_root=str(_pipeline_root(run)))
        try:
            task = build(run.pipeline, local_settings)(**arguments)
        except ValueError as exc:  # kfp.local's exit handler after a failed first step: its output is missing
            if not str(exc).startswith("Tried to get output"):
                raise
            raise RuntimeError(f"a step failed before the pipeline's exit handler could run ({exc})") from None
    outputs = {name: getattr(artifact, "path", str(artifact)) for name, artifact in task.outputs.items()}
    store = run.store_uri if run.pipeline == "training" else None
    experiment = arguments.get("mlflow_experiment", EXPERIMENT)
    return LocalResult(time.monotonic() - started, outputs, tracking_uri, store, experiment)
