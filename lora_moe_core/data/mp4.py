"""Writing (and, for tests, reading) H.264 mp4 clips: the one mp4 writer of the project.

Files are written atomically: FFmpeg writes a hidden temp file in the destination folder, which is renamed
over the destination only when complete, so a killed run never leaves a half-written video under the real
name. x264 runs single-threaded: its output then depends only on the frames, so equal frames give
byte-identical files with one PyAV/FFmpeg build (a thread count following the CPU would not).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lora_moe_core.errors import UserError, disk_full_reason
from lora_moe_core.guards.files import check_output_folder, check_output_name, removed_on_failure


def _reason(exc: OSError) -> str:
    if (full := disk_full_reason(exc)) is not None:  # PyAV's errors carry errno 27 without a strerror
        return f"{full}; free space and rerun"
    return exc.strerror or str(exc) or type(exc).__name__


def check_writable(path: str | Path) -> Path:
    """Make sure a file can be created at ``path``, before costly work, without creating anything: a command that
    fails later must not leave empty folders behind (missing parents are created when the file is written).

    Raises:
        UserError: when ``path`` is a directory, its name is too long, or its nearest existing parent is not a
            writable folder.
    """
    path = Path(path)
    check_output_name(path)  # first: stat() itself fails on a name the file system cannot hold
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file name such as {path / 'output.mp4'}")
    check_output_folder(path.parent, f"cannot write {path.name}: its folder")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp)`` on a hidden temp file beside ``path``, then rename it to ``path``.

    Raises:
        UserError: one line for any OS error (missing permission, disk full, ``path`` is a directory).
    """
    path = check_writable(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with removed_on_failure(path.parent):  # a folder made for this file goes again when the write fails
            write(tmp)
            os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18, preset: str = "medium") -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (even H and W) as H.264/yuv420p mp4, atomically.

    Args:
        frames: the clip; 16 fps is WAN's native rate.
        path: destination; missing parent folders are created.
        fps: frame rate written in the stream header.
        crf: x264 quality (18: visually lossless, what the synthetic dataset uses).
        preset: x264 speed preset.

    Raises:
        ValueError: frames of the wrong dtype or shape (a programming error).
        UserError: an unwritable destination, one line.
    """
    import av  # local: importing the package should not load FFmpeg

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    if int(fps) < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")

    def write(tmp: Path) -> None:
        try:
            with av.open(str(tmp), "w", format="mp4") as container:  # format: the temp name has no .mp4 suffix
                stream = container.add_stream("libx264", rate=int(fps), options={"crf": str(crf), "preset": preset})
                stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                stream.codec_context.thread_count = 1
                for frame in frames:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")))
                container.mux(stream.encode())
        except av.FFmpegError as exc:  # e.g. disk full inside FFmpeg: report it like any write error
            raise OSError(str(exc)) from None

    return atomic_write(path, write)


def read_mp4(path: str | Path) -> np.ndarray:
    """Every frame of a video as uint8 RGB ``[T, H, W, 3]`` (no frame-rate resampling)."""
    from lora_moe_core.data.video import read_frames

    return read_frames(path, target_fps=None)
