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
