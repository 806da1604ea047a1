"""Do the experts specialise? Arms × seeds on the tiny Wan2.2 pair and the family benchmark clips (CPU, minutes).

    python bench/method.py --json bench/results_method_cpu.json --markdown /tmp/method.md   # 3 seeds
    python bench/method.py --smoke --json /tmp/method_smoke.json                             # CI-sized check

Data (:mod:`lora_moe_core.data.synth_families`): synthetic surgical clips, one family each, with a large family-coloured
marker whose colours come in opposed pairs, cached through ``lora-moe cache`` with the deterministic tiny encoder.
Per seed, Stage 1 is trained on the pooled clips to a plateau (its held-out loss at half and at all of its steps
is recorded), then every arm continues from that same Stage-1 LoRA for the same number of optimizer steps:

  routed    Stage 2 as shipped: learned router on caption-derived labels, teacher KL, top-2, timestep gates
  shuffled  the same, with the labels permuted across training clips
  uniform   the same, with routing_mode uniform (every expert gated 0.25)
  vanilla   one LoRA of the experts' total rank (4×) at the experts' per-rank scaling, on the merged Stage 1
  oracle    four vanilla LoRAs of one expert's rank, each trained on one family only, each evaluated on its own

All arms minimise the flow-matching loss that is evaluated (ROI and temporal terms off), early stopping is off, and
every held-out number comes from the same fixed (t, noise) pairs. Pass criteria (issue 13): the routed arm's
specialisation interval lies below 0 while the shuffled and uniform arms' contain 0; wrong experts raise every
family's held-out loss of the routed arm by >= 5%; routed beats vanilla and uniform on held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import method_arms as arms  # noqa: E402
from lora_moe_core.data.latent_cache import read_cache  # noqa: E402
from lora_moe_core.data.synth_families import generate_family_dataset, linear_probe_accuracy  # noqa: E402
from lora_moe_core.evaluation import specialisation as spec  # noqa: E402
from lora_moe_core.families import FAMILIES  # noqa: E402

FULL = {"train": 48, "heldout": 48, "stage1_epochs": 24, "stage2_epochs": 8, "seeds": [0, 1, 2]}
SMOKE = {"train": 8, "heldout": 8, "stage1_epochs": 2, "stage2_epochs": 1, "seeds": [0]}
CLIP = {"width": 64, "height": 48, "num_frames": 9}
STAGE2_ARMS = ("routed", "shuffled", "uniform")


def prepare_data(work: Path, sizes: dict) -> tuple[list, list, dict]:
    """Generate and cache (``lora-moe cache``, tiny task) the training and held-out clips; probe their latents."""
    from lora_moe_core.cli.main import main

    caches = {}
    for split, seed in (("train", 100), ("heldout", 200)):
        generate_family_dataset(work / split, sizes[split], seed=seed, **CLIP)
        caches[split] = work / f"{split}_cache"
        if main(["cache", "--dataset", str(work / split), "--task", "tiny", "--output", str(caches[split])]) != 0:
            raise SystemExit(f"caching the {split} clips failed")
    train, heldout = read_cache(str(caches["train"])), read_cache(str(caches["heldout"]))
    pooled = [*train, *heldout]
    latents = np.stack([entry.latents.numpy() for entry in pooled])
    labels = np.array([int(entry.labels.argmax()) for entry in pooled])
    return train, heldout, {"latent_probe_accuracy": linear_probe_accuracy(latents, labels), "clips": len(pooled)}


def oracle_metrics(train, heldout, seed: int, epochs: int, stage1: Path, work: Path) -> dict[str, float]:
    """Four one-family LoRAs: each clip scored by its own family's LoRA, plus their misrouting matrix and score
    (the specialisation the benchmark allows at all, with nothing learnt about routing)."""
    per_clip = []
    for family in FAMILIES:
        subset = arms.family_subset(train, family)
        # same optimizer steps as the pooled arms: a quarter of the clips, four times the epochs
        lora, _ = arms.train_vanilla(subset, seed, epochs * len(train) // len(subset), stage1,
                                     work / f"oracle_{family}", scale=1)  # fmt: skip
        per_clip.append(arms.lora_clip_losses(lora, heldout, stage1))
    per_clip = np.stack(per_clip, axis=1)  # [N, E]
    members = spec.family_members(heldout)
    own = np.array([per_clip[i, int(entry.labels.argmax())] for i, entry in enumerate(heldout)])
    metrics = spec.summarise({f"expert.{name}": per_clip[:, e] for e, name in enumerate(FAMILIES)}, members)
    return {**metrics, "val_loss": float(own.mean())}


def run_seed(seed: int, train, heldout, sizes: dict, work: Path) -> dict[str, dict]:
    """Stage 1 to plateau, then every arm from it; returns ``{arm: metrics}``."""
    started = time.perf_counter()
    stage1, halfway, history = arms.train_stage1(train, seed, sizes["stage1_epochs"], work / "stage1")
    results = {"stage1": {"val_loss": float(arms.lora_clip_losses(stage1, heldout).mean()),
                          "val_loss_halfway": float(arms.lora_clip_losses(halfway, heldout).mean()),
                          "train_loss_by_epoch": [round(r["loss"], 5) for r in history]}}  # fmt: skip
    for arm in STAGE2_ARMS:
        checkpoint, steps = arms.train_stage2(arm, train, seed, sizes["stage2_epochs"], stage1, work / arm)
        metrics = arms.evaluate_stage2(checkpoint, heldout)
        results[arm] = {**metrics, "val_loss": metrics["gates.learned.val_loss"], "steps": steps}
        print(f"seed {seed} {arm}: {results[arm]['val_loss']:.4f}, score {metrics['specialisation.score']:+.4f}")
    lora, steps = arms.train_vanilla(train, seed, sizes["stage2_epochs"], stage1, work / "vanilla", scale=4)
    results["vanilla"] = {"val_loss": float(arms.lora_clip_losses(lora, heldout, stage1).mean()), "steps": steps}
    results["oracle"] = oracle_metrics(train, heldout, seed, sizes["stage2_epochs"], stage1, work)
    results["seconds"] = time.perf_counter() - started
    return results


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def verdict(per_seed: list[dict]) -> dict[str, object]:
    """The issue's pass criteria, each checked on every seed (a criterion holds only when it holds for all)."""

    def every(test) -> bool:
        return all(test(seed) for seed in per_seed)

    def excludes_zero(arm):
        return lambda s: s[arm]["specialisation.ci_high"] < 0

    def includes_zero(arm):
        return lambda s: s[arm]["specialisation.ci_low"] <= 0 <= s[arm]["specialisation.ci_high"]

    wrong = [min(s["routed"][f"misrouting.wrong_expert_increase.{f}"] for f in FAMILIES) for s in per_seed]
    return {
        "routed_interval_below_zero": every(excludes_zero("routed")),
        "shuffled_interval_contains_zero": every(includes_zero("shuffled")),
        "uniform_interval_contains_zero": every(includes_zero("uniform")),
        "wrong_expert_increase_min_per_seed": [round(w, 4) for w in wrong],
        "wrong_experts_raise_every_family_by_5pct": all(w >= 0.05 for w in wrong),
        "routed_beats_vanilla": every(lambda s: s["routed"]["val_loss"] < s["vanilla"]["val_loss"]),
        "routed_beats_uniform": every(lambda s: s["routed"]["val_loss"] < s["uniform"]["val_loss"]),
    }


def markdown(result: dict) -> str:
    """The BENCHMARKS.md table: arms × metrics, mean ± sd over seeds, intervals per seed."""
    per_seed = result["per_seed"]
    lines = ["| arm | held-out loss | specialisation score | 95% interval per seed | min wrong-expert increase |"
             " learned → uniform gates (same checkpoint) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for arm in ("stage1", *STAGE2_ARMS, "vanilla", "oracle"):
        rows = [seed[arm] for seed in per_seed]
        score = _mean_sd([r.get("specialisation.score") for r in rows])
        intervals = ", ".join(f"[{r['specialisation.ci_low']:+.4f}, {r['specialisation.ci_high']:+.4f}]"
                              for r in rows if "specialisation.ci_low" in r) or "n/a"  # fmt: skip
        wrong = _mean_sd([min(r[f"misrouting.wrong_expert_increase.{f}"] for f in FAMILIES) for r in rows
                          if f"misrouting.wrong_expert_increase.{FAMILIES[0]}" in r] or [None])  # fmt: skip
        gates = "n/a"
        if arm in STAGE2_ARMS:
            gates = f"{_mean_sd([r['gates.learned.val_loss'] for r in rows])} → "
            gates += _mean_sd([r["gates.uniform.val_loss"] for r in rows])
        lines.append(f"| {arm} | {_mean_sd([r['val_loss'] for r in rows])} | {score} | {intervals} | {wrong} | "
                     f"{gates} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few clips and steps: checks the script runs")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2)")
    parser.add_argument("--stage1_epochs", type=int, help="Stage-1 epochs before the arms branch off (default 24)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--work_dir", type=Path, help="keep clips, caches and checkpoints here (default: temporary)")
    args = parser.parse_args(argv)
    # one thread: the tiny DiT's ops are far too small to split, and on a shared 2-core machine a second thread
    # only contends (measured: 13 ms per training micro-batch with one thread, 600 ms with two under load)
    torch.set_num_threads(1)
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes["seeds"] = args.seeds or sizes["seeds"]
    sizes["stage1_epochs"] = args.stage1_epochs or sizes["stage1_epochs"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-moe-method-") as temporary:
        work = args.work_dir or Path(temporary)
        train, heldout, data = prepare_data(work, sizes)
        print(f"data: {data}")
        per_seed = [run_seed(seed, train, heldout, sizes, work / f"seed{seed}") for seed in sizes["seeds"]]
    result = {"sizes": sizes, "clip": CLIP, "data": data, "per_seed": per_seed, "verdict": verdict(per_seed),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1",
              "seconds": time.perf_counter() - started}  # fmt: skip
    table = markdown(result)
    print(table)
    print(json.dumps(result["verdict"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
