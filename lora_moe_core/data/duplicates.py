"""The same video listed twice in a dataset: kept once with a warning, or refused when its entries disagree.

musubi-tuner and diffusers' dataset scripts take every listed entry as a clip, so a video listed twice (the same
path, another spelling of it, a symlink, a hard link or a byte-identical copy under another name) is encoded twice
and weighs double in training without a word. Here a dataset holds each video once, for every reader of it
(``label``, ``cache``, the pipeline's data check): one ``warning:`` line names both entries and the later one is
dropped. When the two entries disagree (another caption, other tip boxes or families), dropping either would
change what the model learns from that video, so the dataset is refused with one line naming both.

Two entries are the same video when their resolved paths are equal (local paths are resolved, symlinks
included, as they are read) or when the files hold the same bytes (SHA-256: a hard link or a copy). Only files
whose size another listed video shares are hashed, so a dataset of distinct videos costs one ``stat`` per video
(one listing on ``s3://``), not a read of every recording.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_moe_core.errors import UserError, one_line
from lora_moe_core.guards.files import file_sha256
from lora_moe_core.storage.store import Storage, is_s3

#: duplicates named one per line; past this many, one more line counts the rest
MAX_WARNING_LINES = 10


@dataclass(frozen=True)
class Duplicate:
    """An entry dropped because an earlier one lists the same video."""

    kept: str  # where the kept entry is (file:line, or the TOML entry and video)
    dropped: str
    video: str  # the dropped entry's video
    same_as: str  # the kept entry's video
    how: str  # "is the same file as" (a hard link) or "holds the same bytes as" (a copy)
    source: str | None = None  # the dropped entry's manifest or caption file (still an input no output may replace)

    def line(self) -> str:
        video = same_video(self.same_as, self.video, self.how)
        return one_line(f"warning: {self.kept} and {self.dropped} list the same video {video}: cached once "
                        f"({self.dropped} dropped)")  # fmt: skip


def same_video(first: str, other: str, how: str) -> str:
    """``first``, or how ``other`` is the same video as ``first``, for messages."""
    return first if first == other else f"({other} {how} {first})"


def drop_duplicates(clips: list[Any], storage: Storage, root: str) -> tuple[list[Any], list[Duplicate]]:
    """``clips`` (:class:`~lora_moe_core.data.dataset.ClipSource`) with every video kept once, in order, and the
    entries dropped.

    Raises:
        UserError: two entries of one video with another caption or other fields, naming both.
    """
    identity = _identities([clip.video for clip in clips], storage, root)
    kept: dict[str, Any] = {}
    unique, dropped = [], []
    for clip in clips:
        key = identity(clip.video)
        first = kept.get(key)
        if first is None:
            kept[key] = clip
            unique.append(clip)
            continue
        how = "is the same file as" if _same_file(first.video, clip.video) else "holds the same bytes as"
        conflict = _conflict(first, clip)
        if conflict is not None:
            raise UserError(f"{origin(first)} and {origin(clip)} list the same video "
                            f"{same_video(first.video, clip.video, how)} with different {conflict}: which one is "
                            "meant? remove or fix one of them")  # fmt: skip
        dropped.append(Duplicate(origin(first), origin(clip), clip.video, first.video, how, clip.source))
    return unique, dropped


def warning_lines(dropped: list[Duplicate]) -> list[str]:
    """One line per dropped entry, at most :data:`MAX_WARNING_LINES` of them and then one that counts the rest."""
    lines = [duplicate.line() for duplicate in dropped[:MAX_WARNING_LINES]]
    if len(dropped) > MAX_WARNING_LINES:
        lines.append(f"warning: {len(dropped) - MAX_WARNING_LINES} more duplicate entries dropped "
                     f"({len(dropped)} in all)")  # fmt: skip
    return lines


def origin(clip: Any) -> str:
    """Where an entry is: ``manifest.jsonl:3``, a TOML entry and its video, or the video itself."""
    return clip.origin or clip.source or clip.video


def _conflict(first: Any, other: Any) -> str | None:
    """What differs between two entries of one video (``captions``, ``'roi'``...), or None when nothing does."""
    if first.caption != other.caption:
        return "captions"
    names = sorted((first.fields.keys() | other.fields.keys()) - {"video_path", "caption"})
    differing = [name for name in names if first.fields.get(name) != other.fields.get(name)]
    return ", ".join(f"'{name}'" for name in differing) or None


def _same_file(first: str, other: str) -> bool:
    if first == other:
        return True
    if is_s3(first):
        return False
    try:
        return os.path.samefile(first, other)
    except OSError:
        return False


def _identities(videos: list[str], storage: Storage, root: str) -> Callable[[str], str]:
    """A key per video, equal for the same video: its content hash where another listed video has its size (the
    same file under another name included), else its resolved path."""
    sizes = _sizes(videos, storage, root)
    shared = {size for size, count in Counter(sizes.values()).items() if count > 1}
    keys: dict[str, str] = {}
    for video in dict.fromkeys(videos):
        digest = _digest(video, storage) if sizes.get(video) in shared else None  # a hard link has its file's size
        keys[video] = f"sha256:{digest}" if digest else video
    return lambda video: keys[video]


def _sizes(videos: list[str], storage: Storage, root: str) -> dict[str, int]:
    """The size of each distinct, readable regular file among ``videos`` (missing ones are the cache's to report)."""
    distinct = list(dict.fromkeys(videos))
    if any(is_s3(video) for video in distinct):
        listed = storage.sizes(root)
        return {video: listed[video] for video in distinct if video in listed}
    sizes = {}
    for video in distinct:
        try:
            status = os.stat(video)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(status.st_mode):
            sizes[video] = status.st_size
    return sizes


def _digest(video: str, storage: Storage) -> str | None:
    """The SHA-256 of a video, or None when it cannot be read (the cache step reports it as a bad video)."""
    try:
        with storage.open_local(video) as local:
            return file_sha256(local, "video")
    except UserError:
        return None
