"""musubi-tuner's resolution buckets and the cover-resize + centre-crop that fits frames into one.

A bucket has an area close to ``resolution`` W·H (never above it), sides divisible by 16 and the aspect ratio
nearest the source's (musubi ``dataset/bucket.py``), so bucket sizes agree with a user's musubi cache.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from lora_moe_core.errors import UserError

#: WAN's bucket sides are multiples of 16 (VAE /8 then patch /2).
RESOLUTION_STEP = 16
_RESIZE_CHUNK = 16  # frames per interpolate call: bounds the float32 copy of a long 1080p clip


@lru_cache(maxsize=32)
def _bucket_candidates(area: int, step: int) -> np.ndarray:
    """musubi's bucket list: widths from √area/2 to √area in ``step``s, height = area/width, and transposes."""
    sqrt_size = int(math.sqrt(area))
    widths = np.arange(sqrt_size // 2 // step * step, sqrt_size + step, step)
    widths = widths[widths > 0]
    heights = (area // widths) // step * step
    pairs = np.concatenate([np.stack([widths, heights], 1), np.stack([heights, widths], 1)])
    # np.unique sorts rows lexicographically, as musubi's sorted set: argmin ties resolve identically.
    return np.unique(pairs[(pairs > 0).all(1)], axis=0)


def bucket_size(
    width: int,
    height: int,
    resolution: tuple[int, int] = (832, 480),
    step: int = RESOLUTION_STEP,
    no_upscale: bool = False,
) -> tuple[int, int]:
    """The (width, height) bucket musubi assigns a ``width``×``height`` source.

    Candidates have an area close to ``resolution`` W·H (never above it) and sides divisible by
    ``step``; the one whose aspect ratio is nearest the source's wins. With ``no_upscale``, a source no
    larger than the target area keeps its own size, rounded down to ``step``.
    """
    if width <= 0 or height <= 0:
        raise UserError(f"video frame size must be positive, got {width}x{height}")
    res_w, res_h = (int(v) for v in resolution)
    if res_w < step or res_h < step:
        raise UserError(f"resolution {res_w}x{res_h} is smaller than the {step}-pixel step")
    area = res_w * res_h
    if no_upscale and width * height <= area:
        bucket = (width // step * step, height // step * step)
        if min(bucket) == 0:
            raise UserError(f"video frame {width}x{height} is smaller than the {step}-pixel resolution step")
        return bucket
    candidates = _bucket_candidates(area, step)
    best = np.abs(candidates[:, 0] / candidates[:, 1] - width / height).argmin()
    return int(candidates[best, 0]), int(candidates[best, 1])


def resize_and_crop(frames: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Resize ``[T, H, W, 3]`` uint8 frames to cover ``bucket`` (width, height), then centre-crop to it.

    Downscaling uses antialiased bilinear filtering (close to OpenCV's INTER_AREA, musubi's choice);
    upscaling uses bicubic (musubi uses Lanczos, which torch lacks).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    bucket_w, bucket_h = bucket
    height, width = frames.shape[1:3]
    if (width, height) == (bucket_w, bucket_h):
        return frames
    scale, (new_w, new_h), (left, top) = cover_transform(width, height, bucket)
    if (new_w, new_h) != (width, height):
        frames = _resize(frames, (new_h, new_w), upscale=scale > 1)
    return np.ascontiguousarray(frames[:, top : top + bucket_h, left : left + bucket_w])


def cover_transform(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """The geometry of :func:`resize_and_crop`: ``(scale, (resized_w, resized_h), (crop_left, crop_top))``.

    Annotations in source pixels map to the cropped frame as ``x' = x·scale − left``, ``y' = y·scale − top``.
    """
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    return scale, (new_w, new_h), ((new_w - bucket_w) // 2, (new_h - bucket_h) // 2)


def _resize(frames: np.ndarray, size: tuple[int, int], upscale: bool) -> np.ndarray:
    out = np.empty((len(frames), *size, 3), dtype=np.uint8)
    for start in range(0, len(frames), _RESIZE_CHUNK):
        chunk = torch.from_numpy(frames[start : start + _RESIZE_CHUNK]).permute(0, 3, 1, 2).float()
        if upscale:
            chunk = F.interpolate(chunk, size=size, mode="bicubic", align_corners=False)
        else:
            chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        # bicubic overshoots at edges: clamp before the uint8 cast so it cannot wrap around
        out[start : start + _RESIZE_CHUNK] = chunk.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
