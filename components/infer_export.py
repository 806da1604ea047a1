"""Sample videos for a list of prompts and the per-instrument standard LoRAs (ComfyUI keys) of a LoRA-MoE."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def infer_export(
    lora_moe: Input[Model],
    task: str,
    base_model_uri: str,
    prompts: list,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int,
    alpha_base: float,
    alpha_expert: float,
    seed: int,
    videos: Output[Artifact],
    instrument_loras: Output[Model],
    tracking: dict,
    kfp_task_name: str,
):
    """Generate one mp4 (and its gates JSON) per prompt into the ``videos`` folder (``lora-moe infer``) and export
    one LoRA per family under that family's fixed route into ``instrument_loras`` (``lora-moe export --to comfy``).

    ``prompts`` is a list of plain strings or of ``lora-moe infer --prompts_file`` JSONL objects:
    ``{"prompt": ..., "instrument_hint": ...}`` (hint optional: routing then follows the prompt's own words; also
    ``seed``, ``negative_prompt``). Prompt i gets seed ``seed + i`` unless it names one.
    """
    import json
    import os
    import re
    import tempfile
    from pathlib import Path

    from lora_moe_core.cli.main import main
    from lora_moe_core.families import FAMILIES
    from lora_moe_core.tracking.tracker import start_tracker

    os.environ.update({**tracking, "KFP_TASK_NAME": kfp_task_name})
    clips, loras = Path(videos.path), Path(instrument_loras.path)
    clips.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    common = ["--alpha_base", str(alpha_base), "--alpha_expert", str(alpha_expert)]
    scratch = tempfile.mkdtemp(prefix="infer-")
    with start_tracker(
        "infer-export",
        tracking.get("MLFLOW_EXPERIMENT_NAME", "lora-moe"),
        tags={"stage": "infer"},
        parent_run_id=tracking.get("MLFLOW_PARENT_RUN_ID"),
        output_dir=scratch,
    ) as run:
        run.log_params(
            {
                "prompts": prompts,
                "num_frames": num_frames,
                "height": height,
                "width": width,
                "num_inference_steps": num_inference_steps,
                "alpha_base": alpha_base,
                "alpha_expert": alpha_expert,
            }
        )
        # one `lora-moe infer` for all prompts: the model is loaded once
        entries = [dict(item) if isinstance(item, dict) else {"prompt": str(item)} for item in prompts]
        for index, entry in enumerate(entries):
            entry["seed"] = int(entry.get("seed", seed + index))  # KFP hands JSON numbers over as floats
            hint = entry.get("instrument_hint") or "prompt"
            entry.setdefault("output_path", f"{index:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', hint).strip('_')}.mp4")
        prompts_file = Path(scratch) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
        argv = [
            "infer",
            "--task",
            task,
            "--lora_moe_weights",
            lora_moe.path,
            "--prompts_file",
            str(prompts_file),
            "--output_dir",
            str(clips),
            "--num_frames",
            str(num_frames),
            "--height",
            str(height),
            "--width",
            str(width),
            "--num_inference_steps",
            str(num_inference_steps),
            *common,
        ]
        argv += ["--model", base_model_uri] if base_model_uri else []
        code = main(argv)
        if code != 0:
            raise SystemExit(f"lora-moe infer failed with exit code {code} (see the error above)")
        for family in FAMILIES:
            code = main(
                [
                    "export",
                    "--lora_moe_weights",
                    lora_moe.path,
                    "--instrument_hint",
                    family,
                    "--to",
                    "comfy",
                    "--output_dir",
                    str(loras),
                    *common,
                ]
            )
            if code != 0:
                raise SystemExit(f"lora-moe export failed with exit code {code} for {family} (see above)")
        videos.metadata.update({"videos": entries})
        instrument_loras.metadata.update({"format": "comfy", "files": sorted(p.name for p in loras.iterdir())})
        run.log_artifact(clips, "videos")
        run.log_artifact(loras, "instrument_loras")
