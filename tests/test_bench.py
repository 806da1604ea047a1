"""The GPU benchmarks keep working: their --smoke mode runs the same code on the tiny model on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"full", "peft", "ours", "loop"}
    # the loop computes the same function as the fused pair
    assert abs(results["ours"]["loss"] - results["loop"]["loss"]) <= 1e-4 * abs(results["ours"]["loss"])
    assert results["ours"]["trainable_params"] > results["peft"]["trainable_params"]


def test_memory_modes_benchmark_smoke(tmp_path):
    out = tmp_path / "modes.json"
    result = subprocess.run([sys.executable, str(BENCH / "memory_modes.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"resident", "offload", "fp8_swap"}
    # offloading moves weights, never changes numbers; fp8 changes them a little
    assert results["offload"]["loss"] == results["resident"]["loss"]
    assert abs(results["fp8_swap"]["loss"] / results["resident"]["loss"] - 1) < 0.01


def test_host_memory_benchmark_smoke_compares_the_same_copies(tmp_path):
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, str(BENCH / "host_memory.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    per_tensor, arena = json.loads(out.read_text())["arms"]
    assert (per_tensor["arm"], arena["arm"]) == ("per_tensor", "arena")
    assert per_tensor["host_copies_bytes"] == arena["host_copies_bytes"] > 0  # the same weights leave the device
    assert per_tensor["arena_reserved_bytes"] == per_tensor["host_copies_bytes"]  # one allocation per tensor
    assert arena["arena_reserved_bytes"] >= arena["host_copies_bytes"]


def test_ddp_benchmark_smoke_runs_two_processes(tmp_path):
    out = tmp_path / "ddp2.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(BENCH / "ddp_step.py"),
               "--smoke", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(out.read_text())
    assert run["world_size"] == 2 and len(run["step_times"]) == 3
    compared = subprocess.run([sys.executable, str(BENCH / "ddp_step.py"), "--compare", str(out)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "scaling efficiency 100.0%" in compared.stdout


def test_method_benchmark_smoke_reports_every_arm(tmp_path):
    """bench/method.py (issue 13) end to end on a few clips and steps: every arm, the verdict, the table."""
    out = tmp_path / "method.json"
    result = subprocess.run([sys.executable, str(BENCH / "method.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["per_seed"]) == 2  # two seeds, trained in two worker processes
    for arms in report["per_seed"]:
        assert {"stage1", "routed", "shuffled", "uniform", "vanilla", "oracle"} <= arms.keys()
        assert arms["routed"]["steps"] == arms["uniform"]["steps"] == arms["vanilla"]["steps"]  # matched steps
        curve = arms["stage1"]["val_loss_by_eighth"]
        assert len(curve) == 8 and curve[-1] == round(arms["stage1"]["val_loss"], 5)
        for arm in ("routed", "shuffled", "uniform", "oracle"):
            # an interval of 2 clips per family need not contain the point estimate; only its order is fixed
            assert arms[arm]["specialisation.ci_low"] <= arms[arm]["specialisation.ci_high"]
            assert np.asarray(arms[arm]["expert_clip_losses"]).shape == (8, 4)  # held-out clips × experts
    assert report["per_seed"][0]["routed"]["val_loss"] != report["per_seed"][1]["routed"]["val_loss"]  # seeds differ
    for arm in ("routed", "shuffled", "uniform", "oracle"):
        assert report["arms"][arm]["ci_low"] <= report["arms"][arm]["ci_high"]
    assert set(report["verdict"]) >= {"stage1_at_plateau", "routed_interval_below_zero", "routed_beats_vanilla",
                                      "routed_beats_uniform", "per_checkpoint_shuffled_contains_zero"}  # fmt: skip
    assert "| routed |" in result.stdout


def _arm(deltas: list[float], seed_index: int, val_loss: float) -> dict:
    """One seed's metrics of an arm whose own-expert advantage is ``deltas[seed_index]`` (40 clips, 4 families)."""
    from lora_moe_core.evaluation import specialisation as spec
    from lora_moe_core.families import FAMILIES

    rng = np.random.default_rng(seed_index)
    family = np.arange(40) % 4
    per_clip = 4.0 + rng.normal(0, 0.002, size=(40, 4)) - deltas[seed_index] * np.eye(4)[family]
    members = [np.flatnonzero(family == f) for f in range(4)]
    metrics = spec.summarise({f"expert.{name}": per_clip[:, e] for e, name in enumerate(FAMILIES)}, members)
    return {**metrics, "val_loss": val_loss, "expert_clip_losses": per_clip.tolist()}


def test_method_verdict_reads_the_seed_interval_for_arms_and_counts_checkpoints():
    """Shuffled-like arms (small interactions whose sign flips by seed) pass the null criterion on the seed ×
    clip interval while failing it per checkpoint; a strongly routed arm passes; the 5% criterion is per seed."""
    from bench import method_report

    routed, shuffled, uniform = [0.3, 0.25, 0.28], [0.02, -0.02, 0.01], [0.0, 0.0, 0.0]
    per_seed = [{"stage1": {"val_loss": 4.1, "last_quarter_improvement": 0.004},
                 "routed": _arm(routed, s, 4.0), "shuffled": _arm(shuffled, s, 4.1), "uniform": _arm(uniform, s, 4.1),
                 "oracle": _arm(routed, s, 3.9), "vanilla": {"val_loss": 4.05}} for s in range(3)]  # fmt: skip
    members = [np.arange(f, 40, 4) for f in range(4)]
    arms = method_report.arm_intervals(per_seed, members)
    verdict = method_report.verdict(per_seed, arms)
    assert verdict["routed_interval_below_zero"] and verdict["per_checkpoint_routed_below_zero"] == "3/3"
    assert verdict["shuffled_interval_contains_zero"] and verdict["per_checkpoint_shuffled_contains_zero"] == "0/3"
    assert verdict["uniform_interval_contains_zero"]
    assert verdict["stage1_at_plateau"] and verdict["routed_beats_vanilla"] and verdict["routed_beats_uniform"]
    # a 0.25 advantage on a loss of ~4 raises the wrong experts' loss by ~6-8%: every seed clears 5%
    assert verdict["wrong_experts_raise_every_family_by_5pct"]
    per_seed[1]["stage1"]["last_quarter_improvement"] = 0.006
    assert not method_report.verdict(per_seed, arms)["stage1_at_plateau"]
    assert "| routed |" in method_report.markdown({"per_seed": per_seed, "arms": arms})
