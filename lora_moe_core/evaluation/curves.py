"""The report's training curves: Stage 1's and Stage 2's epoch histories on one timeline.

Each stage's history is the ``training_state_final.json`` its trainer wrote beside the weights. A pipeline step
does not see the weights where the trainer wrote them (the Stage-2 checkpoint arrives as a KFP artifact file, the
Stage-1 LoRA as a download), so it names the state files by URI (``stage1_state``/``stage2_state`` of the
evaluation settings); a plain ``lora-moe evaluate`` finds them beside local weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_moe_core.errors import UserError

TRAINING_STATE = "training_state_final.json"
STAGES = ("stage1", "stage2")
_LOSSES = (("diffusion_loss", "-"), ("roi_loss", ":"))


def state_beside(weights: str | None) -> str | None:
    """The ``training_state_final.json`` in the folder of ``weights`` (a local path or an ``s3://`` URI)."""
    if not weights:
        return None
    if weights.startswith("s3://"):
        return f"{weights.rsplit('/', 1)[0]}/{TRAINING_STATE}"
    return str(Path(weights).parent / TRAINING_STATE)


def read_histories(states: dict[str, str | None]) -> dict[str, list[dict]]:
    """``{stage: epoch records}`` from ``{stage: state file URI}``; a stage whose file is missing or damaged is
    left out (the curves are an extra and never fail an evaluation)."""
    from lora_moe_core.guards.parse import load_json
    from lora_moe_core.storage.store import Storage

    storage, histories = Storage(), {}
    for stage, uri in states.items():
        try:
            if uri is None or not storage.exists(uri):
                continue
            history = load_json(storage.read_bytes(uri).decode("utf-8"), uri)["history"]
            histories[stage] = [record for record in history if isinstance(record, dict)]
        except (UserError, KeyError, TypeError, UnicodeDecodeError):
            continue
    return histories


@dataclass(frozen=True)
class Series:
    """One line of the plot: a stage's loss per epoch, Stage 2's epochs numbered on from Stage 1's last."""

    label: str
    epochs: list[int]
    values: list[float]
    style: str


def curve_series(histories: dict[str, list[dict]]) -> tuple[list[Series], list[float]]:
    """The plotted lines and where the stage markers go (after each stage's last epoch)."""
    series, markers, start = [], [], 0
    for stage in (name for name in STAGES if histories.get(name)):
        history = histories[stage]
        epochs = [start + int(record.get("epoch", index + 1)) for index, record in enumerate(history)]
        for key, style in _LOSSES:
            values = [float(record.get(key, np.nan)) for record in history]
            if any(np.isfinite(values)):
                series.append(Series(f"{stage} {key}", epochs, values, style))
        start = max(epochs)
        markers.append(start + 0.5)
    return series, markers


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss per epoch, Stage 2's epochs continuing after Stage 1's: one timeline of the adaptation.
    A stage without a history is named in the title, so a missing curve is not read as a stage that never ran."""
    from lora_moe_core.evaluation.report import pyplot, save_figure

    figure, axis = pyplot().subplots(figsize=(7, 4))
    series, markers = curve_series(histories)
    for line in series:
        axis.plot(line.epochs, line.values, line.style, marker="o", markersize=3, label=line.label)
    for x in markers:
        axis.axvline(x, color="grey", linewidth=0.5)
    missing = [stage for stage in STAGES if not histories.get(stage)]
    title = "training curves" + (f" (no {' or '.join(missing)} history found)" if missing else "")
    axis.set(xlabel="epoch (Stage 2 continues after Stage 1)", ylabel="training loss", title=title)
    if series:
        axis.legend(fontsize=8)
    return save_figure(figure, path)
