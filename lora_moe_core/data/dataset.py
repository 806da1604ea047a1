"""Dataset input: a musubi dataset TOML, a JSONL manifest, or a folder holding either; local or ``s3://``.

Relative paths resolve against the folder of the file that names them (the TOML or the manifest), and may not
leave it: a manifest line ``../../etc/passwd`` is refused, so a pipeline never reads outside its dataset.

Captions are checked as they are read: at most ``MAX_CAPTION_CHARS`` characters and no control characters
but tab and line breaks (a NUL, an ANSI colour code or a bell is a data error, not text a model should learn).
UMT5 reads 512 tokens and cuts the rest, as in musubi-tuner and diffusers, so a caption below the limit may
still be truncated; one above it (a pasted log, a whole file) is refused rather than silently cut.

A video listed twice (another spelling of its path, a symlink, a hard link or a byte-identical copy included) is
kept once, with a ``warning:`` line naming both entries, or refused when the two entries disagree (another
caption): :mod:`~lora_moe_core.data.duplicates`.
"""

from __future__ import annotations

import math
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_moe_core.data.duplicates import Duplicate, drop_duplicates, warning_lines
from lora_moe_core.errors import UserError
from lora_moe_core.guards.parse import load_json, load_toml
from lora_moe_core.guards.text import MAX_TEXT_CHARS, check_text, decode_utf8
from lora_moe_core.storage.store import Storage, is_s3, parse_s3, resolve_under

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".webm", ".mkv")
EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")  # musubi's frame_extraction values
#: Longest caption accepted: twice what UMT5's 512 tokens hold in English (~4 characters a token).
MAX_CAPTION_CHARS = MAX_TEXT_CHARS
#: Largest bucket area (W·H) a dataset may ask for: 1080p, above Wan2.2's 1280x720. Every frame is resized to the
#: bucket before encoding, so [65536, 65536] would allocate 12 GiB per frame.
MAX_RESOLUTION_PIXELS = 1920 * 1080


@dataclass
class ClipSource:
    """One training video: where it is, its caption, and every field its manifest line carried."""

    video: str  # local path or s3:// URI, already resolved
    caption: str
    fields: dict[str, Any]  # the manifest line (video_path kept as written), for labels.jsonl
    source: str | None = None  # the manifest or caption file the caption came from
    origin: str | None = None  # where the entry is, for messages: "manifest.jsonl:3", a TOML entry and its video


@dataclass
class DatasetOptions:
    """musubi dataset-config settings that decide how clips are cut from the videos."""

    resolution: tuple[int, int] = (832, 480)  # (W, H) bucket area target
    target_frames: list[int] = field(default_factory=lambda: [81])
    frame_extraction: str = "head"
    frame_stride: int | None = None
    frame_sample: int | None = None
    max_frames: int | None = None
    source_fps: float | None = None
    bucket_no_upscale: bool = False

    def validate(self, where: str) -> DatasetOptions:
        """Check every value as musubi would use it; a one-line UserError naming ``where`` and the key otherwise.

        Runs before any video is decoded, so a typo fails in a second instead of once per video.
        """

        def fail(name: str, wanted: str) -> None:
            raise UserError(f"{where}: {name} must be {wanted}, got {getattr(self, name)!r}")

        resolution = self.resolution
        if (
            not isinstance(resolution, list | tuple)
            or len(resolution) != 2
            or not all(_is_int(v, 16) for v in resolution)
        ):
            fail("resolution", "[width, height], two integers >= 16 (e.g. [832, 480])")
        if resolution[0] * resolution[1] > MAX_RESOLUTION_PIXELS:
            fail("resolution", f"at most {MAX_RESOLUTION_PIXELS:,} pixels (1920x1080)")
        frames = self.target_frames
        if not isinstance(frames, list | tuple) or not frames or not all(_is_int(n, 1) and n % 4 == 1 for n in frames):
            fail("target_frames", "a non-empty list of 4k+1 frame counts (e.g. [17, 33, 81])")
        if self.frame_extraction not in EXTRACTION_MODES:
            fail("frame_extraction", f"one of {', '.join(EXTRACTION_MODES)}")
        for name in ("frame_stride", "frame_sample", "max_frames"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name), 1):
                fail(name, "a positive integer")
        fps = self.source_fps
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0):
            fail("source_fps", "a positive number of frames per second")
        if not isinstance(self.bucket_no_upscale, bool):
            fail("bucket_no_upscale", "true or false")
        self.resolution, self.target_frames = (int(resolution[0]), int(resolution[1])), [int(n) for n in frames]
        return self


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class Dataset:
    clips: list[ClipSource]
    options: DatasetOptions
    root: str  # folder of the dataset file (local path or s3:// prefix)
    files: list[str] = field(default_factory=list)  # dataset TOML(s) read, besides the clips' sources
    dropped: list[Duplicate] = field(default_factory=list)  # entries of a video listed before (:mod:`duplicates`)

    def input_files(self) -> list[str]:
        """Every file this dataset was read from: TOML, manifests, caption files, videos (what no output may
        overwrite)."""
        clips = [*((clip.source, clip.video) for clip in self.clips), *((d.source, d.video) for d in self.dropped)]
        sources = [source for source, _ in clips if source]
        return list(dict.fromkeys([*self.files, *sources, *(video for _, video in clips)]))


def _parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if is_s3(uri) else str(Path(uri).resolve().parent)


def _resolve(root: str, relative: str, what: str) -> str:
    """``root/relative`` for a local folder or an s3 prefix, refusing absolute paths and escapes."""
    if not is_s3(root):
        try:
            return str(resolve_under(root, relative))
        except UserError as exc:
            raise UserError(f"{what}: {exc}") from None
    if relative.startswith("/") or "://" in relative:
        raise UserError(f"{what} {relative!r} must be relative to {root}")
    bucket, prefix = parse_s3(root.rstrip("/"))
    key = posixpath.normpath(posixpath.join("/", prefix, relative))  # a leading "/" keeps ".." from leaving the root
    if not key.startswith(posixpath.join("/", prefix, "")):
        raise UserError(f"{what} {relative!r} escapes the dataset folder {root}")
    return f"s3://{bucket}{key}"


def _read_text(storage: Storage, uri: str, what: str) -> str:
    return decode_utf8(storage.read_bytes(uri), f"{what} {uri}")


def check_caption(caption: str, where: str, allow_empty: bool = False) -> str:
    """``caption`` stripped, or a UserError naming ``where`` when it is too long or holds control codes, bidi
    overrides or lone surrogates (:mod:`lora_moe_core.guards.text`), or is empty unless ``allow_empty``.

    A dataset allows empty captions: labelling gives such a clip no family (counted, like a caption naming no
    instrument) and caching skips it as a bad clip, so one empty caption does not abort a whole dataset."""
    caption = check_text(caption, where)
    if not caption and not allow_empty:
        raise UserError(f"{where}: empty caption")
    return caption


def _check_roi(roi: Any, where: str) -> None:
    """``roi`` (tool-tip boxes in source pixels) holds, per frame, one box [x0, y0, x1, y1], a list of boxes or []."""
    if roi is None:
        return
    if not isinstance(roi, list):
        raise UserError(f"{where}: 'roi' must be a list with one entry per frame, got {type(roi).__name__}")
    for index, frame in enumerate(roi):
        boxes = frame if frame and isinstance(frame, list) and isinstance(frame[0], list) else [frame] if frame else []
        if not isinstance(frame, list | None) or not all(_is_box(box) for box in boxes):
            raise UserError(f"{where}: 'roi' frame {index} must be a box [x0, y0, x1, y1], a list of boxes or [], "
                            f"got {frame!r}")  # fmt: skip


def _is_box(box: Any) -> bool:
    numbers = isinstance(box, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
    return numbers and len(box) == 4 and all(math.isfinite(v) for v in box)


def jsonl_records(text: str, uri: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line of a JSONL text; a bad line is a one-line error."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        yield number, load_json(line, f"{uri}:{number}")


def read_manifest(uri: str, storage: Storage, entry: str | None = None) -> list[ClipSource]:
    """JSONL with ``video_path`` and ``caption`` per line (any other fields are kept); ``entry`` names the TOML
    entry that lists the manifest, in messages."""
    root = _parent(uri)
    clips = []
    for number, record in jsonl_records(_read_text(storage, uri, "manifest"), uri):
        if not isinstance(record, dict):
            raise UserError(f"{uri}:{number}: each line must be a JSON object with 'video_path' and 'caption', "
                            f"got {type(record).__name__}")  # fmt: skip
        if not isinstance(record.get("video_path"), str):
            raise UserError(f"{uri}:{number}: each line needs a 'video_path' string")
        caption = record.get("caption")
        if not isinstance(caption, str):
            raise UserError(f'{uri}:{number}: missing caption for {record["video_path"]} ("" for none)')
        caption = check_caption(caption, f"{uri}:{number}", allow_empty=True)
        _check_roi(record.get("roi"), f"{uri}:{number}")
        video = _resolve(root, record["video_path"], f"{uri}:{number}: video_path")
        where = f"{uri}:{number}" if entry is None else f"{entry} ({uri}:{number})"
        clips.append(ClipSource(video=video, caption=caption, fields=record, source=uri, origin=where))
    if not clips:
        raise UserError(f"manifest {uri} lists no videos")
    return clips


def _directory_clips(storage: Storage, root: str, directory: str, caption_extension: str,
                     entry: str) -> list[ClipSource]:  # fmt: skip
    """The videos of a musubi ``video_directory`` and their caption files, none of them leaving ``root`` (a
    symlinked caption or video pointing elsewhere is refused as a ``..`` would be); ``entry`` names the TOML
    entry in messages."""
    videos = sorted(uri for uri in storage.list(directory) if uri.lower().endswith(VIDEO_EXTENSIONS))
    if not videos:
        raise UserError(f"video_directory {directory} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    clips = []
    for video in videos:
        stem, _ = posixpath.splitext(video) if is_s3(video) else (str(Path(video).with_suffix("")), None)
        caption_uri = stem + caption_extension
        relative = posixpath.relpath(video, directory) if is_s3(video) else str(Path(video).relative_to(directory))
        if not is_s3(video):
            video = _resolve(root, str(Path(video).relative_to(root)), f"video {video}")
            caption_uri = _resolve(root, str(Path(caption_uri).relative_to(root)), f"caption file {caption_uri}")
        if not storage.exists(caption_uri):
            raise UserError(f"missing caption file {caption_uri} for {video}")
        caption = check_caption(_read_text(storage, caption_uri, "caption file"), caption_uri, allow_empty=True)
        fields = {"video_path": relative, "caption": caption}
        clips.append(ClipSource(video=video, caption=caption, fields=fields, source=caption_uri,
                                origin=f"{entry} ({relative})"))  # fmt: skip
    return clips


def _options(uri: str, general: dict[str, Any], entry: dict[str, Any]) -> DatasetOptions:
    merged, defaults = {**general, **entry}, DatasetOptions()
    values = {name: merged.get(name, getattr(defaults, name)) for name in DatasetOptions.__dataclass_fields__}
    return DatasetOptions(**values).validate(uri)


def read_dataset_toml(uri: str, storage: Storage) -> Dataset:
    """musubi dataset config: ``[[datasets]]`` with ``video_directory`` (+ caption files) or ``video_jsonl_file``.

    Several ``[[datasets]]`` entries are concatenated; the clip-cutting options of the first apply to all.
    """
    config = load_toml(_read_text(storage, uri, "dataset config"), uri)
    entries, general = config.get("datasets"), config.get("general", {})
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{uri}: no [[datasets]] entry")
    if not isinstance(general, dict) or not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"{uri}: [general] and each [[datasets]] entry must be TOML tables")
    options = _options(uri, general, entries[0])
    root = _parent(uri)
    clips: list[ClipSource] = []
    for number, entry in enumerate(entries, start=1):
        _check_strings(uri, {**general, **entry}, ("video_directory", "video_jsonl_file", "caption_extension"))
        if "video_directory" in entry:
            directory = _resolve(root, entry["video_directory"], f"{uri}: video_directory")
            clips += _directory_clips(storage, root, directory, general.get("caption_extension", ".txt"),
                                      f"{uri} [[datasets]] entry {number}")  # fmt: skip
        elif "video_jsonl_file" in entry:
            manifest = _resolve(root, entry["video_jsonl_file"], f"{uri}: video_jsonl_file")
            clips += read_manifest(manifest, storage, f"{uri} [[datasets]] entry {number}")
        else:
            raise UserError(f"{uri}: a [[datasets]] entry needs video_directory or video_jsonl_file (images: no)")
    return Dataset(clips=clips, options=options, root=root, files=[uri])


def _check_strings(uri: str, table: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name in table and not isinstance(table[name], str):
            raise UserError(f"{uri}: {name} must be a string, got {table[name]!r}")


def _not_found(storage: Storage, missing: str, message: str) -> UserError:
    """The error for a missing dataset file; on ``s3://`` a missing bucket is named instead.

    Listing under the missing key is one cheap request that raises the storage's one-line bucket error.
    """
    if is_s3(missing):
        storage.list(missing)
    return UserError(message)


def load_dataset(uri: str, storage: Storage | None = None) -> Dataset:
    """Read a dataset from a TOML, a JSONL manifest, or a folder holding ``manifest.jsonl`` / ``dataset.toml``,
    each video once: an entry listing a video listed before is dropped with a ``warning:`` line on stderr naming
    both, and two entries of one video that disagree are refused (:mod:`~lora_moe_core.data.duplicates`).

    Raises:
        UserError: one line for a file that cannot be read, a bad entry, or a video listed twice ambiguously.
    """
    storage = storage or Storage()
    dataset = _read_dataset(str(uri), storage)
    dataset.clips, dataset.dropped = drop_duplicates(dataset.clips, storage, dataset.root)
    for line in warning_lines(dataset.dropped):
        print(line, file=sys.stderr)
    return dataset


def _read_dataset(uri: str, storage: Storage) -> Dataset:
    if not uri.endswith((".toml", ".jsonl", ".json")):
        manifest, toml = storage.join(uri, "manifest.jsonl"), storage.join(uri, "dataset.toml")
        has_manifest, has_toml = storage.exists(manifest), storage.exists(toml)
        if has_manifest and has_toml:
            # clips from the manifest (it carries tip boxes and true families), cutting options from the TOML
            options = read_dataset_toml(toml, storage).options
            return Dataset(read_manifest(manifest, storage), options, _parent(manifest), files=[toml])
        if has_manifest or has_toml:
            return _read_dataset(manifest if has_manifest else toml, storage)
        message = f"dataset {uri} not found: give a dataset .toml, a .jsonl manifest, or a folder with one"
        raise _not_found(storage, manifest, message)
    if not storage.exists(uri):
        raise _not_found(storage, uri, f"dataset {uri} does not exist")
    if uri.endswith(".toml"):
        return read_dataset_toml(uri, storage)
    return Dataset(clips=read_manifest(uri, storage), options=DatasetOptions(), root=_parent(uri))
