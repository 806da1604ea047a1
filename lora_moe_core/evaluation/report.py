"""Evaluation plots (PNG) and the self-contained ``report.html`` that embeds them and the sample videos."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from lora_moe_core.families import FAMILIES

MODELS = ("base", "stage1", "stage2")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: evaluation runs on cluster nodes
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_losses(metrics: dict, path: Path) -> Path:
    """Held-out diffusion loss per family, base / Stage 1 / Stage 2 side by side."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    groups = [*FAMILIES, "all"]
    width = 0.8 / len(MODELS)
    for offset, model in enumerate(MODELS):
        values = [metrics.get(f"val_loss.{group}.{model}", np.nan) for group in groups]
        axis.bar(np.arange(len(groups)) + offset * width, values, width, label=model)
    axis.set_xticks(np.arange(len(groups)) + width, groups)
    values = [v for m in MODELS for g in groups if np.isfinite(v := metrics.get(f"val_loss.{g}.{m}", np.nan))]
    if values:  # the models differ by a few percent: start the axis near the data so the difference shows
        span = max(values) - min(values)
        axis.set_ylim(min(values) - 0.5 * span - 1e-6, max(values) + 0.5 * span + 1e-6)
    axis.set(ylabel="held-out flow-matching loss", title="loss by family (lower is better)")
    axis.legend()
    return _save(figure, path)


def plot_confusion(confusion: list[list[int]], path: Path) -> Path:
    """Routing confusion: caption family (rows) vs the expert with the largest gate (columns)."""
    plt = _pyplot()
    matrix = np.array(confusion)
    figure, axis = plt.subplots(figsize=(5, 4))
    image = axis.imshow(matrix, cmap="Blues")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(value), ha="center", va="center")
    axis.set_xticks(range(len(FAMILIES)), FAMILIES)
    axis.set_yticks(range(len(FAMILIES)), FAMILIES)
    axis.set(xlabel="top expert", ylabel="caption family", title="routing confusion")
    figure.colorbar(image)
    return _save(figure, path)


def plot_gates(gate_means: dict[str, list[float]], path: Path) -> Path:
    """Mean gate of each expert (columns) on clips of each family (rows)."""
    plt = _pyplot()
    rows = [gate_means.get(name, [np.nan] * len(FAMILIES)) for name in FAMILIES]
    figure, axis = plt.subplots(figsize=(5, 4))
    image = axis.imshow(np.array(rows), cmap="viridis", vmin=0, vmax=1)
    for (row, column), value in np.ndenumerate(np.array(rows)):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", color="white")
    axis.set_xticks(range(len(FAMILIES)), FAMILIES)
    axis.set_yticks(range(len(FAMILIES)), FAMILIES)
    axis.set(xlabel="expert", ylabel="clip family", title="gates per family")
    figure.colorbar(image)
    return _save(figure, path)


def plot_gate_vs_timestep(bucket_gates: list[list[float]], boundaries: list[float], path: Path) -> Path:
    """The learned timestep gate of each expert across t (step function over the buckets)."""
    plt = _pyplot()
    edges = [0.0, *boundaries, 1000.0]
    figure, axis = plt.subplots(figsize=(6, 4))
    for expert, name in enumerate(FAMILIES):
        values = [bucket[expert] for bucket in bucket_gates]
        axis.step(edges, [*values, values[-1]], where="post", label=name)
    for boundary in boundaries:
        axis.axvline(boundary, color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="timestep t (0-1000)", ylabel="timestep gate", title="gate vs timestep", ylim=(0, 2))
    axis.legend()
    return _save(figure, path)


def plot_misrouting(matrix: np.ndarray, path: Path) -> Path:
    """Held-out loss of each family's clips (rows) forced onto each expert (columns), with the relative excess over
    the row's own expert, so a specialised model shows its minimum on the diagonal."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    image = axis.imshow(matrix, cmap="magma_r")
    for (row, column), value in np.ndenumerate(matrix):
        excess = value / matrix[row, row] - 1 if np.isfinite(value) else np.nan
        axis.text(column, row, f"{value:.3f}\n{excess:+.1%}", ha="center", va="center", color="grey", fontsize=8)
    axis.set_xticks(range(len(FAMILIES)), FAMILIES)
    axis.set_yticks(range(len(FAMILIES)), FAMILIES)
    axis.set(xlabel="forced expert", ylabel="clip family", title="misrouting matrix (held-out loss)")
    figure.colorbar(image)
    return _save(figure, path)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LoRA-MoE evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} img{{max-width:520px;margin:4px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
video{{width:256px;margin:4px}}</style></head>
<body><h1>LoRA-MoE evaluation</h1>
<p>{summary}</p>
<h2>Plots</h2>{images}
<h2>Samples</h2>{videos}
<h2>Metrics</h2><table>{rows}</table>
<h2>What the metrics stand for</h2><ul>{legend}</ul>
<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesBroken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
}});
</script></body></html>
"""

LEGEND = {
    "val_loss.<Family>.<model>": "held-out flow-matching loss at fixed (t, noise) pairs, clips naming that family",
    "roi_loss.<Family>.<model>": "the same error on the tool-tip cells only (ROI maps from the tip boxes)",
    "routing.accuracy": "share of labelled clips whose largest gate is a family their caption names (the router's "
    "input is those labels: this checks the router, not whether the experts specialise)",
    "routing.classifier_accuracy": "the same with gates from the instrument classifier instead of the caption",
    "routing.usage_entropy": "entropy of the mean gates over held-out clips (expert usage; collapse below 0.5). "
    "High even when every clip goes to one expert, as long as the experts are used equally often",
    "routing.gate_entropy_per_clip": "mean over held-out clips of the entropy of each clip's gates "
    "(0: one expert per clip; ln 4 = 1.386: uniform gates)",
    "misrouting.<Family>.<Expert>": "held-out loss of the clips naming that family, all forced onto that expert "
    "(one-hot router gates, same fixed (t, noise) pairs as val_loss)",
    "misrouting.wrong_expert_increase.<Family>": "(mean loss on the wrong experts - loss on its own expert) / "
    "loss on its own expert, for that family's clips",
    "specialisation.score": "mean diagonal of the misrouting matrix after removing family (row) and expert (column) "
    "effects; negative: each family's own expert is better for it than the expert's overall quality predicts",
    "specialisation.ci_low / ci_high": "95% percentile-bootstrap interval of the score (clips resampled within each "
    "family, fixed seed); specialisation is shown only when the whole interval is below 0",
    "gates.learned.val_loss / gates.uniform.val_loss": "held-out loss of the same Stage-2 checkpoint with its "
    "learned (caption-routed) gates and with uniform gates (0.25 each)",
    "usage.<Family>": "mean gate of that expert over the held-out clips",
    "samples.presence_accuracy": "instrument classifier finds the prompted family in generated clips "
    "(stands in for a tool-presence model; no downloaded weights exist)",
    "samples.flicker": "mean absolute frame-to-frame change of generated clips (lower is steadier)",
    "samples.frechet_classifier": "Fréchet distance between classifier features of generated and held-out clips "
    "(stands in for FVD, whose I3D weights cannot be downloaded here)",
}


def _cell(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(json.dumps(value))


def _video(source: str, caption: str) -> str:
    return (f'<figure><video src="{html.escape(source)}" controls muted loop></video>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip


def write_report(metrics: dict, plots: list[Path], videos: list[Path], path: Path) -> Path:
    """A static HTML page next to its plots and videos (relative links, so the folder can move as a whole)."""
    images = "".join(f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in plots)
    clips = "".join(_video(video.relative_to(path.parent).as_posix(), video.stem) for video in videos)
    rows = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{_cell(value)}</td></tr>" for key, value in sorted(metrics.items())
    )
    legend = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in LEGEND.items())
    accuracy = metrics.get("routing.accuracy")
    summary = "routing accuracy " + (f"{accuracy:.2f}" if isinstance(accuracy, float) else "n/a")
    if "specialisation.score" in metrics:
        low, high = metrics["specialisation.ci_low"], metrics["specialisation.ci_high"]
        summary += f"; specialisation score {metrics['specialisation.score']:+.4f} (95% CI {low:+.4f} to {high:+.4f})"
    page = _PAGE.format(summary=html.escape(summary), images=images, videos=clips or "<p>none</p>", rows=rows,
                        legend=legend)  # fmt: skip
    path.write_text(page, encoding="utf-8")
    return path


def inline_assets(report: str | Path) -> str:
    """``report.html`` as one self-contained page: every relative ``src``/``href`` becomes a ``data:`` URI.

    The KFP UI shows an HTML artifact as a single file, so the plots and sample clips beside it must travel inside.
    Links to files that do not exist, absolute URLs and fragments are left as they are.
    """
    import base64
    import mimetypes
    import re

    folder = Path(report).parent

    def inline(match: re.Match) -> str:
        target = folder / match.group(2)
        if not target.is_file():
            return match.group(0)
        mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return f'{match.group(1)}="data:{mime};base64,{base64.b64encode(target.read_bytes()).decode()}"'

    page = Path(report).read_text(encoding="utf-8")
    return re.sub(r'(src|href)="(?![a-z]+:)([^"#?]+)"', inline, page)
