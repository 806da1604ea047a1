"""PNG plots of a run's epoch history (logged to MLflow beside the checkpoints)."""

from __future__ import annotations

from pathlib import Path

from lora_moe_core.families import FAMILIES
from lora_moe_core.training.monitor import MAX_EXPERT_USAGE


def plot_history(history: list[dict[str, float]], output_dir: Path) -> list[Path]:
    """``losses.png`` (every loss term per epoch) and, for Stage 2/3, ``routing.png`` (usage, entropy, accuracy)."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    from matplotlib import pyplot as plt

    epochs = [record["epoch"] for record in history]
    paths = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in sorted(
        {k for record in history for k in record if k == "loss" or k.endswith("_loss") or k == "teacher_kl"}
    ):
        axis.plot(epochs, [record.get(key, float("nan")) for record in history], marker="o", label=key)
    axis.set(xlabel="epoch", ylabel="loss", title="training losses", yscale="log")
    axis.legend(fontsize=8)
    paths.append(_save(figure, output_dir / "losses.png"))
    if "usage.Scissors" in history[0]:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for name in FAMILIES:
            left.plot(epochs, [record[f"usage.{name}"] for record in history], marker="o", label=name)
        left.axhline(MAX_EXPERT_USAGE, color="red", linestyle="--", linewidth=1,
                     label=f"early-stop {MAX_EXPERT_USAGE:.0%}")  # fmt: skip
        left.set(xlabel="epoch", ylabel="mean gate", title="expert usage", ylim=(0, 1))
        left.legend(fontsize=8)
        for key in ("routing_entropy", "routing_accuracy"):
            right.plot(epochs, [record.get(key, float("nan")) for record in history], marker="o", label=key)
        right.axhline(0.5, color="red", linestyle="--", linewidth=1, label="entropy floor 0.5")
        right.set(xlabel="epoch", title="routing")
        right.legend(fontsize=8)
        paths.append(_save(figure, output_dir / "routing.png"))
    return paths


def _save(figure, path: Path) -> Path:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
