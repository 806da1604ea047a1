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
    """Evaluate on the held-out latent cache.

    ``metrics`` gets every number of ``metrics.json``; ``report`` is the HTML report with its plots and sample
    clips inlined (the KFP UI shows one self-contained file). The evaluation logs metrics, plots, report and clips
    to its own MLflow run, a child of the pipeline's. Sample clips: ``samples_per_family`` per family,
    ``sample_width`` × ``sample_height`` × ``sample_frames``, ``sample_steps`` denoising steps.
    """
    import base64
    import json
    import mimetypes
    import os
    import re
    import tempfile
    from pathlib import Path

    from lora_moe_core.cli.main import main
    from lora_moe_core.storage.store import Storage, is_s3

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    scratch = Path(tempfile.mkdtemp(prefix="evaluate-"))
    out = scratch / "heldout"
    stage1 = stage1_lora_uri
    if is_s3(stage1_lora_uri):
        stage1 = str(Storage().download(stage1_lora_uri, scratch / "stage1.safetensors"))
    argv = [
        "evaluate",
        "--task",
        task,
        "--lora_moe_weights",
        lora_moe.path,
        "--base_lora_weights",
        stage1,
        "--cache",
        eval_cache_uri,
        "--output_dir",
        str(out),
        "--samples_per_family",
        str(samples_per_family),
        "--sample_steps",
        str(sample_steps),
        "--sample_size",
        str(sample_width),
        str(sample_height),
        str(sample_frames),
        "--seed",
        str(seed),
    ]
    argv += ["--model", base_model_uri] if base_model_uri else []
    code = main(argv)  # logs its own MLflow run, a child of MLFLOW_PARENT_RUN_ID
    if code != 0:
        raise SystemExit(f"lora-moe evaluate failed with exit code {code} (see the error above)")
    for key, value in sorted(json.loads((out / "metrics.json").read_text()).items()):
        metrics.log_metric(key, float(value))

    def inline(match: re.Match) -> str:  # relative src="plot.png" -> data: URI
        target = out / match.group(2)
        if not target.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return f'{match.group(1)}="data:{mime};base64,{base64.b64encode(target.read_bytes()).decode()}"'

    page = (out / "report.html").read_text(encoding="utf-8")
    Path(report.path).write_text(re.sub(r'(src|href)="(?![a-z]+:)([^"#?]+)"', inline, page), encoding="utf-8")
