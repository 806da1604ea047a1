"""Verdict and table of the specialisation benchmark (bench/method.py): the issue's pass criteria, read two ways.

Each Stage-2 arm is a training *procedure* run on several seeds, so an arm's specialisation interval is the
two-level bootstrap over seeds and clips (:func:`evaluation.specialisation.seed_clip_interval`). The per-checkpoint
clip bootstrap that ``lora-moe evaluate`` prints is kept beside it, with how many seeds it holds on: it resolves
tiny affinities of one trained checkpoint (signs that change from seed to seed), which is what it should do for a
user's one checkpoint and why it cannot decide whether a procedure specialises.
"""

from __future__ import annotations

import numpy as np

from lora_moe_core.evaluation import specialisation as spec
from lora_moe_core.families import FAMILIES

INTERVAL_ARMS = ("routed", "shuffled", "uniform", "oracle")
TABLE_ARMS = ("stage1", "routed", "shuffled", "uniform", "vanilla", "oracle")
PLATEAU = 0.005  # Stage 1 counts as plateaued when its last quarter of steps improves held-out loss by < 0.5%


def arm_intervals(per_seed: list[dict], members: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per arm: mean score over seeds and the seed × clip 95% interval."""
    out = {}
    for arm in INTERVAL_ARMS:
        runs = [np.asarray(seed[arm]["expert_clip_losses"]) for seed in per_seed]
        low, high = spec.seed_clip_interval(runs, members)
        out[arm] = {"score": float(np.mean([seed[arm]["specialisation.score"] for seed in per_seed])),
                    "ci_low": low, "ci_high": high}  # fmt: skip
    return out


def _min_wrong(metrics: dict) -> float:
    return min(metrics[f"misrouting.wrong_expert_increase.{family}"] for family in FAMILIES)


def verdict(per_seed: list[dict], arms: dict[str, dict[str, float]]) -> dict[str, object]:
    """The issue's pass criteria. Interval criteria read the arm (seed × clip) interval; the per-checkpoint clip
    intervals are counted beside them. Loss comparisons and the 5% criterion must hold on every seed."""

    def every(test) -> bool:
        return all(test(seed) for seed in per_seed)

    def contains_zero(low: float, high: float) -> bool:
        return low <= 0 <= high

    def below(low: float, high: float) -> bool:
        return high < 0

    def per_checkpoint(arm: str, test) -> str:
        held = sum(test(s[arm]["specialisation.ci_low"], s[arm]["specialisation.ci_high"]) for s in per_seed)
        return f"{held}/{len(per_seed)}"

    wrong = [_min_wrong(seed["routed"]) for seed in per_seed]
    oracle_wrong = [_min_wrong(seed["oracle"]) for seed in per_seed]
    return {
        "stage1_at_plateau": every(lambda s: s["stage1"]["last_quarter_improvement"] < PLATEAU),
        "routed_interval_below_zero": below(arms["routed"]["ci_low"], arms["routed"]["ci_high"]),
        "shuffled_interval_contains_zero": contains_zero(arms["shuffled"]["ci_low"], arms["shuffled"]["ci_high"]),
        "uniform_interval_contains_zero": contains_zero(arms["uniform"]["ci_low"], arms["uniform"]["ci_high"]),
        "per_checkpoint_routed_below_zero": per_checkpoint("routed", below),
        "per_checkpoint_shuffled_contains_zero": per_checkpoint("shuffled", contains_zero),
        "per_checkpoint_uniform_contains_zero": per_checkpoint("uniform", contains_zero),
        "wrong_expert_increase_min_per_seed": [round(w, 4) for w in wrong],
        "oracle_wrong_expert_increase_min_per_seed": [round(w, 4) for w in oracle_wrong],
        "wrong_experts_raise_every_family_by_5pct": all(w >= 0.05 for w in wrong),
        "routed_beats_vanilla": every(lambda s: s["routed"]["val_loss"] < s["vanilla"]["val_loss"]),
        "routed_beats_uniform": every(lambda s: s["routed"]["val_loss"] < s["uniform"]["val_loss"]),
    }


def _mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _row(arm: str, rows: list[dict], arms: dict) -> str:
    score = _mean_sd([r.get("specialisation.score") for r in rows])
    interval = f"[{arms[arm]['ci_low']:+.4f}, {arms[arm]['ci_high']:+.4f}]" if arm in arms else "n/a"
    inside = "n/a"
    if "specialisation.ci_low" in rows[0]:
        inside = f"{sum(r['specialisation.ci_low'] <= 0 <= r['specialisation.ci_high'] for r in rows)}/{len(rows)}"
    wrong = _mean_sd([_min_wrong(r) for r in rows] if "specialisation.score" in rows[0] else [None])
    gates = "n/a"
    if "gates.uniform.val_loss" in rows[0]:
        gates = f"{_mean_sd([r['gates.learned.val_loss'] for r in rows])} → "
        gates += _mean_sd([r["gates.uniform.val_loss"] for r in rows])
    loss = _mean_sd([r["val_loss"] for r in rows])
    return f"| {arm} | {loss} | {score} | {interval} | {inside} | {wrong} | {gates} |"


def markdown(result: dict) -> str:
    """The BENCHMARKS.md table: arms × metrics, mean ± sd over seeds, the arm interval, per-checkpoint counts."""
    per_seed, arms = result["per_seed"], result["arms"]
    lines = ["| arm | held-out loss | specialisation score | 95% interval, seeds × clips | per-checkpoint intervals"
             " containing 0 | min wrong-expert increase | learned → uniform gates (same checkpoint) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [_row(arm, [seed[arm] for seed in per_seed], arms) for arm in TABLE_ARMS]
    return "\n".join(lines) + "\n"
