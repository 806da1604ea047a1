"""Latent caching end to end on the tiny model: musubi layout, ROI maps, resume, shards, bad videos, S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open

from lora_moe_core.cli.main import main
from lora_moe_core.data.latent_cache import read_cache
from lora_moe_core.data.synth import generate_dataset
from lora_moe_core.guards.owners import OWNER_FILE
from lora_moe_core.storage.store import Storage

CLIP = ["--target_frames", "17"]  # 64×48 clips of 17 frames: latents [16, 5, 6, 8]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    generate_dataset(folder, 4, seed=2, width=64, height=48, num_frames=17)
    return folder


@pytest.fixture(scope="module")
def cache(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    assert main(["cache", "--dataset", str(dataset), "--task", "tiny", "--output", str(out), *CLIP]) == 0
    return out


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cache_files_follow_musubi_layout(cache, dataset):
    manifest = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    latent = cache / "clip_0000_00000-017_0064x0048_wan.safetensors"
    with safe_open(str(latent), framework="pt") as handle:
        assert handle.get_tensor("latents_5x6x8_bfloat16").shape == (16, 5, 6, 8)
        assert handle.get_tensor("latents_5x6x8_bfloat16").dtype == torch.bfloat16
        roi = handle.get_tensor("roi_weights_5x6x8")
        labels = handle.get_tensor("instrument_labels")
        metadata = handle.metadata()
    assert metadata["architecture"] == "wan" and metadata["format_version"] == "1.0.1"
    assert (metadata["width"], metadata["height"], metadata["frame_count"]) == ("64", "48", "17")
    assert roi.max().item() == 4.0 and roi.min().item() == 1.0 and 0 < (roi > 1).float().mean() < 0.5
    families = ["Scissors", "Hook", "Suction", "Other"]
    assert [families[i] for i in labels.nonzero().flatten().tolist()] == manifest[0]["instruments"]
    with safe_open(str(cache / "clip_0000_wan_te.safetensors"), framework="pt") as handle:
        text = handle.get_tensor("varlen_t5_bfloat16")
        assert text.dim() == 2 and text.shape[1] == 16 and handle.metadata()["caption1"] == manifest[0]["caption"]


def test_latents_are_normalised_and_entries_read_back(cache):
    entries = read_cache(str(cache))
    assert len(entries) == 4 and all(e.labelled for e in entries)
    latents = torch.stack([e.latents for e in entries])
    assert 0.3 < latents.std().item() < 3.0  # calibrated tiny VAE: near unit scale, like the real Wan VAE's
    assert abs(latents.mean().item()) < 1.0


def test_rerun_skips_current_entries_and_redoes_missing(cache, dataset, capsys):
    argv = ["cache", "--dataset", str(dataset), "--task", "tiny", "--output", str(cache), *CLIP]
    assert main(argv) == 0
    assert "0 videos, 4 up to date" in capsys.readouterr().out.replace("from 0 videos", "0 videos")
    (cache / "clip_0002_lora_moe.json").unlink()
    assert main(argv) == 0
    assert "from 1 videos, 3 up to date" in capsys.readouterr().out


def test_shards_are_disjoint_and_cover_everything(dataset, tmp_path):
    outputs = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / shard.replace("/", "of")
        assert main(["cache", "--dataset", str(dataset), "--task", "tiny", "--output", str(out), "--shard", shard,
                     *CLIP]) == 0  # fmt: skip
        outputs.append({p.name for p in out.glob("*_wan.safetensors")})
    assert not outputs[0] & outputs[1] and len(outputs[0] | outputs[1]) == 4


def _bad_videos(folder: Path, dataset: Path) -> None:
    (folder / "videos").mkdir(parents=True)
    lines = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()][:1]
    for line in lines:
        shutil.copy(dataset / line["video_path"], folder / line["video_path"])
    (folder / "videos" / "text.mp4").write_text("this is not a video")
    data = (dataset / lines[0]["video_path"]).read_bytes()
    (folder / "videos" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with av.open(str(folder / "videos" / "empty.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    extra = [
        {"video_path": f"videos/{name}.mp4", "caption": "电凝钩分离组织"} for name in ("text", "truncated", "empty")
    ]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines + extra))


def test_bad_videos_are_reported_skipped_and_fail_past_the_limit(dataset, tmp_path, capsys):
    _bad_videos(tmp_path / "data", dataset)
    out = tmp_path / "cache"
    argv = ["cache", "--dataset", str(tmp_path / "data"), "--task", "tiny", "--output", str(out), *CLIP]
    err = _one_line_error(capsys, argv)
    assert "3 of 4 videos failed" in err
    assert main([*argv, "--max_bad_fraction", "0.8"]) == 0
    report = capsys.readouterr().out
    for name in ("text.mp4", "truncated.mp4", "empty.mp4"):
        assert f"skipped {tmp_path / 'data' / 'videos' / name}" in report
    assert "1 up to date, 3 failed" in report  # the good video was cached by the failed run already
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [OWNER_FILE]  # no temporary file left


def test_musubi_cache_is_reused_without_reencoding(cache, tmp_path, capsys):
    musubi = tmp_path / "musubi"
    musubi.mkdir()
    for path in cache.glob("*.safetensors"):  # strip our keys: a plain musubi cache
        with safe_open(str(path), framework="pt") as handle:
            keep = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(("latents_", "varlen_t5_"))}
            metadata = {k: v for k, v in handle.metadata().items() if not k.startswith("lora_moe.")}
        from safetensors.torch import save_file

        save_file(keep, musubi / path.name, metadata=metadata)
    out = tmp_path / "ours"
    assert main(["cache", "--dataset", str(musubi), "--task", "tiny", "--output", str(out)]) == 0
    assert "without re-encoding: 4 clips" in capsys.readouterr().out
    entries, original = read_cache(str(out)), read_cache(str(cache))
    for ours, theirs in zip(entries, original, strict=True):
        torch.testing.assert_close(ours.latents, theirs.latents, rtol=0, atol=0)
        assert torch.equal(ours.labels, theirs.labels)  # labels recovered from the stored caption
        assert ours.roi_weights.eq(1).all()


def test_whole_data_stage_on_s3(dataset, s3_env, tmp_path, capsys):
    storage = Storage()
    storage.sync_dir_to(dataset, "s3://test/data")
    assert main(["label", "--dataset", "s3://test/data", "--output", "s3://test/data/labels.jsonl"]) == 0
    assert main(["cache", "--dataset", "s3://test/data", "--labels", "s3://test/data/labels.jsonl", "--task", "tiny",
                 "--output", "s3://test/cache", *CLIP]) == 0  # fmt: skip
    assert "cached 4 clips from 4 videos" in capsys.readouterr().out
    assert len(read_cache("s3://test/cache")) == 4
    assert main(["cache", "--dataset", "s3://test/data", "--task", "tiny", "--output", "s3://test/cache", *CLIP]) == 0
    assert "4 up to date" in capsys.readouterr().out


def test_s3_errors_are_one_line(dataset, s3_env, monkeypatch, capsys):
    err = _one_line_error(capsys, ["label", "--dataset", "s3://test/nothing-here", "--output", "x.jsonl"])
    assert "not found" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    err = _one_line_error(capsys, ["label", "--dataset", "s3://test/data", "--output", "x.jsonl"])
    assert "access denied" in err and "wrong-secret" not in err


@pytest.mark.parametrize("fallback", ["motion", "uniform"])
def test_clips_without_tip_boxes_use_the_roi_fallback(dataset, tmp_path, fallback):
    out = tmp_path / "cache"
    argv = ["cache", "--dataset", str(dataset / "dataset.toml"), "--task", "tiny", "--output", str(out),
            "--roi_fallback", fallback, "--shard", "0/4", *CLIP]  # fmt: skip
    assert main(argv) == 0  # a musubi video_directory dataset: captions from .txt files, no boxes
    (latent,) = out.glob("*_wan.safetensors")
    with safe_open(str(latent), framework="pt") as handle:
        weights = handle.get_tensor("roi_weights_5x6x8")
        assert handle.metadata()["lora_moe.roi_source"] == fallback
    if fallback == "uniform":
        assert weights.eq(1).all()
    else:
        assert weights.max().item() == pytest.approx(4.0) and weights.min().item() >= 1.0
