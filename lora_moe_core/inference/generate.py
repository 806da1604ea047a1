"""Text-to-video generation with a trained LoRA-MoE on WAN2.2-A14B (``lora-moe infer``).

Routing of one video, first match wins: ``--instrument_hint`` → instrument keywords in the prompt → the
instrument classifier on a reference video's VAE latents (``--reference_video``; the generated video itself
cannot be used, it does not exist before routing) → uniform gates. The network then turns the instrument
logits into gates (its learned router when the checkpoint was trained so), and a forward pre-hook folds in the
timestep gates at every denoising step: Wan2.2 runs ``transformer`` (high noise) while t ≥ 875 and
``transformer_2`` below, so with the default two timestep buckets each DiT only ever sees one bucket, which
is what makes ``--merge`` (adapters folded into the DiT weights for one fixed route) exact.

Each video is written with ``<stem>.gates.json`` beside it: the route, the gates and every generation setting.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_moe_core.defaults import torch_dtype
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.inference.prompts import negative_or_default, plan_jobs
from lora_moe_core.inference.request import InferenceRequest
from lora_moe_core.model.devices import resolve_device
from lora_moe_core.model.sources import ModelSource

FPS = 16  # WAN2.2 A14B generates 16 fps clips


# -- routing ------------------------------------------------------------------------------------------------------
@dataclass
class Route:
    """The routing of one video: the families it names, where they came from, the router input and output."""

    families: list[str]
    source: str  # hint, prompt, classifier or uniform
    logits: torch.Tensor | None  # [4] instrument logits given to the router; None routes uniformly
    gates: torch.Tensor | None = None  # [4] router gates the network computed (None without a LoRA-MoE)

    def gate_dict(self) -> dict[str, float] | None:
        return None if self.gates is None else _per_family(self.gates)


def _per_family(values: torch.Tensor) -> dict[str, float]:
    return {family: round(float(value), 6) for family, value in zip(FAMILIES, values.tolist(), strict=True)}


def resolve_route(prompt: str, instrument_hint: str | None = None, classify: Callable[[], torch.Tensor] | None = None,
                  confidence: float = 5.0, vocabulary: Any = None) -> Route:  # fmt: skip
    """Families, source and router input of one prompt (the gates are the network's business).

    ``instrument_hint`` ("Hook/Electrocautery", "Hook+Suction", "none") beats the prompt's keywords;
    ``classify`` lazily gives the classifier's ``[4]`` logits and runs only when neither names anything;
    ``confidence`` is the logit of a named family (the config's ``hint_confidence``).
    """
    from lora_moe_core.data.vocabulary import Vocabulary, instrument_logits, parse_instrument_hint

    if instrument_hint is not None:
        # "none" gives zero logits, not uniform gates: what training fed the router for clips without instruments
        families = parse_instrument_hint(instrument_hint)
        return Route(families, "hint", instrument_logits(families, confidence))
    families = (vocabulary or Vocabulary.from_builtin()).match(prompt).families
    if families:
        return Route(families, "prompt", instrument_logits(families, confidence))
    if classify is not None:
        logits = classify().reshape(-1).float().cpu()  # multi-label: a family is present where its logit is > 0
        return Route([f for f, v in zip(FAMILIES, logits.tolist(), strict=True) if v > 0], "classifier", logits)
    return Route([], "uniform", None)


# -- argument checks ----------------------------------------------------------------------------------------------
def check_generation_args(height: int, width: int, num_frames: int, num_inference_steps: int,
                          guidance_scale: float, guidance_scale_2: float) -> None:  # fmt: skip
    """Fail clearly where WanPipeline would silently round sizes or drop guidance."""
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 16:
            low = max(16, value // 16 * 16)
            raise UserError(f"{name} must be a multiple of 16 (VAE /8, patch /2), got {value}; try {low} or {low + 16}")
    if num_frames < 1 or (num_frames - 1) % 4:
        low = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise UserError(f"num_frames must be 4k+1 (e.g. 17, 33, 81: the VAE compresses time by 4), got {num_frames}; "
                        f"try {low} or {low + 4}")  # fmt: skip
    if num_inference_steps < 1:
        raise UserError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if guidance_scale <= 1 < guidance_scale_2:
        raise UserError(f"guidance_scale_2 {guidance_scale_2} needs guidance_scale > 1: WanPipeline switches "
                        f"classifier-free guidance on or off for both experts from guidance_scale alone")  # fmt: skip


# -- the session --------------------------------------------------------------------------------------------------
class InferenceSession:
    """A WanPipeline (two DiTs, UniPC flow scheduler) with a LoRA-MoE applied to both DiTs.

    Args:
        task, model: ``t2v-A14B`` with a diffusers-layout folder (local or s3://) or a ``ModelSource`` (folder and/or
            musubi's single files), or ``tiny`` (random parts for whatever is not given).
        lora_moe_weights: Stage-2/3 checkpoint; None runs the base model.
        alpha_base, alpha_expert: branch multipliers; None keeps the checkpoint's.
        merge: fold the adapters into the DiT weights for each route (exact with one DiT per timestep bucket).
        classifier_weights: instrument classifier for videos routed by a reference video.
        device, dtype: ``auto`` = cuda when available; dtype (``bf16``... or torch) default bf16 on cuda, else fp32.
        flow_shift: UniPC flow shift (default: the task's official 12).
        dits: ``{"high", "low"}`` DiTs already loaded (evaluation's), free of adapters; default: load ``model``'s.
    """

    def __init__(self, task: str = "t2v-A14B", model: ModelSource | str | None = None,
                 lora_moe_weights: str | None = None, alpha_base: float | None = None,
                 alpha_expert: float | None = None, merge: bool = False, classifier_weights: str | None = None,
                 device: str | None = None, dtype: torch.dtype | str | None = None,
                 flow_shift: float | None = None, dits: dict[str, torch.nn.Module] | None = None):  # fmt: skip
        from diffusers import UniPCMultistepScheduler, WanPipeline

        from lora_moe_core.data.vocabulary import Vocabulary
        from lora_moe_core.model.loading import load_dits, load_encoders
        from lora_moe_core.model.wan import get_task

        self.task = get_task(task)
        self.device = resolve_device(device)
        self.dtype = (torch_dtype(dtype) if isinstance(dtype, str) else dtype) or (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        self.flow_shift = self.task.flow_shift if flow_shift is None else flow_shift
        if merge and lora_moe_weights is None:
            raise UserError("--merge needs --lora_moe_weights (there is nothing to merge into the base model)")
        encoders = load_encoders(task, model, self.dtype)
        if task == "tiny" and self.device.type != "cpu":
            encoders = copy.deepcopy(encoders)  # the tiny encoders are memoised: leave the shared copy on the CPU
        self.dits = dits if dits is not None else load_dits(task, model, self.dtype)
        self.network = self._load_network(lora_moe_weights, alpha_base, alpha_expert)
        self.merge = merge
        self._merged_gates: torch.Tensor | None = None
        self._buckets = self._merge_buckets() if merge else None
        self.classifier = None
        if classifier_weights is not None:
            from lora_moe_core.model.classifier import load_classifier

            self.classifier = load_classifier(classifier_weights).to(self.device)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=self.flow_shift)  # fmt: skip
        self.pipeline = WanPipeline(
            tokenizer=encoders.tokenizer, text_encoder=encoders.text_encoder, vae=encoders.vae, scheduler=scheduler,
            transformer=self.dits["high"], transformer_2=self.dits["low"], boundary_ratio=self.task.boundary_ratio,
        )  # fmt: skip
        self.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=not sys.stderr.isatty())  # no bar spam in job logs
        self.vocabulary = Vocabulary.from_builtin()
        self.last_timesteps: list[float] = []

    def _load_network(self, path: str | None, alpha_base: float | None, alpha_expert: float | None):
        if path is None:
            return None
        from lora_moe_core.adapters.checkpoint import load_network
        from lora_moe_core.model.wan import linear_shapes

        network = load_network(path, linear_shapes(self.dits["high"]))  # raises for another model size
        network.route.alpha_base = network.route.alpha_base if alpha_base is None else alpha_base
        network.alpha_expert = network.alpha_expert if alpha_expert is None else alpha_expert
        network.to(self.device).eval().requires_grad_(False)
        for dit in self._unique_dits():
            network.apply_to(dit)
        return network

    def set_multipliers(self, alpha_base: float, alpha_expert: float) -> None:
        """Branch multipliers for the next clips (``alpha_expert=0`` runs the frozen Stage-1 LoRA alone)."""
        if self.merge:
            raise UserError("multipliers of a merged session are folded into the weights; run without --merge")
        self.network.route.alpha_base, self.network.alpha_expert = alpha_base, alpha_expert

    def _unique_dits(self) -> list[torch.nn.Module]:
        """A model folder without ``transformer_2`` serves both regimes with one DiT: adapt it once."""
        return [self.dits["high"]] if self.dits["low"] is self.dits["high"] else [self.dits["high"], self.dits["low"]]

    def _merge_buckets(self) -> tuple[int, int]:
        """Timestep bucket of (high DiT, low DiT); merging needs each DiT to run in a single bucket."""
        gates = self.network.timestep_gates
        boundary = self.task.boundary_ratio * 1000
        edges = gates.boundaries.tolist()
        if any(edge != boundary for edge in edges):
            raise UserError(f"--merge needs the checkpoint's timestep buckets to split at the expert boundary "
                            f"{boundary:g} (two buckets), but they split at {edges}; run without --merge")  # fmt: skip
        high, low = len(edges), 0
        bucket_gates = gates.bucket_gates()
        if self.dits["low"] is self.dits["high"] and not torch.equal(bucket_gates[high], bucket_gates[low]):
            raise UserError("--merge: this model has one DiT for both noise regimes but the timestep gates differ "
                            "between them; run without --merge")  # fmt: skip
        return high, low

    # -- routing ----------------------------------------------------------------------------------------------
    def route(self, prompt: str, instrument_hint: str | None = None, reference_video: str | None = None,
              height: int = 480, width: int = 832, num_frames: int = 81) -> Route:  # fmt: skip
        """The route of one prompt with the network's gates; ``reference_video`` (encoded at the generation
        size) is classified when hint and prompt name no instrument."""
        if reference_video is not None and self.classifier is None:
            raise UserError("--reference_video needs --classifier_weights (it is only used to classify instruments)")
        classify = None
        if reference_video is not None:
            classify = lambda: self._classify(reference_video, height, width, num_frames)  # noqa: E731
        confidence = self.network.config.router.hint_confidence if self.network is not None else 5.0
        route = resolve_route(prompt, instrument_hint, classify, confidence, self.vocabulary)
        if self.network is not None:
            route.gates = self.network.set_routing(route.logits)[0].detach().float().cpu()
        return route

    @torch.no_grad()
    def _classify(self, path: str, height: int, width: int, num_frames: int) -> torch.Tensor:
        from lora_moe_core.data.buckets import resize_and_crop
        from lora_moe_core.data.video import frames_to_tensor, read_frames
        from lora_moe_core.model.loading import encode_video

        frames = read_frames(path, target_fps=FPS, max_frames=num_frames)
        frames = resize_and_crop(frames[: (len(frames) - 1) // 4 * 4 + 1], (width, height))  # VAE: 4k+1 frames
        latents = encode_video(self.pipeline.vae, frames_to_tensor(frames)[None].to(self.device))
        return self.classifier(latents.float())[0]

    def _set_route(self, route: Route) -> None:
        """Hold the route's gates for the next forwards; with ``merge``, (re)fold the weights when it changed."""
        if self.network is None:
            return
        gates = self.network.set_routing(route.logits)
        route.gates = gates[0].detach().float().cpu()
        if not self.merge or (self._merged_gates is not None and torch.equal(self._merged_gates, route.gates)):
            return
        self.unmerge()
        high, low = self._buckets
        self.network.merge_into(self.dits["high"], gates.detach(), high)
        if self.dits["low"] is not self.dits["high"]:
            self.network.merge_into(self.dits["low"], gates.detach(), low)
        self._merged_gates = route.gates

    def unmerge(self) -> None:
        """Restore the DiT weights after a merged route (bf16 weights keep a rounding residue)."""
        if self._merged_gates is not None:
            for dit in self._unique_dits():
                self.network.unmerge_from(dit)
            self._merged_gates = None

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmerge()

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, route: Route | None = None, seed: int = 0, num_inference_steps: int = 40,
                 guidance_scale: float = 4.0, guidance_scale_2: float = 3.0, height: int = 480, width: int = 832,
                 num_frames: int = 81, negative_prompt: str | None = None,
                 as_float: bool = False) -> np.ndarray:  # fmt: skip
        """One video ``[T, H, W, 3]``: uint8, or float32 in [0, 1] with ``as_float``.

        ``route`` defaults to :meth:`route` of the prompt; ``negative_prompt`` None means Wan's own, "" none.
        The initial noise comes from a CPU generator, so a seed gives the same noise on every device.
        """
        check_generation_args(height, width, num_frames, num_inference_steps, guidance_scale, guidance_scale_2)
        route = route or self.route(prompt, height=height, width=width, num_frames=num_frames)
        self._set_route(route)
        output = self.pipeline(
            prompt=prompt, negative_prompt=negative_or_default(negative_prompt), height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        )  # fmt: skip
        self.last_timesteps = [float(t) for t in self.pipeline.scheduler.timesteps]
        frames = np.asarray(output.frames[0], dtype=np.float32)  # [T, H, W, 3] in [0, 1]
        return frames if as_float else np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)

    def gate_report(self, route: Route) -> dict[str, Any]:
        """Route, gates, timestep gates and α's as JSON-ready values (call after :meth:`generate`)."""
        from lora_moe_core.adapters.export import regime_names

        boundary = self.task.boundary_ratio * 1000
        high_steps = sum(t >= boundary for t in self.last_timesteps)
        report: dict[str, Any] = {
            "route": {"source": route.source, "families": route.families,
                      "instrument_logits": None if route.logits is None else _per_family(route.logits)},
            "gates": route.gate_dict(),
            "steps_per_expert": {"high_noise": high_steps, "low_noise": len(self.last_timesteps) - high_steps},
            "merged": self.merge,
        }  # fmt: skip
        if self.network is None:
            return report
        network = self.network
        bucket_gates = network.timestep_gates.bucket_gates().detach().float().cpu()
        names = regime_names(len(bucket_gates), network.timestep_gates.boundaries.tolist())
        report["routing_mode"] = "uniform" if route.logits is None else network.config.router.routing_mode
        report["timestep_gates"] = {name: _per_family(row) for name, row in zip(names, bucket_gates, strict=True)}
        report["expert_scale"] = {name: _per_family(route.gates * row * network.alpha_expert)
                                  for name, row in zip(names, bucket_gates, strict=True)}  # fmt: skip
        report["alpha_base"], report["alpha_expert"] = network.route.alpha_base, network.alpha_expert
        return report


# -- the command --------------------------------------------------------------------------------------------------
def run_infer(args: InferenceRequest) -> list[Path]:
    """``lora-moe infer``: generate every planned video, write it and its gates JSON, print the gates."""
    from lora_moe_core.adapters.checkpoint import read_checkpoint
    from lora_moe_core.data.mp4 import atomic_write, write_mp4

    check_generation_args(args.height, args.width, args.num_frames, args.num_inference_steps, args.guidance_scale,
                          args.guidance_scale_2)  # fmt: skip
    jobs = plan_jobs(args)
    if args.classifier_weights is None and any(job.reference_video for job in jobs):
        raise UserError("--reference_video needs --classifier_weights (it is only used to classify instruments)")
    if args.classifier_weights and not any(job.reference_video for job in jobs):
        print("warning: --classifier_weights is unused without --reference_video; prompts naming no instrument "
              "route uniformly", file=sys.stderr)  # fmt: skip
    task = args.task or (read_checkpoint(args.lora_moe_weights).config.model.task if args.lora_moe_weights
                         else "t2v-A14B")  # fmt: skip
    settings = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "guidance_scale_2": args.guidance_scale_2, "height": args.height, "width": args.width,
                "num_frames": args.num_frames}  # fmt: skip
    written = []
    with InferenceSession(task, ModelSource.of(args), args.lora_moe_weights, args.alpha_base, args.alpha_expert,
                          args.merge, args.classifier_weights, args.device, args.dtype,
                          args.flow_shift) as session:  # fmt: skip
        for job in jobs:
            start = time.perf_counter()
            route = session.route(job.prompt, job.instrument_hint, job.reference_video, args.height, args.width,
                                  args.num_frames)  # fmt: skip
            frames = session.generate(job.prompt, route, job.seed, negative_prompt=job.negative_prompt, **settings)
            write_mp4(frames, job.output_path, fps=FPS)
            report = {"prompt": job.prompt, "video": job.output_path.name, **session.gate_report(route),
                      "instrument_hint": job.instrument_hint, "reference_video": job.reference_video,
                      "seed": job.seed, **settings, "fps": FPS, "flow_shift": session.flow_shift,
                      "boundary_ratio": session.task.boundary_ratio, "negative_prompt": job.negative_prompt,
                      "task": task, "model": args.model, **ModelSource.of(args).overrides(),
                      "lora_moe_weights": args.lora_moe_weights,
                      "device": str(session.device), "dtype": str(session.dtype).removeprefix("torch."),
                      "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
            text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
            atomic_write(job.output_path.with_suffix(".gates.json"),
                         lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))  # fmt: skip
            print(_gate_line(route) + f" -> {job.output_path}", flush=True)
            written.append(job.output_path)
    return written


def _gate_line(route: Route) -> str:
    families = "+".join(route.families) or "no instrument"
    if route.gates is None:
        return f"route {route.source} ({families}), base model"
    gates = ", ".join(f"{name}={value:.3f}" for name, value in route.gate_dict().items())
    return f"route {route.source} ({families}): gates {gates}"
