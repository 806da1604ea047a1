"""Register the LoRA-MoE (with its per-instrument LoRAs beside it) in the MLflow model registry."""

from kfp import dsl
from kfp.dsl import Input, Model

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def register_model(
    lora_moe: Input[Model],
    instrument_loras: Input[Model],
    model_name: str,
    alias: str,
    tracking: dict,
    kfp_task_name: str,
) -> str:
    """Log the checkpoint and the per-instrument LoRAs of the infer-export step to the step's MLflow run and register
    them as a new version of ``model_name`` with ``alias``; returns the version ("" when tracking is off).
    Fails when the registry cannot be reached."""
    import tempfile

    from lora_moe_core.tracking.context import TrackingContext
    from lora_moe_core.tracking.registry import register_checkpoint

    context = TrackingContext.from_step(tracking, kfp_task_name)
    version = register_checkpoint(lora_moe.path, model_name, tempfile.mkdtemp(prefix="register-"), context=context,
                                  alias=alias, exported=instrument_loras.path)  # fmt: skip
    print(f"registered {model_name} version {version} (alias {alias!r})" if version else
          "MLflow tracking is off: nothing registered")  # fmt: skip
    return version
