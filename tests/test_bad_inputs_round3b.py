"""Bad input, round three, the rest of issue #26: a video listed twice in a dataset (class 10) and a truncated
legacy optimizer state given to ``--resume`` (class 11). The refusals that fit the sandbox of
``test_bad_inputs.py`` (the same video with two captions, ``pipeline run`` with a missing model file) are cases of
``test_bad_inputs_round3.py``; what is here needs real tiny videos, a cache or a training run.

A video listed twice (the same path, another spelling of it, a symlink, a hard link or a byte-identical copy, in
any dataset format: JSONL, a folder, musubi TOML with ``video_directory`` or ``video_jsonl_file``, local or
``s3://``) is kept once, with one ``warning:`` line on stderr naming both entries: ``label`` writes one line for
it and ``cache`` encodes it once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lora_moe_core.cli.main import main
from lora_moe_core.data.latent_cache import read_cache
from lora_moe_core.data.synth import generate_dataset
from tests.test_faults_training import RUN, _assert_same_run, _resumed_step, _stage2_argv, reference, stage1
from tests.test_security_inputs import _one_error, _run_with_saves, _snapshot

__all__ = ["reference", "stage1"]  # the fault tests' module fixtures: the Stage-1 LoRA, the uninterrupted run
CLIP = ["--target_frames", "17"]


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny clips (64x48, 17 frames) with their captions, manifest.jsonl and dataset.toml."""
    folder = tmp_path_factory.mktemp("three")
    generate_dataset(folder, 3, seed=7, width=64, height=48, num_frames=17)
    return folder


def _copy(synthetic: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    data = tmp_path / "data"
    shutil.copytree(synthetic, data, ignore=shutil.ignore_patterns(".lora-moe-owner"))
    records = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    return data, records


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def _warnings(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines), err  # no traceback, no error
    return lines


# how the fourth entry names the first entry's video
SAME_VIDEO = {
    "the same path": lambda data: "videos/clip_0000.mp4",
    "another spelling": lambda data: "./videos/../videos/clip_0000.mp4",
    "a symlink": lambda data: os.symlink("clip_0000.mp4", data / "videos" / "link.mp4") or "videos/link.mp4",
    "a hard link": lambda data: (
        os.link(data / "videos" / "clip_0000.mp4", data / "videos" / "hard.mp4") or "videos/hard.mp4"
    ),
    "a byte copy": lambda data: (
        shutil.copy(data / "videos" / "clip_0000.mp4", data / "videos" / "copy.mp4") and "videos/copy.mp4"
    ),
}


@pytest.mark.parametrize("how", SAME_VIDEO)
def test_a_video_listed_twice_is_labelled_once_with_one_warning(how, synthetic, tmp_path, capsys) -> None:
    data, records = _copy(synthetic, tmp_path)
    second = SAME_VIDEO[how](data)
    manifest = _write_jsonl(data / "twice.jsonl", [*records, {**records[0], "video_path": second}])
    assert main(["label", "--dataset", str(manifest), "--output", str(tmp_path / "labels.jsonl")]) == 0
    (line,) = _warnings(capsys.readouterr().err)
    assert f"{manifest}:1 and {manifest}:4 list the same video" in line and f"({manifest}:4 dropped)" in line
    if how in ("a hard link", "a byte copy"):
        assert f"{data / second} {'is the same file as' if how == 'a hard link' else 'holds the same bytes as'}" in line
    labels = [json.loads(text) for text in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [label["video_path"] for label in labels] == [record["video_path"] for record in records]


def _toml(data: Path, *entries: str) -> Path:
    general = (data / "dataset.toml").read_text().split("[[datasets]]")[0]
    path = data / "twice.toml"
    path.write_text(general + "".join(f"[[datasets]]\n{entry}\ntarget_frames = [17]\n\n" for entry in entries))
    return path


FORMATS = {  # a dataset in each format the project reads, listing every video twice: (dataset, entry names)
    "two video_directory entries": lambda data: (
        _toml(data, 'video_directory = "videos"', 'video_directory = "./videos"'),
        lambda toml, i, video: (f"{toml} [[datasets]] entry 1 ({video})", f"{toml} [[datasets]] entry 2 ({video})")),
    "two video_jsonl_file entries": lambda data: (
        _toml(data, 'video_jsonl_file = "manifest.jsonl"', 'video_jsonl_file = "./manifest.jsonl"'),
        lambda toml, i, video: (f"{toml} [[datasets]] entry 1 ({data / 'manifest.jsonl'}:{i + 1})",
                                f"{toml} [[datasets]] entry 2 ({data / 'manifest.jsonl'}:{i + 1})")),
    "a folder with manifest.jsonl and dataset.toml": lambda data: (
        _write_jsonl(data / "manifest.jsonl", 2 * [json.loads(x) for x in (data / "manifest.jsonl").read_text()
                                                   .splitlines()]).parent,
        lambda folder, i, video: (f"{folder / 'manifest.jsonl'}:{i + 1}", f"{folder / 'manifest.jsonl'}:{i + 4}")),
}  # fmt: skip


@pytest.mark.parametrize("form", FORMATS)
def test_every_dataset_format_lists_each_video_once(form, synthetic, tmp_path, capsys) -> None:
    data, records = _copy(synthetic, tmp_path)
    dataset, names = FORMATS[form](data)
    assert main(["label", "--dataset", str(dataset), "--output", str(tmp_path / "labels.jsonl")]) == 0
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 3
    for index, (line, record) in enumerate(zip(lines, records, strict=True)):
        kept, dropped = names(dataset, index, Path(record["video_path"]).name)
        assert line.startswith(f"warning: {kept} and {dropped} list the same video "), line
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 3


def test_a_duplicate_is_cached_once_and_the_rerun_is_up_to_date(synthetic, tmp_path, capsys) -> None:
    data, records = _copy(synthetic, tmp_path)
    shutil.copy(data / "videos" / "clip_0001.mp4", data / "videos" / "again.mp4")
    manifest = _write_jsonl(data / "twice.jsonl", [*records[:2], {**records[1], "video_path": "videos/again.mp4"}])
    argv = ["cache", "--dataset", str(manifest), "--task", "tiny", "--output", str(tmp_path / "cache"), *CLIP]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "cached 2 clips from 2 videos" in captured.out
    (line,) = _warnings(captured.err)
    assert f"{manifest}:2 and {manifest}:3 list the same video ({data / 'videos' / 'again.mp4'} holds" in line
    names = sorted(entry.name for entry in read_cache(str(tmp_path / "cache")))
    assert names == [f"clip_000{i}_00000-017_0064x0048_wan.safetensors" for i in range(2)]
    assert not list((tmp_path / "cache").glob("again*"))
    assert main(argv) == 0
    assert "2 up to date" in capsys.readouterr().out


def test_labels_written_before_the_duplicate_was_dropped_are_refused(synthetic, tmp_path, capsys) -> None:
    data, records = _copy(synthetic, tmp_path)
    labels = tmp_path / "labels.jsonl"
    assert main(["label", "--dataset", str(data), "--output", str(labels)]) == 0
    old = labels.read_text().splitlines()
    labels.write_text("\n".join([*old, old[0]]) + "\n")  # what labelling the duplicated list used to write
    manifest = _write_jsonl(data / "twice.jsonl", [*records, records[0]])
    capsys.readouterr()
    assert main(["cache", "--dataset", str(manifest), "--labels", str(labels), "--task", "tiny", "--output",
                 str(tmp_path / "cache"), *CLIP]) == 2  # fmt: skip
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: ") and error.startswith(f"error: {labels} has 4 lines but the dataset has 3")
    assert "once 1 duplicate entries are dropped: rerun `lora-moe label`" in error
    assert not (tmp_path / "cache").exists()


def test_many_duplicates_are_counted_after_ten_lines(synthetic, tmp_path, capsys) -> None:
    data, records = _copy(synthetic, tmp_path)
    manifest = _write_jsonl(data / "many.jsonl", [records[0]] * 13)
    assert main(["label", "--dataset", str(manifest), "--output", str(tmp_path / "labels.jsonl")]) == 0
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 11 and lines[-1] == "warning: 2 more duplicate entries dropped (12 in all)"
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 1


def test_only_videos_of_a_shared_size_are_hashed(tmp_path, monkeypatch) -> None:
    """Distinct sizes cost one stat per video; equal sizes with other bytes are two videos."""
    from lora_moe_core.data import duplicates
    from lora_moe_core.data.dataset import load_dataset

    hashed, real = [], duplicates.file_sha256
    monkeypatch.setattr(duplicates, "file_sha256", lambda path, what: hashed.append(Path(path).name) or real(path))
    for name, data in {"a.mp4": b"a" * 100, "b.mp4": b"b" * 200, "c.mp4": b"c" * 300, "d.mp4": b"d" * 300}.items():
        (tmp_path / name).write_bytes(data)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"video_path": f"{x}.mp4", "caption": "hook"} for x in "abcd"])
    assert len(load_dataset(str(manifest)).clips) == 4
    assert sorted(hashed) == ["c.mp4", "d.mp4"]


def test_an_s3_dataset_lists_each_video_once(synthetic, s3_env, tmp_path, capsys) -> None:
    import uuid

    from lora_moe_core.storage.store import Storage

    data, records = _copy(synthetic, tmp_path)
    (data / "extra").mkdir()  # not in videos/: dataset.toml's video_directory would want a caption file for it
    shutil.copy(data / "videos" / "clip_0002.mp4", data / "extra" / "copy.mp4")
    _write_jsonl(data / "manifest.jsonl", [*records, {**records[2], "video_path": "extra/copy.mp4"}, records[0]])
    prefix = f"s3://test/dup-{uuid.uuid4().hex[:8]}"
    Storage().sync_dir_to(data, prefix)
    assert main(["label", "--dataset", prefix, "--output", str(tmp_path / "labels.jsonl")]) == 0
    first, second = _warnings(capsys.readouterr().err)
    manifest = f"{prefix}/manifest.jsonl"
    assert f"{manifest}:3 and {manifest}:4 list the same video ({prefix}/extra/copy.mp4 holds the same" in first
    assert f"{manifest}:1 and {manifest}:5 list the same video {prefix}/videos/clip_0000.mp4:" in second
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 3


# -- 11. a truncated optimizer state of a legacy save (its marker predates checksums) -----------------------------
def _legacy(payload: dict) -> None:
    payload.pop("files")  # a marker written before the sizes and SHA-256s were recorded


@pytest.mark.parametrize("cut", ["in the data", "in the header"])
def test_a_truncated_legacy_optimizer_state_is_one_line_and_auto_skips_it(cut, tiny_cache, stage1, reference,
                                                                          tmp_path, capsys) -> None:  # fmt: skip
    run = _run_with_saves(reference, tmp_path, _legacy)
    optimizer = run / "optimizer_step_3.safetensors"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) - 100] if cut == "in the data" else data[:40])
    before = _snapshot(run)
    marker = run / "training_state_step_3.json"
    err = _one_error(capsys, _stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", str(marker)))
    assert f"--resume {marker}: optimizer_step_3.safetensors is damaged" in err
    assert ("file not fully covered" if cut == "in the data" else "header length field says") in err
    assert _snapshot(run) == before  # nothing written, nothing removed, no tracking file
    assert main(_stage2_argv(tiny_cache, stage1, run, *RUN, "--resume", "auto")) == 0
    printed = capsys.readouterr().out
    assert "skipping training_state_step_3.json: optimizer_step_3.safetensors is damaged" in printed
    assert _resumed_step(printed) == 2
    _assert_same_run(run, reference)
