"""bench/a14b_pipeline.py (issue 21) end to end on the tiny model on CPU: the stages the GPU run makes at A14B size,
the same code (files in the original Wan layouts, worker processes, SIGKILL then --resume auto, the records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("a14b")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "a14b_pipeline.py"), "--size", "tiny", "--work",
                             str(work / "run"), "--json", str(out), "--infer_steps", "2"],
                            capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


pytestmark = pytest.mark.slow  # nine worker processes: a few minutes on a shared 2-core machine


def test_every_stage_ran_and_was_measured(run):
    stages = run["stages"]
    assert list(stages) == ["files", "clips", "cache", "train_fast", "train_lowmem", "resume", "evaluate", "infer",
                            "export"]  # fmt: skip
    for name, record in stages.items():
        assert record["wall_s"] > 0 and record["peak_rss_gib_wait4"] > 0, name
        assert record["exit_code"] == (-9 if name == "train_lowmem" else 0), name
    assert run["card"] == "cpu" and run["plan"]["task"] == "tiny"
    loads = {event["event"] for event in stages["train_fast"]["events"]}
    assert {"load --dit", "load --dit_high_noise", "place DiTs + adapters (prepare_recipe)"} <= loads
    assert {"load --vae", "load --t5"} <= {event["event"] for event in stages["cache"]["events"]}
    assert stages["cache"]["clips_cached"] == {"train": 4, "heldout": 4}


def test_files_are_the_original_wan_layouts(run):
    files = run["stages"]["files"]["files"]
    assert files["dit"] == files["dit_high_noise"]  # one file serves both experts, as on the 64 GB disk
    with safe_open(files["dit"], framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("blocks.0.self_attn.q.weight").dtype == torch.bfloat16
    assert {"patch_embedding.weight", "blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "head.head.weight"} <= (
        keys
    )
    with safe_open(files["vae"], framework="pt") as handle:
        assert "decoder.middle.0.residual.0.gamma" in set(handle.keys())
    t5 = torch.load(files["t5"], weights_only=True, mmap=True)
    assert {"token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.gate.0.weight"} <= set(t5)


def test_the_killed_run_resumes_to_the_last_step(run):
    steps = run["plan"]["steps"]
    stages = run["stages"]
    assert len(stages["train_fast"]["step_times_s"]) == steps
    assert len(stages["resume"]["step_times_s"]) == steps - 1  # step 1 came from the killed run's save
    assert stages["resume"]["flags"]["resume"] == "auto" and stages["resume"]["flags"]["fp8_base"] is True
    lowmem = Path(stages["resume"]["final"]).parent
    assert (lowmem / "training_state_step_1.json").exists() and (lowmem / "training_state_final.json").exists()


def test_evaluate_infer_export_report_what_they_did(run):
    stages = run["stages"]
    metrics = stages["evaluate"]["metrics"]
    assert metrics["evaluation.clips"] == run["plan"]["eval_clips"] == 4
    assert metrics["evaluation.timesteps"] == len(run["plan"]["eval_timesteps"]) == 2
    assert metrics["evaluation.samples"] == 8 and metrics["val_loss.all.stage2"] > 0
    infer = stages["infer"]
    assert sum(infer["steps_per_expert"].values()) == 2 and infer["guidance"] == [4.0, 3.0]
    assert infer["video_bytes"] > 1000
    assert len(stages["export"]["files"]) >= 4  # one LoRA per family
