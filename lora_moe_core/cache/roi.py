"""ROI weight maps at latent resolution: where the reconstruction loss counts more (the instrument tips).

Latent frame ``f`` of the Wan VAE covers pixel frame 0 for ``f = 0`` and frames ``4f-3 … 4f`` after it; a
latent cell covers an 8×8 pixel patch. A cell gets ``tip_weight`` when any tip box of its frames touches it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
Box = Sequence[float]  # [x0, y0, x1, y1] in pixels of the cropped clip


def latent_frame_groups(num_frames: int) -> list[range]:
    """Pixel frames behind each latent frame for a 4k+1 clip."""
    groups = [range(0, 1)]
    groups += [range(1 + TEMPORAL_STRIDE * i, 1 + TEMPORAL_STRIDE * (i + 1)) for i in range((num_frames - 1) // 4)]
    return groups


def box_weights(boxes_per_frame: Sequence[Sequence[Box]], size: tuple[int, int], tip_weight: float) -> torch.Tensor:
    """``[F_lat, H/8, W/8]`` weights: ``tip_weight`` on cells touched by a tip box, 1 elsewhere.

    Args:
        boxes_per_frame: for each pixel frame of the clip, its tip boxes in clip pixels.
        size: ``(width, height)`` of the clip in pixels.
        tip_weight: weight of tip cells (seed: 3–5×).
    """
    width, height = size
    cells_w, cells_h = width // SPATIAL_STRIDE, height // SPATIAL_STRIDE
    groups = latent_frame_groups(len(boxes_per_frame))
    weights = torch.ones(len(groups), cells_h, cells_w)
    for latent_index, frames in enumerate(groups):
        for frame in frames:
            for x0, y0, x1, y1 in boxes_per_frame[frame]:
                left, top = max(0, math.floor(x0 / SPATIAL_STRIDE)), max(0, math.floor(y0 / SPATIAL_STRIDE))
                right = min(cells_w, math.ceil(x1 / SPATIAL_STRIDE))
                bottom = min(cells_h, math.ceil(y1 / SPATIAL_STRIDE))
                if right > left and bottom > top:
                    weights[latent_index, top:bottom, left:right] = tip_weight
    return weights


def motion_weights(clip: np.ndarray, tip_weight: float) -> torch.Tensor:
    """Weights from motion saliency when no boxes exist: instruments move more than tissue.

    Mean absolute frame difference per 8×8 cell and latent frame, scaled so the most moving cell gets
    ``tip_weight`` and a still one 1.
    """
    frames = torch.from_numpy(clip).float().mean(dim=-1)  # [T, H, W] grey
    diffs = torch.cat([torch.zeros_like(frames[:1]), (frames[1:] - frames[:-1]).abs()])  # [T, H, W]
    diffs[0] = diffs[1] if len(diffs) > 1 else diffs[0]  # frame 0 has no predecessor: borrow its successor's
    groups = latent_frame_groups(len(frames))
    per_latent = torch.stack([diffs[list(group)].mean(dim=0) for group in groups])  # [F_lat, H, W]
    pooled = torch.nn.functional.avg_pool2d(per_latent[:, None], SPATIAL_STRIDE)[:, 0]  # [F_lat, H/8, W/8]
    peak = pooled.amax()
    if peak <= 0:
        return torch.ones_like(pooled)
    return 1 + (tip_weight - 1) * pooled / peak


def transform_boxes(
    boxes_per_frame: Sequence[Sequence[Box]], scale: float, offset: tuple[int, int], size: tuple[int, int]
) -> list[list[list[float]]]:
    """Map source-pixel boxes through resize (``scale``) and crop (``offset``), clamped to the clip."""
    left, top = offset
    width, height = size
    mapped = []
    for boxes in boxes_per_frame:
        frame_boxes = []
        for x0, y0, x1, y1 in boxes:
            box = [x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top]
            box = [min(max(box[0], 0), width), min(max(box[1], 0), height),
                   min(max(box[2], 0), width), min(max(box[3], 0), height)]  # fmt: skip
            if box[2] > box[0] and box[3] > box[1]:
                frame_boxes.append(box)
        mapped.append(frame_boxes)
    return mapped
