"""Synthetic surgical clips: files, manifest, decoded frames, tip boxes, captions, determinism, errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import av
import numpy as np
import pytest

from lora_moe_core.data.synth import generate_dataset, make_caption
from lora_moe_core.data.vocabulary import Vocabulary
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.guards.owners import OWNER_FILE, owner_of

W, H, T, FPS, N = 96, 64, 9, 16, 6
FIELDS = {"video_path", "caption", "roi", "instruments", "width", "height", "num_frames", "fps"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synth")
    records = generate_dataset(out, N, seed=3, width=W, height=H, num_frames=T, fps=FPS)
    return out, records


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_files_and_manifest_fields(dataset):
    out, records = dataset
    rows = manifest(out)
    assert rows == records and len(rows) == N
    for row in rows:
        assert set(row) == FIELDS
        assert (row["width"], row["height"], row["num_frames"], row["fps"]) == (W, H, T, FPS)
        video = out / row["video_path"]
        assert row["video_path"].startswith("videos/") and video.is_file()
        assert video.with_suffix(".txt").read_text(encoding="utf-8") == row["caption"]
        assert row["instruments"] == [f for f in FAMILIES if f in row["instruments"]] and row["instruments"]
    hidden = [p.relative_to(out) for p in out.rglob("*") if p.name.startswith(".")]
    assert hidden == [Path(OWNER_FILE)], "temp files left behind"  # only the marker that synth-data owns it
    assert owner_of(out) == "synth-data"
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in text and not text.isascii()  # Chinese captions stored readable (ensure_ascii=False)


def test_decoded_frames_have_the_requested_shape(dataset):
    out, records = dataset
    with av.open(str(out / records[0]["video_path"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == FPS
    for row in records[:2]:
        assert decode(out / row["video_path"]).shape == (T, H, W, 3)


def test_roi_boxes_inside_frame_one_per_instrument_and_moving(dataset):
    _, records = dataset
    for row in records:
        assert len(row["roi"]) == T
        for boxes in row["roi"]:
            assert len(boxes) == len(row["instruments"])
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        boxes = np.array(row["roi"], dtype=float)  # [T, n, 4]
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        path = np.abs(np.diff(centres, axis=0)).sum(axis=(0, 2))  # [n]: distance travelled per tip
        assert path.min() >= 1, "every tip box should move over time"


def test_captions_label_exactly_their_families(dataset):
    _, records = dataset
    vocab = Vocabulary.from_builtin()
    for row in records:
        assert vocab.match(row["caption"]).families == row["instruments"], row["caption"]
    english = [r for r in records if r["caption"].isascii()]
    assert english and len(english) < len(records), "expected a zh/en mix (one English caption per 4 clips)"
    assert any(len(r["instruments"]) == 1 for r in records)


def test_every_template_and_synonym_labels_correctly():
    """make_caption draws templates and synonyms at random: sample it hard for every family set."""
    vocab = Vocabulary.from_builtin()
    rng = np.random.default_rng(0)
    sets = [[f] for f in FAMILIES] + [[a, b] for i, a in enumerate(FAMILIES) for b in FAMILIES[i + 1 :]]
    captions = set()
    for families in sets:
        for english in (False, True):
            for _ in range(150):
                caption = make_caption(families, rng, english=english)
                assert vocab.match(caption).families == families, caption
                captions.add(caption)
    assert len(captions) > 1000, "captions should vary"


def test_same_seed_same_output_and_different_seed_differs(dataset, tmp_path):
    out, records = dataset
    again = generate_dataset(tmp_path / "a", N, seed=3, width=W, height=H, num_frames=T, fps=FPS)
    assert again == records
    assert (tmp_path / "a/manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    first = records[0]["video_path"]
    assert np.array_equal(decode(tmp_path / "a" / first), decode(out / first))
    # x264 runs single-threaded, so even the encoded bytes are reproducible.
    assert (tmp_path / "a" / first).read_bytes() == (out / first).read_bytes()
    other = generate_dataset(tmp_path / "b", N, seed=4, width=W, height=H, num_frames=T, fps=FPS)
    assert [r["caption"] for r in other] != [r["caption"] for r in records]
    assert (tmp_path / "b/manifest.jsonl").read_bytes() != (out / "manifest.jsonl").read_bytes()


def test_rerun_with_fewer_clips_removes_stale_clips(dataset, tmp_path):
    generate_dataset(tmp_path, 3, seed=1, width=64, height=48, num_frames=5)
    generate_dataset(tmp_path, 1, seed=1, width=64, height=48, num_frames=5)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["clip_0000.mp4", "clip_0000.txt"]
    assert len(manifest(tmp_path)) == 1


def test_interrupted_encode_leaves_no_partial_mp4_and_no_manifest(tmp_path, monkeypatch):
    real, calls = av.VideoFrame, []

    class Interrupting:
        @staticmethod
        def from_ndarray(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # in the middle of the first clip
                raise KeyboardInterrupt
            return real.from_ndarray(*args, **kwargs)

    monkeypatch.setattr(av, "VideoFrame", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 2, width=64, height=48, num_frames=5)
    assert not list(tmp_path.rglob("*.mp4")) and not list(tmp_path.rglob("*.part"))
    assert not (tmp_path / "manifest.jsonl").exists()


def test_progress_reports_every_clip(tmp_path):
    seen = []
    generate_dataset(tmp_path, 2, width=64, height=48, num_frames=5, progress=lambda *a: seen.append(a))
    assert seen == [(1, 2), (2, 2)]


def test_dataset_toml_is_musubi_config(dataset):
    out, _ = dataset
    config = tomllib.loads((out / "dataset.toml").read_text(encoding="utf-8"))
    assert config["general"] == {
        "resolution": [W, H],
        "caption_extension": ".txt",
        "batch_size": 1,
        "enable_bucket": True,
        "bucket_no_upscale": False,
    }
    (ds,) = config["datasets"]
    assert ds["video_directory"] == "videos" and (out / ds["video_directory"]).is_dir()
    assert ds["cache_directory"] == "cache" and ds["target_frames"] == [T] and ds["frame_extraction"] == "head"


def _grey(pixels: np.ndarray) -> np.ndarray:
    """Steel: bright enough and nearly colourless (tissue is strongly red)."""
    pixels = pixels.astype(int)
    return (pixels.max(-1) - pixels.min(-1) < 45) & (pixels.mean(-1) > 60)


def test_instrument_tips_are_grey_and_surroundings_tissue_coloured(dataset):
    out, records = dataset
    inside_grey, outside_grey, outside_red = [], [], []
    for row in records:
        frames = decode(out / row["video_path"])
        for k in (0, T // 2, T - 1):
            frame, outside = frames[k], np.ones((H, W), bool)
            for x0, y0, x1, y1 in row["roi"][k]:
                inside_grey.append(_grey(frame[y0:y1, x0:x1]).mean())
                outside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False
            outside_grey.append(_grey(frame[outside]).mean())
            rgb = frame[outside].astype(int)
            outside_red.append(np.median(rgb[:, 0] - rgb[:, 1]))
    # Measured over seeds 0-11: inside min 0.18, mean 0.33-0.42; outside max 0.08; red margin >= 65.
    assert min(inside_grey) > 0.1 and np.mean(inside_grey) > 0.25  # the tip fills a good part of its box
    assert max(outside_grey) < 0.2  # elsewhere only the shafts (and a little smoke) are grey
    assert min(outside_red) > 40  # tissue: red well above green


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_videos": 0}, "num_videos"),
        ({"width": 100}, "multiple of 16"),
        ({"height": 50}, "multiple of 16"),
        ({"num_frames": 32}, r"4k\+1"),
        ({"fps": 0}, "fps"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_input_raises_one_line_user_error(tmp_path, kwargs, message):
    args = {"num_videos": 1, "width": 64, "height": 48, "num_frames": 5} | kwargs
    with pytest.raises(UserError, match=message) as info:
        generate_dataset(tmp_path / "out", **args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_raises_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create .*/file/out: .*/file is a file, not a folder") as info:
        generate_dataset(blocker / "out", 1, width=64, height=48, num_frames=5)
    assert "\n" not in str(info.value)
