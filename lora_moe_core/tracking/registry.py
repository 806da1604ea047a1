"""The MLflow model registry: register a trained LoRA-MoE (with its per-instrument LoRAs) and fetch one back."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT, REGISTRY_ALIAS
from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import removed_on_failure
from lora_moe_core.tracking.context import TrackingContext

CHECKPOINT_NAME = "lora_moe_final.safetensors"


def package_model(checkpoint: str | Path, folder: Path, exported: str | Path | None = None,
                  alpha_base: float = ALPHA_BASE, alpha_expert: float = ALPHA_EXPERT) -> Path:  # fmt: skip
    """``folder/lora_moe_final.safetensors`` + ``folder/exported/<Family>[_regime].safetensors`` (ComfyUI keys).

    ``exported``: a folder that already holds the per-instrument LoRAs of this checkpoint (the pipeline's
    infer-export step), copied as it is; without it they are exported here with ``alpha_base``/``alpha_expert``.
    """
    from lora_moe_core.adapters.export import export_family_loras

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint, folder / CHECKPOINT_NAME)
    if exported is not None:
        shutil.copytree(exported, folder / "exported", dirs_exist_ok=True)
        return folder
    export_family_loras(checkpoint, folder / "exported", "comfy", alpha_base, alpha_expert)
    return folder


def register_checkpoint(checkpoint: str | Path, name: str, work_dir: str | Path, *,
                        context: TrackingContext | None = None, alias: str = REGISTRY_ALIAS,
                        tracking_uri: str | None = None, exported: str | Path | None = None) -> str:  # fmt: skip
    """Log the packaged model to a ``register`` run and register it as a new version of ``name`` with ``alias``.

    Returns the version, or "" when tracking is off (``MLFLOW_TRACKING_URI=none``).

    Raises:
        UserError: when the registry cannot be reached (the version would silently be missing).
    """
    from lora_moe_core.tracking.runs import register_model
    from lora_moe_core.tracking.tracker import MLflowTracker, start_tracker

    context = context if context is not None else TrackingContext.from_env()
    with removed_on_failure(work_dir) as work:  # a bad checkpoint or a refused registration leaves no work_dir
        folder = package_model(checkpoint, work / "model", exported)
        with start_tracker(f"register-{name}", tracking_uri=tracking_uri, tags={"stage": "register"},
                           output_dir=work, context=context) as run:  # fmt: skip
            if not isinstance(run, MLflowTracker):
                return ""
            run.log_artifact(folder, "model")
            tags = {"format": "safetensors", **({"kfp.run_id": context.kfp_run_id} if context.kfp_run_id else {})}
            version = register_model(run, name, "model", run.run_id, alias=alias, tags=tags)
            run.set_tags({"registered_model": f"{name}/{version}"})
    return version


def fetch_checkpoint(uri: str, folder: str | Path, tracking_uri: str | None = None) -> Path:
    """A local copy of the Stage-2 checkpoint at ``uri``: a path, ``s3://…`` or ``models:/<name>@<alias>``.

    A registered model (as ``register_checkpoint`` writes it) gives its ``lora_moe_final.safetensors``; the file
    is checked to be a LoRA-MoE checkpoint before it is returned.

    Raises:
        UserError: the model or file does not exist, or is not a Stage-2 checkpoint (one line).
    """
    from lora_moe_core.adapters.checkpoint import read_checkpoint
    from lora_moe_core.storage.store import Storage, is_s3

    folder = Path(folder)
    if uri.startswith("models:/"):
        local = _download_registered(uri, folder, tracking_uri)
    elif is_s3(uri):
        local = Storage().download(uri, folder / CHECKPOINT_NAME)
    else:
        local = Path(uri)
    read_checkpoint(local)  # UserError (one line) when it is not a Stage-2 checkpoint
    return local


def _download_registered(uri: str, folder: Path, tracking_uri: str | None) -> Path:
    import mlflow

    from lora_moe_core.tracking.mlflow_client import resolve_tracking_uri

    resolved = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"{uri}: {str(exc).splitlines()[0]}") from None
    found = sorted(downloaded.rglob(CHECKPOINT_NAME)) if downloaded.is_dir() else [downloaded]
    if not found:
        raise UserError(f"{uri} holds no {CHECKPOINT_NAME}")
    return found[0]
