"""Checkpoint and resume files: the adapter file, the optimizer state (safetensors) and a JSON state file.

A save at step N writes ``<prefix>_step_N.safetensors``, ``optimizer_step_N.safetensors`` and, last,
``training_state_step_N.json``; the JSON is the marker of a complete save, so a run killed mid-save resumes
from the previous one. Nothing is pickled: a resume path given by a user is read with safetensors and JSON.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_moe_core.errors import UserError
from lora_moe_core.safetensors_io import read_safetensors, write_safetensors

STATE_FILE = re.compile(r"^training_state_step_(\d+)\.json$")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state to ``{"<param>.<key>": tensor}`` plus its param groups as metadata."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors, metadata = read_safetensors(path, what="optimizer state")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path}: optimizer state does not match this run ({exc})") from None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2, ensure_ascii=False)
    os.replace(temporary, path)


def save_step(output_dir: Path, step: int, checkpoint: Path, optimizer: torch.optim.Optimizer,
              state: dict[str, Any]) -> Path:  # fmt: skip
    """Write the optimizer state and the JSON marker for a checkpoint already written at ``checkpoint``."""
    tensors, metadata = optimizer_tensors(optimizer)
    optimizer_path = write_safetensors(tensors, output_dir / f"optimizer_step_{step}.safetensors", metadata)
    marker = output_dir / f"training_state_step_{step}.json"
    write_json(marker, {**state, "checkpoint": checkpoint.name, "optimizer": optimizer_path.name})
    return marker


def find_resume(output_dir: Path, resume: str) -> Path | None:
    """The state file to resume from: ``auto`` = latest complete save in ``output_dir`` (None if none)."""
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            return find_resume(path, "auto") or _no_state(path)
        if not path.is_file():
            raise UserError(f"--resume {resume}: no such training_state_step_N.json")
        return path
    candidates = sorted(((int(m[1]), p) for p in output_dir.glob("training_state_step_*.json")
                         if (m := STATE_FILE.match(p.name))), reverse=True)  # fmt: skip
    for _, path in candidates:
        state = read_state(path)
        if all((path.parent / state[key]).is_file() for key in ("checkpoint", "optimizer")):
            return path
    return None


def _no_state(path: Path) -> Path:
    raise UserError(f"--resume {path}: the folder holds no complete training_state_step_N.json")


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read training state {path}: {exc}") from None
