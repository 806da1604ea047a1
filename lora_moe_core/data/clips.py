"""Cutting a video's 16 fps frames into training clips, as musubi's ``frame_extraction`` does.

:func:`extract_clips` cuts an array of frames; :func:`iter_clips` cuts a stream of them (``head``, ``chunk``,
``slide``, ``uniform``), holding one clip at a time, so that a recording of any length is cached in bounded
memory. Both give the same clips (``tests/test_video.py`` checks every mode).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from lora_moe_core.data.dataset import EXTRACTION_MODES
from lora_moe_core.errors import UserError

#: WAN's VAE compresses time by 4: a clip of 4k+1 frames gives k+1 latent frames.
VAE_FRAME_STRIDE = 4
#: Extraction modes cut from a stream of frames (:func:`iter_clips`): memory is one clip, not the video.
STREAMED_MODES = ("head", "chunk", "slide", "uniform")


def _check_frame_counts(target_frames: Sequence[int]) -> list[int]:
    counts = [int(n) for n in target_frames]
    bad = [n for n in counts if n < 1 or (n - 1) % VAE_FRAME_STRIDE]
    if bad:
        raise UserError(f"target_frames must be 4k+1 (1, 5, 9, ..., 81), got {bad}")
    return counts


def _positive(name: str, value: int | None, default: int) -> int:
    value = default if value is None else int(value)
    if value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")
    return value


def _cut_arguments(target_frames: Sequence[int], mode: str, frame_stride: int | None,
                   frame_sample: int | None) -> tuple[list[int], int, int]:  # fmt: skip
    """Validated (clip lengths, stride, samples) of every mode but ``full``."""
    counts = _check_frame_counts(target_frames)
    if not counts:
        raise UserError(f"target_frames is empty: frame_extraction={mode!r} needs at least one clip length")
    return counts, _positive("frame_stride", frame_stride, 1), _positive("frame_sample", frame_sample, 1)


def _starts_here(start: int, length: int, mode: str, stride: int) -> bool:
    """Whether ``head``, ``chunk`` or ``slide`` starts a ``length``-frame clip at frame ``start`` (``uniform``
    needs the video's length: :func:`_clip_starts`)."""
    if mode == "head":
        return start == 0
    if mode == "chunk":
        return start % length == 0
    return start % stride == 0  # slide


def _clip_starts(total: int, length: int, mode: str, stride: int, samples: int) -> list[int]:
    """Start indices of the ``length``-frame clips of a ``total``-frame video under ``mode``."""
    if total < length:
        return []
    if mode == "uniform":  # musubi's linspace truncated to int; repeated starts would only duplicate a cache file
        return [int(i) for i in np.unique(np.linspace(0, total - length, samples, dtype=int))]
    return [start for start in range(total - length + 1) if _starts_here(start, length, mode, stride)]


def iter_clips(
    frames: Iterable[np.ndarray],
    target_frames: Sequence[int],
    mode: str = "chunk",
    frame_stride: int | None = None,
    frame_sample: int | None = None,
    total: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`extract_clips` over a stream of frames for ``head``, ``chunk``, ``slide`` and ``uniform``: each clip is
    yielded once its last frame has arrived, and only the longest target's worth of frames is held, so a
    recording of any length is cut in bounded memory. Clips come in order of their last frame.

    ``uniform`` spreads its windows over ``total`` frames (the count the container header gives); a window that
    would end past the real end of a shorter stream is not made. UserError at the end when no clip was made.
    """
    if mode not in STREAMED_MODES:
        raise UserError(f"frame_extraction {mode!r} cannot be streamed; use one of {', '.join(STREAMED_MODES)}")
    counts, stride, samples = _cut_arguments(target_frames, mode, frame_stride, frame_sample)
    wanted = {}  # length -> the starts uniform wants
    if mode == "uniform":
        if total is None:
            raise UserError("frame_extraction uniform needs the video's frame count and rate, and its header gives "
                            "none; re-encode it or use chunk")  # fmt: skip
        wanted = {length: set(_clip_starts(total, length, mode, stride, samples)) for length in counts}
    window: deque[np.ndarray] = deque(maxlen=max(counts))
    made, index = 0, -1
    for index, frame in enumerate(frames):
        window.append(frame)
        for length in counts:
            start = index - length + 1
            if start < 0:
                continue
            if start in wanted[length] if mode == "uniform" else _starts_here(start, length, mode, stride):
                made += 1
                yield start, np.stack(list(window)[len(window) - length :])  # [length, H, W, 3]
    if not made:
        raise UserError(f"{index + 1} frames at 16 fps: shorter than target_frames {counts}")


def extract_clips(
    frames: np.ndarray,
    target_frames: Sequence[int],
    mode: str = "head",
    frame_stride: int | None = None,
    frame_sample: int | None = None,
    max_frames: int | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Cut a video into training clips as musubi's ``frame_extraction`` does; returns ``(start, clip)``.

    - ``head``: the first N frames, for each N in ``target_frames``;
    - ``chunk``: consecutive non-overlapping N-frame pieces;
    - ``slide``: N-frame windows every ``frame_stride`` frames (default 1);
    - ``uniform``: ``frame_sample`` windows (default 1) spread evenly over the video;
    - ``full``: one clip of all frames, at most ``max_frames`` (default 129), rounded down to 4k+1;
      ``target_frames`` is not used.

    A video shorter than a target gives no clip for it; the caller reports videos that give none.
    Clips are views into ``frames``.
    """
    if mode not in EXTRACTION_MODES:
        raise UserError(f"frame_extraction must be one of {', '.join(EXTRACTION_MODES)}, got {mode!r}")
    total = len(frames)
    if mode == "full":
        limit = min(total, _positive("max_frames", max_frames, 129))
        length = (limit - 1) // VAE_FRAME_STRIDE * VAE_FRAME_STRIDE + 1
        return [(0, frames[:length])] if limit >= 1 else []
    counts, stride, samples = _cut_arguments(target_frames, mode, frame_stride, frame_sample)
    return [
        (start, frames[start : start + length])
        for length in counts
        for start in _clip_starts(total, length, mode, stride, samples)
    ]
