"""Register the LoRA-MoE (with its per-instrument LoRAs beside it) in the MLflow model registry."""

from kfp import dsl
from kfp.dsl import Input, Model

from components.images import LIGHT_IMAGE


@dsl.component(base_image=LIGHT_IMAGE, install_kfp_package=False)
def register_model(
    lora_moe: Input[Model],
    model_name: str,
    alias: str,
    alpha_base: float,
    alpha_expert: float,
    tracking: dict,
    kfp_task_name: str,
) -> str:
    """Log the packaged model to the step's MLflow run and register it as a new version of ``model_name`` with
    ``alias``; returns the version ("" when tracking is off). Fails when the registry cannot be reached."""
    import os
    import tempfile
    from pathlib import Path

    from lora_moe_core.tracking.registry import package_model
    from lora_moe_core.tracking.runs import register_model
    from lora_moe_core.tracking.tracker import MLflowTracker, start_tracker

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    scratch = Path(tempfile.mkdtemp(prefix="register-"))
    folder = package_model(lora_moe.path, scratch / "model", alpha_base=alpha_base, alpha_expert=alpha_expert)
    with start_tracker(
        f"register-{model_name}",
        tracking.get("MLFLOW_EXPERIMENT_NAME", "lora-moe"),
        tags={"stage": "register"},
        parent_run_id=tracking.get("MLFLOW_PARENT_RUN_ID"),
        output_dir=scratch,
    ) as run:
        if not isinstance(run, MLflowTracker):
            print("MLflow tracking is off: nothing registered")
            return ""
        run.log_artifact(folder, "model")
        version = register_model(
            run,
            model_name,
            "model",
            run.run_id,
            alias=alias,
            tags={"kfp.run_id": tracking.get("KFP_RUN_ID", ""), "format": "safetensors"},
        )
        run.set_tags({"registered_model": f"{model_name}/{version}"})
    print(f"registered {model_name} version {version} (alias {alias!r})")
    return version
