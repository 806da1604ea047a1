"""The inference pipeline ``lora-moe-inference``: a trained LoRA-MoE + prompts → videos (and per-instrument LoRAs).

``build_inference_pipeline(settings)`` builds it for a cluster; ``lora_moe_inference`` is the default build.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Model

from components import finish_tracking, import_lora_moe, infer_export, start_tracking
from components.k8s import ClusterSettings, cpu_task, gpu_task, use_credentials
from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT, DEFAULT_TASK, EXPERIMENT, REGISTERED_MODEL, REGISTRY_ALIAS
from pipelines.defaults import BASE_MODEL_URI, PROMPTS

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
        prompts: list = PROMPTS,
        task: str = DEFAULT_TASK,
        base_model_uri: str = BASE_MODEL_URI,
        dit_uri: str = "",
        dit_high_noise_uri: str = "",
        vae_uri: str = "",
        t5_uri: str = "",
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

        The parameters are in the order a user fills the form; the IR (and so the KFP UI) lists them
        alphabetically, so each description starts with its group: 1 input, 2 model, 3 video, 4 tracking.

        Args:
            lora_moe_uri: 1 input · LoRA-MoE checkpoint: models:/name@alias, models:/name/version, s3:// or a path.
            prompts: 1 input · strings or {"prompt", "instrument_hint", "seed", "negative_prompt"} objects.
            task: 2 model · t2v-A14B (Wan2.2, two 14B DiTs) or tiny (random, CPU smoke test).
            base_model_uri: 2 model · diffusers-layout Wan2.2 folder; clear it when all four single files are given.
            dit_uri: 2 model · low-noise DiT single file (original Wan/ComfyUI keys) as musubi's --dit; empty: folder's.
            dit_high_noise_uri: 2 model · high-noise DiT single file as musubi's --dit_high_noise; empty: the folder's.
            vae_uri: 2 model · Wan2.1 VAE single file (wan_2.1_vae.safetensors) as musubi's --vae; empty: the folder's.
            t5_uri: 2 model · UMT5 encoder .pth (models_t5_umt5-xxl-enc-bf16.pth) as musubi's --t5; empty: the folder's.
            num_frames: 3 video · frames per video (4k+1, 16 fps).
            height: 3 video · height in pixels (multiple of 16).
            width: 3 video · width in pixels (multiple of 16).
            num_inference_steps: 3 video · UniPC denoising steps.
            alpha_base: 3 video · multiplier of the Stage-1 (base) LoRA (seed: 0.7).
            alpha_expert: 3 video · multiplier of the expert LoRAs (seed: 1.0).
            seed: 3 video · noise seed of the first prompt; prompt i uses seed + i unless it names one.
            mlflow_experiment: 4 tracking · MLflow experiment of the parent run and its step run.
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
