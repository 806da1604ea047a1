"""Video input for latent caching: probe, decode + fps resampling, musubi buckets, clip extraction.

Semantics follow musubi-tuner's dataset code (``dataset/bucket.py``, ``media_utils.py``,
``image_video_dataset.py``) so clips and bucket sizes agree with a user's musubi cache:

- fps resampling picks, for each target time ``k / target_fps``, the nearest source frame (ties go to
  the earlier one), source frame ``i`` sitting at ``i / source_fps``;
- a bucket (:mod:`lora_moe_core.data.buckets`) has an area close to ``resolution`` W·H, sides divisible by 16 and
  the aspect ratio nearest the source's; frames are resized to cover it and centre-cropped;
- clips come from the modes head / chunk / slide / uniform / full and are 4k+1 frames long.

Every failure a user can cause is a one-line :class:`UserError` naming the file; PyAV exceptions never
escape. Truncated or damaged files fail by default, as in musubi; ``read_frames(min_frames=N)`` instead
keeps the decodable prefix when it gives at least N frames (with a warning), so a long recording whose
last seconds are cut off stays usable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from lora_moe_core.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TARGET_FPS = 16.0

# Float slack for "nearest frame" ties: k·ratio can land a few ulps off an exact .5.
_EPS = 1e-9
# A stream that decodes this many fewer frames than its header declares is treated as truncated; a
# small shortfall is normal (mp4 edit lists drop encoder-delay frames) and is not.
_SHORTFALL_TOLERANCE = (2, 0.01)  # frames, fraction of the declared count
#: Largest frame decoded: DCI 8K. Surgical video is at most 4K; a bigger header is damaged or hostile, and one
#: frame of it decodes to hundreds of MB (16384x8192: 403 MB as RGB) before anything could resize it.
MAX_FRAME_PIXELS = 8192 * 4320
#: Plausible source frame rates. Outside them the header is wrong: resampling 17 frames "at 0.001 fps" to 16 fps
#: would make 272,000 frames, and 10,000 fps would leave a 2-second clip a single frame.
FPS_RANGE = (1.0, 1000.0)
#: Most bytes one video's frames may take in memory at once (RGB at the larger of source and bucket size), checked
#: from the container header before decoding: 81 frames at 1080p take 0.5 GiB; ``full`` extraction of 2,000 tiny
#: frames upscaled to 832x480 would take 2.4 GiB. Streamed modes hold one clip, so a recording of any length fits.
MAX_DECODE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about the first video stream."""

    width: int
    height: int
    num_frames: int
    fps: float

    @property
    def duration(self) -> float:
        """Length in seconds (``num_frames / fps``)."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def _reason(err: BaseException) -> str:
    """FFmpeg's message without the errno and file noise, lower-cased to sit inside a sentence."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


@contextmanager
def _open_video(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open ``path`` and yield (container, first video stream); every failure becomes a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"video not found: {path}")
    if not path.is_file():
        raise UserError(f"video path is not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"video {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        reason = f"{_reason(err)} (not a video file, or truncated or damaged)"
        raise UserError(f"cannot read video {path}: {reason}") from err
    try:
        if not container.streams.video:
            raise UserError(f"video {path} has no video stream (0 frames)")
        stream = container.streams.video[0]
        _check_frame_size(path, stream.codec_context.width, stream.codec_context.height)
        yield container, stream
    except (av.FFmpegError, OSError) as err:
        raise UserError(f"cannot decode video {path}: {_reason(err)}") from err
    finally:
        container.close()


def _check_frame_size(path: Path, width: int, height: int) -> None:
    """Refuse a header whose frame size is missing or too large to decode, before FFmpeg allocates frames."""
    if width <= 0 or height <= 0:
        raise UserError(f"video {path} has no usable frame size (header says {width}x{height}: damaged, or "
                        "beyond what FFmpeg decodes)")  # fmt: skip
    if width * height > MAX_FRAME_PIXELS:
        raise UserError(f"video {path} is {width}x{height}, too large to decode (at most {MAX_FRAME_PIXELS:,} "
                        "pixels, 8192x4320): damaged header, or downscale it first")  # fmt: skip


def _check_fps(path: str | Path, fps: float, given: bool) -> None:
    low, high = FPS_RANGE
    if low <= fps <= high:
        return
    if given:
        raise UserError(f"source_fps {fps:g} is not a plausible frame rate ({low:g}-{high:g} fps)")
    raise UserError(f"video {path} declares {fps:g} fps, not a plausible frame rate ({low:g}-{high:g} fps): "
                    "damaged header? set source_fps for it in the dataset config")  # fmt: skip


def _stream_fps(stream: av.VideoStream) -> float:
    """The stream's frame rate (average, else guessed, else base), or 0.0 when the header has none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Read size, frame count and fps of the first video stream without decoding pictures.

    The frame count comes from the header; containers without one (some mkv/webm) are demuxed and their
    packets counted. A truncated file whose header survived reports the header's count: ``read_frames``
    is the step that finds the damage.
    """
    with _open_video(path) as (container, stream):
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        context = stream.codec_context
        return VideoInfo(int(context.width), int(context.height), num_frames, _stream_fps(stream))


def frames_needed(mode: str, target_frames: Sequence[int], max_frames: int | None) -> int | None:
    """How many 16 fps frames a clip extraction reads from the start of a video; None when it needs them all."""
    if mode == "head":
        return max(target_frames)
    if mode == "full":
        return max_frames or 129
    return None


def target_frame_count(info: VideoInfo, source_fps: float | None = None) -> int | None:
    """16 fps frames the header promises (None when it gives no frame rate or count)."""
    fps = source_fps or info.fps
    if fps <= 0 or info.num_frames <= 0:
        return None
    return max(1, math.ceil(info.num_frames * DEFAULT_TARGET_FPS / fps))


def check_decode_budget(path: str | Path, info: VideoInfo, needed: int | None, bucket: tuple[int, int],
                        source_fps: float | None = None, held: int | None = None) -> int | None:  # fmt: skip
    """Refuse, from the header alone, a video whose frames held in memory at once would exceed ``MAX_DECODE_BYTES``.

    Args:
        needed: 16 fps frames read from the start (None: the whole video).
        held: frames held in memory at once (None: every frame read). Streamed extraction (:func:`clips.iter_clips`)
            holds one clip of the longest target, whatever the video's length.

    Returns:
        The number of 16 fps frames to decode (``needed``, or all of them when None): pass it to
        :func:`read_frames` as ``max_frames`` so that decoding stops there.

    Raises:
        UserError: naming the file, the frame count and size, and what to change.
    """
    total = target_frame_count(info, source_fps)
    if total is None:
        return needed  # read_frames reports the missing frame rate or frames
    count = min(total, needed) if needed else total
    in_memory = min(count, held) if held else count
    pixels = max(info.width * info.height, bucket[0] * bucket[1])
    size = in_memory * pixels * 3
    if size > MAX_DECODE_BYTES:
        change = ("lower target_frames or the resolution" if held else
                  "cut it into shorter videos, or use frame_extraction head/full with max_frames")  # fmt: skip
        raise UserError(f"video {path} would decode {in_memory} frames of {bucket[0]}x{bucket[1]} "
                        f"({size / 1024**3:.1f} GiB) at once, over the limit of {MAX_DECODE_BYTES / 1024**3:g} GiB: "
                        f"{change}")  # fmt: skip
    return count


def _nearest_source(target_index: np.ndarray | int, ratio: float) -> np.ndarray:
    """Source frame nearest to target frame ``k`` when ``ratio = source_fps / target_fps`` (ties: earlier)."""
    return np.ceil(np.asarray(target_index, dtype=np.float64) * ratio - 0.5 - _EPS).astype(np.int64)


def resample_indices(num_source: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Indices of the source frames that make a ``target_fps`` video (musubi's nearest-frame rule).

    The result covers the source's duration: ``ceil(num_source · target_fps / source_fps)`` frames, each
    the nearest source frame to ``k / target_fps`` (clamped to the last frame).
    """
    return _resampled_picks(num_source, source_fps / target_fps)


def _resampled_picks(num_source: int, ratio: float) -> np.ndarray:
    if num_source <= 0:
        return np.zeros(0, dtype=np.int64)
    count = max(1, math.ceil(num_source / ratio - _EPS))
    return np.minimum(_nearest_source(np.arange(count), ratio), num_source - 1)


@dataclass
class _Decoded:
    count: int = 0  # frames decoded
    bad_packets: int = 0  # packets the decoder rejected, or 1 when demuxing broke off
    stopped_early: bool = False  # max_frames reached before the end of the stream
    packets: int = 0  # non-empty packets demuxed, including those after max_frames (read, never decoded)
    served: int = 0  # target frames yielded


def _target_frames(container, stream, ratio: float, max_frames: int | None, state: _Decoded) -> Iterator[np.ndarray]:
    """Decode the stream and yield the target grid's frames in order, converting to RGB only the picked ones.

    Memory is one decoded frame: a frame serving several targets (upsampling) is yielded once per target, and
    targets past the last decoded frame repeat it. Packets the decoder rejects are counted in ``state`` and
    skipped rather than raised, so the frames before a truncation point survive for the caller's policy.
    """
    next_pick = 0  # the source frame the next target wants
    last_frame, last_rgb = None, None
    # one reformatter for the whole stream: it caches the swscale context, which to_ndarray rebuilds per frame
    to_rgb = VideoReformatter()
    try:
        for packet in container.demux(stream):
            state.packets += bool(packet.size)
            if state.stopped_early:
                continue  # demux only (cheap): a truncated tail still shows as missing packets
            try:
                frames = packet.decode()
            except av.FFmpegError:
                state.bad_packets += 1
                continue
            for frame in frames:
                index, last_frame, last_rgb = state.count, frame, None
                state.count += 1
                if index == next_pick:
                    last_rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                    while next_pick <= index and (max_frames is None or state.served < max_frames):
                        yield last_rgb  # one source frame may serve several targets (upsampling)
                        state.served += 1
                        next_pick = int(_nearest_source(state.served, ratio))
                if max_frames is not None and state.served >= max_frames:
                    state.stopped_early = True
                    break
    except av.FFmpegError:
        state.bad_packets += 1  # the demuxer itself broke off (cut inside a packet header)
    if last_frame is None or state.stopped_early:
        return
    targets = len(_resampled_picks(state.count, ratio))
    if max_frames is not None:
        targets = min(targets, max_frames)
    if state.served < targets:  # targets whose nearest source frame lies past the end clamp to the last one
        last_rgb = last_rgb if last_rgb is not None else to_rgb.reformat(last_frame, format="rgb24").to_ndarray()
        while state.served < targets:
            yield last_rgb
            state.served += 1


def _is_damaged(decoded: _Decoded, declared: int) -> bool:
    if decoded.bad_packets:
        return True
    frames, fraction = _SHORTFALL_TOLERANCE
    found = decoded.packets if decoded.stopped_early else decoded.count  # past max_frames only packets are counted
    return declared > 0 and declared - found > max(frames, fraction * declared)


def read_frames(
    path: str | Path,
    target_fps: float | None = DEFAULT_TARGET_FPS,
    source_fps: float | None = None,
    *,
    max_frames: int | None = None,
    min_frames: int | None = None,
) -> np.ndarray:
    """Decode a video to RGB frames ``[T, H, W, 3]`` uint8, resampled to ``target_fps``.

    Args:
        path: the video file.
        target_fps: output frame rate; each output frame is the nearest source frame in time
            (musubi's rule). ``None`` keeps every decoded frame.
        source_fps: the source's frame rate, overriding the stream header (musubi's ``source_fps``).
        max_frames: stop decoding once this many output frames exist (``head`` extraction needs no more).
        min_frames: policy for truncated or damaged files. ``None`` (default, as musubi): fail. An int:
            keep the decodable frames when they give at least this many output frames, with a warning.

    Raises:
        UserError: one line naming the file when it is missing, empty, not a video, larger than
            ``MAX_FRAME_PIXELS``, has no decodable frame, has no fps or one outside ``FPS_RANGE``, or is
            truncated/damaged beyond the ``min_frames`` policy.
    """
    return np.stack(list(iter_frames(path, target_fps, source_fps, max_frames=max_frames, min_frames=min_frames)))


def iter_frames(
    path: str | Path,
    target_fps: float | None = DEFAULT_TARGET_FPS,
    source_fps: float | None = None,
    *,
    max_frames: int | None = None,
    min_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """:func:`read_frames` one ``[H, W, 3]`` frame at a time: memory stays one frame whatever the video's length.

    The truncation/damage policy can only be judged at the end of the stream, so its UserError comes after the
    last frame (a consumer must not publish anything before the iterator is exhausted).
    """
    if target_fps is not None and target_fps <= 0:
        raise UserError(f"target_fps must be positive, got {target_fps}")
    if source_fps is not None and source_fps <= 0:
        raise UserError(f"source_fps must be positive, got {source_fps}")
    for name, value in (("max_frames", max_frames), ("min_frames", min_frames)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    decoded = _Decoded()
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"  # frame + slice threads: decoding dominates the cost
        fps = source_fps or _stream_fps(stream)
        if target_fps is not None and fps <= 0:
            raise UserError(f"video {path} declares no frame rate; set source_fps for it")
        if target_fps is not None:
            _check_fps(path, fps, given=source_fps is not None)
        ratio = 1.0 if target_fps is None else fps / target_fps
        declared = int(stream.frames or 0)
        yield from _target_frames(container, stream, ratio, max_frames, decoded)
    if decoded.count == 0:
        raise UserError(f"video {path} has no decodable frames (0 frames, or the file is truncated or damaged)")
    if _is_damaged(decoded, declared):
        _apply_damage_policy(path, decoded, declared, decoded.served, min_frames)


def _apply_damage_policy(path, decoded: _Decoded, declared: int, usable: int, min_frames: int | None) -> None:
    what = (f"the container holds {decoded.packets} of {declared} frames" if decoded.stopped_early
            else f"decoded {decoded.count} of {declared or '?'} frames")  # fmt: skip
    what += f", {decoded.bad_packets} unreadable packet(s)" if decoded.bad_packets else ""
    if min_frames is None or usable < min_frames:
        need = "" if min_frames is None else f"; need at least {min_frames} frames, have {usable}"
        raise UserError(f"video {path} is truncated or damaged ({what}{need}); re-encode or re-download it")
    logger.warning("video %s is truncated or damaged (%s); using the %d decodable frames", path, what, usable)


def frames_to_tensor(clip: np.ndarray) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 RGB → ``[3, T, H, W]`` float32 in [-1, 1], the WAN VAE's input layout."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"clip must be uint8 [T, H, W, 3], got {clip.dtype} {clip.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float()
    return tensor.div_(127.5).sub_(1.0)
