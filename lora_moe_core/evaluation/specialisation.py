"""Do the experts specialise? The misrouting matrix, a specialisation score with a bootstrap interval, and
learned against uniform gates on one checkpoint.

Every number comes from held-out clips at the fixed ``(t, noise)`` pairs of :func:`evaluation.held_out_losses`
(same seed, same draw order), so the routes compared here see exactly the same inputs:

* ``L[f, e]``, the **misrouting matrix**: mean held-out loss of the clips naming family ``f`` when every one of
  them is forced onto expert ``e`` (one-hot router gates; timestep gates and α's as trained).
* The **specialisation score**: the mean diagonal of the two-way interaction ``L − row mean − column mean +
  grand mean``. Row effects (some families are harder) and column effects (some experts are better for
  everyone: more steps, luckier seeds) cancel, so the score is negative only when each family's own expert is
  better for it than that expert's overall quality predicts. Identical experts score exactly 0.
* Its 95% interval: percentile bootstrap over held-out clips, resampled within each family, fixed seed. This
  is conditional on one checkpoint: it says how well the held-out clips pin down *this* checkpoint's score.
  Any two trained experts differ a little, and with enough clips that difference is resolved even when training
  never saw a family (measured: shuffled-label checkpoints score ±0.003 with intervals ±0.0007).
* Across training runs, :func:`seed_clip_interval` answers the question about a training *procedure* (do
  experts trained this way specialise?): a two-level bootstrap over runs, then clips, as recommended for
  few-run comparisons (Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021).
* The **wrong-expert increase** per family: ``(mean_{e≠f} L[f, e] − L[f, f]) / L[f, f]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.evaluation.batched import DEFAULT_BATCH, draw_noises, score_clip
from lora_moe_core.evaluation.metrics import EVAL_TIMESTEPS, entry_families
from lora_moe_core.families import FAMILIES, NUM_FAMILIES
from lora_moe_core.training.batches import Batch, collate

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0

#: A route sets the network's gates for a one-clip batch (before the DiT runs).
Route = Callable[[Batch], None]


def force_gates(network, gates: torch.Tensor) -> None:
    """Hold ``gates`` (``[B, E]`` or ``[E]``) as the router gates of the next forwards, bypassing the router.

    Timestep gates and α_expert still apply (the forward hook folds them in), as they do for any route.
    """
    gates = gates.reshape(-1, NUM_FAMILIES).float().to(network.timestep_gates.logits.device)
    network.router_gates = gates
    network.router_probs = gates
    network.route.expert_scale = None


def standard_routes(network) -> dict[str, Route]:
    """The routes the evaluation compares: each expert forced, the learned (configured) route, uniform gates."""
    confidence = network.config.router.hint_confidence
    routes: dict[str, Route] = {
        f"expert.{name}": (lambda batch, e=index: force_gates(network, torch.eye(NUM_FAMILIES)[e]))
        for index, name in enumerate(FAMILIES)
    }
    routes["learned"] = lambda batch: network.set_routing(batch.labels * confidence)
    routes["uniform"] = lambda batch: network.set_routing(batch.labels * confidence, mode="uniform")
    return routes


@torch.no_grad()
def clip_losses(
    entries: list[CacheEntry], dits: dict[str, nn.Module], boundary: float, routes: dict[str, Route], seed: int = 0,
    timesteps: Sequence[float] = EVAL_TIMESTEPS, network=None, batch_size: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Held-out diffusion loss per clip (mean over ``timesteps``) under each route: ``{route: [N]}``.

    The noise of clip ``i`` is drawn as :func:`evaluation.held_out_losses` draws it, once, and reused for every
    route, so the routes differ only in their gates. With ``network`` (the LoRA-MoE the routes set) all routes of a
    clip share the blocks before the first expert and run the rest as one batch (:mod:`batched`); without it each
    route runs the whole DiT.
    """
    out = {name: np.zeros(len(entries)) for name in routes}
    for index, entry in enumerate(entries):
        batch = collate([entry])
        noises = draw_noises(batch, torch.Generator().manual_seed(seed * 100_003 + index), timesteps)
        if network is not None:
            gates = []
            for route in routes.values():
                route(batch)
                gates.append(network.router_gates.detach().reshape(1, -1).clone())
            scores, _ = score_clip(dits, boundary, batch, noises, timesteps, batch_size, gates, network)
            for row, name in enumerate(routes):
                out[name][index] = scores[row].mean()
            continue
        for name, route in routes.items():
            route(batch)
            out[name][index] = score_clip(dits, boundary, batch, noises, timesteps, batch_size)[0][0].mean()
    return out


def family_members(entries: list[CacheEntry]) -> list[np.ndarray]:
    """Indices of the clips naming each family (a clip naming two counts for both), FAMILIES order."""
    named = [entry_families(entry) for entry in entries]
    return [np.array([i for i, families in enumerate(named) if name in families], dtype=int) for name in FAMILIES]


def misrouting_matrix(per_clip: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """``L[f, e]`` from per-clip losses ``[N, E]`` (column e: forced onto expert e); NaN rows for absent families."""
    rows = [per_clip[index].mean(axis=0) if len(index) else np.full(per_clip.shape[1], np.nan) for index in members]
    return np.stack(rows)


def specialisation_score(matrix: np.ndarray) -> float:
    """Mean diagonal of the two-way interaction of ``L[f, e]`` over the families present (negative: specialised)."""
    present = ~np.isnan(matrix).any(axis=1)
    sub = matrix[present][:, present]  # families without clips and their experts drop out together
    if sub.shape[0] < 2:
        return float("nan")
    interaction = sub - sub.mean(axis=1, keepdims=True) - sub.mean(axis=0, keepdims=True) + sub.mean()
    return float(np.diag(interaction).mean())


def bootstrap_interval(
    per_clip: np.ndarray,
    members: list[np.ndarray],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`specialisation_score`, resampling clips within each family."""
    rng = np.random.default_rng(seed)
    scores = np.empty(samples)
    for draw in range(samples):
        scores[draw] = specialisation_score(misrouting_matrix(per_clip, _resample_within(members, rng)))
    return _percentile_interval(scores, level)


def mean_interval(
    values: np.ndarray,
    index: np.ndarray,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``values[index].mean()``, the clips of ``index`` drawn with replacement.

    For a paired comparison pass per-clip differences: each draw then resamples the same clips for both models.
    """
    rng = np.random.default_rng(seed)
    draws = index[rng.integers(len(index), size=(samples, len(index)))]  # [samples, clips]
    return _percentile_interval(values[draws].mean(axis=1), level)


def _resample_within(members: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Each family's clip indices drawn with replacement (empty families stay empty)."""
    return [index[rng.integers(len(index), size=len(index))] if len(index) else index for index in members]


def _percentile_interval(scores: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def seed_clip_interval(
    per_clip_runs: list[np.ndarray],
    members: list[np.ndarray],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean score over training runs (seeds), each run's per-clip losses ``[N, E]``
    measured on the same held-out clips.

    Each draw resamples the runs with replacement, then the clips within each family; the drawn runs share one
    clip draw, because they were evaluated on the same clips (their differences say nothing about clip sampling).
    """
    rng = np.random.default_rng(seed)
    scores = np.empty(samples)
    for draw in range(samples):
        runs = rng.integers(len(per_clip_runs), size=len(per_clip_runs))
        resampled = _resample_within(members, rng)
        scores[draw] = np.mean([specialisation_score(misrouting_matrix(per_clip_runs[r], resampled)) for r in runs])
    return _percentile_interval(scores, level)


def wrong_expert_increase(matrix: np.ndarray) -> np.ndarray:
    """Per family, ``(mean off-diagonal − diagonal) / diagonal`` of ``L[f, e]`` (0.05 = wrong experts cost 5%)."""
    diagonal = np.diag(matrix)
    off = (matrix.sum(axis=1) - diagonal) / (matrix.shape[1] - 1)
    return (off - diagonal) / diagonal


def summarise(per_route: dict[str, np.ndarray], members: list[np.ndarray], prefix: str = "") -> dict[str, float]:
    """Flat metrics from :func:`clip_losses` output: the matrix, score, interval, increases, route losses."""
    per_clip = expert_clip_losses(per_route)  # [N, E]
    matrix = misrouting_matrix(per_clip, members)
    low, high = bootstrap_interval(per_clip, members)
    score = specialisation_score(matrix)
    metrics: dict[str, float] = {}
    if not np.isnan(score):  # needs two families with clips; metrics.json holds numbers only
        metrics = {f"{prefix}specialisation.score": score, f"{prefix}specialisation.ci_low": low,
                   f"{prefix}specialisation.ci_high": high}  # fmt: skip
    for row, family in enumerate(FAMILIES):
        if np.isnan(matrix[row]).any():
            continue
        for column, expert in enumerate(FAMILIES):
            metrics[f"{prefix}misrouting.{family}.{expert}"] = float(matrix[row, column])
        metrics[f"{prefix}misrouting.wrong_expert_increase.{family}"] = float(wrong_expert_increase(matrix)[row])
    labelled = np.unique(np.concatenate(members)) if members else np.array([], dtype=int)
    for route in ("learned", "uniform"):
        if route in per_route and len(labelled):
            metrics[f"{prefix}gates.{route}.val_loss"] = float(per_route[route][labelled].mean())
    return metrics


def route_losses(
    network, entries: list[CacheEntry], dits: dict[str, nn.Module], boundary: float, seed: int = 0,
    timesteps: Sequence[float] = EVAL_TIMESTEPS, batch_size: int = DEFAULT_BATCH,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Apply ``network`` to the DiTs, measure every standard route on ``entries`` (:func:`clip_losses`), remove
    the network again."""
    unique = list({id(d): d for d in dits.values()}.values())
    for dit in unique:
        network.apply_to(dit)
    try:
        return clip_losses(entries, dits, boundary, standard_routes(network), seed, timesteps, network, batch_size)
    finally:
        for dit in unique:
            network.remove_from(dit)


def expert_clip_losses(per_route: dict[str, np.ndarray]) -> np.ndarray:
    """The forced-expert columns of :func:`clip_losses` output as ``[N, E]`` (FAMILIES order)."""
    return np.stack([per_route[f"expert.{name}"] for name in FAMILIES], axis=1)


def specialisation_metrics(
    network, entries: list[CacheEntry], dits: dict[str, nn.Module], boundary: float, seed: int = 0,
    timesteps: Sequence[float] = EVAL_TIMESTEPS, batch_size: int = DEFAULT_BATCH,
) -> tuple[dict[str, float], np.ndarray]:  # fmt: skip
    """Measure every standard route of ``network`` on the labelled clips (:func:`route_losses`).

    Returns:
        The flat metrics of :func:`summarise` and the misrouting matrix ``[F, E]`` (NaN rows: no clips).
    """
    labelled = [entry for entry in entries if entry.labelled]
    per_route = route_losses(network, labelled, dits, boundary, seed, timesteps, batch_size)
    members = family_members(labelled)
    return summarise(per_route, members), misrouting_matrix(expert_clip_losses(per_route), members)


def verdict(score: float, low: float, high: float, loss: float | None = None) -> str:
    """What the score and its 95% interval say about this checkpoint, in words a reader can act on.

    ``loss``: the held-out loss of the Stage-2 checkpoint, to give the score's size as a share of it. The
    interval is conditional on one checkpoint (see the module doc): it says how well the held-out clips pin down
    *this* checkpoint's score, not whether the training recipe makes experts specialise.
    """
    size = f"{abs(score):.4f}" + (f", {abs(score) / loss:.2%} of the held-out loss" if loss else "")
    if high < 0:
        return (f"The experts specialise: each family's own expert fits its clips better than that expert's "
                f"overall quality predicts (by {size}), and the whole 95% interval is below 0. Whether training "
                "does this reliably is a question over seeds (bench/method.py).")  # fmt: skip
    if low <= 0:
        return ("No evidence of specialisation: the 95% interval includes 0, so on these held-out clips a family's "
                "own expert is not measurably better for it than the other experts. Train longer, with more "
                "clips per family, or check that the captions name the instruments.")  # fmt: skip
    return (f"No sign of specialisation: each family's own expert fits its clips slightly worse than the other "
            f"experts do (by {size}), and the whole 95% interval is above 0. Routing by instrument does not help "
            "on these clips yet; train longer, with more clips per family, or check the labels.")  # fmt: skip
