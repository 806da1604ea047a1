"""What a training-state marker (``training_state_step_N.json``) must hold before a resume reads any of it.

A marker is a file in a folder a user can edit or copy from elsewhere, so ``--resume`` treats it as input: it is
read only when it is a regular file (a FIFO would block), through the bounded JSON reader, and every field the
resume uses is checked for its type and shape against the structures the trainer itself writes
(:class:`~lora_moe_core.training.monitor.EpochStats`, :class:`~lora_moe_core.training.monitor.EarlyStopping`)
before any weight, moment or counter is loaded. The files it names must be plain names inside the marker's
folder, and stay there once symlinks are resolved: a marker never makes the trainer read from elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import read_regular_bytes
from lora_moe_core.guards.parse import load_json
from lora_moe_core.guards.text import decode_utf8
from lora_moe_core.training.monitor import EarlyStopping, EpochStats

MAX_COUNTER = 10**12  # steps, epochs, micro-batches: far beyond any run
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StateEscape(UserError):
    """A marker naming a file outside its own folder: refused outright, never skipped for an earlier save."""


def read_marker(path: Path) -> dict[str, Any]:
    """The parsed marker at ``path`` after every check of this module.

    Raises:
        StateEscape: a file it names lies outside its folder.
        UserError: not a regular file, not bounded JSON, or a field of the wrong type or shape.
    """
    what = f"training state {path}"
    payload = load_json(decode_utf8(read_regular_bytes(path, "training state"), what), what)
    problem = state_problem(payload) or loop_fields_problem(payload)
    if problem is not None:
        raise UserError(f"{what}: {problem}")
    for key in ("checkpoint", "optimizer"):
        escape = _escape(path.parent, payload[key])
        if escape is not None:
            raise StateEscape(f"{what}: '{key}' {escape}; a resume reads only files of the run's own folder")
    return payload


def _escape(folder: Path, name: str) -> str | None:
    """Why ``name`` (a file a marker names) is not a file of ``folder``, or None."""
    if Path(name).name != name or name in ("", ".", ".."):
        return f"{name!r} is a path, not a file name"
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        return f"{name!r} is a link to {target}, outside {folder}"
    return None


def state_problem(payload: Any) -> str | None:
    """What makes ``payload`` unusable as the marker of a save (the first field found), or None: its step and
    the files it names; the training loop's own fields are checked by :func:`loop_fields_problem`."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__}, not an object"
    problem = _counter_problem(payload, "step")
    if problem is not None:
        return problem
    for key in ("checkpoint", "optimizer"):
        if not isinstance(payload.get(key), str):
            return f"'{key}' must be a file name, got {_shown(payload.get(key))}"
    files = payload.get("files", {})
    if not isinstance(files, dict):
        return f"'files' must be an object, got {_shown(files)}"
    for name, entry in files.items():
        if not (isinstance(entry, dict) and _is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                and _SHA256.match(entry["sha256"])):  # fmt: skip
            return f'\'files\' entry {name!r} must be {{"bytes": int, "sha256": 64 hex digits}}'
    return None


def _counter_problem(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if not _is_int(value) or not 0 <= value <= MAX_COUNTER:
        return f"'{key}' must be an integer from 0 to {MAX_COUNTER}, got {_shown(value)}"
    return None


def loop_fields_problem(payload: dict[str, Any]) -> str | None:
    """What the training loop cannot resume from: its counters, history rows, early stopping, the epoch sums
    (this rank's and every rank's), in the structures it writes them; None when all are usable."""
    for key in ("epoch", "micro_step"):
        if (problem := _counter_problem(payload, key)) is not None:
            return problem
    if payload.get("stopped") is not None and not isinstance(payload["stopped"], str):
        return f"'stopped' must be text or null, got {_shown(payload['stopped'])}"
    history = payload.get("history", [])
    if not isinstance(history, list) or not all(_is_metrics(row) for row in history):
        return "'history' must be a list of {metric: number} objects"
    fields = {"early_stopping": EarlyStopping().state(), "epoch_stats": EpochStats().state()}
    for key, template in fields.items():
        if key in payload and not _matches(payload[key], template):
            return f"'{key}' does not have the fields and shapes the trainer writes"
    per_rank = payload.get("epoch_stats_per_rank", [])
    if not isinstance(per_rank, list) or not all(_matches(part, fields["epoch_stats"]) for part in per_rank):
        return "'epoch_stats_per_rank' must be a list of epoch statistics as the trainer writes them"
    return None


def _matches(value: Any, template: Any) -> bool:
    """``value`` has ``template``'s structure: the same keys (an empty template dict: any {text: number}), lists
    of the same length whose items match, numbers where it has numbers (integers where it has integers)."""
    if isinstance(template, dict):
        if not template:
            return _is_metrics(value)
        return isinstance(value, dict) and value.keys() == template.keys() and all(
            _matches(value[key], item) for key, item in template.items())  # fmt: skip
    if isinstance(template, list):
        return isinstance(value, list) and len(value) == len(template) and all(
            _matches(item, expected) for item, expected in zip(value, template, strict=True))  # fmt: skip
    if isinstance(template, int) and not isinstance(template, bool):
        return _is_int(value)
    return _is_number(value)


def _is_metrics(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short rendering of a bad value for the message (a hostile value can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
