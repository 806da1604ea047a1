"""What one ``lora-moe infer`` asks for, as a typed value the CLI and the pipeline's infer step both build."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT


@dataclass
class InferenceRequest:
    """The videos to generate and how (defaults: the seed's A14B settings). Exactly one prompt source is given:
    ``prompt``, ``prompts_file`` (.txt or .jsonl) or ``prompts`` (a list of .jsonl-line objects)."""

    prompt: str | None = None
    prompts_file: str | None = None
    prompts: list[dict[str, Any]] | None = None
    lora_moe_weights: str | None = None  # Stage-2/3 checkpoint; None runs the base model
    instrument_hint: str | None = None
    reference_video: str | None = None
    classifier_weights: str | None = None
    alpha_base: float = ALPHA_BASE
    alpha_expert: float = ALPHA_EXPERT
    output_path: str = "output.mp4"  # the video of ``prompt``
    output_dir: str = "outputs/infer"  # the videos of ``prompts_file`` / ``prompts``
    task: str | None = None  # default: the checkpoint's
    model: str | None = None  # diffusers-layout folder; the four files below win over its parts
    dit: str | None = None  # musubi's single files: low-noise DiT, high-noise DiT, VAE, UMT5 encoder
    dit_high_noise: str | None = None
    vae: str | None = None
    t5: str | None = None
    seed: int = 0
    num_inference_steps: int = 40
    guidance_scale: float = 4.0
    guidance_scale_2: float = 3.0
    flow_shift: float = 12.0
    height: int = 480
    width: int = 832
    num_frames: int = 81
    negative_prompt: str | None = None  # None: Wan's own; "" for none
    merge: bool = False
    device: str = "auto"
    dtype: str | None = None

    @classmethod
    def from_namespace(cls, values: Any) -> InferenceRequest:
        """From parsed ``lora-moe infer`` flags (attributes of the same names)."""
        return cls(**{field.name: getattr(values, field.name) for field in fields(cls) if hasattr(values, field.name)})
