"""Latent caching: videos → musubi-compatible latent and text files, plus ROI weight maps and labels.

Per source video ``clip_0003.mp4`` (832×480 source, a 33-frame clip at 0) the cache holds::

    clip_0003_00000-033_0832x0480_wan.safetensors   latents_9x60x104_bfloat16 [16, 9, 60, 104] (musubi key)
                                                    roi_weights_9x60x104 [9, 60, 104], instrument_probs [4],
                                                    instrument_labels [4] (multi-hot)        (our keys)
    clip_0003_wan_te.safetensors                    varlen_t5_bfloat16 [L, 4096]             (musubi key)
    clip_0003_lora_moe.json                         done-marker: content hash and the files above

Files are written to a staging folder (hidden, inside a local output, so that the final rename is atomic on the
same file system) and published text file first, latent files next, marker last: a killed run or a full disk
never leaves a visible latent file without its text file, nor a marker naming a missing or partial file. Ctrl-C
waits for the entry being published and for the removal of the staging folder, so it leaves every visible entry
whole and no staging folder behind (the CLI exits 130). A rerun
skips every video whose marker holds the same content hash (video bytes, caption, labels and settings) and
redoes the rest. A video that cannot be decoded is skipped (up to ``max_bad_fraction``); a write that fails
stops the run at once with one line (a full disk says so), since every later video would fail the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from lora_moe_core.cache import roi
from lora_moe_core.data import buckets, video
from lora_moe_core.data.clips import STREAMED_MODES, extract_clips, iter_clips
from lora_moe_core.data.dataset import ClipSource, Dataset, DatasetOptions
from lora_moe_core.errors import UserError, disk_full_reason
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.safetensors_io import write_safetensors
from lora_moe_core.guards.files import file_sha256
from lora_moe_core.guards.numbers import check_number
from lora_moe_core.model.loading import Encoders, encode_prompts, encode_video
from lora_moe_core.model.sources import ModelSource
from lora_moe_core.signals import deferred_interrupts
from lora_moe_core.storage.store import Storage, is_s3

log = logging.getLogger(__name__)
MUSUBI_FORMAT_VERSION = "1.0.1"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class CacheSettings:
    """How clips become cache entries."""

    task: str
    model: ModelSource | str | None = None  # a diffusers folder, or a folder and/or --vae/--t5 files
    tip_weight: float = 4.0  # ROI weight of tip cells (seed: 3–5×)
    roi_fallback: str = "motion"  # without tip boxes: motion saliency or uniform
    latent_dtype: str = "bfloat16"  # musubi stores latents in the VAE dtype (bf16)
    max_bad_fraction: float = 0.1  # fail the run when more videos than this fail to decode

    def __post_init__(self) -> None:
        """The same limits for ``lora-moe cache`` flags, the pipeline's cache step and library callers."""
        check_number("tip_weight", self.tip_weight, at_least=1, at_most=100)
        check_number("max_bad_fraction", self.max_bad_fraction, at_least=0, at_most=1)
        if self.roi_fallback not in ("motion", "uniform"):
            raise UserError(f"roi_fallback must be motion or uniform, got {self.roi_fallback!r}")
        if self.latent_dtype not in DTYPE_NAMES.values():
            raise UserError(f"latent_dtype must be one of {', '.join(DTYPE_NAMES.values())}, got {self.latent_dtype!r}")


@dataclass
class _Clips:
    """A decoded video, ready to encode: its pieces, boxes and geometry."""

    stem: str
    digest: str
    pieces: Iterable[tuple[int, np.ndarray]]  # (first frame, [F, H, W, 3] frames), decoded as they are taken
    boxes: list | None
    source_size: tuple[int, int]  # width, height of the video
    bucket: tuple[int, int]


class CacheWriteError(UserError):
    """Writing the cache failed (disk full, permissions): ends the run, unlike a bad video."""


def _cut(local: str, info: video.VideoInfo, bucket: tuple[int, int], options: DatasetOptions, name: str):
    """The clips of one video as ``(start, [F, H, W, 3])``, decoded and resized lazily (see ``_cache_video``)."""
    mode = options.frame_extraction
    # memory and time bounded before decoding: the frames held at once, within MAX_DECODE_BYTES
    needed = video.frames_needed(mode, options.target_frames, options.max_frames)
    held = max(options.target_frames, default=1) if mode in STREAMED_MODES else None
    limit = video.check_decode_budget(name, info, needed, bucket, options.source_fps, held=held)
    frames = video.iter_frames(local, video.DEFAULT_TARGET_FPS, options.source_fps,
                               max_frames=limit if needed else None)  # fmt: skip
    resized = (buckets.resize_and_crop(frame[None], bucket)[0] for frame in frames)
    if mode in STREAMED_MODES:
        total = video.target_frame_count(info, options.source_fps)
        return iter_clips(resized, options.target_frames, mode, options.frame_stride, options.frame_sample, total)
    frames = np.stack(list(resized))
    pieces = extract_clips(frames, options.target_frames, mode, options.frame_stride, options.frame_sample,
                           options.max_frames)  # fmt: skip
    if not pieces:
        raise UserError(f"{len(frames)} frames at 16 fps: shorter than target_frames {options.target_frames}")
    return pieces


@dataclass
class CacheReport:
    written: int = 0
    skipped: int = 0
    failed: int = 0
    clips: int = 0


def shard_of(items: list[Any], shard: tuple[int, int]) -> list[Any]:
    """Items ``i`` with ``i % n == index`` for ``shard = (index, n)``: disjoint, covering, order-stable."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {index}/{count}: expected i/n with 0 <= i < n")
    return items[index::count]


def content_hash(
    video_bytes_hash: str, caption: str, label: dict, settings: CacheSettings, options: DatasetOptions
) -> str:
    """Hash of everything an entry depends on; equal hash → the cached entry is still valid."""
    encoding = {k: v for k, v in asdict(settings).items() if k != "max_bad_fraction"}  # run policy, not content
    encoding["model"] = ModelSource.of(settings.model).identity()
    payload = json.dumps([video_bytes_hash, caption, label.get("probs"), label.get("roi"), encoding,
                          asdict(options)], sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()


def _stem(clip: ClipSource) -> str:
    return Path(clip.video.rsplit("/", 1)[-1]).stem


def entry_stems(clips: list[ClipSource]) -> list[str]:
    """The cache-entry name of each clip: its video's file stem (musubi's naming), or, when two videos of the
    dataset share that stem (``case01/video.mp4``, ``case02/video.mp4``), the stem plus 8 hex digits of the
    SHA-256 of its path in the dataset, so that neither overwrites the other's entry."""
    stems = [_stem(clip) for clip in clips]
    shared = {stem for stem, count in Counter(stems).items() if count > 1}
    return [f"{stem}-{hashlib.sha256(str(clip.fields.get('video_path', clip.video)).encode()).hexdigest()[:8]}"
            if stem in shared else stem for stem, clip in zip(stems, clips, strict=True)]  # fmt: skip


def _label_vector(label: dict) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(label.get("probs") or [1.0 / len(FAMILIES)] * len(FAMILIES), dtype=torch.float32)
    multi_hot = torch.tensor([float(name in label.get("families", [])) for name in FAMILIES])
    return probs, multi_hot


def _clip_rois(clip: ClipSource, fps: float, options: DatasetOptions, source_size, bucket):
    """Per resampled frame, the tip boxes mapped into the bucket; None when the manifest has no ROI."""
    boxes = clip.fields.get("roi")
    if not boxes:
        return None
    picks = video.resample_indices(len(boxes), options.source_fps or fps, video.DEFAULT_TARGET_FPS)
    picked = [boxes[int(i)] for i in picks]
    picked = [frame if frame and isinstance(frame[0], list | tuple) else ([frame] if frame else []) for frame in picked]
    scale, _, offset = buckets.cover_transform(*source_size, bucket)
    return roi.transform_boxes(picked, scale, offset, bucket)


class LatentCacher:
    """Encode a dataset's clips into a cache folder (local or ``s3://``), resumably.

    Args:
        encoders: VAE, text encoder and tokenizer.
        settings: the cache settings.
        output: cache folder or ``s3://`` prefix.
        storage: storage backend.
    """

    def __init__(self, encoders: Encoders, settings: CacheSettings, output: str, storage: Storage | None = None):
        self.encoders, self.settings, self.output = encoders, settings, output
        self.storage = storage or Storage()
        self.dtype = {v: k for k, v in DTYPE_NAMES.items()}[settings.latent_dtype]
        self.staging_prefix = ".staging-0of1-"  # set per shard by run()

    def run(self, dataset: Dataset, labels: list[dict], shard: tuple[int, int] = (0, 1)) -> CacheReport:
        """Cache every clip of the shard; raises UserError when the failed fraction exceeds the limit."""
        pairs = shard_of(list(zip(dataset.clips, labels, entry_stems(dataset.clips), strict=True)), shard)
        report, first_failure = CacheReport(), ""
        self.staging_prefix = f".staging-{shard[0]}of{shard[1]}-"  # a shard's own: shards may share the folder
        self._remove_stale_staging()
        for clip, label, stem in tqdm(pairs, desc="caching", unit="video", disable=None):
            try:
                written = self._cache_video(clip, label, dataset.options, stem, report)
            except CacheWriteError:
                raise  # the output is the problem, not this video: every further write would fail too
            except UserError as exc:  # a bad video: skipped, nothing of it published
                report.failed += 1
                print(f"skipped {clip.video}: {exc}")
                first_failure = first_failure or (str(exc) if clip.video in str(exc) else f"{clip.video}: {exc}")
                continue
            if written is None:
                report.skipped += 1
                continue
            report.clips += written
            report.written += 1
        if pairs and report.failed / len(pairs) > self.settings.max_bad_fraction:
            limit = f"{self.settings.max_bad_fraction:.0%}"
            raise UserError(f"{report.failed} of {len(pairs)} videos failed to cache (more than {limit}); first: "
                            f"{first_failure}; fix or remove them and rerun to resume")  # fmt: skip
        return report

    def _marker(self, stem: str) -> str:
        return self.storage.join(self.output, f"{stem}_lora_moe.json")

    def _is_current(self, stem: str, digest: str) -> bool:
        marker = self._marker(stem)
        if not self.storage.exists(marker):
            return False
        try:
            entry = json.loads(self.storage.read_bytes(marker))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        files = [*entry.get("latent_files", []), entry.get("text_file", "")]
        return entry.get("content_hash") == digest and all(self.storage.exists(self.storage.join(self.output, f))
                                                           for f in files)  # fmt: skip

    def _cache_video(self, clip: ClipSource, label: dict, options: DatasetOptions, stem: str,
                     report: CacheReport) -> int | None:  # fmt: skip
        """Decode, cut, encode and publish one video; returns its clip count, None when its entry is current.

        Frames stream from the decoder through resizing and cutting into the encoder, so memory holds one clip
        (``full`` extraction: its at most ``max_frames``). UserError for a bad video, CacheWriteError for a
        failed write.
        """
        if not clip.caption:
            raise UserError(f"{clip.video}: empty caption, nothing to condition on (labelled with no family)")
        with self.storage.open_local(clip.video) as local:
            if not Path(local).is_file():
                raise UserError(f"video path is not a file: {clip.video}")
            video_hash = file_sha256(local, "video")  # in chunks: recordings can be GBs
            digest = content_hash(video_hash, clip.caption, {**label, "roi": clip.fields.get("roi")}, self.settings,
                                  options)  # fmt: skip
            if self._is_current(stem, digest):
                return None
            info = video.probe_video(local)
            bucket = buckets.bucket_size(info.width, info.height, options.resolution,
                                         no_upscale=options.bucket_no_upscale)  # fmt: skip
            pieces = _cut(local, info, bucket, options, clip.video)
            boxes = _clip_rois(clip, info.fps, options, (info.width, info.height), bucket)
            clips = _Clips(stem, digest, pieces, boxes, (info.width, info.height), bucket)
            return self._write_entry(clips, clip, label, report)

    def _write_entry(self, clips: _Clips, clip: ClipSource, label: dict, report: CacheReport) -> int:
        """Encode one video's pieces as they are cut, stage them, then publish the files, marker last; returns the
        number of clips written. A bad video raises UserError before anything is published."""
        width, height = clips.source_size
        text_name, marker = f"{clips.stem}_wan_te.safetensors", f"{clips.stem}_lora_moe.json"
        files = []
        with self._staging() as staging:
            target: str | Path = staging
            try:
                target = staging / text_name
                self._write_text(target, clip.caption)
                for start, piece in clips.pieces:
                    files.append(f"{clips.stem}_{start:05d}-{len(piece):03d}_{width:04d}x{height:04d}_wan.safetensors")
                    target = staging / files[-1]
                    piece_boxes = clips.boxes[start : start + len(piece)] if clips.boxes is not None else None
                    self._write_latents(target, piece, piece_boxes, label, clip, clips.bucket)
                entry = {"content_hash": clips.digest, "video": clip.fields.get("video_path", clip.video),
                         "caption": clip.caption, "families": label.get("families", []), "latent_files": files,
                         "text_file": text_name}  # fmt: skip
                target = staging / marker
                target.write_bytes(json.dumps(entry, ensure_ascii=False).encode())
                with deferred_interrupts():  # a few renames: Ctrl-C waits for the whole entry, never half of it
                    for name in (text_name, *files, marker):  # the text before any latent file, the marker last
                        target = self.storage.join(self.output, name)
                        self._publish(staging / name, target)
            except (OSError, SafetensorError) as exc:
                raise _write_error(exc, target, report) from None
        return len(files)

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A temporary folder on the output's file system (local output) or the system's (``s3://``)."""
        if is_s3(self.output):
            with tempfile.TemporaryDirectory(prefix="lora-moe-cache-") as folder:
                yield Path(folder)
            return
        Path(self.output).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=self.staging_prefix, dir=self.output))
        try:
            yield folder
        finally:
            with deferred_interrupts():  # Ctrl-C during the encoding: its staged files go before the exit
                shutil.rmtree(folder, ignore_errors=True)

    def _remove_stale_staging(self) -> None:
        """Delete staging folders a killed run of this shard left in a local output."""
        if not is_s3(self.output) and Path(self.output).is_dir():
            for folder in Path(self.output).glob(f"{self.staging_prefix}*"):
                shutil.rmtree(folder, ignore_errors=True)

    def _publish(self, local: Path, target: str) -> None:
        if is_s3(self.output):
            self.storage.upload(local, target)
        else:
            local.replace(target)  # same file system: an atomic rename

    def _write_latents(self, path: Path, piece: np.ndarray, boxes, label: dict, clip: ClipSource, bucket) -> None:
        latents = encode_video(self.encoders.vae, video.frames_to_tensor(piece)[None])[0]  # [16, F, H/8, W/8]
        _, frames, height, width = latents.shape
        if boxes is not None:
            weights = roi.box_weights(boxes, bucket, self.settings.tip_weight)
        elif self.settings.roi_fallback == "motion":
            weights = roi.motion_weights(piece, self.settings.tip_weight)
        else:
            weights = torch.ones(frames, height, width)
        probs, multi_hot = _label_vector(label)
        shape = f"{frames}x{height}x{width}"
        tensors = {f"latents_{shape}_{self.settings.latent_dtype}": latents.to(self.dtype),
                   f"roi_weights_{shape}": weights.float(),
                   "instrument_probs": probs, "instrument_labels": multi_hot}  # fmt: skip
        metadata = {"architecture": "wan", "width": str(bucket[0]), "height": str(bucket[1]),
                    "frame_count": str(len(piece)), "format_version": MUSUBI_FORMAT_VERSION,
                    "lora_moe.caption": clip.caption, "lora_moe.families": json.dumps(label.get("families", [])),
                    "lora_moe.roi_source": "boxes" if boxes is not None else self.settings.roi_fallback}  # fmt: skip
        write_safetensors(tensors, path, metadata)

    def _write_text(self, path: Path, caption: str) -> None:
        embeds = encode_prompts(self.encoders, [caption])[0]
        key = f"varlen_t5_{self.settings.latent_dtype}"
        metadata = {"architecture": "wan", "caption1": caption, "format_version": MUSUBI_FORMAT_VERSION}
        write_safetensors({key: embeds.to(self.dtype)}, path, metadata)


def _write_error(exc: OSError | SafetensorError, target: str | Path, report: CacheReport) -> Exception:
    """One line for a failed write: a full disk by name, with what to do; other errors as they are."""
    reason = disk_full_reason(exc)
    if reason is not None:
        return CacheWriteError(f"{reason} while writing {target}; stopped after caching {report.written} videos "
                               "this run (every entry on disk is whole): free space and rerun the same command to "
                               "resume")  # fmt: skip
    if isinstance(exc, OSError):
        return CacheWriteError(f"cannot write {getattr(exc, 'filename', None) or target}: {exc.strerror or exc}")
    return exc


def is_musubi_cache(folder: str, storage: Storage) -> bool:
    """True for a folder of ``*_wan.safetensors`` cache files (no videos to encode)."""
    from lora_moe_core.data.latent_cache import LATENT_FILE

    if str(folder).endswith((".toml", ".jsonl", ".json")):
        return False
    try:
        names = [
            uri.rsplit("/", 1)[-1]
            for uri in storage.list(folder)
            if storage.join(folder, uri.rsplit("/", 1)[-1]) == uri
        ]
    except UserError:
        return False
    has_dataset = any(name in ("dataset.toml", "manifest.jsonl") for name in names)
    return not has_dataset and any(LATENT_FILE.match(name) for name in names)


def import_musubi_cache(source: str, output: str, settings: CacheSettings, storage: Storage) -> CacheReport:
    """Reuse a musubi-tuner cache without re-encoding: copy its files, adding our label and ROI keys.

    Labels come from the caption musubi stored with the text embeddings; ROI weights are uniform (no boxes or
    frames exist to derive them from).
    """
    from lora_moe_core.data.latent_cache import LATENT_FILE, local_cache_dir, read_entry
    from lora_moe_core.data.vocabulary import Vocabulary
    from lora_moe_core.formats.safetensors_io import read_safetensors

    folder, vocabulary, report = local_cache_dir(source, storage), Vocabulary.from_builtin(), CacheReport()
    with tempfile.TemporaryDirectory() as staging:
        for path in sorted(p for p in folder.glob("*_wan.safetensors") if LATENT_FILE.match(p.name)):
            entry = read_entry(path, vocabulary)
            tensors, metadata = read_safetensors(path, what="latent cache file")
            frames, height, width = entry.latents.shape[1:]
            tensors[f"roi_weights_{frames}x{height}x{width}"] = entry.roi_weights
            tensors.update({"instrument_probs": entry.probs, "instrument_labels": entry.labels})
            metadata = {**metadata, "lora_moe.caption": entry.caption, "lora_moe.roi_source": "uniform"}
            write_safetensors(tensors, Path(staging) / path.name, metadata)
            text_name = f"{LATENT_FILE.match(path.name)['stem']}_wan_te.safetensors"
            for name, local in ((path.name, Path(staging) / path.name), (text_name, folder / text_name)):
                target = storage.join(output, name)
                storage.upload(local, target) if is_s3(output) else storage.write_bytes(target, local.read_bytes())
            report.written += 1
            report.clips += 1
    return report
