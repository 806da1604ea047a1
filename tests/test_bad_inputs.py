"""The bad-input corpus (``tests/data/bad/``, listed in its README.md) fed to the real ``lora-moe`` commands.

Each case must exit with code 2 and print exactly one ``error:`` line naming the problem and the file, with no
traceback and no warning; nothing may be written outside the command's output folder, and what that folder held
before the run (a finished cache entry, an earlier LoRA, labels, a video) must survive byte for byte.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lora_moe_core.cli.main import main
from tests.helpers import assert_one_line_error

BAD = Path(__file__).parent / "data" / "bad"
CAPTION = "电凝钩分离胆囊三角组织"  # names the Hook family
CLIP = ["--target_frames", "5"]  # the first 5 of ok.mp4's 17 frames (64x48, 16 fps): a cheap VAE encode
MISSING_BUCKET = "s3://no-such-bucket-4f2a"
NO_BUCKET = "bucket 'no-such-bucket-4f2a' does not exist"
PREVIOUS = b"the result of an earlier run\n"
MIXED_BAD = ("truncated.mp4", "not_a_video.mp4", "huge_16384x8192.mp4")

Argv = Callable[[Path, Path], list[str]]  # (input folder, output folder) -> command line


@dataclass(frozen=True)
class Case:
    """One bad input: the command line that feeds it to the CLI and the words its error line must hold."""

    id: str
    argv: Argv
    words: tuple[str, ...]
    output: str  # what the command writes in the output folder; an earlier run left one there already
    prepare: Callable[[Path], None] | None = None  # writes generated inputs into the input folder
    s3: bool = False  # needs the SeaweedFS test server


def _manifest(folder: Path, name: str, *records: dict) -> None:
    (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _cache_argv(dataset: str, output: str, *extra: str) -> list[str]:
    return ["cache", "--dataset", dataset, "--task", "tiny", "--output", output, *extra, *CLIP]


def _video(case_id: str, video: str, *words: str, prepare: Callable[[Path], None] | None = None) -> Case:
    """``cache`` of a dataset made only of ``video``, into a cache folder that holds an earlier, finished entry."""

    def write_dataset(src: Path) -> None:
        _manifest(src, "only.jsonl", {"video_path": video, "caption": CAPTION})
        if prepare:
            prepare(src)

    argv: Argv = lambda src, out: _cache_argv(str(src / "only.jsonl"), str(out / "cache"))
    return Case(case_id, argv, (video, *words), "cache", write_dataset)


def _label(case_id: str, dataset: str, *words: str, prepare=None) -> Case:
    argv: Argv = lambda src, out: ["label", "--dataset", str(src / dataset), "--output", str(out / "labels.jsonl")]
    return Case(case_id, argv, words, "labels.jsonl", prepare)


def _labels_file(case_id: str, labels: str, *words: str) -> Case:
    argv: Argv = lambda src, out: _cache_argv(str(src / "ok.jsonl"), str(out / "cache"), "--labels", str(src / labels))
    return Case(case_id, argv, (labels, *words), "cache")


def _config(case_id: str, config: str, *words: str) -> Case:
    argv: Argv = lambda src, out: ["train", "--config", str(src / config), "--task", "tiny", "--output_dir", str(out)]
    return Case(case_id, argv, (config, *words), "lora_moe_final.safetensors")


def _convert(case_id: str, lora: str, *words: str) -> Case:
    argv: Argv = lambda src, out: ["convert-lora", "--input", str(src / lora), "--to", "comfy", "--output",
                                   str(out / "lora.safetensors")]  # fmt: skip
    return Case(case_id, argv, (lora, *words), "lora.safetensors")


def _export(case_id: str, weights: str, *words: str, prepare=None) -> Case:
    argv: Argv = lambda src, out: ["export", "--lora_moe_weights", str(src / weights), "--instrument_hint", "Hook",
                                   "--output_dir", str(out)]  # fmt: skip
    return Case(case_id, argv, (weights, *words), "Hook.safetensors", prepare)


def _s3(case_id: str, argv: Argv, output: str) -> Case:
    return Case(case_id, argv, (NO_BUCKET,), output, s3=True)


def _long_caption(src: Path) -> None:
    _manifest(src, "caption_100k.jsonl", {"video_path": "ok.mp4", "caption": "电凝钩" + "a" * 99_997})


def _nan_checkpoint(src: Path) -> None:
    from lora_moe_core.adapters.checkpoint import save_checkpoint
    from lora_moe_core.config import load_config
    from lora_moe_core.model.wan import build_transformer
    from tests.helpers import make_network

    network = make_network(load_config(None, {"task": "tiny"}), build_transformer("tiny", seed=0))
    with torch.no_grad():
        next(iter(network.experts.values())).lora_B[0, 0, 0] = float("nan")
    save_checkpoint(network, src / "nan_checkpoint.safetensors")


# fmt: off
CASES = [
    _video("empty-mp4", "empty.mp4", "empty (0 bytes)"),
    _video("not-a-video", "not_a_video.mp4", "not a video file"),
    _video("truncated-mp4", "truncated.mp4", "truncated or damaged", "holds 9 of 17 frames"),
    _video("huge-resolution", "huge_16384x8192.mp4", "16384x8192, too large"),
    _video("resolution-ffmpeg-refuses", "huge_16384x16384.mp4", "no usable frame size"),
    _video("fps-10000", "fps_10000.mp4", "10000 fps", "source_fps"),
    _video("fps-0.001", "fps_0.001.mp4", "0.001 fps", "source_fps"),
    _video("audio-only", "audio_only.mp4", "no video stream"),
    _video("missing-video", "gone.mp4", "does not exist"),
    _video("video-is-a-folder", "folder.mp4", "not a file", prepare=lambda src: (src / "folder.mp4").mkdir()),
    _label("caption-control-chars", "caption_control_chars.jsonl", "caption_control_chars.jsonl:1",
           "control character U+001B"),
    _label("caption-100k", "caption_100k.jsonl", "caption_100k.jsonl:1", "100000 characters", "limit of 4096",
           prepare=_long_caption),
    _label("caption-invalid-utf8", "caption_invalid_utf8.jsonl", "caption_invalid_utf8.jsonl", "not UTF-8",
           "offset 48"),
    _label("caption-file-nul", "caption_dir/dataset.toml", "clip.txt", "control character U+0000"),
    _label("manifest-escapes-root", "manifest_escape.jsonl", "manifest_escape.jsonl:1", "escapes"),
    _label("manifest-line-not-object", "manifest_not_object.jsonl", "manifest_not_object.jsonl:1", "JSON object"),
    _label("manifest-empty", "manifest_empty.jsonl", "manifest_empty.jsonl", "no videos"),
    _label("manifest-bad-roi", "manifest_bad_roi.jsonl", "manifest_bad_roi.jsonl:1", "'roi' frame 1 must be a box"),
    _label("dataset-toml-bad-resolution", "dataset_bad_resolution.toml", "dataset_bad_resolution.toml",
           "resolution must be", "'832x480'"),
    _labels_file("labels-invalid-utf8", "labels_invalid_utf8.jsonl", "not UTF-8", "offset 43"),
    _labels_file("labels-line-not-object", "labels_not_object.jsonl", ":1", "JSON object"),
    _config("config-unknown-key", "config_unknown_key.toml", "unknown config key 'training.learning_rte'",
            "did you mean 'learning_rate'"),
    _config("config-wrong-type", "config_wrong_type.toml", "training.num_train_epochs", "'twenty'"),
    _config("config-negative-rank", "config_negative_rank.toml", "lora.lora_dim", "-4"),
    _config("config-invalid-utf8", "config_invalid_utf8.toml", "not UTF-8", "offset 35"),
    _convert("lora-nan", "lora_nan.safetensors", "holds 1 NaN value"),
    _convert("lora-inf", "lora_inf.safetensors", "holds 1 Inf value"),
    _convert("lora-wrong-shapes", "lora_wrong_shapes.safetensors", "rank mismatch"),
    _convert("lora-bogus-header-length", "lora_bogus_header.safetensors", "header length field says"),
    _convert("lora-truncated", "lora_truncated.safetensors", "truncated"),
    _convert("lora-pickle-ckpt", "lora_pickle.ckpt", "pickle"),
    _convert("lora-pickle-pt", "lora_pickle.pt", "pickle"),
    _export("export-pickle", "lora_pickle.ckpt", "pickle"),
    _export("export-nan-checkpoint", "nan_checkpoint.safetensors", "holds 1 NaN value", prepare=_nan_checkpoint),
    Case("infer-bogus-header", lambda src, out: ["infer", "--lora_moe_weights",
         str(src / "lora_bogus_header.safetensors"), "--prompt", CAPTION, "--output_path", str(out / "output.mp4")],
         ("lora_bogus_header.safetensors", "header length field says"), "output.mp4"),
    Case("infer-prompt-control-chars", lambda src, out: ["infer", "--lora_moe_weights",
         str(src / "lora_bogus_header.safetensors"), "--prompt", "hook \x1b[31m cautery", "--output_path",
         str(out / "output.mp4")], ("--prompt", "control character U+001B"), "output.mp4"),
    _s3("s3-missing-bucket-dataset", lambda src, out: ["label", "--dataset", f"{MISSING_BUCKET}/data", "--output",
        str(out / "labels.jsonl")], "labels.jsonl"),
    _s3("s3-missing-bucket-manifest", lambda src, out: _cache_argv(f"{MISSING_BUCKET}/data/manifest.jsonl",
        str(out / "cache")), "cache"),
    _s3("s3-missing-bucket-cache-output", lambda src, out: _cache_argv(str(src / "ok.jsonl"),
        f"{MISSING_BUCKET}/cache"), "cache"),
    _s3("s3-missing-bucket-train-cache", lambda src, out: ["train", "--task", "tiny", "--cache",
        f"{MISSING_BUCKET}/cache", "--output_dir", str(out)], "lora_moe_final.safetensors"),
]
# fmt: on


@dataclass(frozen=True)
class MixedRun:
    """``cache`` of one good video and three bad ones with ``--max_bad_fraction 0.75``."""

    input: Path
    cache: Path
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> MixedRun:
    """The mixed run; its cache folder (one finished entry) is also what the cases find in their output folder."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in ("ok.mp4", *MIXED_BAD):
        shutil.copy(BAD / name, folder / name)
    _manifest(folder, "mixed.jsonl", *({"video_path": name, "caption": CAPTION} for name in ("ok.mp4", *MIXED_BAD)))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(_cache_argv(str(folder / "mixed.jsonl"), str(folder / "cache"), "--max_bad_fraction", "0.75"))
    return MixedRun(folder, folder / "cache", code, out.getvalue(), err.getvalue())


def _snapshot(root: Path) -> dict[str, tuple[int, bytes] | None]:
    """Every file under ``root`` with its mtime and bytes; folders as None (their mtime moves with temp files)."""
    return {
        str(path.relative_to(root)): (path.stat().st_mtime_ns, path.read_bytes()) if path.is_file() else None
        for path in root.rglob("*")
    }


def _sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Input and output folders, with the working dir, temp dir, home and latent mirror inside ``tmp_path``."""
    src, out = tmp_path / "input", tmp_path / "output"
    shutil.copytree(BAD, src, ignore=shutil.ignore_patterns("*.py", "README.md", "__pycache__"))
    for name in ("cwd", "tmp", "home"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORA_MOE_CACHE", str(tmp_path / "home" / "lora_moe"))
    return src, out


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_with_one_line_and_changes_nothing(case, tmp_path, monkeypatch, capsys, caplog, request,
                                                           mixed_run):  # fmt: skip
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run)


def check_case(case: Case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run) -> None:
    """Run one case in a sandbox: exit 2, one ``error:`` line naming its words, no warning, nothing written or
    lost anywhere under ``tmp_path`` (inputs, outputs, working dir, temp dir, home)."""
    if case.s3:
        request.getfixturevalue("s3_env")
    src, out = _sandbox(tmp_path, monkeypatch)
    if case.prepare:
        case.prepare(src)
    if case.output == "cache":
        shutil.copytree(mixed_run.cache, out / "cache")  # copy2: the bytes and mtimes the earlier run left
    else:
        out.mkdir()
        (out / case.output).write_bytes(PREVIOUS)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_one_line_error(capsys, case.argv(src, out), *case.words)  # exit 2, one "error:" line: no traceback
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    after = _snapshot(tmp_path)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"files created, changed or removed: {changed}"


def test_mixed_dataset_caches_the_good_video_and_reports_the_bad_ones(mixed_run):
    assert mixed_run.code == 0, mixed_run.err
    assert mixed_run.err == ""
    assert "cached 1 clips from 1 videos, 0 up to date, 3 failed" in mixed_run.out
    reasons = {line.split(": ", 1)[0]: line for line in mixed_run.out.splitlines() if line.startswith("skipped ")}
    assert sorted(reasons) == sorted(f"skipped {mixed_run.input / name}" for name in MIXED_BAD)
    assert "truncated or damaged" in reasons[f"skipped {mixed_run.input / 'truncated.mp4'}"]
    assert "too large" in reasons[f"skipped {mixed_run.input / 'huge_16384x8192.mp4'}"]
    entry = [".lora-moe-owner", "ok_00000-005_0064x0048_wan.safetensors", "ok_lora_moe.json", "ok_wan_te.safetensors"]
    assert sorted(p.name for p in mixed_run.cache.iterdir()) == entry  # the one entry, and the cache's marker


def test_caption_limits_are_inclusive_and_allow_tabs_and_line_breaks(tmp_path):
    from lora_moe_core.data.dataset import MAX_CAPTION_CHARS, load_dataset

    caption = "电凝钩\t分离\r\n组织" + "a" * (MAX_CAPTION_CHARS - 10)
    assert len(caption) == MAX_CAPTION_CHARS
    _manifest(tmp_path, "edge.jsonl", {"video_path": "ok.mp4", "caption": caption})
    assert load_dataset(str(tmp_path / "edge.jsonl")).clips[0].caption == caption


def test_committed_corpus_is_what_make_bad_writes():
    from lora_moe_core.data.video import VideoInfo, probe_video

    spec = importlib.util.spec_from_file_location("make_bad", BAD / "make_bad.py")
    make_bad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_bad)
    assert probe_video(BAD / "ok.mp4") == VideoInfo(width=64, height=48, num_frames=17, fps=16.0)
    files = make_bad.corpus((BAD / "ok.mp4").read_bytes())
    committed = {
        str(p.relative_to(BAD)) for p in BAD.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc", ".md")
    }
    assert committed == set(files)
    stale = [name for name, data in files.items() if (BAD / name).read_bytes() != data]
    assert not stale, f"run `python tests/data/bad/make_bad.py` to rewrite {stale}"
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    assert not [name for name in files if f"`{name}`" not in readme], "every file needs a line in README.md"
    assert sum(len(data) for data in files.values()) < 100_000
