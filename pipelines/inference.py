"""The inference pipeline ``lora-moe-inference``: a trained LoRA-MoE + prompts → videos (and per-instrument LoRAs).

``build_inference_pipeline(settings)`` builds it for a cluster; ``lora_moe_inference`` is the default build.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Model

from components import finish_tracking, import_lora_moe, infer_export, start_tracking
from components.k8s import ClusterSettings, cpu_task, gpu_task, use_credentials
from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT, EXPERIMENT, REGISTERED_MODEL, REGISTRY_ALIAS
from pipelines.defaults import PROMPTS

PIPELINE_NAME = "lora-moe-inference"


class InferenceOutputs(NamedTuple):
    videos: Artifact
    instrument_loras: Model


def build_inference_pipeline(settings: ClusterSettings | None = None):
    """The ``@dsl.pipeline`` for ``settings`` (validated; default: ``ClusterSettings.from_env()``)."""
    s = (settings or ClusterSettings.from_env()).validate()

    @dsl.pipeline(name=PIPELINE_NAME, description="Videos from prompts with a trained WAN2.2 LoRA-MoE")
    def lora_moe_inference(
        lora_moe_uri: str = f"models:/{REGISTERED_MODEL}@{REGISTRY_ALIAS}",
        base_model_uri: str = "s3://lora-moe-data/models/Wan2.2-T2V-A14B-Diffusers",
        dit_uri: str = "",
        dit_high_noise_uri: str = "",
        vae_uri: str = "",
        t5_uri: str = "",
        task: str = "t2v-A14B",
        prompts: list = PROMPTS,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 40,
        alpha_base: float = ALPHA_BASE,
        alpha_expert: float = ALPHA_EXPERT,
        seed: int = 0,
        mlflow_experiment: str = EXPERIMENT,
    ) -> InferenceOutputs:
        """Generate videos.

        1. ``import-lora-moe``: the checkpoint from a path, an s3:// URI or the registry (``models:/name@alias``).
        2. ``infer-export``: one video (+ gates JSON) per prompt, and one standard LoRA per instrument.
        The MLflow parent run (``start-tracking``) is ended by ``finish-tracking`` even when a step fails.
        """
        start = start_tracking(
            experiment=mlflow_experiment,
            pipeline=PIPELINE_NAME,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
        use_credentials(cpu_task(start, s), s, s3=False)
        context = {"tracking": start.output, "kfp_task_name": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}
        model = use_credentials(cpu_task(import_lora_moe(lora_moe_uri=lora_moe_uri), s), s)
        samples = infer_export(
            lora_moe=model.outputs["lora_moe"],
            task=task,
            base_model_uri=base_model_uri,
            dit_uri=dit_uri,
            dit_high_noise_uri=dit_high_noise_uri,
            vae_uri=vae_uri,
            t5_uri=t5_uri,
            prompts=prompts,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            alpha_base=alpha_base,
            alpha_expert=alpha_expert,
            seed=seed,
            **context,
        )
        use_credentials(gpu_task(samples, s), s)
        finish = finish_tracking(tracking=start.output, final_stage="infer").after(samples).ignore_upstream_failure()
        use_credentials(cpu_task(finish, s), s, s3=False)
        return InferenceOutputs(videos=samples.outputs["videos"], instrument_loras=samples.outputs["instrument_loras"])

    return lora_moe_inference


lora_moe_inference = build_inference_pipeline()
