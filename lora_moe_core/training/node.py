"""``lora-moe train-node``: what each pod of a multi-node Stage-2 TrainJob runs.

The pods share no folder, only the object store. Every node downloads the resolved config (the launcher's
``config_uri``, beside ``<stage_uri>``) and whatever an earlier attempt saved under ``<stage_uri>``, then starts
``torchrun`` over its GPUs with ``--resume auto``: torchrun takes the node count, this node's rank and the
rendezvous address from the ``PET_*`` variables Kubeflow Trainer's Torch plugin sets. Global rank 0 (static
rendezvous: on node 0) writes the checkpoints; node 0 copies its folder to ``<stage_uri>`` when torchrun ends,
also when it failed or was stopped, so the next attempt resumes from the last save.

A SIGTERM (the pod deleted or pre-empted) is passed on to torchrun, which passes it to the workers: they save after
the current step and exit, and node 0 uploads that save in the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lora_moe_core.config import config_to_dict, load_config
from lora_moe_core.errors import UserError
from lora_moe_core.storage.store import Storage, is_s3, join

CONFIG_NAME = "config.resolved.json"
#: config fields naming input files that a node reads locally: an s3:// value is downloaded first
_INPUT_FILES = (("lora_moe", "base_lora_weights"), ("lora_moe", "lora_moe_weights"), ("loss", "classifier_weights"))


def node_rank(environ: dict[str, str] | None = None) -> int:
    """This node's rank from ``PET_NODE_RANK`` (0 when unset: a single node)."""
    value = (os.environ if environ is None else environ).get("PET_NODE_RANK", "0")
    if not value.isdigit():
        raise UserError(f"PET_NODE_RANK {value!r} is not a node rank")
    return int(value)


def _local_inputs(data: dict, work_dir: Path, storage: Storage) -> dict:
    for section, key in _INPUT_FILES:
        uri = data.get(section, {}).get(key)
        if isinstance(uri, str) and is_s3(uri):
            data[section][key] = str(storage.download(uri, work_dir / "inputs" / section / Path(uri).name))
    return data


def prepare_node(config_uri: str, stage_uri: str, work_dir: Path, storage: Storage) -> Path:
    """Download the config, its s3:// input files and the earlier saves; returns the node's config file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    downloaded = storage.download(config_uri, work_dir / "launcher" / CONFIG_NAME)
    data = _local_inputs(json.loads(downloaded.read_text(encoding="utf-8")), work_dir, storage)
    output_dir = work_dir / "output"
    data["training"].update(output_dir=str(output_dir), resume="auto")
    config = load_config(_write(work_dir / "launcher" / "node.json", data))  # validated before torchrun starts
    if storage.exists(stage_uri):
        copied = storage.sync_dir_from(stage_uri, output_dir)
        print(f"node {node_rank()}: {len(copied)} file(s) of an earlier attempt from {stage_uri}")
    return _write(output_dir / CONFIG_NAME, config_to_dict(config))


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def run_torchrun(config_file: Path, gpus_per_node: int) -> int:
    """``torchrun --nproc_per_node G -m lora_moe_core train --config F``; SIGTERM is forwarded. Returns its code."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus_per_node),
            "-m", "lora_moe_core", "train", "--config", str(config_file)]  # fmt: skip
    process = subprocess.Popen(argv)
    # In a container this process is PID 1, which the default SIGTERM action does not end: pass it on instead.
    previous = signal.signal(signal.SIGTERM, lambda number, frame: process.send_signal(number))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_node(config_uri: str, stage_uri: str, gpus_per_node: int, work_dir: Path) -> int:
    """One node of the TrainJob, start to end; returns torchrun's exit code (0: this node's share is done)."""
    if gpus_per_node < 1:
        raise UserError(f"--gpus_per_node {gpus_per_node} must be at least 1")
    storage = Storage()
    rank = node_rank()
    config_file = prepare_node(config_uri, stage_uri, Path(work_dir), storage)
    code = run_torchrun(config_file, gpus_per_node)
    if rank == 0:
        copied = storage.sync_dir_to(config_file.parent, stage_uri)
        print(f"node 0: {len(copied)} file(s) to {stage_uri} (torchrun exit code {code})")
    return code


def stage_files(stage_uri: str) -> tuple[str, str]:
    """The final checkpoint and the final state of a finished Stage-2 run under ``stage_uri``."""
    return join(stage_uri, "lora_moe_final.safetensors"), join(stage_uri, "training_state_final.json")
