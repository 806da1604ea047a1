"""Start a training stage from code (a pipeline step): in this process, one process per GPU under torchrun, or
(Stage 2 on several nodes) as a Kubeflow Trainer TrainJob whose nodes each run torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_moe_core.config import Config, config_to_dict
from lora_moe_core.tracking.context import TrackingContext
from lora_moe_core.training.trainjob import Placement

if TYPE_CHECKING:
    from lora_moe_core.training.trainjob_client import WaitSettings


def launch_training(config: Config, gpus: int = 1, context: TrackingContext | None = None) -> list[dict[str, Any]]:
    """Train ``config`` and return the run's epoch history (``training_state_final.json``).

    ``gpus`` > 1 launches one process per GPU with ``torchrun`` (each node of a TrainJob
    does the same: ``lora_moe_core.training.node``);
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


def trainjob_uris(run_uri: str) -> tuple[str, str]:
    """Where a TrainJob's nodes find the launcher's config, and where they put the stage's files (as the
    single-pod step does: ``<run_uri>/stage2``)."""
    from lora_moe_core.storage.store import join

    return join(run_uri, "stage2-trainjob", "config.json"), join(run_uri, "stage2")


def launch_trainjob(config: Config, *, num_nodes: int, gpus_per_node: int, placement: Placement, run_uri: str,
                    name: str, namespace: str, wait: WaitSettings, context: TrackingContext | None = None,
                    api=None, log=print) -> list[dict[str, Any]]:  # fmt: skip
    """Train ``config`` on ``num_nodes`` nodes as a TrainJob (:mod:`~lora_moe_core.training.node` on each); return
    the epoch history, with the final checkpoint and state copied into ``config.training.output_dir``.

    ``api``: a kubernetes ``ApiClient`` (default: the pod's service account). Raises TrainJobFailed (a UserError)
    when the TrainJob fails or times out.
    """
    from lora_moe_core.storage.store import Storage
    from lora_moe_core.training.node import stage_files
    from lora_moe_core.training.trainjob import TrainJobRequest, build_trainjob
    from lora_moe_core.training.trainjob_client import TrainJobRunner, kube_api

    storage = Storage()
    output_dir = Path(config.training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_uri, stage_uri = trainjob_uris(run_uri)
    resolved = output_dir / "config.resolved.json"
    resolved.write_text(json.dumps(config_to_dict(config), indent=2, ensure_ascii=False), encoding="utf-8")
    storage.upload(resolved, config_uri)
    context = context or TrackingContext()
    command = ("lora-moe", "train-node", "--config_uri", config_uri, "--stage_uri", stage_uri,
               "--gpus_per_node", str(gpus_per_node))  # fmt: skip
    annotations = {"lora-moe/run-uri": run_uri, "lora-moe/kfp-run-id": context.kfp_run_id}
    request = TrainJobRequest(name=name, namespace=namespace, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
                              command=command, placement=placement, env=context.environ(),
                              annotations={k: v for k, v in annotations.items() if v})  # fmt: skip
    TrainJobRunner(api or kube_api(), wait, log).run(build_trainjob(request))
    checkpoint, state = stage_files(stage_uri)
    storage.download(checkpoint, output_dir / "lora_moe_final.safetensors")
    storage.download(state, output_dir / "training_state_final.json")
    return json.loads((output_dir / "training_state_final.json").read_text())["history"]
