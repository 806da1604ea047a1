"""Output folders a command replaces: written only when empty, new, already the same command's, or ``--overwrite``.

``synth-data`` rewrites a folder's manifest and deletes the clips it did not write; ``cache`` rewrites entries.
Pointed at a user's dataset by mistake, either would destroy it. A command that owns a folder leaves a hidden
marker (:data:`OWNER_FILE`, ``{"command": "synth-data"}``) in it, so rerunning the same command into its own
folder works as before, while a non-empty folder without the marker (a user's, or another command's) is refused
unless the user says ``--overwrite``. Object-store prefixes carry no marker and are not checked here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import os_reason, removed_on_failure

OWNER_FILE = ".lora-moe-owner"


def owner_of(folder: Path) -> str | None:
    """The command whose marker ``folder`` holds, or None (no marker, or one that is not ours)."""
    marker = folder / OWNER_FILE
    try:
        if marker.is_file() and marker.stat().st_size < 4096:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("command")
            return owner if isinstance(owner, str) else None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def check_owned(folder: str | os.PathLike[str], command: str, overwrite: bool = False) -> None:
    """Refuse ``folder`` when it holds anything and is not ``command``'s own, unless ``overwrite``.

    Raises:
        UserError: naming the folder, who owns it, and ``--overwrite``.
    """
    folder = Path(folder)
    if overwrite or not folder.is_dir():
        return
    try:
        held = [entry.name for entry in os.scandir(folder) if entry.name != OWNER_FILE]
    except OSError as exc:
        raise UserError(f"{command}: cannot read output folder {folder}: {os_reason(exc)}") from None
    owner = owner_of(folder)
    if held and owner != command:
        whose = f"`lora-moe {owner}`'s output" if owner else "not a folder this command wrote"
        raise UserError(f"{command}: output folder {folder} already holds {len(held)} entries ({whose}, e.g. "
                        f"{sorted(held)[0]}); choose an empty folder or pass --overwrite")  # fmt: skip


@contextlib.contextmanager
def owned_output(folder: str | os.PathLike[str], command: str, overwrite: bool = False,
                 keep_files: bool = False) -> Iterator[Path]:  # fmt: skip
    """:func:`check_owned`, then the folder created as :func:`~lora_moe_core.guards.files.removed_on_failure`
    does and marked as ``command``'s. A marker this call wrote goes again when the block fails, but where
    ``keep_files`` keeps what the block published."""
    check_owned(folder, command, overwrite)
    with removed_on_failure(folder, keep_files=keep_files) as out:
        marker = out / OWNER_FILE
        wrote = owner_of(out) != command
        try:
            if wrote:
                marker.write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write to output folder {out}: {os_reason(exc)}") from None
        try:
            yield out
        except BaseException:
            # the marker goes unless kept files (a cache's published entries) make the folder this command's
            if wrote and not (keep_files and any(entry.name != OWNER_FILE for entry in os.scandir(out))):
                marker.unlink(missing_ok=True)
            raise
