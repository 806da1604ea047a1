"""The instrument families that name the experts, in the one order used everywhere."""

from __future__ import annotations

#: Expert index e serves FAMILIES[e]. Checkpoints, gates, labels and reports all use this order.
FAMILIES: tuple[str, ...] = ("Scissors", "Hook", "Suction", "Other")
NUM_FAMILIES = len(FAMILIES)
