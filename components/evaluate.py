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
):
    """Evaluate on the held-out latent cache. ``metrics`` gets every number of ``metrics.json``; ``report`` is the
    HTML report with its plots and sample clips inlined (the KFP UI shows one self-contained file); the whole
    evaluation folder goes to the step's MLflow run. The sample clips are ``sample_width`` × ``sample_height``,
    ``sample_frames`` frames, ``sample_steps`` denoising steps."""
    import base64
    import json
    import mimetypes
    import os
    import re
    import tempfile
    from pathlib import Path

    from lora_moe_core.cli import main
    from lora_moe_core.storage import Storage, is_s3
    from lora_moe_core.tracking import start_tracker

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-"))
    out = scratch / "evaluation"
    stage1 = stage1_lora_uri
    if is_s3(stage1_lora_uri):
        stage1 = str(Storage().download(stage1_lora_uri, scratch / "stage1.safetensors"))
    argv = ["evaluate", "--task", task, "--lora_moe_weights", lora_moe.path, "--base_lora_weights", stage1,
            "--cache", eval_cache_uri, "--output_dir", str(out), "--samples_per_family", str(samples_per_family),
            "--sample_steps", str(sample_steps), "--sample_size", str(sample_width), str(sample_height), str(sample_frames),
            "--seed", str(seed)]  # fmt: skip
    argv += ["--model", base_model_uri] if base_model_uri else []
    with start_tracker("evaluate", tracking.get("MLFLOW_EXPERIMENT_NAME", "lora-moe"), tags={"stage": "evaluate"},
                       parent_run_id=tracking.get("MLFLOW_PARENT_RUN_ID"), output_dir=scratch) as run:  # fmt: skip
        run.log_params({"eval_cache_uri": eval_cache_uri, "stage1_lora_uri": stage1_lora_uri,
                        "samples_per_family": samples_per_family, "sample_steps": sample_steps})  # fmt: skip
        code = main(argv)
        if code != 0:
            raise SystemExit(f"lora-moe evaluate failed with exit code {code} (see the error above)")
        values = json.loads((out / "metrics.json").read_text())
        for key, value in sorted(values.items()):
            metrics.log_metric(key, float(value))
        run.log_metrics(values, step=0)
        run.log_artifact(out, "evaluation")

    def inline(match: re.Match) -> str:  # relative src="plot.png" -> data: URI
        target = out / match.group(2)
        if not target.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return f'{match.group(1)}="data:{mime};base64,{base64.b64encode(target.read_bytes()).decode()}"'

    page = (out / "report.html").read_text(encoding="utf-8")
    Path(report.path).write_text(re.sub(r'(src|href)="(?![a-z]+:)([^"#?]+)"', inline, page), encoding="utf-8")
