"""Run the whole training pipeline on this machine with ``kfp.local`` (what ``make run`` does).

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

from lora_moe_core.errors import UserError
from pipelines.defaults import DEMO_STAGE1_CONFIG, DEMO_STAGE2_CONFIG, REPO, training_section

TINY_PROMPTS = [{"prompt": "电凝钩切割组织", "instrument_hint": "Hook/Electrocautery"}]


@dataclass
class LocalRun:
    """What one local run is made of; ``arguments()`` turns it into the pipeline's arguments."""

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

    @property
    def store_uri(self) -> str:
        return self.store or str((self.output_dir / "store").resolve())

    def resolved_tracking_uri(self) -> str:
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}")  # fmt: skip

    def arguments(self) -> dict[str, Any]:
        from lora_moe_core.storage import join

        store = self.store_uri
        width, height, frames = self.sample_size
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
            "stage1_config": str(REPO / DEMO_STAGE1_CONFIG),
            "stage1_epochs": self.stage1_epochs,
            "stage1_learning_rate": training_section(DEMO_STAGE1_CONFIG)["learning_rate"],
            "stage2_config": str(REPO / DEMO_STAGE2_CONFIG),
            "stage2_epochs": self.stage2_epochs,
            "stage2_learning_rate": training_section(DEMO_STAGE2_CONFIG)["learning_rate"],
            "seed": 0,
            "samples_per_family": 1,
            "sample_steps": self.sample_steps,
            "sample_width": width,
            "sample_height": height,
            "sample_frames": frames,
            "prompts": TINY_PROMPTS,
        }
        unknown = sorted(set(self.overrides) - set(pipeline_parameters()))
        if unknown:
            raise UserError(f"unknown pipeline parameter(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(pipeline_parameters()))}")  # fmt: skip
        return {**arguments, **self.overrides}


@dataclass
class LocalResult:
    """Where a finished local run put its outputs."""

    seconds: float
    outputs: dict[str, str]  # output name -> local path
    tracking_uri: str
    store: str

    def summary(self) -> list[str]:
        """The lines printed at the end of ``lora-moe pipeline run``."""
        paths = self.outputs
        lines = [f"done in {self.seconds:.0f} s.",
                 f"  Stage-2 checkpoint:   {paths.get('lora_moe', '?')}",
                 f"  evaluation report:    {paths.get('report', '?')}",
                 f"  sample videos:        {paths.get('videos', '?')}",
                 f"  per-instrument LoRAs: {paths.get('instrument_loras', '?')}",
                 f"  big data (store):     {self.store}"]  # fmt: skip
        if self.tracking_uri.startswith(("http://", "https://")):
            lines.append(f"  MLflow runs:          {self.tracking_uri} (experiment lora-moe)")
        else:
            lines.append(f"  MLflow runs:          mlflow ui --backend-store-uri {self.tracking_uri}")
        return lines


def pipeline_parameters() -> dict[str, Any]:
    """The training pipeline's parameters and their defaults."""
    import inspect

    from pipelines.training import lora_moe_training

    return {name: p.default for name, p in inspect.signature(lora_moe_training.pipeline_func).parameters.items()}


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
    from lora_moe_core.storage import Storage, is_s3, join

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
    """Run the training pipeline with ``kfp.local`` and return where its outputs are.

    Raises:
        UserError: for bad settings (store, parameters) before anything runs.
        RuntimeError: when a step fails (its log and error are printed above by kfp.local).
    """
    from kfp import local

    from components.k8s import ClusterSettings
    from pipelines.training import build_training_pipeline

    arguments = run.arguments()
    _check_store(run.store_uri)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = run.resolved_tracking_uri()
    (run.output_dir / "arguments.json").write_text(json.dumps(arguments, indent=2, ensure_ascii=False))
    started = time.monotonic()
    # every step is a child process of this one: they read the tracking URI and S3 settings from the environment
    with _environment({"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_LOGGING_LEVEL": "WARNING"}):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run.output_dir / "kfp"))
        # endpoints from this process's environment, not the cluster's service names
        pipeline = build_training_pipeline(ClusterSettings(s3_endpoint_url="", mlflow_tracking_uri=""))
        task = pipeline(**arguments)
    outputs = {name: getattr(artifact, "path", str(artifact)) for name, artifact in task.outputs.items()}
    return LocalResult(time.monotonic() - started, outputs, tracking_uri, run.store_uri)
