"""Sample videos for a list of prompts and the per-instrument standard LoRAs (ComfyUI keys) of a LoRA-MoE."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def infer_export(
    lora_moe: Input[Model],
    task: str,
    base_model_uri: str,
    dit_uri: str,
    dit_high_noise_uri: str,
    vae_uri: str,
    t5_uri: str,
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
    import re
    import tempfile
    from pathlib import Path

    from lora_moe_core.adapters.export import export_family_loras
    from lora_moe_core.inference.generate import run_infer
    from lora_moe_core.inference.request import InferenceRequest
    from lora_moe_core.model.sources import ModelSource
    from lora_moe_core.tracking.context import TrackingContext

    context = TrackingContext.from_step(tracking, kfp_task_name)
    source = ModelSource.from_uris(base_model_uri, dit_uri, dit_high_noise_uri, vae_uri, t5_uri)  # "" = not given
    clips, loras = Path(videos.path), Path(instrument_loras.path)
    clips.mkdir(parents=True, exist_ok=True)
    entries = [dict(item) if isinstance(item, dict) else {"prompt": str(item)} for item in prompts]
    for index, entry in enumerate(entries):
        entry["seed"] = int(entry.get("seed", seed + index))  # KFP hands JSON numbers over as floats
        hint = entry.get("instrument_hint") or "prompt"
        entry.setdefault("output_path", f"{index:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', hint).strip('_')}.mp4")
    request = InferenceRequest(prompts=entries, lora_moe_weights=lora_moe.path, task=task,
                               **source.overrides(), output_dir=str(clips), num_frames=num_frames,
                               height=height, width=width, num_inference_steps=num_inference_steps,
                               alpha_base=alpha_base, alpha_expert=alpha_expert)  # fmt: skip
    with context.start_run("infer-export", "infer", tempfile.mkdtemp(prefix="infer-")) as run:
        run.log_params({"prompts": prompts, "num_frames": num_frames, "height": height, "width": width,
                        "num_inference_steps": num_inference_steps, "alpha_base": alpha_base,
                        "alpha_expert": alpha_expert})  # fmt: skip
        run_infer(request)  # one session for all prompts: the model is loaded once
        exported = export_family_loras(lora_moe.path, loras, "comfy", alpha_base, alpha_expert)
        videos.metadata.update({"videos": entries})
        instrument_loras.metadata.update({"format": "comfy", "files": sorted(path.name for path in exported)})
        run.log_artifact(clips, "videos")
        run.log_artifact(loras, "instrument_loras")
