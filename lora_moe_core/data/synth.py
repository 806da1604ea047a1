"""Procedural surgical-like clips with known instruments, per-frame tip boxes and zh/en captions.

``generate_dataset(DIR, N)`` writes::

    DIR/videos/clip_0000.mp4   H.264 (libx264, yuv420p, single-threaded so the bytes are reproducible)
    DIR/videos/clip_0000.txt   the caption (musubi caption file, no trailing newline)
    DIR/dataset.toml           musubi-tuner dataset config (relative paths, see below)
    DIR/manifest.jsonl         one JSON object per clip, written last

Each clip shows drifting, breathing tissue (low-frequency pink/red texture, fat, vessels, specular
highlights) and one or two grey metallic instruments entering from the image edges. The tip shape
tells the family apart: Scissors = two tapered curved blades that open and close; Hook = thin
L-shaped hook with a glow and smoke while it cauterises; Suction = narrower straight tube with a
dark round lumen, aspirating a shrinking blood pool; Other = grasper with two boxy serrated jaws.

Everything is a function of ``(seed, clip index)``: one seed gives a byte-identical manifest,
identical frames and (x264 single-threaded) identical mp4 bytes; clip i does not depend on how many
clips are generated. Across CPUs or numpy/FFmpeg builds, vectorised math kernels may differ in the
last bit, so bit-exactness is promised on one installation only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lora_moe_core.data.mp4 import atomic_write
from lora_moe_core.data.synth_captions import make_caption  # re-exported: public name of this module
from lora_moe_core.data.synth_render import render_clip  # re-exported: models.py imports it from here
from lora_moe_core.data.vocabulary import Vocabulary
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.guards.owners import owned_output

TWO_INSTRUMENT_SHARE = 0.3  # share of clips that show two different families
_CLIP_NAME = re.compile(r"^\.?clip_\d+\.(mp4|txt)(\.part)?$")  # ours, incl. temp files of a killed run

# --- dataset on disk ------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(num_videos, seed, width, height, num_frames, fps) -> None:
    _check_int("num_videos", num_videos, 1)
    _check_int("seed", seed, 0)
    _check_int("fps", fps, 1)
    for name, value in (("width", width), ("height", height)):
        _check_int(name, value, 32)
        if value % 16:
            raise UserError(f"{name} must be a multiple of 16 (the WAN bucket step), got {value}")
    _check_int("num_frames", num_frames, 1)
    if (num_frames - 1) % 4:
        raise UserError(f"num_frames must be 4k+1 (e.g. 17, 33, 81) for the WAN VAE, got {num_frames}")


def _plan_dataset(seed: int, num_videos: int) -> list[tuple[str, bool]]:
    """(primary family, english?) per clip: each block of 4 clips covers every family once and has one
    English caption, so even a handful of clips is balanced."""
    rng = np.random.default_rng([seed, 0])
    plan = []
    for _ in range(0, num_videos, 4):
        english = rng.integers(4)
        plan += [(FAMILIES[f], j == english) for j, f in enumerate(rng.permutation(len(FAMILIES)))]
    return plan[:num_videos]


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as H.264 mp4, atomically (one implementation: :mod:`mp4`)."""
    from lora_moe_core.data import mp4  # local: generating captions or importing the package should not load FFmpeg

    mp4.write_mp4(frames, path, fps=int(fps))


def _dataset_toml(width: int, height: int, num_frames: int, fps: int) -> str:
    source_fps = "" if fps == 16 else f"source_fps = {float(fps)}  # musubi resamples to WAN's 16 fps\n"
    return (
        "# musubi-tuner dataset config (docs/dataset_config.md), written by lora_moe_core.data.synth.\n"
        "# Relative paths resolve against this file's folder when lora_moe_core reads it. musubi-tuner\n"
        "# itself opens them relative to its working directory: run it from this folder or make them absolute.\n"
        "[general]\n"
        f"resolution = [{width}, {height}]\n"
        'caption_extension = ".txt"\n'
        "batch_size = 1\n"
        "enable_bucket = true\n"
        "bucket_no_upscale = false\n\n"
        "[[datasets]]\n"
        'video_directory = "videos"\n'
        'cache_directory = "cache"\n'
        f"target_frames = [{num_frames}]\n"
        'frame_extraction = "head"\n'
        f"{source_fps}"
        "num_repeats = 1\n"
    )


def _prepare_output(output_dir: str | Path) -> tuple[Path, Path]:
    out = Path(output_dir)
    videos = out / "videos"
    try:
        videos.mkdir(parents=True, exist_ok=True)
        probe = videos / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    return out, videos


def generate_dataset(
    output_dir: str | Path,
    num_videos: int,
    seed: int = 0,
    width: int = 128,
    height: int = 96,
    num_frames: int = 33,
    fps: int = 16,
    *,
    progress: Callable[[int, int], None] | None = None,
    render: Callable = render_clip,
    two_instrument_share: float = TWO_INSTRUMENT_SHARE,
    overwrite: bool = False,
) -> list[dict]:
    """Write ``num_videos`` synthetic clips, their captions, ``dataset.toml`` and ``manifest.jsonl``.

    Returns the manifest records: ``video_path`` (relative to ``output_dir``), ``caption``, ``roi``
    (per frame, one ``[x0, y0, x1, y1]`` tip box per instrument in ``instruments`` order; pixels,
    x1/y1 exclusive, inside the frame), ``instruments`` (FAMILIES order), ``width``, ``height``,
    ``num_frames``, ``fps``. Old ``clip_*.mp4``/``.txt`` files in ``videos/`` that this run did not
    write are removed so the folder matches the manifest. ``progress(done, total)`` is called per clip.
    ``render`` draws a clip (``render_clip``'s signature; :mod:`synth_families` passes its own) and
    ``two_instrument_share`` is the share of clips showing two families.

    ``output_dir`` must be new, empty or written by ``synth-data`` before, unless ``overwrite``
    (:mod:`lora_moe_core.guards.owners`).

    Raises UserError (one line) for bad sizes or counts, a folder that holds other files, an unwritable
    ``output_dir``.
    """
    _validate(num_videos, seed, width, height, num_frames, fps)
    with owned_output(output_dir, "synth-data", overwrite):  # never over a user's dataset
        out, videos = _prepare_output(output_dir)
        vocab = Vocabulary.from_builtin()
        digits = max(4, len(str(num_videos - 1)))
        records = []
        for i, (primary, english) in enumerate(_plan_dataset(seed, num_videos)):
            rng = np.random.default_rng([seed, 1, i])  # per clip: clip i is the same whatever num_videos is
            chosen = {primary}
            if rng.random() < two_instrument_share:
                chosen.add(str(rng.choice([f for f in FAMILIES if f != primary])))
            families = [f for f in FAMILIES if f in chosen]
            caption = make_caption(families, rng, english=english)
            labelled = vocab.match(caption).families
            if labelled != families:  # a template bug, not a user error: fail loudly
                raise AssertionError(f"synthetic caption {caption!r} labels as {labelled}, expected {families}")
            frames, roi = render(rng, families, width, height, num_frames, fps)
            stem = f"clip_{i:0{digits}d}"
            _write_text(videos / f"{stem}.txt", caption)  # caption first: an orphan caption is harmless
            write_mp4(videos / f"{stem}.mp4", frames, fps)
            records.append({"video_path": f"videos/{stem}.mp4", "caption": caption, "roi": roi, "instruments": families,
                            "width": width, "height": height, "num_frames": num_frames, "fps": fps})  # fmt: skip
            if progress is not None:
                progress(i + 1, num_videos)
        keep = {Path(r["video_path"]).name for r in records} | {Path(r["video_path"]).stem + ".txt" for r in records}
        for stale in videos.iterdir():
            if _CLIP_NAME.match(stale.name) and stale.name not in keep:
                stale.unlink()
        _write_text(out / "dataset.toml", _dataset_toml(width, height, num_frames, fps))
        _write_text(out / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return records
