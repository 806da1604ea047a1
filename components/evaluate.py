"""Held-out evaluation: losses of base / Stage 1 / Stage 2 per family, routing, sample clips (``lora-moe evaluate``)."""

from kfp import dsl
from kfp.dsl import HTML, Input, Metrics, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(
    eval_cache_uri: str,
    lora_moe: Input[Model],
    stage1_lora_uri: str,
    task: str,
    base_model_uri: str,
    dit_uri: str,
    dit_high_noise_uri: str,
    vae_uri: str,
    t5_uri: str,
    samples_per_family: int,
    sample_steps: int,
    sample_width: int,
    sample_height: int,
    sample_frames: int,
    seed: int,
    metrics: Output[Metrics],
    report: Output[HTML],
    tracking: dict,
    kfp_task_name: str,
    eval_clips: int,
    eval_timesteps: list,
    matched_lora_uri: str = "",
):
    """Evaluate on the held-out latent cache.

    ``metrics`` gets every number of ``metrics.json``; ``report`` is the HTML report with its plots and sample
    clips inlined (the KFP UI shows one self-contained file). The budget: ``eval_clips`` held-out clips (0: all),
    each scored at ``eval_timesteps``. The evaluation logs metrics, plots, report and clips to its own MLflow run,
    a child of the pipeline's. Sample clips: ``samples_per_family`` per family,
    ``sample_width`` × ``sample_height`` × ``sample_frames``, ``sample_steps`` denoising steps.
    ``matched_lora_uri``: the matched single-LoRA arm ("" when ``baseline_arm`` is off); with it the report opens
    with LoRA-MoE vs matched LoRA per family, and each arm gets an MLflow run with the same metric names.
    """
    import json
    import tempfile
    from pathlib import Path

    from lora_moe_core.evaluation.curves import state_beside
    from lora_moe_core.evaluation.report import inline_assets
    from lora_moe_core.evaluation.run import EvaluationSettings, run_evaluation
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.storage.store import Storage, is_s3
    from lora_moe_core.tracking.context import TrackingContext

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-"))
    out = scratch / "heldout"
    stage1 = stage1_lora_uri
    if is_s3(stage1_lora_uri):
        stage1 = str(Storage().download(stage1_lora_uri, scratch / "stage1.safetensors"))
    # the training curves: each trainer's state file lies beside the weights it wrote to the store, not beside
    # the downloaded copy or the KFP artifact file read here
    states = {"stage1_state": state_beside(stage1_lora_uri), "stage2_state": state_beside(lora_moe.metadata.get("uri"))}
    matched = matched_lora_uri or None
    if is_s3(matched_lora_uri):
        matched = str(Storage().download(matched_lora_uri, scratch / "matched_lora.safetensors"))
    settings = EvaluationSettings(task=task, lora_moe_weights=lora_moe.path, base_lora_weights=stage1,
                                  cache=eval_cache_uri, output_dir=str(out), model=source,
                                  samples_per_family=samples_per_family, sample_steps=sample_steps,
                                  sample_size=(sample_width, sample_height, sample_frames), seed=seed,
                                  eval_clips=eval_clips, eval_timesteps=tuple(float(t) for t in eval_timesteps),
                                  matched_lora_weights=matched, matched_lora_state=state_beside(matched_lora_uri),
                                  **states)  # fmt: skip
    run_evaluation(settings, context)  # logs its own MLflow run, a child of the pipeline's
    for key, value in sorted(json.loads((out / "metrics.json").read_text()).items()):
        metrics.log_metric(key, float(value))
    Path(report.path).write_text(inline_assets(out / "report.html"), encoding="utf-8")
