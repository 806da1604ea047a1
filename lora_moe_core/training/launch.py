"""Start ``lora-moe train`` from code (a pipeline step): in this process, or one process per GPU under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def resolve_config(config: str) -> Path:
    """A config path as given, or relative to the folder holding ``lora_moe_core`` (an image's ``/app``)."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    import lora_moe_core

    return Path(lora_moe_core.__file__).resolve().parents[1] / config


def launch_training(argv: list[str], gpus: int, output_dir: Path, stage: str) -> list[dict[str, Any]]:
    """Run ``lora-moe <argv>`` (``argv`` starts with ``train``) and return the run's epoch history.

    ``gpus`` > 1 launches one process per GPU with ``torchrun`` (as manifests/optional/pytorchjob-stage2.yaml).

    Raises:
        SystemExit: naming ``stage`` and the exit code when training fails (its error line is already printed).
    """
    if gpus > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "-m", "lora_moe_core"]
        code = subprocess.run([*torchrun, *argv], check=False).returncode
    else:
        from lora_moe_core.cli.main import main

        code = main(argv)
    if code != 0:
        raise SystemExit(f"lora-moe train ({stage}) failed with exit code {code} (see the error above)")
    return json.loads((output_dir / "training_state_final.json").read_text())["history"]
