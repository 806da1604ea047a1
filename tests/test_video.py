"""Video input: probe, fps resampling, clip extraction, buckets, resize/crop, tensors, bad files.

Test videos are written here with PyAV (libx264, yuv420p). Frame ``i`` is a solid grey of level
``5·i``, so a decoded frame tells which source frame it came from even after lossy compression.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lora_moe_core.data.buckets import bucket_size, resize_and_crop
from lora_moe_core.data.clips import extract_clips, iter_clips
from lora_moe_core.data.video import (
    VideoInfo,
    frames_to_tensor,
    probe_video,
    read_frames,
    resample_indices,
)
from lora_moe_core.errors import UserError

LEVEL_STEP = 5  # grey step per frame: wide enough that x264 + YUV→RGB rounding cannot blur indices


def write_video(path: Path, num_frames: int, fps: int, size=(64, 48), noise=False, faststart=False) -> Path:
    """Write an H.264 mp4 whose frame i is grey level 5·i (or random noise, for big packets)."""
    width, height = size
    rng = np.random.default_rng(0)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            if noise:
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                pixels = np.full((height, width, 3), index * LEVEL_STEP, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def frame_ids(frames: np.ndarray) -> list[int]:
    """Source frame index of each decoded grey frame."""
    return np.rint(frames.reshape(len(frames), -1).mean(1) / LEVEL_STEP).astype(int).tolist()


def nearest_expected(num_source: int, source_fps: int, target_fps: int) -> list[int]:
    """Independent exact-arithmetic version of the nearest-frame rule (ties → earlier frame)."""
    count = -(-num_source * target_fps // source_fps)  # ceil of the duration in target frames
    picks = []
    for k in range(count):
        distances = [abs(Fraction(i, source_fps) - Fraction(k, target_fps)) for i in range(num_source)]
        picks.append(distances.index(min(distances)))
    return picks


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "v30": write_video(root / "clip30.mp4", 48, 30),
        "v24": write_video(root / "clip24.mp4", 36, 24, size=(80, 48)),
        "noise": write_video(root / "noise.mp4", 48, 30, size=(128, 96), noise=True, faststart=True),
    }


# --- probe and decode -------------------------------------------------------------------------------


def test_probe_reports_header_values(videos):
    assert probe_video(videos["v30"]) == VideoInfo(width=64, height=48, num_frames=48, fps=30.0)
    info = probe_video(videos["v24"])
    assert (info.width, info.height, info.num_frames, info.fps) == (80, 48, 36, 24.0)
    assert info.duration == pytest.approx(1.5)


def test_read_all_frames_in_order(videos):
    frames = read_frames(videos["v30"], target_fps=None)
    assert frames.shape == (48, 48, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == list(range(48))


@pytest.mark.parametrize("key, source_fps, count", [("v30", 30, 48), ("v24", 24, 36)])
def test_resample_to_16fps_picks_nearest_frames(videos, key, source_fps, count):
    frames = read_frames(videos[key])  # default target: 16 fps
    expected = nearest_expected(count, source_fps, 16)
    assert len(frames) == len(expected) == -(-count * 16 // source_fps)  # 26 for 30 fps, 24 for 24 fps
    assert frame_ids(frames) == expected
    assert resample_indices(count, source_fps, 16).tolist() == expected


def test_resample_30_to_16_known_values():
    # 30/16 = 1.875 source frames per target frame; 7.5 is a tie and goes to the earlier frame 7
    assert resample_indices(48, 30, 16)[:6].tolist() == [0, 2, 4, 6, 7, 9]
    assert resample_indices(0, 30, 16).tolist() == []


def test_source_fps_overrides_header(videos):
    frames = read_frames(videos["v30"], target_fps=16, source_fps=32)  # treated as 32 fps: every 2nd frame
    assert frame_ids(frames) == list(range(0, 48, 2))


def test_upsampling_repeats_frames(videos):
    frames = read_frames(videos["v30"], target_fps=60)
    assert frame_ids(frames) == [i // 2 for i in range(96)]


def test_max_frames_stops_early(videos):
    frames = read_frames(videos["v30"], max_frames=5)
    assert frame_ids(frames) == [0, 2, 4, 6, 7]


# --- clip extraction --------------------------------------------------------------------------------


def indexed(total: int) -> np.ndarray:
    """A fake [T, 1, 1, 3] video whose pixel value is the frame index."""
    return np.repeat(np.arange(total, dtype=np.uint8)[:, None, None, None], 3, axis=3)


def spans(clips) -> list[tuple[int, int]]:
    for start, clip in clips:  # each clip is the slice starting at its start index
        assert int(clip[0, 0, 0, 0]) == start and (len(clip) - 1) % 4 == 0
    return [(start, len(clip)) for start, clip in clips]


def test_head_takes_first_frames_per_target():
    assert spans(extract_clips(indexed(40), [17, 33, 45], "head")) == [(0, 17), (0, 33)]


def test_chunk_takes_non_overlapping_pieces():
    assert spans(extract_clips(indexed(40), [9], "chunk")) == [(0, 9), (9, 9), (18, 9), (27, 9)]


def test_slide_steps_by_stride():
    assert spans(extract_clips(indexed(40), [17], "slide", frame_stride=10)) == [(0, 17), (10, 17), (20, 17)]
    assert len(extract_clips(indexed(20), [17], "slide")) == 4  # default stride 1: starts 0..3


def test_uniform_spreads_samples():
    assert spans(extract_clips(indexed(40), [17], "uniform", frame_sample=3)) == [(0, 17), (11, 17), (23, 17)]
    assert spans(extract_clips(indexed(17), [17], "uniform", frame_sample=4)) == [(0, 17)]  # no duplicates


def test_full_rounds_down_to_4k_plus_1():
    assert spans(extract_clips(indexed(40), [], "full")) == [(0, 37)]
    assert spans(extract_clips(indexed(40), [], "full", max_frames=20)) == [(0, 17)]
    assert spans(extract_clips(indexed(200), [], "full")) == [(0, 129)]  # musubi's default max_frames
    assert extract_clips(indexed(0), [], "full") == []


@pytest.mark.parametrize(
    "mode, targets, options",
    [("head", [17, 33, 45], {}), ("chunk", [9], {}), ("chunk", [5, 9], {}), ("slide", [17], {"frame_stride": 10}),
     ("slide", [5, 9], {}), ("uniform", [17], {"frame_sample": 3}), ("uniform", [5, 13], {"frame_sample": 5})],
)  # fmt: skip
def test_streamed_clips_equal_the_in_memory_cut(mode, targets, options):
    """iter_clips over a frame stream cuts exactly the clips extract_clips cuts from the whole array."""
    whole = extract_clips(indexed(40), targets, mode, **options)
    streamed = list(iter_clips(iter(indexed(40)), targets, mode, total=40, **options))
    assert sorted(spans(streamed)) == sorted(spans(whole))
    for start, clip in streamed:
        np.testing.assert_array_equal(clip, indexed(40)[start : start + len(clip)])


def test_streamed_cut_holds_one_clip_and_reports_a_short_video():
    held = []

    def frames():
        for index, frame in enumerate(indexed(400)):
            held.append(index)
            yield frame

    clips = iter_clips(frames(), [9], "chunk")
    first_start, first = next(clips)
    assert (first_start, len(first), len(held)) == (0, 9, 9)  # the first clip comes after 9 frames, not 400
    assert len(list(clips)) == 400 // 9 - 1
    with pytest.raises(UserError, match="16 frames at 16 fps: shorter than target_frames \\[17\\]"):
        list(iter_clips(iter(indexed(16)), [17], "slide"))
    with pytest.raises(UserError, match="cannot be streamed"):
        list(iter_clips(iter(indexed(16)), [17], "full"))


def test_short_video_gives_no_clips():
    for mode in ("head", "chunk", "slide", "uniform"):
        assert extract_clips(indexed(16), [17], mode) == []


@pytest.mark.parametrize("targets", [[16], [17, 80], [0], [-3]])
def test_target_frames_must_be_4k_plus_1(targets):
    with pytest.raises(UserError, match="4k\\+1"):
        extract_clips(indexed(100), targets, "head")


def test_bad_extraction_arguments():
    with pytest.raises(UserError, match="frame_extraction"):
        extract_clips(indexed(40), [17], "random")
    with pytest.raises(UserError, match="frame_stride"):
        extract_clips(indexed(40), [17], "slide", frame_stride=0)
    with pytest.raises(UserError, match="target_frames"):
        extract_clips(indexed(40), [], "head")


# --- buckets, resize, tensors -----------------------------------------------------------------------


def test_bucket_exact_resolution_is_kept():
    assert bucket_size(832, 480, resolution=(832, 480)) == (832, 480)
    assert bucket_size(480, 832, resolution=(832, 480)) == (480, 832)


@pytest.mark.parametrize("size", [(1920, 1080), (1280, 720), (1080, 1920), (640, 640), (2048, 858)])
def test_bucket_is_16_divisible_near_aspect_and_area(size):
    width, height = size
    bw, bh = bucket_size(width, height, resolution=(832, 480))
    assert bw % 16 == 0 and bh % 16 == 0
    assert 0.9 * 832 * 480 <= bw * bh <= 832 * 480
    assert abs(bw / bh - width / height) / (width / height) < 0.06


def test_bucket_1080p_matches_musubi():
    assert bucket_size(1920, 1080, resolution=(832, 480)) == (832, 480)


def test_bucket_no_upscale_keeps_small_sources():
    assert bucket_size(500, 300, resolution=(832, 480), no_upscale=True) == (496, 288)
    assert bucket_size(1920, 1080, resolution=(832, 480), no_upscale=True) == (832, 480)
    with pytest.raises(UserError):
        bucket_size(8, 8, resolution=(832, 480), no_upscale=True)


def test_resize_and_crop_downscale_keeps_centre():
    frames = np.zeros((2, 90, 160, 3), dtype=np.uint8)
    frames[:, 35:55, 70:90] = 255  # white square in the middle of a black 16:9 frame
    out = resize_and_crop(frames, (64, 64))
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert out[:, 30:34, 30:34].min() > 200  # centre still white
    assert out[:, :4, :4].max() < 20 and out[:, -4:, -4:].max() < 20  # corners black: cropped, not squeezed


def test_resize_and_crop_upscale_and_identity():
    frames = np.random.default_rng(0).integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    out = resize_and_crop(frames, (64, 48))
    assert out.shape == (3, 48, 64, 3) and out.dtype == np.uint8
    assert resize_and_crop(frames, (30, 20)) is frames


def test_decoded_video_through_bucket_pipeline(videos):
    frames = read_frames(videos["v24"])
    clips = extract_clips(frames, [5, 9], "chunk")
    bucket = bucket_size(80, 48, resolution=(64, 48))
    tensor = frames_to_tensor(resize_and_crop(clips[0][1], bucket))
    assert tensor.shape == (3, 5, bucket[1], bucket[0])


def test_frames_to_tensor_layout_and_range():
    clip = np.zeros((5, 4, 6, 3), dtype=np.uint8)
    clip[:, :, :, 0] = 255
    tensor = frames_to_tensor(clip)
    assert tensor.shape == (3, 5, 4, 6) and tensor.dtype == torch.float32
    assert torch.all(tensor[0] == 1.0) and torch.all(tensor[1:] == -1.0)
    assert tensor.min() >= -1 and tensor.max() <= 1


# --- bad inputs: one-line UserError naming the file ---------------------------------------------------


def assert_user_error(call, path: Path, match: str | None = None) -> str:
    with pytest.raises(UserError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    if match:
        assert match in message
    return message


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("call", [probe_video, read_frames], ids=["probe", "read"])
def test_bad_files_raise_one_line_user_errors(call, videos, tmp_path):
    assert_user_error(call, tmp_path / "missing.mp4", "not found")
    assert_user_error(call, tmp_path, "not a file")
    text = tmp_path / "notes.mp4"
    text.write_text("this is a caption, not a video\n" * 20)
    assert_user_error(call, text, "not a video")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert_user_error(call, empty)
    # moov atom at the end (x264 default): half a file cannot even be opened
    assert_user_error(call, truncate(videos["v30"], tmp_path / "half.mp4"), "truncated")


def test_zero_frame_video(tmp_path):
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    assert_user_error(probe_video, path, "0 frames")
    assert_user_error(read_frames, path, "0 frames")


def test_truncated_mid_stream_fails_by_default(videos, tmp_path):
    # faststart puts the header first, so a cut file opens and decodes until the cut
    cut = truncate(videos["noise"], tmp_path / "cut.mp4", 0.6)
    assert probe_video(cut).num_frames == 48  # the header survives; only decoding finds the damage
    message = assert_user_error(read_frames, cut, "truncated or damaged")
    assert "of 48 frames" in message
    assert_user_error(lambda p: read_frames(p, min_frames=1000), cut, "need at least 1000")


def test_truncated_mid_stream_keeps_prefix_when_enough(videos, tmp_path, caplog):
    cut = truncate(videos["noise"], tmp_path / "cut.mp4", 0.6)
    with caplog.at_level(logging.WARNING, logger="lora_moe_core.data.video"):
        frames = read_frames(cut, target_fps=None, min_frames=5)
    assert 5 <= len(frames) < 48
    assert "cut.mp4" in caplog.text and "truncated" in caplog.text


def test_nothing_decodable_fails_even_with_min_frames(videos, tmp_path):
    cut = truncate(videos["noise"], tmp_path / "stub.mp4", 0.02)
    assert_user_error(lambda p: read_frames(p, min_frames=1), cut)
