"""What one ``lora-moe infer`` asks for, as a typed value the CLI and the pipeline's infer step both build."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT
from lora_moe_core.errors import UserError
from lora_moe_core.guards.numbers import check_int, check_number
from lora_moe_core.guards.text import check_text
from lora_moe_core.model.devices import DEVICE_PATTERN

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed overflows past 64 bits
MAX_SIDE, MAX_FRAMES = 4096, 1025  # beyond what Wan2.2 generates (1280x720, 81-121 frames), far beyond memory


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

    def __post_init__(self) -> None:
        """Every number finite and in range, the device one we can run on, the negative prompt clean text: the same
        limits for the CLI flags, the pipeline's infer step and library callers."""
        check_number("alpha_base", self.alpha_base, at_least=0)
        check_number("alpha_expert", self.alpha_expert, at_least=0)
        check_number("guidance_scale", self.guidance_scale, at_least=0)
        check_number("guidance_scale_2", self.guidance_scale_2, at_least=0)
        check_number("flow_shift", self.flow_shift, above=0)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("num_inference_steps", self.num_inference_steps, 1, 1000)
        check_int("height", self.height, 16, MAX_SIDE)
        check_int("width", self.width, 16, MAX_SIDE)
        check_int("num_frames", self.num_frames, 1, MAX_FRAMES)
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "--negative_prompt", "negative prompt")

    @classmethod
    def from_namespace(cls, values: Any) -> InferenceRequest:
        """From parsed ``lora-moe infer`` flags (attributes of the same names)."""
        return cls(**{field.name: getattr(values, field.name) for field in fields(cls) if hasattr(values, field.name)})
