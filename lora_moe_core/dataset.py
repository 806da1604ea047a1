"""Dataset input: a musubi dataset TOML, a JSONL manifest, or a folder holding either; local or ``s3://``.

Relative paths resolve against the folder of the file that names them (the TOML or the manifest), and may not
leave it: a manifest line ``../../etc/passwd`` is refused, so a pipeline never reads outside its dataset.
"""

from __future__ import annotations

import json
import posixpath
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError
from lora_moe_core.storage import Storage, is_s3, parse_s3, resolve_under

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".webm", ".mkv")


@dataclass
class ClipSource:
    """One training video: where it is, its caption, and every field its manifest line carried."""

    video: str  # local path or s3:// URI, already resolved
    caption: str
    fields: dict[str, Any]  # the manifest line (video_path kept as written), for labels.jsonl


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


@dataclass
class Dataset:
    clips: list[ClipSource]
    options: DatasetOptions
    root: str  # folder of the dataset file (local path or s3:// prefix)


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
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {uri} is not UTF-8 text") from None


def read_manifest(uri: str, storage: Storage) -> list[ClipSource]:
    """JSONL with ``video_path`` and ``caption`` per line (any other fields are kept)."""
    root = _parent(uri)
    clips = []
    for number, line in enumerate(_read_text(storage, uri, "manifest").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{uri}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("video_path"), str):
            raise UserError(f"{uri}:{number}: each line needs a 'video_path' string")
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise UserError(f"{uri}:{number}: empty or missing caption for {record['video_path']}")
        video = _resolve(root, record["video_path"], f"{uri}:{number}: video_path")
        clips.append(ClipSource(video=video, caption=caption.strip(), fields=record))
    if not clips:
        raise UserError(f"manifest {uri} lists no videos")
    return clips


def _directory_clips(storage: Storage, directory: str, caption_extension: str) -> list[ClipSource]:
    videos = sorted(uri for uri in storage.list(directory) if uri.lower().endswith(VIDEO_EXTENSIONS))
    if not videos:
        raise UserError(f"video_directory {directory} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    clips = []
    for video in videos:
        stem, _ = posixpath.splitext(video) if is_s3(video) else (str(Path(video).with_suffix("")), None)
        caption_uri = stem + caption_extension
        if not storage.exists(caption_uri):
            raise UserError(f"missing caption file {caption_uri} for {video}")
        caption = _read_text(storage, caption_uri, "caption file").strip()
        if not caption:
            raise UserError(f"empty caption in {caption_uri}")
        relative = posixpath.relpath(video, directory) if is_s3(video) else str(Path(video).relative_to(directory))
        clips.append(ClipSource(video=video, caption=caption, fields={"video_path": relative, "caption": caption}))
    return clips


def _options(general: dict[str, Any], entry: dict[str, Any]) -> DatasetOptions:
    merged = {**general, **entry}
    resolution = merged.get("resolution", [832, 480])
    return DatasetOptions(
        resolution=(int(resolution[0]), int(resolution[1])),
        target_frames=[int(n) for n in merged.get("target_frames", [81])],
        frame_extraction=str(merged.get("frame_extraction", "head")),
        frame_stride=merged.get("frame_stride"),
        frame_sample=merged.get("frame_sample"),
        max_frames=merged.get("max_frames"),
        source_fps=merged.get("source_fps"),
        bucket_no_upscale=bool(merged.get("bucket_no_upscale", False)),
    )


def read_dataset_toml(uri: str, storage: Storage) -> Dataset:
    """musubi dataset config: ``[[datasets]]`` with ``video_directory`` (+ caption files) or ``video_jsonl_file``.

    Several ``[[datasets]]`` entries are concatenated; the clip-cutting options of the first apply to all.
    """
    try:
        config = tomllib.loads(_read_text(storage, uri, "dataset config"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{uri}: invalid TOML: {exc}") from None
    entries = config.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{uri}: no [[datasets]] entry")
    root, general = _parent(uri), config.get("general", {})
    clips: list[ClipSource] = []
    for entry in entries:
        if "video_directory" in entry:
            directory = _resolve(root, entry["video_directory"], f"{uri}: video_directory")
            clips += _directory_clips(storage, directory, general.get("caption_extension", ".txt"))
        elif "video_jsonl_file" in entry:
            clips += read_manifest(_resolve(root, entry["video_jsonl_file"], f"{uri}: video_jsonl_file"), storage)
        else:
            raise UserError(f"{uri}: a [[datasets]] entry needs video_directory or video_jsonl_file (images: no)")
    return Dataset(clips=clips, options=_options(general, entries[0]), root=root)


def load_dataset(uri: str, storage: Storage | None = None) -> Dataset:
    """Read a dataset from a TOML, a JSONL manifest, or a folder holding ``manifest.jsonl`` / ``dataset.toml``."""
    storage = storage or Storage()
    uri = str(uri)
    if not uri.endswith((".toml", ".jsonl", ".json")):
        manifest, toml = storage.join(uri, "manifest.jsonl"), storage.join(uri, "dataset.toml")
        has_manifest, has_toml = storage.exists(manifest), storage.exists(toml)
        if has_manifest and has_toml:
            # clips from the manifest (it carries tip boxes and true families), cutting options from the TOML
            options = read_dataset_toml(toml, storage).options
            return Dataset(clips=read_manifest(manifest, storage), options=options, root=_parent(manifest))
        if has_manifest or has_toml:
            return load_dataset(manifest if has_manifest else toml, storage)
        raise UserError(f"dataset {uri} not found: give a dataset .toml, a .jsonl manifest, or a folder with one")
    if not storage.exists(uri):
        raise UserError(f"dataset {uri} does not exist")
    if uri.endswith(".toml"):
        return read_dataset_toml(uri, storage)
    return Dataset(clips=read_manifest(uri, storage), options=DatasetOptions(), root=_parent(uri))
