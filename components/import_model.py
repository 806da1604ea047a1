"""A trained LoRA-MoE as a ``Model`` artifact: from a path, an s3:// URI or the MLflow model registry."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def import_lora_moe(lora_moe_uri: str, lora_moe: Output[Model]):
    """Copy the Stage-2 checkpoint at ``lora_moe_uri`` into the ``lora_moe`` artifact after checking it loads.

    ``lora_moe_uri``: a local path, ``s3://bucket/key.safetensors``, or a registered model ``models:/<name>@<alias>``
    / ``models:/<name>/<version>`` (as written by ``register_model``: its ``lora_moe_final.safetensors`` is used).
    """
    import shutil
    import tempfile

    from lora_moe_core.adapters.checkpoint import read_checkpoint
    from lora_moe_core.tracking.registry import fetch_checkpoint

    local = fetch_checkpoint(lora_moe_uri, tempfile.mkdtemp(prefix="import-lora-moe-"))
    task = read_checkpoint(local).config.model.task
    shutil.copyfile(local, lora_moe.path)
    lora_moe.metadata.update({"uri": lora_moe_uri, "task": task})
    print(f"LoRA-MoE {lora_moe_uri} ({task})")
