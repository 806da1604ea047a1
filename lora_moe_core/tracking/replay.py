"""Send what a tracker could not: replay a ``tracking_fallback.jsonl`` to MLflow (``lora-moe sync-tracking``).

While MLflow is unreachable, :class:`tracking.MLflowTracker` appends every call to the fallback file. Calls the
tracker later replayed itself are followed by a ``replayed`` line; the rest never reached the server (the run
ended, or was killed, during the outage). This module sends those, per tracker, in their original order: to the
run they were logged for, or to a new run made from the tracker's header line (experiment, name, tags) when
the server was down from the start. It then appends a ``replayed`` line, so a second replay sends nothing.
Metrics keep their original step and timestamp (MLflow drops exact duplicates), so a call that did reach the
server just before an outage and is sent again does not show twice.

A fallback file is input like any other, and a tampered one must not exfiltrate or plant files: the replay sends
only to the tracking URI the user passes or ``MLFLOW_TRACKING_URI`` names (else the run folder's own
``mlruns.db``, where a run without a URI logs), never to the one a header line claims, and uploads only files that
lie inside the folder holding the fallback file (paths resolved, symlinks inside artifact folders included). The
whole file is checked before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_moe_core.defaults import EXPERIMENT
from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import read_regular_bytes
from lora_moe_core.guards.parse import load_json
from lora_moe_core.guards.text import decode_utf8
from lora_moe_core.redaction import redact_url
from lora_moe_core.tracking.mlflow_client import (
    _REJECTED_CODES,
    _Rejected,
    _set_http_defaults,
    _short,
    resolve_tracking_uri,
)
from lora_moe_core.tracking.tracker import MLflowTracker

log = logging.getLogger(__name__)
SENDABLE = frozenset({"params", "metrics", "tags", "artifact", "dataset", "close"})


@dataclass
class ReplayedRun:
    """What one tracker's unsent calls became."""

    run_id: str
    tracking_uri: str
    calls: int = 0  # calls accepted by the server
    metric_steps: list[int] = field(default_factory=list)
    refused: int = 0  # calls the server answered with a refusal (logged, not retried)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The tracking lines of a fallback file; a garbage line (but a last one cut short) is a one-line error."""
    text = decode_utf8(read_regular_bytes(path, "tracking fallback file"), f"tracking fallback file {path}")
    raws = text.splitlines()
    lines = []
    for number, raw in enumerate(raws, 1):
        if not raw.strip():
            continue
        try:
            line = load_json(raw, f"{path}:{number}")
        except UserError:
            if number < len(raws):
                raise
            log.warning("tracking: %s line %d is not JSON (cut short?); skipped", path, number)
            continue  # the last line of a process killed mid-write
        problem = _line_problem(line)
        if problem:
            raise UserError(f"{path}:{number}: {problem}: not a line of a tracking_fallback.jsonl a run wrote")
        lines.append(line)
    if not lines:
        raise UserError(f"{path} holds no tracking line: not a tracking_fallback.jsonl a run wrote")
    return lines


def _line_problem(line: Any) -> str | None:
    """What makes a parsed line unusable by the replay (the fields ``_unsent`` and ``_replay_tracker`` read)."""
    if not isinstance(line, dict):
        return f"a {type(line).__name__}, not an object"
    if not isinstance(line.get("tracker"), str) or not isinstance(line.get("kind"), str):
        return "no 'tracker' and 'kind' strings"
    number = {"replayed": "upto", **dict.fromkeys(SENDABLE, "seq")}.get(line["kind"])
    if number and (not isinstance(line.get(number), int) or isinstance(line.get(number), bool)):
        return f"'{line['kind']}' line without an integer '{number}'"
    kind = line["kind"]
    if kind in ("metrics", "params", "tags") and not isinstance(line.get(kind), dict):
        return f"'{kind}' line without a '{kind}' object"
    if kind == "metrics" and not all(isinstance(line.get(key), int) for key in ("step", "timestamp")):
        return "'metrics' line without integer 'step' and 'timestamp'"
    if kind in SENDABLE and not isinstance(line.get("run_name"), str):
        return f"'{kind}' line without a 'run_name'"
    if kind == "artifact" and not isinstance(line.get("path"), str):
        return "'artifact' line without a 'path' string"
    if kind == "artifact" and not _relative_artifact_path(line.get("artifact_path")):
        return "'artifact' line whose 'artifact_path' is not a relative folder name"
    return None


def _relative_artifact_path(value: Any) -> bool:
    """None, or a relative path that stays inside the run's artifact root (no ``..``, no absolute path)."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    return not value.startswith(("/", "\\")) and ".." not in value.replace("\\", "/").split("/")


def _escaping_file(artifact: Path, root: Path) -> Path | None:
    """The first file or folder under ``artifact`` (itself included) whose resolved path leaves ``root``."""
    resolved = artifact.resolve()
    if not resolved.is_relative_to(root):
        return artifact
    if not resolved.is_dir():
        return None
    seen = {resolved}
    # followlinks: MLflow's local artifact store copies folders with copytree, which follows links inside them
    for folder, dirs, files in os.walk(resolved, followlinks=True):
        for name in [*dirs, *files]:
            entry = Path(folder, name)
            target = entry.resolve()
            if not target.is_relative_to(root):
                return entry
            if name in dirs and target in seen:
                dirs.remove(name)  # a link loop: walked once
            seen.add(target)
    return None


def _refuse_foreign_artifacts(path: Path, calls: list[dict[str, Any]]) -> None:
    """Refuse a replay whose artifact lines name files outside the run folder that wrote ``path``."""
    root = path.resolve().parent
    for call in calls:
        if call["kind"] != "artifact":
            continue
        escaping = _escaping_file(Path(call["path"]), root)
        if escaping is not None:
            raise UserError(f"{path}: artifact {escaping} (seq {call['seq']}) lies outside the run folder {root}; "
                            "sync-tracking uploads only the run's own files")  # fmt: skip


def replay_uri(path: Path, tracking_uri: str | None, lines: list[dict[str, Any]]) -> str:
    """Where a replay sends: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the run folder's own sqlite
    store. A header naming any other place is refused, not followed: the file could have been edited.

    Raises:
        UserError: no URI given and the file was logged for another tracking store.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    default = resolve_tracking_uri(None, path.resolve().parent)
    recorded = sorted({line.get("tracking_uri") for line in lines if line["kind"] == "run"} - {None, default}, key=str)
    if recorded:
        raise UserError(f"{path} was logged for MLflow at {redact_url(str(recorded[0]))}; sync-tracking sends only "
                        "where you say: pass --tracking_uri or set MLFLOW_TRACKING_URI")  # fmt: skip
    return default


def _unsent(lines: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None, list[dict[str, Any]]]:
    """A tracker's header, its latest known run id, and its calls after the last ``replayed`` line."""
    header = next((line for line in lines if line["kind"] == "run"), {})
    run_id = next((line["run_id"] for line in reversed(lines) if line.get("run_id")), None)
    done = max((line["upto"] for line in lines if line["kind"] == "replayed"), default=0)
    calls = [line for line in lines if line["kind"] in SENDABLE and "refused" not in line and line["seq"] > done]
    return header, run_id, sorted(calls, key=lambda line: line["seq"])


def replay_fallback(path: str | Path, tracking_uri: str | None = None) -> list[ReplayedRun]:
    """Send the unsent calls of a fallback file; returns one report per run that received calls.

    Args:
        path: the ``tracking_fallback.jsonl`` a run left.
        tracking_uri: where to send (default: ``MLFLOW_TRACKING_URI``, else the run folder's ``mlruns.db``;
            see :func:`replay_uri`).

    Raises:
        UserError: the file cannot be read, names files outside its run folder or another tracking store, or the
            server is still unreachable (what was sent is recorded).
    """
    path = Path(path)
    lines = _read_lines(path)
    uri = replay_uri(path, tracking_uri, lines)
    by_tracker: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_tracker.setdefault(line["tracker"], []).append(line)
    pending = [(tracker_id, *_unsent(tracker_lines)) for tracker_id, tracker_lines in by_tracker.items()]
    for *_, calls in pending:
        _refuse_foreign_artifacts(path, calls)
    _set_http_defaults()
    return [_replay_tracker(path, tracker_id, header, run_id, calls, uri)
            for tracker_id, header, run_id, calls in pending if calls]  # fmt: skip


def _replay_tracker(path: Path, tracker_id: str, header: dict[str, Any], run_id: str | None,
                    calls: list[dict[str, Any]], uri: str) -> ReplayedRun:  # fmt: skip
    tracker = MLflowTracker(uri, header.get("run_name") or calls[0]["run_name"], header.get("experiment", EXPERIMENT),
                            header.get("tags"), fallback_path=path, run_id=run_id)  # fmt: skip
    tracker.tracker_id, sent = tracker_id, None
    try:
        tracker._ensure_run()
        report = ReplayedRun(tracker.run_id, redact_url(uri))
        for call in calls:
            try:
                tracker._send(call)
            except Exception as exc:  # noqa: BLE001 - a refusal is skipped, anything else is an outage
                if not (isinstance(exc, _Rejected) or getattr(exc, "error_code", None) in _REJECTED_CODES):
                    raise
                report.refused += 1
                log.warning("tracking: %s (seq %d) refused: %s", call["kind"], call["seq"], _short(exc))
            else:
                report.calls += 1
                report.metric_steps += [call["step"]] if call["kind"] == "metrics" else []
            sent = call["seq"]
    except Exception as exc:  # noqa: BLE001
        where = redact_url(uri)
        raise UserError(f"MLflow at {where} is unreachable or refused the run ({_short(exc)}); rerun `lora-moe "
                        f"sync-tracking {path}` once it is back (--tracking_uri if it moved)") from None  # fmt: skip
    finally:
        if sent is not None:
            _append(path, {"kind": "replayed", "tracker": tracker_id, "run_id": tracker.run_id, "upto": sent})
    return report


def _append(path: Path, line: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
