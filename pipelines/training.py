"""The training pipeline ``lora-moe-training``: dataset → labels → latent cache → Stage 1 → Stage 2 → evaluation →
sample videos and per-instrument LoRAs → model registry, with one MLflow parent run per pipeline run.

``build_training_pipeline(settings)`` builds it for a cluster (images, GPU pool, secrets: see
``components.k8s.ClusterSettings``); ``lora_moe_training`` is the build for the default settings.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Metrics, Model

from components import (
    cache_latents,
    evaluate,
    finish_tracking,
    import_stage1,
    infer_export,
    label_captions,
    plan_shards,
    prepare_data,
    register_model,
    skip_baseline_arm,
    start_tracking,
    train_baseline_arm,
    train_stage1,
    train_stage2,
    train_stage2_trainjob,
)
from components.k8s import ClusterSettings, cpu_task, gpu_task, launcher_task, trainjob_placement, use_credentials
from lora_moe_core.defaults import (
    ALPHA_BASE,
    ALPHA_EXPERT,
    DEFAULT_TASK,
    EVAL_CLIPS,
    EVAL_TIMESTEPS,
    EXPERIMENT,
    REGISTERED_MODEL,
    REGISTRY_ALIAS,
)
from pipelines.defaults import BASE_MODEL_URI, PROMPTS, SEED_STAGE1, SEED_STAGE2, STAGE1_CONFIG, STAGE2_CONFIG

EVAL_TIMESTEP_LIST = list(EVAL_TIMESTEPS)  # a KFP list parameter's default

PIPELINE_NAME = "lora-moe-training"
SYNTHETIC_SIZE = [128, 96, 33]  # width, height, frames of synthetic clips


class TrainingOutputs(NamedTuple):
    lora_moe: Model
    stage2_metrics: Metrics
    eval_metrics: Metrics
    report: HTML
    videos: Artifact
    instrument_loras: Model


def build_training_pipeline(settings: ClusterSettings | None = None):
    """The ``@dsl.pipeline`` for ``settings`` (validated; default: ``ClusterSettings.from_env()``)."""
    s = (settings or ClusterSettings.from_env()).validate()

    def cpu(task, s3=True, mlflow=True):
        return use_credentials(cpu_task(task, s), s, s3=s3, mlflow=mlflow)

    def gpu(task, gpus=1, timeout_s=None):
        return use_credentials(gpu_task(task, s, gpus=gpus, timeout_s=timeout_s), s)

    def stage2_steps(inputs: dict, gpus_per_step, num_nodes, ttl_s, cache):
        """Stage 2 in one pod (``stage2_num_nodes`` == 1, today's step), else a TrainJob launcher; the checkpoint
        and metrics of whichever ran (dsl.OneOf)."""
        with dsl.If(num_nodes == 1, name="train-stage-2-one-node"):
            one_pod = gpu(train_stage2(gpus=gpus_per_step, **inputs).after(cache), gpus=gpus_per_step,
                          timeout_s=s.train_timeout_s)  # fmt: skip
        with dsl.Else(name="train-stage-2-trainjob"):
            launcher = train_stage2_trainjob(num_nodes=num_nodes, gpus_per_node=gpus_per_step,
                                             placement=trainjob_placement(s), ttl_s=ttl_s, **inputs)  # fmt: skip
            launched = use_credentials(launcher_task(launcher.after(cache), s), s)
        return (dsl.OneOf(one_pod.outputs["lora_moe"], launched.outputs["lora_moe"]),
                dsl.OneOf(one_pod.outputs["metrics"], launched.outputs["metrics"]))  # fmt: skip

    @dsl.pipeline(name=PIPELINE_NAME, description="LoRA mixture of experts for WAN2.2 surgical video, two stages")
    def lora_moe_training(
        dataset_uri: str = "s3://lora-moe-data/datasets/surgical/train",
        eval_dataset_uri: str = "s3://lora-moe-data/datasets/surgical/heldout",
        synthetic_clips: int = 0,
        synthetic_eval_clips: int = 0,
        synthetic_size: list = SYNTHETIC_SIZE,
        target_frames: int = 0,
        cache_uri: str = "",
        cache_shards: int = 4,
        work_uri: str = "s3://lora-moe-data/runs",
        task: str = DEFAULT_TASK,
        base_model_uri: str = BASE_MODEL_URI,
        dit_uri: str = "",
        dit_high_noise_uri: str = "",
        vae_uri: str = "",
        t5_uri: str = "",
        stage1_lora_uri: str = "",
        stage1_config: str = STAGE1_CONFIG,
        stage1_epochs: int = SEED_STAGE1["num_train_epochs"],
        stage1_learning_rate: float = SEED_STAGE1["learning_rate"],
        stage2_config: str = STAGE2_CONFIG,
        stage2_epochs: int = SEED_STAGE2["num_train_epochs"],
        stage2_learning_rate: float = SEED_STAGE2["learning_rate"],
        seed: int = SEED_STAGE2["seed"],
        gpus_per_step: int = 1,
        baseline_arm: bool = True,
        stage2_num_nodes: int = 1,
        stage2_trainjob_ttl_s: int = 86400,
        samples_per_family: int = 1,
        eval_clips: int = EVAL_CLIPS,
        eval_timesteps: list = EVAL_TIMESTEP_LIST,
        sample_steps: int = 30,
        sample_width: int = 832,
        sample_height: int = 480,
        sample_frames: int = 33,
        prompts: list = PROMPTS,
        alpha_base: float = ALPHA_BASE,
        alpha_expert: float = ALPHA_EXPERT,
        mlflow_experiment: str = EXPERIMENT,
        model_name: str = REGISTERED_MODEL,
        model_alias: str = REGISTRY_ALIAS,
    ) -> TrainingOutputs:
        """Train the two-stage LoRA-MoE.

        1. ``prepare-data``: check both datasets (or write synthetic ones: ``synthetic_clips`` > 0), lay out the run.
        2. ``label-captions``: caption keywords → the four instrument families, training and held-out sets.
        3. ``cache-latents``: VAE + UMT5 encoding, fanned out over ``cache_shards`` GPUs (``dsl.ParallelFor``).
        4. Stage 1: ``train-stage1``, or ``import-stage1`` when ``stage1_lora_uri`` is given (``dsl.If``).
        5. ``train-stage2``: experts + router on the frozen Stage-1 LoRA; beside it (``baseline_arm``, ``dsl.If``)
           ``train-baseline-arm``: one LoRA matched to it (same Stage 1, clips, steps and trainable parameters).
        6. ``evaluate``: held-out losses, routing, LoRA-MoE vs the matched LoRA, sample clips → metrics and a report.
        7. ``infer-export``: one video per prompt and one standard LoRA per instrument.
        8. ``register-model``: a new version in the MLflow registry, aliased ``model_alias``.
        The MLflow parent run (``start-tracking``) is ended by ``finish-tracking`` even when a step fails.

        The parameters are in the order a user fills the form; the IR (and so the KFP UI) lists them
        alphabetically, so each description starts with its group: 1 data, 2 model, 3 Stage 1, 4 Stage 2,
        5 evaluation, 6 tracking.

        Args:
            dataset_uri: 1 data · training clips: musubi dataset TOML, JSONL manifest, folder or musubi cache.
            eval_dataset_uri: 1 data · held-out clips for evaluation, same forms as dataset_uri.
            synthetic_clips: 1 data · > 0: write this many procedural clips to dataset_uri first (demo, smoke test).
            synthetic_eval_clips: 1 data · > 0: write this many procedural held-out clips to eval_dataset_uri.
            synthetic_size: 1 data · [width, height, frames] of synthetic clips.
            target_frames: 1 data · frames per cached clip (4k+1); 0 keeps the dataset's own target_frames.
            cache_uri: 1 data · latent cache prefix to reuse or fill; empty: <work_uri>/<run>/cache.
            cache_shards: 1 data · parallel GPU caching steps (each takes every n-th clip).
            work_uri: 1 data · where the run's caches, checkpoints and outputs go (s3:// prefix or folder).
            task: 2 model · t2v-A14B (Wan2.2, two 14B DiTs) or tiny (random, CPU smoke test).
            base_model_uri: 2 model · diffusers-layout Wan2.2 folder; clear it when all four single files are given.
            dit_uri: 2 model · low-noise DiT single file (original Wan/ComfyUI keys) as musubi's --dit; empty: folder's.
            dit_high_noise_uri: 2 model · high-noise DiT single file as musubi's --dit_high_noise; empty: the folder's.
            vae_uri: 2 model · Wan2.1 VAE single file (wan_2.1_vae.safetensors) as musubi's --vae; empty: the folder's.
            t5_uri: 2 model · UMT5 encoder .pth (models_t5_umt5-xxl-enc-bf16.pth) as musubi's --t5; empty: the folder's.
            stage1_lora_uri: 3 Stage 1 · your Stage-1 LoRA (musubi/ComfyUI/diffusers keys): skips Stage-1 training.
            stage1_config: 3 Stage 1 · Stage-1 TOML config (path in the image, e.g. configs/vanilla_lora.toml).
            stage1_epochs: 3 Stage 1 · passes over the training clips.
            stage1_learning_rate: 3 Stage 1 · AdamW learning rate.
            stage2_config: 4 Stage 2 · Stage-2 TOML config (experts, router, losses).
            stage2_epochs: 4 Stage 2 · passes over the training clips.
            stage2_learning_rate: 4 Stage 2 · AdamW learning rate of experts and router.
            seed: 4 Stage 2 · random seed of both stages, evaluation noise and sample videos.
            gpus_per_step: 4 Stage 2 · GPUs of each training step (torchrun); caching, evaluation, inference use 1.
            baseline_arm: 4 Stage 2 · also train one LoRA matched to Stage 2 (parameters, steps, Stage 1, clips) and
                open the report with LoRA-MoE vs it per family: is the mixture worth it on this data?
            stage2_num_nodes: 4 Stage 2 · > 1: Stage 2 as a Kubeflow Trainer TrainJob of this many gpus_per_step nodes.
            stage2_trainjob_ttl_s: 4 Stage 2 · keep the finished TrainJob this long (0: delete at once, < 0: keep).
            samples_per_family: 5 evaluation · generated clips per instrument family in the report (0: none).
            eval_clips: 5 evaluation · held-out clips scored, taken from each family in turn (0: all; at A14B
                size about 5 DiT forwards per clip and timestep).
            eval_timesteps: 5 evaluation · timesteps in (0, 1] each held-out clip is scored at.
            sample_steps: 5 evaluation · denoising steps of report clips and sample videos.
            sample_width: 5 evaluation · width of report clips and sample videos (multiple of 16).
            sample_height: 5 evaluation · height of report clips and sample videos (multiple of 16).
            sample_frames: 5 evaluation · frames of report clips and sample videos (4k+1).
            prompts: 5 evaluation · sample video prompts: strings or {"prompt", "instrument_hint"} objects.
            alpha_base: 5 evaluation · multiplier of the Stage-1 LoRA in sample videos and exported LoRAs.
            alpha_expert: 5 evaluation · multiplier of the expert LoRAs in sample videos and exported LoRAs.
            mlflow_experiment: 6 tracking · MLflow experiment of the parent run and its step runs.
            model_name: 6 tracking · MLflow registered model that gets the new version.
            model_alias: 6 tracking · alias set on the new model version (e.g. candidate).
        """
        start = cpu(
            start_tracking(
                experiment=mlflow_experiment,
                pipeline=PIPELINE_NAME,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            ),
            s3=False,
        )
        context = {"tracking": start.output, "kfp_task_name": dsl.PIPELINE_TASK_NAME_PLACEHOLDER}
        model_files = {
            "base_model_uri": base_model_uri,
            "dit_uri": dit_uri,
            "dit_high_noise_uri": dit_high_noise_uri,
            "vae_uri": vae_uri,
            "t5_uri": t5_uri,
        }  # every step that loads the base model takes all five
        data = cpu(
            prepare_data(
                dataset_uri=dataset_uri,
                eval_dataset_uri=eval_dataset_uri,
                work_uri=work_uri,
                cache_uri=cache_uri,
                synthetic_clips=synthetic_clips,
                synthetic_eval_clips=synthetic_eval_clips,
                synthetic_size=synthetic_size,
                seed=seed,
                **context,
            )
        )
        labels = cpu(label_captions(dataset_uri=dataset_uri, **context).after(data))
        held_out = {"dataset_uri": eval_dataset_uri, "dataset_role": "evaluation"}  # MLflow dataset input context
        eval_labels = cpu(label_captions(**held_out, **context).after(data))
        labels.set_display_name("label-captions-train")
        eval_labels.set_display_name("label-captions-heldout")

        shards = cpu(
            plan_shards(
                clips=data.outputs["clips"],
                cache_shards=cache_shards,
                train_cache_uri=data.outputs["train_cache_uri"],
                tracking=start.output,
            ),
            s3=False,
            mlflow=False,
        )
        with dsl.ParallelFor(shards.output, name="cache-shards") as shard:
            cache = gpu(
                cache_latents(
                    dataset_uri=dataset_uri,
                    labels=labels.outputs["labels"],
                    output_uri=shard.output_uri,
                    shard=shard.shard,
                    task=task,
                    **model_files,
                    target_frames=target_frames,
                    tracking=shard.tracking,
                    kfp_task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
                )
            )
        eval_cache = gpu(
            cache_latents(
                dataset_uri=eval_dataset_uri,
                labels=eval_labels.outputs["labels"],
                output_uri=data.outputs["eval_cache_uri"],
                shard="0/1",
                dataset_role="evaluation",
                task=task,
                **model_files,
                target_frames=target_frames,
                **context,
            )
        )
        eval_cache.set_display_name("cache-latents-heldout")

        with dsl.If(stage1_lora_uri == "", name="train-stage-1"):
            stage1 = gpu(
                train_stage1(
                    cache_uri=data.outputs["train_cache_uri"],
                    config=stage1_config,
                    task=task,
                    **model_files,
                    num_train_epochs=stage1_epochs,
                    learning_rate=stage1_learning_rate,
                    seed=seed,
                    gpus=gpus_per_step,
                    run_uri=data.outputs["run_uri"],
                    **context,
                ).after(cache),
                gpus=gpus_per_step,
                timeout_s=s.train_timeout_s,
            )
        with dsl.Else(name="import-stage-1"):
            imported = cpu(import_stage1(stage1_lora_uri=stage1_lora_uri, **context))
        stage1_lora_uri_out = dsl.OneOf(stage1.outputs["Output"], imported.outputs["Output"])

        stage2_inputs = dict(
            cache_uri=data.outputs["train_cache_uri"],
            stage1_lora_uri=stage1_lora_uri_out,
            config=stage2_config,
            task=task,
            **model_files,
            num_train_epochs=stage2_epochs,
            learning_rate=stage2_learning_rate,
            seed=seed,
            run_uri=data.outputs["run_uri"],
            **context,
        )
        if s.trainjob_stage2:
            stage2_lora_moe, stage2_metrics = stage2_steps(stage2_inputs, gpus_per_step, stage2_num_nodes,
                                                           stage2_trainjob_ttl_s, cache)  # fmt: skip
        else:  # kfp.local: today's one-pod step alone (pipelines/local_run.py refuses more nodes)
            stage2 = gpu(train_stage2(gpus=gpus_per_step, **stage2_inputs).after(cache), gpus=gpus_per_step,
                         timeout_s=s.train_timeout_s)  # fmt: skip
            stage2_lora_moe, stage2_metrics = stage2.outputs["lora_moe"], stage2.outputs["metrics"]
        with dsl.If(baseline_arm == True, name="baseline-arm"):  # noqa: E712 - a pipeline channel, not a bool
            arm = gpu(train_baseline_arm(gpus=gpus_per_step, **stage2_inputs).after(cache), gpus=gpus_per_step,
                      timeout_s=s.train_timeout_s)  # fmt: skip
        with dsl.Else(name="no-baseline-arm"):
            no_arm = cpu(skip_baseline_arm(), s3=False, mlflow=False)
        matched_lora_uri = dsl.OneOf(arm.outputs["Output"], no_arm.output)

        evaluation = gpu(
            evaluate(
                eval_cache_uri=data.outputs["eval_cache_uri"],
                lora_moe=stage2_lora_moe,
                stage1_lora_uri=stage1_lora_uri_out,
                task=task,
                **model_files,
                samples_per_family=samples_per_family,
                eval_clips=eval_clips,
                eval_timesteps=eval_timesteps,
                sample_steps=sample_steps,
                sample_width=sample_width,
                sample_height=sample_height,
                sample_frames=sample_frames,
                seed=seed,
                matched_lora_uri=matched_lora_uri,
                **context,
            ).after(eval_cache)
        )
        samples = gpu(
            infer_export(
                lora_moe=stage2_lora_moe,
                task=task,
                **model_files,
                prompts=prompts,
                num_frames=sample_frames,
                height=sample_height,
                width=sample_width,
                num_inference_steps=sample_steps,
                alpha_base=alpha_base,
                alpha_expert=alpha_expert,
                seed=seed,
                **context,
            )
        )
        register = cpu(
            register_model(
                lora_moe=stage2_lora_moe,
                instrument_loras=samples.outputs["instrument_loras"],
                model_name=model_name,
                alias=model_alias,
                **context,
            ).after(evaluation, samples)
        )
        cpu(
            finish_tracking(tracking=start.output, final_stage="register").after(register).ignore_upstream_failure(),
            s3=False,
        )
        return TrainingOutputs(
            lora_moe=stage2_lora_moe,
            stage2_metrics=stage2_metrics,
            eval_metrics=evaluation.outputs["metrics"],
            report=evaluation.outputs["report"],
            videos=samples.outputs["videos"],
            instrument_loras=samples.outputs["instrument_loras"],
        )

    return lora_moe_training


lora_moe_training = build_training_pipeline()
