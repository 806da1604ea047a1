"""LoRA-MoE vs the matched single LoRA (:mod:`training.baseline_arm`): is the mixture worth it on this data?

Both arms are measured on the same held-out clips at the same fixed (t, noise) pairs (:func:`specialisation.
clip_losses`, which draws them as :func:`metrics.held_out_losses` does), so their per-clip losses pair up. Per
family (clips naming it) and over all clips the evaluation reports the mean difference, LoRA-MoE minus matched
LoRA (negative: the mixture fits better), its relative size and a 95% percentile-bootstrap interval of the
paired difference (clips resampled, fixed seed). Like the specialisation interval it is conditional on these two
checkpoints: it says how well the held-out clips pin down *their* difference, not how much another training
seed would move it.

In MLflow each arm also gets a run of its own, ``arm-lora_moe`` and ``arm-matched_lora``, children of the
pipeline's parent run (of the evaluation's run for a plain ``lora-moe evaluate``), with the same metric names
(``val_loss.<Family>``, ``val_loss.all``, ``trainable_parameters``, ``train_steps``): select both and Compare.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_moe_core.adapters.network import LoRAMoENetwork, LoRANetwork, module_name
from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.errors import UserError
from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.evaluation.batched import DEFAULT_BATCH
from lora_moe_core.evaluation.metrics import EVAL_TIMESTEPS
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.lora_files import LoRAFile, LoRAModuleWeights, read_lora
from lora_moe_core.model.wan import linear_shapes
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.training.baseline_arm import ARM, lora_parameter_count, stage2_parameter_count

#: the arms' names in MLflow and their suffix in metrics.json (``val_loss.<group>.<suffix>``)
ARMS = {"lora_moe": "stage2", ARM: ARM}
PREFIX = f"vs_{ARM}"


def read_matched_lora(path: str) -> LoRAFile:
    """The arm's LoRA file, checked to be one: its metadata holds the config of a ``baseline_arm`` run.

    Raises:
        UserError: for an unreadable file or a LoRA that was not trained as a baseline arm.
    """
    lora = read_lora(path)
    try:
        training = json.loads(lora.metadata["lora_moe.config"])["training"]
    except (KeyError, TypeError, ValueError):
        training = {}
    if not isinstance(training, dict) or training.get("baseline_arm") is not True:
        raise UserError(f"{path} is not a matched-LoRA arm (train one with `lora-moe train --config <Stage-2 config> "
                        "--baseline_arm`, or the pipeline's baseline_arm)")  # fmt: skip
    return lora


def _base_modules(network: LoRAMoENetwork) -> dict[str, LoRAModuleWeights]:
    """The checkpoint's frozen Stage-1 branch: the LoRA the arm was trained over."""
    return {module_name(key): LoRAModuleWeights(lora.lora_A.detach(), lora.lora_B.detach(), lora.alpha)
            for key, lora in network.base_loras.items()}  # fmt: skip


def lora_clip_losses(entries: list[CacheEntry], dits: dict, boundary: float, lora: dict[str, LoRAModuleWeights],
                     base: dict[str, LoRAModuleWeights] | None = None, base_multiplier: float = 1.0,
                     seed: int = 0, timesteps: Sequence[float] = EVAL_TIMESTEPS,
                     batch_size: int = DEFAULT_BATCH) -> np.ndarray:  # fmt: skip
    """Per-clip held-out loss ``[N]`` of the DiTs + ``base`` (frozen, × ``base_multiplier``) + ``lora``, applied
    unmerged as the arm was trained (:class:`training.baseline_arm.BaselineArmRecipe`); the DiTs are left clean."""
    shapes = linear_shapes(dits["high"])
    device = next(dits["high"].parameters()).device  # the DiTs' (the GPU when evaluate runs there)
    lower = LoRANetwork.from_modules(base, shapes).to(device) if base else None
    upper = LoRANetwork.from_modules(lora, shapes).to(device)
    unique = list({id(d): d for d in dits.values()}.values())
    try:
        for dit in unique:
            if lower is not None:
                lower.apply_to(dit, base_multiplier)
            upper.apply_to(dit, inside=lower is not None)
        plain = {"plain": lambda batch: None}
        return spec.clip_losses(entries, dits, boundary, plain, seed, timesteps, batch_size=batch_size)["plain"]
    finally:
        for dit in unique:
            LoRANetwork.remove_from(dit)


def arm_clip_losses(network: LoRAMoENetwork, arm: LoRAFile, entries: list[CacheEntry], dits: dict, boundary: float,
                    seed: int = 0, timesteps: Sequence[float] = EVAL_TIMESTEPS,
                    batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:  # fmt: skip
    """``{"lora_moe": [N], "matched_lora": [N]}``: both arms' per-clip loss at the same pairs; the mixture routed
    by the caption labels as in training (what ``val_loss.*.stage2`` measures), the arm over the checkpoint's own
    Stage-1 branch at its ``alpha_base``."""
    unique = list({id(d): d for d in dits.values()}.values())
    confidence = network.config.router.hint_confidence
    for dit in unique:
        network.apply_to(dit)
    try:
        route = {"lora_moe": lambda batch: network.set_routing(batch.labels * confidence)}
        moe = spec.clip_losses(entries, dits, boundary, route, seed, timesteps, batch_size=batch_size)["lora_moe"]
    finally:
        for dit in unique:
            network.remove_from(dit)
    lora = lora_clip_losses(entries, dits, boundary, arm.modules, _base_modules(network), network.route.alpha_base,
                            seed, timesteps, batch_size)  # fmt: skip
    return {"lora_moe": moe, ARM: lora}


def comparison_metrics(per_clip: dict[str, np.ndarray], members: list[np.ndarray]) -> dict[str, float]:
    """Flat metrics of the comparison, per family with clips and ``all``: the arm's loss, the mean paired
    difference (LoRA-MoE − matched LoRA), its relative size, its 95% bootstrap interval and the clip count."""
    moe, lora = per_clip["lora_moe"], per_clip[ARM]
    difference = moe - lora
    groups = {name: index for name, index in zip(FAMILIES, members, strict=True) if len(index)}
    groups["all"] = np.arange(len(moe))
    metrics: dict[str, float] = {}
    for group, index in groups.items():
        low, high = spec.mean_interval(difference, index)
        metrics[f"val_loss.{group}.{ARM}"] = float(lora[index].mean())
        metrics.update({f"{PREFIX}.{group}.difference": float(difference[index].mean()),
                        f"{PREFIX}.{group}.relative": float(moe[index].mean() / lora[index].mean() - 1),
                        f"{PREFIX}.{group}.ci_low": low, f"{PREFIX}.{group}.ci_high": high,
                        f"{PREFIX}.{group}.clips": float(len(index))})  # fmt: skip
    return metrics


def _final_step(state: str | None) -> int | None:
    """``step`` of a ``training_state_final.json`` (local or s3://); None when it is missing or unreadable."""
    from lora_moe_core.guards.parse import load_json
    from lora_moe_core.storage.store import Storage

    try:
        storage = Storage()
        if state is None or not storage.exists(state):
            return None
        step = load_json(storage.read_bytes(state).decode("utf-8"), state)["step"]
        return int(step) if isinstance(step, int) else None
    except (UserError, KeyError, TypeError, UnicodeDecodeError):
        return None


def budget_metrics(network: LoRAMoENetwork, arm: LoRAFile, states: dict[str, str | None]) -> dict[str, float]:
    """Each arm's trainable parameters and, where its training state is found, its optimizer steps."""
    metrics = {"params.trainable.stage2": float(stage2_parameter_count(network)),
               f"params.trainable.{ARM}": float(lora_parameter_count(arm.modules))}  # fmt: skip
    for suffix, state in states.items():
        if (step := _final_step(state)) is not None:
            metrics[f"steps.{suffix}"] = float(step)
    return metrics


def compare(network: LoRAMoENetwork, arm: LoRAFile, entries: list[CacheEntry], dits: dict, boundary: float,
            states: dict[str, str | None], seed: int = 0, timesteps: Sequence[float] = EVAL_TIMESTEPS,
            batch_size: int = DEFAULT_BATCH) -> dict[str, float]:  # fmt: skip
    """Every metric of the comparison (see the module doc); ``states``: ``{"stage2"|"matched_lora": state URI}``."""
    per_clip = arm_clip_losses(network, arm, entries, dits, boundary, seed, timesteps, batch_size)
    return {**comparison_metrics(per_clip, spec.family_members(entries)), **budget_metrics(network, arm, states)}


def arm_run_metrics(metrics: dict[str, float], arm: str) -> dict[str, float]:
    """One arm's numbers under the names both arm runs share (so MLflow's compare view lines them up)."""
    suffix = ARMS[arm]
    shared = {f"val_loss.{group}": metrics[f"val_loss.{group}.{suffix}"] for group in (*FAMILIES, "all")
              if f"val_loss.{group}.{suffix}" in metrics and f"{PREFIX}.{group}.clips" in metrics}  # fmt: skip
    extra = {"trainable_parameters": metrics.get(f"params.trainable.{suffix}"),
             "train_steps": metrics.get(f"steps.{suffix}")}  # fmt: skip
    return {**shared, **{key: value for key, value in extra.items() if value is not None}}


def log_arm_runs(metrics: dict[str, float], weights: dict[str, str], cache: str, output_dir: Path,
                 context: TrackingContext, evaluation_run_id: str | None) -> None:  # fmt: skip
    """One MLflow run per arm, children of the pipeline's parent run (else of the evaluation's run)."""
    from lora_moe_core.tracking.tracker import start_tracker

    parent = context.parent_run_id or evaluation_run_id
    for arm in ARMS:
        run = start_tracker(run_name=f"arm-{arm}", output_dir=output_dir, tags={"stage": "arm", "arm": arm},
                            parent_run_id=parent, context=context)  # fmt: skip
        run.log_params({"arm": arm, "weights": weights[arm], "heldout_cache": cache})
        run.log_metrics(arm_run_metrics(metrics, arm), step=0)
        run.close("FINISHED")


# -- the report's top section ----------------------------------------------------------------------------------
def _verdict(low: float, high: float) -> str:
    if high < 0:
        return "LoRA-MoE better"
    if low > 0:
        return "matched LoRA better"
    return "no measurable difference"


def headline(metrics: dict[str, float]) -> str:
    """The sentence over the table: what the comparison over all held-out clips says."""
    relative, low, high = (metrics[f"{PREFIX}.all.{key}"] for key in ("relative", "ci_low", "ci_high"))
    size = f"{abs(relative):.2%} {'lower' if relative < 0 else 'higher'}"
    interval = f"95% interval of the difference {low:+.4f} to {high:+.4f}"
    if high < 0:
        verdict = "the mixture is worth it on these clips"
    elif low > 0:
        verdict = "on these clips one ordinary LoRA does better than the mixture"
    else:
        verdict = "the held-out clips cannot tell the two apart: the interval includes 0"
    return (f"Over all {int(metrics[f'{PREFIX}.all.clips'])} held-out clips, LoRA-MoE's loss is {size} than that of "
            f"one LoRA with the same trainable parameters and steps ({interval}): {verdict}.")  # fmt: skip


def _budget_line(metrics: dict[str, float]) -> str:
    params = [metrics.get(f"params.trainable.{suffix}") for suffix in ("stage2", ARM)]
    steps = [metrics.get(f"steps.{suffix}") for suffix in ("stage2", ARM)]
    line = ("Matched: both continue from the same Stage-1 LoRA on the same cache, with the same clip order, losses "
            "(the arm has no routing terms) and held-out (t, noise) pairs. Trainable parameters: LoRA-MoE "
            f"{params[0]:,.0f} (experts, router, timestep gates), matched LoRA {params[1]:,.0f}.")  # fmt: skip
    if None not in steps:
        line += f" Optimizer steps: {steps[0]:,.0f} and {steps[1]:,.0f}."
        if steps[0] < steps[1]:
            line += " Stage 2 stopped early (the seed's rules); the arm trained its planned steps."
    return line


def report_section(metrics: dict[str, float]) -> str:
    """The HTML at the top of report.html: the headline, a row per family and the budget of each arm."""
    title = "<h2>LoRA-MoE vs matched LoRA</h2>"
    if f"{PREFIX}.all.difference" not in metrics:
        return (f'{title}<p class="arms">No matched single-LoRA arm in this evaluation: set the pipeline\'s '
                "<code>baseline_arm</code>, or train one with <code>lora-moe train --baseline_arm</code> and pass "
                "it as <code>--matched_lora_weights</code>.</p>")  # fmt: skip
    header = ["family", "clips", "LoRA-MoE", "matched LoRA", "LoRA-MoE − matched LoRA (95% CI)", "relative",
              "verdict"]  # fmt: skip
    rows = ["<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>"]
    for group in (*FAMILIES, "all"):
        if f"{PREFIX}.{group}.difference" not in metrics:
            continue
        value = {key: metrics[f"{PREFIX}.{group}.{key}"] for key in ("difference", "relative", "ci_low", "ci_high")}
        verdict = _verdict(value["ci_low"], value["ci_high"])
        tone = {"LoRA-MoE better": "better", "matched LoRA better": "worse"}.get(verdict, "")
        cells = [f"{int(metrics[f'{PREFIX}.{group}.clips'])}", f"{metrics.get(f'val_loss.{group}.stage2', np.nan):.4f}",
                 f"{metrics[f'val_loss.{group}.{ARM}']:.4f}",
                 f"{value['difference']:+.4f} ({value['ci_low']:+.4f} to {value['ci_high']:+.4f})",
                 f"{value['relative']:+.2%}"]  # fmt: skip
        rows.append(f"<tr><th>{html.escape(group)}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + f'<td class="{tone}">{html.escape(verdict)}</td></tr>')  # fmt: skip
    return (f'{title}<p class="arms">{html.escape(headline(metrics))}</p><table class="arms">{"".join(rows)}</table>'
            f"<p>{html.escape(_budget_line(metrics))}</p>")  # fmt: skip
