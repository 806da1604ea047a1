"""Per-epoch training statistics and the seed's early-stopping rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora_moe_core.families import FAMILIES
from lora_moe_core.training.losses import entropy

ROI_PATIENCE = 5  # seed: stop when the ROI loss plateaus for 5 epochs
MIN_ROUTING_ENTROPY = 0.5  # seed: collapse warning
MAX_EXPERT_USAGE = 0.7  # seed: one expert above 70%
PLATEAU_MIN_DELTA = 1e-3  # relative improvement that counts as progress


@dataclass
class EpochStats:
    """Running sums over one epoch's micro-batches; :meth:`summary` turns them into metrics.

    Only sums and counts are kept (float64), never per-sample tensors: the state is small, exact in JSON
    (:meth:`state`/:meth:`from_state`), and a run resumed mid-epoch ends the epoch with the same summary, hence
    the same early-stopping decision, as an uninterrupted run.
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    routed: int = 0  # samples with routing statistics
    gate_sum: list[float] = field(default_factory=lambda: [0.0] * len(FAMILIES))  # Σ top-k gates [E]
    soft_sum: list[float] = field(default_factory=lambda: [0.0] * len(FAMILIES))  # Σ router probabilities [E]
    gate_entropy_sum: float = 0.0  # Σ per-sample entropy of the gates
    family_rows: list[int] = field(default_factory=lambda: [0] * len(FAMILIES))  # samples labelled with family f
    family_gate_sum: list[list[float]] = field(
        default_factory=lambda: [[0.0] * len(FAMILIES) for _ in FAMILIES]
    )  # [f][e]: Σ gate of expert e on samples of family f
    labelled: int = 0  # samples whose caption names an instrument
    hits: int = 0  # ... whose first expert is one of their families

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def add_routing(self, gates: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one micro-batch: ``gates``/``soft`` [B, E] (top-k gates, router probabilities), ``labels`` [B, 4]."""
        gates, soft = gates.detach().double().cpu(), soft.detach().double().cpu()
        labels = labels.detach().cpu() > 0
        self.routed += gates.shape[0]
        self.gate_sum = _added(self.gate_sum, gates.sum(dim=0))
        self.soft_sum = _added(self.soft_sum, soft.sum(dim=0))
        self.gate_entropy_sum += float(entropy(gates).sum())
        for family in range(len(FAMILIES)):
            rows = labels[:, family]
            self.family_rows[family] += int(rows.sum())
            self.family_gate_sum[family] = _added(self.family_gate_sum[family], gates[rows].sum(dim=0))
        labelled = labels.any(dim=1)
        self.labelled += int(labelled.sum())
        first = gates.argmax(dim=1, keepdim=True)
        self.hits += int(labels.gather(1, first)[labelled].sum())

    def summary(self) -> dict[str, float]:
        metrics = {key: self.sums[key] / self.counts[key] for key in self.sums}
        if not self.routed:
            return metrics
        metrics["routed_clips"] = float(self.routed)  # every rank's clips once merged (DDP)
        usage = [value / self.routed for value in self.gate_sum]
        metrics["routing_entropy"] = float(entropy(torch.tensor(self.soft_sum, dtype=torch.float64) / self.routed))
        metrics["gate_entropy"] = self.gate_entropy_sum / self.routed
        for index, name in enumerate(FAMILIES):
            metrics[f"usage.{name}"] = usage[index]
            if self.family_rows[index]:  # mean gate of each expert on clips of this family
                for expert, expert_name in enumerate(FAMILIES):
                    mean = self.family_gate_sum[index][expert] / self.family_rows[index]
                    metrics[f"gate_mean.{name}.{expert_name}"] = mean
        if self.labelled:
            metrics["routing_accuracy"] = self.hits / self.labelled
        return metrics

    def state(self) -> dict[str, Any]:
        """JSON-ready sums (Python floats round-trip exactly through JSON)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        return cls(**state)

    @classmethod
    def merge(cls, parts: list[EpochStats]) -> EpochStats:
        """The sums of several processes' statistics: the epoch summary of every rank's clips together."""
        merged = cls()
        for part in parts:
            for key, value in part.sums.items():
                merged.sums[key] = merged.sums.get(key, 0.0) + value
                merged.counts[key] = merged.counts.get(key, 0) + part.counts[key]
            for name in ("routed", "gate_sum", "soft_sum", "gate_entropy_sum", "family_rows", "family_gate_sum",
                         "labelled", "hits"):  # fmt: skip
                setattr(merged, name, _summed(getattr(merged, name), getattr(part, name)))
        return merged


def _summed(a: Any, b: Any) -> Any:
    """``a + b`` for numbers, element by element for (nested) lists."""
    if isinstance(a, list):
        return [_summed(x, y) for x, y in zip(a, b, strict=True)]
    return a + b


def _added(total: list[float], batch: torch.Tensor) -> list[float]:
    return [a + b for a, b in zip(total, batch.tolist(), strict=True)]


@dataclass
class EarlyStopping:
    """The seed's three rules, checked once per epoch; each returns its reason for the log."""

    best_roi: float = float("inf")
    epochs_without_roi_gain: int = 0

    def check(self, summary: dict[str, float]) -> str | None:
        roi = summary.get("roi_loss")
        if roi is not None and roi > 0:
            if roi < self.best_roi * (1 - PLATEAU_MIN_DELTA):
                self.best_roi, self.epochs_without_roi_gain = roi, 0
            else:
                self.epochs_without_roi_gain += 1
            if self.epochs_without_roi_gain >= ROI_PATIENCE:
                return f"ROI loss plateaued for {ROI_PATIENCE} epochs (best {self.best_roi:.5f})"
        if summary.get("routing_entropy", 10.0) < MIN_ROUTING_ENTROPY:
            return f"routing entropy {summary['routing_entropy']:.3f} < {MIN_ROUTING_ENTROPY} (collapse warning)"
        usage = {name: summary[f"usage.{name}"] for name in FAMILIES if f"usage.{name}" in summary}
        if usage and max(usage.values()) > MAX_EXPERT_USAGE:
            name = max(usage, key=usage.get)
            return f"expert {name} takes {usage[name]:.0%} of the routing (> {MAX_EXPERT_USAGE:.0%})"
        return None

    def state(self) -> dict[str, float]:
        return {"best_roi": self.best_roi, "epochs_without_roi_gain": self.epochs_without_roi_gain}
