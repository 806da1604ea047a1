"""The GPU benchmarks keep working: their --smoke mode runs the same code on the tiny model on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
