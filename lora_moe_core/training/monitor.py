"""Per-epoch training statistics and the seed's early-stopping rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_moe_core.families import FAMILIES
from lora_moe_core.training.losses import entropy

ROI_PATIENCE = 5  # seed: stop when the ROI loss plateaus for 5 epochs
MIN_ROUTING_ENTROPY = 0.5  # seed: collapse warning
MAX_EXPERT_USAGE = 0.7  # seed: one expert above 70%
PLATEAU_MIN_DELTA = 1e-3  # relative improvement that counts as progress


@dataclass
class EpochStats:
    """Sums over one epoch's micro-batches; :meth:`summary` turns them into metrics."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    gates: list[torch.Tensor] = field(default_factory=list)  # [B, E] top-k gates used
    soft: list[torch.Tensor] = field(default_factory=list)  # [B, E] router probabilities before top-k
    labels: list[torch.Tensor] = field(default_factory=list)  # [B, 4]

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def add_routing(self, gates: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor) -> None:
        self.gates.append(gates.detach().float().cpu())
        self.soft.append(soft.detach().float().cpu())
        self.labels.append(labels.detach().float().cpu())

    def summary(self) -> dict[str, float]:
        metrics = {key: self.sums[key] / self.counts[key] for key in self.sums}
        if not self.gates:
            return metrics
        gates, soft, labels = torch.cat(self.gates), torch.cat(self.soft), torch.cat(self.labels)
        usage = gates.mean(dim=0)
        metrics["routing_entropy"] = float(entropy(soft.mean(dim=0)))
        metrics["gate_entropy"] = float(entropy(gates).mean())
        for index, name in enumerate(FAMILIES):
            metrics[f"usage.{name}"] = float(usage[index])
            rows = labels[:, index] > 0
            if rows.any():  # mean gate of each expert on clips of this family
                for expert, expert_name in enumerate(FAMILIES):
                    metrics[f"gate_mean.{name}.{expert_name}"] = float(gates[rows, expert].mean())
        labelled = labels.sum(dim=1) > 0
        if labelled.any():
            hits = labels[labelled].gather(1, gates[labelled].argmax(dim=1, keepdim=True)) > 0
            metrics["routing_accuracy"] = float(hits.float().mean())
        return metrics


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
