"""Checkpoint and resume files: the adapter file, the optimizer state (safetensors) and a JSON state file.

A save at step N writes ``<prefix>_step_N.safetensors``, ``optimizer_step_N.safetensors`` and, last,
``training_state_step_N.json``; the JSON is the marker of a complete save, so a run killed mid-save resumes
from the previous one. Every file is written to a hidden temporary name and renamed into place, so a visible
file is always whole; the two data files are flushed to disk before the marker is written, and the marker
records their size and SHA-256, so a file damaged later (a node crash before the page cache reached the disk,
a truncated copy) is noticed on resume and that save skipped for the previous one, as object stores verify
checksums. A legacy marker (written before checksums were recorded: no ``files``) is still read; its files must
then be whole safetensors files, checked from their headers before anything is loaded. Nothing is pickled: a
resume path given by a user is read with safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from lora_moe_core.errors import UserError
from lora_moe_core.formats.safetensors_io import read_safetensors, whole_file_problem, write_safetensors
from lora_moe_core.guards.parse import load_json
from lora_moe_core.training.saved_state import StateEscape, read_marker

_MOMENT_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})  # AdamW's per-parameter state
STATE_FILE = re.compile(r"^training_state_step_(\d+)\.json$")
# Temporary names of the files a save writes: our atomic writers' ".<target>.<random>.tmp", and ".tmpXXXXXX" where
# safetensors' own writer (Rust tempfile crate) puts the data before renaming it over ours.
PARTIAL_FILE = re.compile(
    r"^\.(?:(?:\w+_(?:step_\d+|final)\.safetensors|optimizer_step_\d+\.safetensors|training_state_(?:step_\d+|final)"
    r"\.json)\.\w+\.tmp|tmp[A-Za-z0-9]{6})$"
)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state to ``{"<param>.<key>": tensor}`` plus its param groups as metadata."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load AdamW moments saved by :func:`optimizer_tensors`, each checked against this run's parameters first
    (a moment of another shape would load silently and fail, or broadcast, at the next step)."""
    tensors, metadata = read_safetensors(path, what="optimizer state")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params) or key not in _MOMENT_KEYS:
            raise UserError(f"{path}: optimizer state holds {name!r}, not a moment of this run's {len(params)} "
                            "parameters")  # fmt: skip
        expected = params[int(index)].shape if key != "step" else torch.Size()
        if tensor.shape != expected or not tensor.is_floating_point():
            raise UserError(f"{path}: optimizer moment {name!r} is {tuple(tensor.shape)} {tensor.dtype}, this run's "
                            f"parameter needs {tuple(expected)} floating point")  # fmt: skip
        state.setdefault(int(index), {})[key] = tensor
    groups = load_json((metadata or {}).get("param_groups", "null"), f"{path} metadata 'param_groups'")
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise UserError(f"{path}: optimizer state has no 'param_groups' list in its metadata")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: optimizer state does not match this run ({exc})") from None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic, durable JSON write: a hidden temporary file, flushed to disk, renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666, not mkstemp (0o600): the file gets the umask's usual permissions, like any output
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2, ensure_ascii=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def file_digest(path: Path, flush: bool = False) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file; ``flush`` also forces its data to disk first."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if flush:
            os.fsync(handle.fileno())
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        size = handle.tell()
    return {"bytes": size, "sha256": digest.hexdigest()}


def save_step(output_dir: Path, step: int, checkpoint: Path, optimizer: torch.optim.Optimizer,
              state: dict[str, Any]) -> Path:  # fmt: skip
    """Write the optimizer state, then the JSON marker, for a checkpoint already written at ``checkpoint``.

    The marker comes last and holds the size and SHA-256 of both files, read back after they were flushed.
    """
    tensors, metadata = optimizer_tensors(optimizer)
    optimizer_path = write_safetensors(tensors, output_dir / f"optimizer_step_{step}.safetensors", metadata)
    files = {path.name: file_digest(path, flush=True) for path in (checkpoint, optimizer_path)}
    _fsync_dir(output_dir)
    marker = output_dir / f"training_state_step_{step}.json"
    write_json(marker, {**state, "checkpoint": checkpoint.name, "optimizer": optimizer_path.name, "files": files})
    return marker


def find_resume(output_dir: Path, resume: str) -> Path | None:
    """The state file to resume from: ``auto`` = latest complete save in ``output_dir`` (None if none).

    A save whose marker is unreadable or whose files are missing or differ from the size and SHA-256 recorded
    at save time is skipped, with a printed note, for the one before it. An explicit marker path must be whole.
    """
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            return find_resume(path, "auto") or _no_state(path)
        if not path.exists():
            raise UserError(f"--resume {resume}: no such training_state_step_N.json")
        problem = check_save(path)
        if problem is not None:
            raise UserError(f"--resume {resume}: {problem}")
        return path
    candidates = sorted(((int(m[1]), p) for p in output_dir.glob("training_state_step_*.json")
                         if (m := STATE_FILE.match(p.name))), reverse=True)  # fmt: skip
    for _, path in candidates:
        problem = check_save(path)
        if problem is None:
            return path
        print(f"skipping {path.name}: {problem}; trying the save before it")
    return None


def check_save(marker: Path) -> str | None:
    """Why the save of ``marker`` cannot be resumed from (unreadable, file missing or damaged); None if whole.

    Raises:
        StateEscape: the marker names a file outside its folder (a tampered marker is refused, not skipped).
    """
    try:
        state = read_marker(marker)
    except StateEscape:
        raise
    except UserError as exc:
        return f"unreadable marker ({str(exc).removeprefix(f'training state {marker}: ')})"
    recorded = state.get("files") or {}
    for name in (state["checkpoint"], state["optimizer"]):
        path = marker.parent / name
        if not path.is_file():
            return f"{name} is missing"
        if name in recorded:
            actual = file_digest(path)
            if actual != recorded[name]:
                what = "size" if actual["bytes"] != recorded[name].get("bytes") else "SHA-256"
                return f"{name} is damaged ({what} differs from the one recorded at save time)"
        elif (problem := whole_file_problem(path, "saved state")) is not None:
            # a legacy marker, written before checksums were recorded, names its files only: they must at least be
            # whole safetensors files (a truncated copy is found here, before anything is loaded)
            return f"{name} is damaged ({problem})"
    return None


def remove_partial_files(output_dir: Path) -> int:
    """Delete temporary files an interrupted save left in ``output_dir``; returns how many.

    Only one process writes a run's folder (rank 0), so a temporary file present at start-up is dead.
    """
    removed = 0
    for path in output_dir.glob(".*"):
        if PARTIAL_FILE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _no_state(path: Path) -> Path:
    raise UserError(f"--resume {path}: the folder holds no complete training_state_step_N.json")


def read_state(path: Path) -> dict[str, Any]:
    """A marker, every field checked (:func:`~lora_moe_core.training.saved_state.read_marker`)."""
    return read_marker(path)
