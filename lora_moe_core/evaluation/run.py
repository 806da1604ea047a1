"""`lora-moe evaluate`: held-out losses for base / Stage 1 / Stage 2, routing, the misrouting matrix and
specialisation score (:mod:`specialisation`), samples, plots, report, MLflow.

``metrics.json`` is flat (``{"key": number}``); every key is documented in :data:`report.LEGEND`. The routing
confusion matrix is flattened to ``routing.confusion.<caption family>.<top expert>`` counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lora_moe_core.adapters.checkpoint import load_network
from lora_moe_core.adapters.network import LoRAMoENetwork, LoRANetwork
from lora_moe_core.data.latent_cache import CacheEntry, read_cache
from lora_moe_core.defaults import ALPHA_BASE, ALPHA_EXPERT, EVAL_CLIPS
from lora_moe_core.errors import UserError
from lora_moe_core.evaluation import arms, curves, report, specialisation
from lora_moe_core.evaluation import metrics as evaluation
from lora_moe_core.evaluation.batched import DEFAULT_BATCH
from lora_moe_core.evaluation.metrics import EVAL_TIMESTEPS
from lora_moe_core.families import FAMILIES
from lora_moe_core.families import family as family_entry
from lora_moe_core.formats.lora_files import read_lora
from lora_moe_core.guards.files import removed_on_failure
from lora_moe_core.guards.numbers import check_int, check_number
from lora_moe_core.model.devices import compute_dtype, resolve_device
from lora_moe_core.model.sources import ModelSource
from lora_moe_core.model.wan import get_task, linear_shapes
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.tracking.links import MlflowLink, mlflow_link


def select_clips(entries: list[CacheEntry], count: int) -> list[CacheEntry]:
    """At most ``count`` clips (0: all), taken from each family in turn (a clip by its first named family,
    unlabelled ones last), each family's in cache order; all clips, in cache order, when they are fewer."""
    if not count or len(entries) <= count:
        return entries
    groups: dict[str, list[CacheEntry]] = {name: [] for name in [*FAMILIES, ""]}
    for entry in entries:
        groups[(evaluation.entry_families(entry) or [""])[0]].append(entry)
    chosen: list[CacheEntry] = []
    while len(chosen) < count:
        for group in groups.values():
            if group and len(chosen) < count:
                chosen.append(group.pop(0))
    order = {id(entry): index for index, entry in enumerate(entries)}
    return sorted(chosen, key=lambda entry: order[id(entry)])


@dataclass
class EvaluationSettings:
    task: str
    lora_moe_weights: str
    base_lora_weights: str | None
    cache: str
    output_dir: str
    model: ModelSource | str | None = None  # a diffusers folder, or a folder and/or single files
    classifier_weights: str | None = None
    samples_per_family: int = 1
    sample_steps: int = 8
    sample_size: tuple[int, int, int] = (64, 64, 17)  # width, height, frames
    seed: int = 0
    # training_state_final.json of each stage, for the training curves (default: beside the weights file)
    stage1_state: str | None = None
    stage2_state: str | None = None
    # the matched single-LoRA arm (`lora-moe train --baseline_arm`) to compare with, and its training state
    matched_lora_weights: str | None = None
    matched_lora_state: str | None = None
    # the budget (issue 21): at A14B size every clip × timestep costs several DiT forwards of seconds each
    eval_clips: int = EVAL_CLIPS  # held-out clips scored, spread over the families (0: all)
    eval_timesteps: tuple[float, ...] = EVAL_TIMESTEPS
    eval_batch: int = DEFAULT_BATCH  # samples per DiT forward
    device: str | None = None  # auto: cuda when available (the DiTs in bf16), else cpu

    def __post_init__(self) -> None:
        """The same limits for ``lora-moe evaluate`` flags, the pipeline's evaluate step and library callers."""
        check_int("eval_clips", self.eval_clips, 0, 1_000_000)
        check_int("eval_batch", self.eval_batch, 1, 256)
        check_int("samples_per_family", self.samples_per_family, 0, 1000)
        self.eval_timesteps = tuple(float(t) for t in self.eval_timesteps)
        if not self.eval_timesteps:
            raise UserError("eval_timesteps is empty: give at least one t in (0, 1), e.g. 0.9")
        for t in self.eval_timesteps:
            check_number("eval_timesteps", t, above=0, at_most=1)


def _check_labels(entries: list[CacheEntry], cache: str) -> None:
    if not any(e.labelled for e in entries):
        raise UserError(f"held-out cache {cache} has no instrument labels: label the captions before caching "
                        "(`lora-moe label`), evaluation reports per family")  # fmt: skip


def _loss_metrics(settings: EvaluationSettings, entries: list[CacheEntry], network: LoRAMoENetwork,
                  dits: dict, metrics: dict) -> None:  # fmt: skip
    boundary = get_task(settings.task).boundary_ratio
    shapes = linear_shapes(dits["high"])
    unique = list({id(d): d for d in dits.values()}.values())
    budget = {"seed": settings.seed, "timesteps": settings.eval_timesteps, "batch_size": settings.eval_batch}
    results = {"base": evaluation.held_out_losses(entries, dits, boundary, **budget)}
    if settings.base_lora_weights:
        stage1 = LoRANetwork.from_modules(read_lora(settings.base_lora_weights).modules, shapes)
        stage1.to(next(dits["high"].parameters()).device)
        for dit in unique:
            stage1.apply_to(dit)
        results["stage1"] = evaluation.held_out_losses(entries, dits, boundary, **budget)
        for dit in unique:
            LoRANetwork.remove_from(dit)
    for dit in unique:
        network.apply_to(dit)
    confidence = network.config.router.hint_confidence
    results["stage2"] = evaluation.held_out_losses(
        entries,
        dits,
        boundary,
        prepare=lambda batch: network.set_routing(batch.labels * confidence),
        **budget,
    )
    for dit in unique:
        network.remove_from(dit)
    for model, (diffusion, roi) in results.items():
        for group, value in diffusion.items():
            metrics[f"val_loss.{group}.{model}"] = value
        if model != "base":
            for group, value in roi.items():
                metrics[f"roi_loss.{group}.{model}"] = value


def _routing(network: LoRAMoENetwork, entries: list[CacheEntry], classifier, metrics: dict) -> dict:
    routing = evaluation.routing_metrics(network, entries, classifier)
    confusion, gate_means = routing.pop("routing.confusion"), routing.pop("routing.gate_means")
    metrics.update(routing)
    for row, family in enumerate(FAMILIES):
        for column, expert in enumerate(FAMILIES):
            metrics[f"routing.confusion.{family}.{expert}"] = confusion[row][column]
    return {"confusion": confusion, "gate_means": gate_means}


def _samples(settings: EvaluationSettings, entries: list[CacheEntry], classifier, out: Path,
             metrics: dict, dits: dict) -> list[report.SamplePair]:  # fmt: skip
    """Generate clips per family, Stage 1 and Stage 2 from the same noise; presence accuracy, flicker and a Fréchet
    distance on classifier features of the Stage-2 clips.

    "Stage 1" is the checkpoint's frozen base LoRA alone at full strength (``alpha_expert = 0``): the Stage-1 LoRA
    the user trained; Stage 2 runs at the seed's inference multipliers.
    """
    from lora_moe_core.data.mp4 import write_mp4
    from lora_moe_core.data.video import frames_to_tensor
    from lora_moe_core.inference.generate import InferenceSession
    from lora_moe_core.model.loading import encode_video

    # the DiTs already loaded (not a second copy of 53 GB), free of adapters again
    session = InferenceSession(task=settings.task, model=settings.model, lora_moe_weights=settings.lora_moe_weights,
                               device=settings.device, dits=dits)  # fmt: skip
    width, height, frames = settings.sample_size
    pairs, flicker, hits, features = [], [], [], []
    for family in FAMILIES:
        prompt = family_entry(family).sample_prompt
        for index in range(settings.samples_per_family):
            route = session.route(prompt, instrument_hint=family)
            pair = report.SamplePair(family, out / "samples" / f"{family}_{index}_stage1.mp4",
                                     out / "samples" / f"{family}_{index}.mp4")  # fmt: skip
            for path, multipliers in ((pair.stage1, (1.0, 0.0)), (pair.stage2, (ALPHA_BASE, ALPHA_EXPERT))):
                session.set_multipliers(*multipliers)
                clip = session.generate(prompt, route, seed=settings.seed + index, height=height, width=width,
                                        num_inference_steps=settings.sample_steps, num_frames=frames)  # fmt: skip
                write_mp4(clip, path)
                report.write_poster(clip, path)
            pairs.append(pair)  # the metrics below are on the Stage-2 clip, the last one generated
            flicker.append(evaluation.temporal_flicker(clip))
            if classifier is not None:
                vae = session.pipeline.vae
                latents = encode_video(vae, frames_to_tensor(clip)[None].to(vae.device, vae.dtype)).float().cpu()
                with torch.no_grad():
                    hits.append(bool(classifier(latents)[0].argmax() == FAMILIES.index(family)))
                    features.append(classifier.features(latents)[0].numpy())
    metrics["samples.flicker"] = float(np.mean(flicker))
    if classifier is not None:
        metrics["samples.presence_accuracy"] = float(np.mean(hits))
        with torch.no_grad():
            real = np.stack([classifier.features(e.latents[None])[0].numpy() for e in entries])
        metrics["samples.frechet_classifier"] = evaluation.frechet_distance(np.stack(features), real)
    return pairs


def run_evaluation(settings: EvaluationSettings, context: TrackingContext | None = None) -> dict[str, float]:
    """Evaluate and write ``metrics.json``, the plots and ``report.html`` into ``output_dir``.

    ``context``: the MLflow parent run and KFP tags of a pipeline step (default: this process's environment).
    """
    from lora_moe_core.model.loading import load_dits
    from lora_moe_core.tracking.mlflow_client import resolve_tracking_uri

    resolve_tracking_uri(None, settings.output_dir)  # a garbage MLFLOW_TRACKING_URI fails before any work
    device = resolve_device(settings.device)
    available = read_cache(settings.cache)
    _check_labels(available, settings.cache)
    entries = select_clips(available, settings.eval_clips)
    if settings.matched_lora_weights:
        arms.read_matched_lora(settings.matched_lora_weights)  # refused before any output is written
    dits = load_dits(settings.task, settings.model, compute_dtype(device))
    for dit in {id(d): d for d in dits.values()}.values():
        dit.to(device)
    network = load_network(settings.lora_moe_weights, linear_shapes(dits["high"])).to(device)
    classifier = None
    if settings.classifier_weights:
        from lora_moe_core.model.classifier import load_classifier

        classifier = load_classifier(settings.classifier_weights)
    with removed_on_failure(settings.output_dir) as out:  # inputs are checked: only now is a folder created
        metrics = {"evaluation.clips": len(entries), "evaluation.held_out_clips": len(available),
                   "evaluation.timesteps": len(settings.eval_timesteps),
                   "evaluation.samples": 2 * len(FAMILIES) * settings.samples_per_family}  # fmt: skip
        return _evaluate(settings, entries, dits, network, classifier, out, context, metrics)


def _evaluate(settings: EvaluationSettings, entries: list[CacheEntry], dits, network, classifier, out: Path,
              context: TrackingContext | None, metrics: dict[str, float]) -> dict[str, float]:  # fmt: skip
    """The metrics, plots, samples and report of :func:`run_evaluation`, written into ``out``."""
    _loss_metrics(settings, entries, network, dits, metrics)
    boundary = get_task(settings.task).boundary_ratio
    found, misrouting = specialisation.specialisation_metrics(network, entries, dits, boundary, settings.seed,
                                                              settings.eval_timesteps, settings.eval_batch)  # fmt: skip
    metrics.update(found)
    if settings.matched_lora_weights:
        metrics.update(_arm_comparison(settings, entries, dits, network))
    network.to("cpu")  # routing metrics compare its gates with the cached labels, on the CPU
    routing = _routing(network, entries, classifier, metrics)
    pairs = _samples(settings, entries, classifier, out, metrics, dits) if settings.samples_per_family else []
    gates = network.timestep_gates
    plots = [report.plot_losses(metrics, out / "loss_by_family.png"),
             report.plot_confusion(routing["confusion"], out / "routing_confusion.png"),
             report.plot_gates(routing["gate_means"], out / "gates_per_family.png"),
             report.plot_gate_vs_timestep(gates.bucket_gates().tolist(), gates.boundaries.tolist(),
                                          out / "gate_vs_timestep.png"),
             report.plot_misrouting(misrouting, out / "misrouting_matrix.png")]  # fmt: skip
    states = {"stage1": settings.stage1_state or curves.state_beside(settings.base_lora_weights),
              "stage2": settings.stage2_state or curves.state_beside(settings.lora_moe_weights)}  # fmt: skip
    histories = curves.read_histories(states)
    if histories:
        plots.insert(0, curves.plot_training_curves(histories, out / "training_curves.png"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    from lora_moe_core.tracking.tracker import start_tracker

    # the run exists before the report is written, so that the report links to it
    tracker = start_tracker(run_name=f"evaluate-{out.name}", output_dir=out, tags={"stage": "evaluate"},
                            context=context)  # fmt: skip
    report.write_report(metrics, plots, pairs, out / "report.html", _mlflow_links(tracker, context))
    _track(tracker, settings, metrics, out, context, entries)
    if settings.matched_lora_weights:
        weights = {"lora_moe": settings.lora_moe_weights, arms.ARM: settings.matched_lora_weights}
        arms.log_arm_runs(metrics, weights, settings.cache, out, context or TrackingContext.from_env(),
                          getattr(tracker, "run_id", None))  # fmt: skip
    return metrics


def _arm_comparison(settings: EvaluationSettings, entries: list[CacheEntry], dits, network) -> dict[str, float]:
    """LoRA-MoE vs the matched single LoRA on the same pairs (:mod:`arms`)."""
    states = {"stage2": settings.stage2_state or curves.state_beside(settings.lora_moe_weights),
              arms.ARM: settings.matched_lora_state or curves.state_beside(settings.matched_lora_weights)}  # fmt: skip
    matched = arms.read_matched_lora(settings.matched_lora_weights)
    return arms.compare(
        network,
        matched,
        entries,
        dits,
        get_task(settings.task).boundary_ratio,
        states,
        settings.seed,
        settings.eval_timesteps,
        settings.eval_batch,
    )  # the MoE's own (t, noise) pairs


def _mlflow_links(tracker, context: TrackingContext | None) -> list[tuple[str, MlflowLink]]:
    """The evaluation's own MLflow run and the pipeline's parent run, for the report (none while MLflow is away)."""
    link = getattr(tracker, "link", lambda: None)()  # a NullTracker (tracking off) has no run
    if link is None:
        return []
    links = [("this evaluation's run", link)]
    parent = (context or TrackingContext.from_env()).parent_run_id
    if parent:
        links.append(("the pipeline run", mlflow_link(tracker.tracking_uri, tracker.experiment_id, parent)))
    return links


def _track(tracker, settings: EvaluationSettings, metrics: dict, out: Path, context: TrackingContext | None,
           entries: list[CacheEntry]) -> None:  # fmt: skip
    """Log the metrics, the held-out cache as a dataset input and every file of the report to MLflow (a child of
    the pipeline run when there is one); metrics.json, report.html and the plots also go to the parent run."""
    from lora_moe_core.tracking.datasets import cache_dataset_ref
    from lora_moe_core.tracking.runs import log_to_parent_run

    tracker.log_params({"evaluate": {k: str(v) for k, v in settings.__dict__.items()}})
    tracker.log_dataset(cache_dataset_ref(settings.cache, entries, "evaluation"))
    tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
    for name in ("metrics.json", "report.html"):
        tracker.log_artifact(out / name, "evaluation")
    for path in [*out.glob("*.png"), *(out / "samples").glob("*")]:  # clips and their posters
        tracker.log_artifact(path, "evaluation" if path.suffix == ".png" else "evaluation/samples")
    tracker.close("FINISHED")
    report_files = [out / "metrics.json", out / "report.html", *sorted(out.glob("*.png"))]
    log_to_parent_run(context or TrackingContext.from_env(), [(path, "evaluation") for path in report_files], out)
