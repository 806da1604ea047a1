"""Start a training stage from code (a pipeline step): in this process, or one process per GPU under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lora_moe_core.config import Config, config_to_dict
from lora_moe_core.tracking.context import TrackingContext


def launch_training(config: Config, gpus: int = 1, context: TrackingContext | None = None) -> list[dict[str, Any]]:
    """Train ``config`` and return the run's epoch history (``training_state_final.json``).

    ``gpus`` > 1 launches one process per GPU with ``torchrun`` (as manifests/optional/pytorchjob-stage2.yaml);
    the workers get the resolved config as a JSON file beside the checkpoints and ``context`` in their environment.

    Raises:
        SystemExit: naming the stage and the exit code when the torchrun workers fail (their error is printed).
    """
    from lora_moe_core.training.baseline_arm import resolve_arm

    config = resolve_arm(config)  # the arm's own config (and folder), which the workers then train as it is
    output_dir = Path(config.training.output_dir)
    if gpus > 1:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = output_dir / "config.resolved.json"
        resolved.write_text(json.dumps(config_to_dict(config), indent=2, ensure_ascii=False), encoding="utf-8")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "-m", "lora_moe_core"]
        env = {**os.environ, **(context or TrackingContext()).environ()}
        code = subprocess.run([*torchrun, "train", "--config", str(resolved)], env=env, check=False).returncode
        if code != 0:
            raise SystemExit(f"training ({config.training.training_stage}) failed with exit code {code} (see above)")
    else:
        from lora_moe_core.training.run import run_training

        run_training(config, context)
    return json.loads((output_dir / "training_state_final.json").read_text())["history"]
