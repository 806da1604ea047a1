"""A trained LoRA-MoE as a ``Model`` artifact: from a path, an s3:// URI or the MLflow model registry."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def import_lora_moe(lora_moe_uri: str, lora_moe: Output[Model], tracking: dict, kfp_task_name: str):
    """Copy the Stage-2 checkpoint at ``lora_moe_uri`` into the ``lora_moe`` artifact after checking it loads.

    ``lora_moe_uri``: a local path, ``s3://bucket/key.safetensors``, or a registered model ``models:/<name>@<alias>``
    / ``models:/<name>/<version>`` (as written by ``register_model``: its ``lora_moe_final.safetensors`` is used).
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lora_moe_core.adapters.checkpoint import read_checkpoint
    from lora_moe_core.errors import UserError
    from lora_moe_core.storage.store import Storage, is_s3

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    scratch = Path(tempfile.mkdtemp(prefix="import-lora-moe-"))
    if lora_moe_uri.startswith("models:/"):
        import mlflow

        from lora_moe_core.tracking.tracker import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri())
        mlflow.set_registry_uri(resolve_tracking_uri())
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=lora_moe_uri, dst_path=str(scratch)))
        found = sorted(folder.rglob("lora_moe_final.safetensors")) if folder.is_dir() else [folder]
        if not found:
            raise UserError(f"{lora_moe_uri} holds no lora_moe_final.safetensors")
        local = found[0]
    elif is_s3(lora_moe_uri):
        local = Storage().download(lora_moe_uri, scratch / "lora_moe_final.safetensors")
    else:
        local = Path(lora_moe_uri)
    checkpoint = read_checkpoint(local)  # UserError (one line) when it is not a Stage-2 checkpoint
    shutil.copyfile(local, lora_moe.path)
    lora_moe.metadata.update({"uri": lora_moe_uri, "task": checkpoint.config.model.task})
    print(f"LoRA-MoE {lora_moe_uri} ({checkpoint.config.model.task})")
