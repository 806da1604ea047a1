"""Run a pipeline on this machine with ``kfp.local``: the whole training DAG (what ``make run`` does) or inference.

The same components run as on the cluster, each in its own Python process (``SubprocessRunner(use_venv=False)``:
this interpreter, no pip), on the tiny random WAN2.2 (``task=tiny``) and synthetic clips. Big data goes to the
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

    def __post_init__(self) -> None:
        """Refuse counts and sizes the pipeline cannot use before any step runs (``--clips -1`` used to run the
        whole pipeline and fail in its last step with a traceback)."""
        from lora_moe_core.guards.numbers import check_int

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


def run_local(run: LocalRun) -> LocalResult:
    """Run the pipeline with ``kfp.local`` and return where its outputs are.

    Raises:
        UserError: for bad settings (store, parameters) before anything runs.
        RuntimeError: when a step fails (its log and error are printed above by kfp.local).
    """
    from kfp import local

    from components.k8s import ClusterSettings
    from pipelines.compile import build

    arguments = run.arguments()
    if run.pipeline == "training":
        _check_store(run.store_uri)
        if arguments.get("stage2_num_nodes", 1) != 1:  # the local build has no TrainJob branch (components/k8s.py)
            raise UserError("stage2_num_nodes > 1 runs Stage 2 as a Kubeflow Trainer TrainJob on a cluster "
                            "(lora-moe pipeline compile/submit); a local run trains it here, on one node")  # fmt: skip
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
    with _environment(env):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run.output_dir / "kfp"))
        # endpoints from this process's environment, not the cluster's service names; a failed step fails at once
        local_settings = ClusterSettings(s3_endpoint_url="", mlflow_tracking_uri="", gpu_retries=0, cpu_retries=0,
                                         trainjob_stage2=False)  # fmt: skip
        task = build(run.pipeline, local_settings)(**arguments)
    outputs = {name: getattr(artifact, "path", str(artifact)) for name, artifact in task.outputs.items()}
    store = run.store_uri if run.pipeline == "training" else None
    experiment = arguments.get("mlflow_experiment", EXPERIMENT)
    return LocalResult(time.monotonic() - started, outputs, tracking_uri, store, experiment)
