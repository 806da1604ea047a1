"""Latent caching: videos → musubi-compatible latent and text files, plus ROI weight maps and labels.

Per source video ``clip_0003.mp4`` (832×480 source, a 33-frame clip at 0) the cache holds::

    clip_0003_00000-033_0832x0480_wan.safetensors   latents_9x60x104_bfloat16 [16, 9, 60, 104] (musubi key)
                                                    roi_weights_9x60x104 [9, 60, 104], instrument_probs [4],
                                                    instrument_labels [4] (multi-hot)        (our keys)
    clip_0003_wan_te.safetensors                    varlen_t5_bfloat16 [L, 4096]             (musubi key)
    clip_0003_lora_moe.json                         done-marker: content hash and the files above

The marker is written last, so a killed run leaves no entry that looks complete; a rerun skips every video
whose marker holds the same content hash (video bytes, caption, labels and settings) and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lora_moe_core import roi, video
from lora_moe_core.dataset import ClipSource, Dataset, DatasetOptions
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.models import Encoders, encode_prompts, encode_video
from lora_moe_core.safetensors_io import write_safetensors
from lora_moe_core.storage import Storage, is_s3

log = logging.getLogger(__name__)
MUSUBI_FORMAT_VERSION = "1.0.1"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class CacheSettings:
    """How clips become cache entries."""

    task: str
    model: str | None = None
    tip_weight: float = 4.0  # ROI weight of tip cells (seed: 3–5×)
    roi_fallback: str = "motion"  # without tip boxes: motion saliency or uniform
    latent_dtype: str = "bfloat16"  # musubi stores latents in the VAE dtype (bf16)
    max_bad_fraction: float = 0.1  # fail the run when more videos than this fail to decode


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
    payload = json.dumps([video_bytes_hash, caption, label.get("probs"), label.get("roi"), encoding,
                          asdict(options)], sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()


def _stem(clip: ClipSource) -> str:
    return Path(clip.video.rsplit("/", 1)[-1]).stem


def _label_vector(label: dict) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(label.get("probs") or [1.0 / len(FAMILIES)] * len(FAMILIES), dtype=torch.float32)
    multi_hot = torch.tensor([float(name in label.get("families", [])) for name in FAMILIES])
    return probs, multi_hot


def _clip_rois(clip: ClipSource, frames_src: int, fps: float, options: DatasetOptions, source_size, bucket):
    """Per resampled frame, the tip boxes mapped into the bucket; None when the manifest has no ROI."""
    boxes = clip.fields.get("roi")
    if not boxes:
        return None
    picks = video.resample_indices(len(boxes), options.source_fps or fps, video.DEFAULT_TARGET_FPS)[:frames_src]
    picked = [boxes[int(i)] for i in picks]
    picked = [frame if frame and isinstance(frame[0], list | tuple) else ([frame] if frame else []) for frame in picked]
    scale, _, offset = video.cover_transform(*source_size, bucket)
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

    def run(self, dataset: Dataset, labels: list[dict], shard: tuple[int, int] = (0, 1)) -> CacheReport:
        """Cache every clip of the shard; raises UserError when the failed fraction exceeds the limit."""
        pairs = shard_of(list(zip(dataset.clips, labels, strict=True)), shard)
        report = CacheReport()
        for clip, label in tqdm(pairs, desc="caching", unit="video", disable=None):
            try:
                written = self._cache_one(clip, label, dataset.options)
            except UserError as exc:
                report.failed += 1
                print(f"skipped {clip.video}: {exc}")
                continue
            report.clips += written
            report.written += written > 0
            report.skipped += written == 0
        if pairs and report.failed / len(pairs) > self.settings.max_bad_fraction:
            limit = f"{self.settings.max_bad_fraction:.0%}"
            raise UserError(f"{report.failed} of {len(pairs)} videos failed to cache (more than {limit}); "
                            "fix or remove them and rerun to resume")  # fmt: skip
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

    def _cache_one(self, clip: ClipSource, label: dict, options: DatasetOptions) -> int:
        """Cache one video; returns the number of clips written (0 when the cached entry was current)."""
        stem = _stem(clip)
        with self.storage.open_local(clip.video) as local:
            video_hash = hashlib.sha256(Path(local).read_bytes()).hexdigest()
            digest = content_hash(video_hash, clip.caption, {**label, "roi": clip.fields.get("roi")}, self.settings,
                                  options)  # fmt: skip
            if self._is_current(stem, digest):
                return 0
            info = video.probe_video(local)
            frames = video.read_frames(local, video.DEFAULT_TARGET_FPS, options.source_fps)
        bucket = video.bucket_size(info.width, info.height, options.resolution, no_upscale=options.bucket_no_upscale)
        frames = video.resize_and_crop(frames, bucket)
        boxes = _clip_rois(clip, len(frames), info.fps, options, (info.width, info.height), bucket)
        pieces = video.extract_clips(frames, options.target_frames, options.frame_extraction, options.frame_stride,
                                     options.frame_sample, options.max_frames)  # fmt: skip
        if not pieces:
            raise UserError(f"{len(frames)} frames at 16 fps: shorter than target_frames {options.target_frames}")
        files = []
        with tempfile.TemporaryDirectory() as staging:
            for start, piece in pieces:
                piece_boxes = boxes[start : start + len(piece)] if boxes is not None else None
                name = f"{stem}_{start:05d}-{len(piece):03d}_{info.width:04d}x{info.height:04d}_wan.safetensors"
                self._write_latents(Path(staging) / name, piece, piece_boxes, label, clip, bucket)
                files.append(name)
            text_name = f"{stem}_wan_te.safetensors"
            self._write_text(Path(staging) / text_name, clip.caption)
            for name in [*files, text_name]:
                self._publish(Path(staging) / name, name)
        entry = {"content_hash": digest, "video": clip.fields.get("video_path", clip.video), "caption": clip.caption,
                 "families": label.get("families", []), "latent_files": files, "text_file": text_name}  # fmt: skip
        self.storage.write_bytes(self._marker(stem), json.dumps(entry, ensure_ascii=False).encode())
        return len(files)

    def _publish(self, local: Path, name: str) -> None:
        target = self.storage.join(self.output, name)
        if is_s3(self.output):
            self.storage.upload(local, target)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            local.replace(target)

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


def is_musubi_cache(folder: str, storage: Storage) -> bool:
    """True for a folder of ``*_wan.safetensors`` cache files (no videos to encode)."""
    from lora_moe_core.latent_cache import LATENT_FILE

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
    from lora_moe_core.latent_cache import LATENT_FILE, local_cache_dir, read_entry
    from lora_moe_core.safetensors_io import read_safetensors
    from lora_moe_core.vocabulary import Vocabulary

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
