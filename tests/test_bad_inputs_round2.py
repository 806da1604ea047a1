"""Bad input, round two (issue #14): the hostile cases of ``tests/data/bad/`` README's second table, run through
the same sandbox as ``test_bad_inputs.py`` (exit 2, one ``error:`` line naming file and reason, nothing written
or lost). FIFOs, symlinks, over-long names and tampered checkpoints or caches are made at test time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_moe_core.cli.main import main
from tests.test_bad_inputs import BAD, CAPTION, Argv, Case, _cache_argv, check_case, mixed_run  # noqa: F401

LONG = "a" * 300  # one path component longer than ext4's 255 bytes


def _infer(case_id: str, *extra: str, words: tuple[str, ...], argv: Argv | None = None, prepare=None) -> Case:
    """``infer`` with ``extra`` flags; every check here runs before a model would load."""
    default: Argv = lambda src, out: ["infer", "--task", "tiny", "--prompt", CAPTION, "--output_path",
                                      str(out / "output.mp4"), *extra]  # fmt: skip
    return Case(case_id, argv or default, words, "output.mp4", prepare)


def _label(case_id: str, dataset: str, *words: str, output: str | None = None, prepare=None) -> Case:
    argv: Argv = lambda src, out: ["label", "--dataset", str(src / dataset), "--output",
                                   str(src / output if output else out / "labels.jsonl")]  # fmt: skip
    return Case(case_id, argv, words, "labels.jsonl", prepare)


def _train(case_id: str, words: tuple[str, ...], config: str | None = None, cache: str | None = None,
           prepare=None) -> Case:  # fmt: skip
    def argv(src: Path, out: Path) -> list[str]:
        extra = ["--config", str(src / config)] if config else []
        extra += ["--cache", str(src / cache)] if cache else []
        return ["train", "--task", "tiny", *extra, "--output_dir", str(out)]

    return Case(case_id, argv, words, "lora_moe_final.safetensors", prepare)


def _convert(case_id: str, lora: str, *words: str, output: str | None = None, prepare=None) -> Case:
    argv: Argv = lambda src, out: ["convert-lora", "--input", str(src / lora), "--to", "comfy", "--output",
                                   str(src / output if output else out / "lora.safetensors")]  # fmt: skip
    return Case(case_id, argv, words, "lora.safetensors", prepare)


def _export(case_id: str, *words: str, extra: tuple[str, ...] = (), tamper=None, into_input: bool = False,
            names_file: bool = True) -> Case:  # fmt: skip
    """``export`` of a tiny checkpoint ``Hook.safetensors`` written at test time (``tamper`` edits its tensors)."""

    def prepare(src: Path) -> None:
        _checkpoint(src / "Hook.safetensors", tamper)

    argv: Argv = lambda src, out: ["export", "--lora_moe_weights", str(src / "Hook.safetensors"), "--instrument_hint",
                                   "Hook", "--output_dir", str(src if into_input else out), *extra]  # fmt: skip
    return Case(case_id, argv, ("Hook.safetensors", *words) if names_file else words, "Hook.safetensors", prepare)


def _cache_flag(case_id: str, *flags: str, words: tuple[str, ...]) -> Case:
    argv: Argv = lambda src, out: _cache_argv(str(src / "ok.jsonl"), str(out / "cache"), *flags)
    return Case(case_id, argv, words, "cache")


def _sync(case_id: str, fallback: str, *words: str) -> Case:
    return Case(case_id, lambda src, out: ["sync-tracking", str(src / fallback)], (fallback, *words), "unused.txt")


# -- inputs made at test time ------------------------------------------------------------------------------------
def _checkpoint(path: Path, tamper=None) -> None:
    """A tiny Stage-2 checkpoint at ``path``; ``tamper(tensors)`` edits its tensors as a hostile user would."""
    from lora_moe_core.adapters.checkpoint import save_checkpoint
    from lora_moe_core.config import load_config
    from lora_moe_core.model.wan import build_transformer
    from tests.helpers import make_network

    save_checkpoint(make_network(load_config(None, {"task": "tiny"}), build_transformer("tiny", seed=0)), path)
    if tamper is not None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        tamper(tensors)
        save_file(tensors, str(path), metadata=metadata)


def _alpha(value: float):
    def tamper(tensors: dict[str, torch.Tensor]) -> None:
        for key in [key for key in tensors if key.startswith("expert_lora_alpha.")]:
            tensors[key] = torch.tensor(value)

    return tamper


def _set(key: str, value: torch.Tensor):
    return lambda tensors: tensors.__setitem__(key, value)


def _cache(damage=None):
    """A one-entry latent cache ``cache/`` of tiny shapes; ``damage(tensors)`` edits its latent file."""

    def prepare(src: Path) -> None:
        folder = src / "cache"
        folder.mkdir()
        tensors = {"latents_2x6x8_bfloat16": torch.zeros(16, 2, 6, 8, dtype=torch.bfloat16),
                   "roi_weights_2x6x8": torch.ones(2, 6, 8), "instrument_probs": torch.tensor([0.0, 1.0, 0.0, 0.0]),
                   "instrument_labels": torch.tensor([0.0, 1.0, 0.0, 0.0])}  # fmt: skip
        if damage:
            damage(tensors)
        metadata = {"architecture": "wan", "format_version": "1.0.1", "lora_moe.caption": CAPTION}
        save_file(tensors, str(folder / "ok_00000-005_0064x0048_wan.safetensors"), metadata=metadata)
        save_file({"varlen_t5_bfloat16": torch.zeros(3, 16, dtype=torch.bfloat16)},
                  str(folder / "ok_wan_te.safetensors"), metadata={"caption1": CAPTION})  # fmt: skip

    return prepare


def _fifo(*names: str):
    def prepare(src: Path) -> None:
        for name in names:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(src / name)

    return prepare


def _folder_dataset(name: str, caption=None):
    """``name/dataset.toml`` with ``videos/clip.mp4``; ``caption(path)`` makes ``videos/clip.txt``."""

    def prepare(src: Path) -> None:
        (src / name / "videos").mkdir(parents=True)
        (src / name / "dataset.toml").write_text('[[datasets]]\nvideo_directory = "videos"\n')
        shutil.copy(src / "ok.mp4", src / name / "videos" / "clip.mp4")
        caption(src / name / "videos" / "clip.txt")

    return prepare


def _ok_toml(src: Path) -> None:
    (src / "ok.toml").write_text('[[datasets]]\nvideo_jsonl_file = "ok.jsonl"\n')


OVERWRITE = "would overwrite the input"

# fmt: off
CASES = [
    # inputs destroyed
    _infer("infer-output-is-checkpoint", words=(OVERWRITE, "lora_bogus_header.safetensors"),
           argv=lambda src, out: ["infer", "--lora_moe_weights", str(src / "lora_bogus_header.safetensors"),
                                  "--prompt", CAPTION, "--output_path", str(src / "lora_bogus_header.safetensors")]),
    _export("export-output-dir-holds-checkpoint", OVERWRITE, into_input=True),
    _label("label-output-is-manifest", "ok.jsonl", OVERWRITE, "ok.jsonl", output="ok.jsonl"),
    _label("label-output-is-dataset-toml", "ok.toml", OVERWRITE, "ok.toml", output="ok.toml", prepare=_ok_toml),
    _convert("convert-output-is-input", "lora_nan.safetensors", "is the input file", output="lora_nan.safetensors"),
    # paths escaping their root
    _label("caption-symlink-escapes", "linked/dataset.toml", "clip.txt", "escapes",
           prepare=_folder_dataset("linked", lambda path: path.symlink_to(path.parents[2] / "ok.jsonl"))),
    _infer("prompts-output-path-escapes", words=("prompts_escape.jsonl", "escapes"),
           argv=lambda src, out: ["infer", "--task", "tiny", "--prompts_file", str(src / "prompts_escape.jsonl"),
                                  "--output_dir", str(out / "infer")]),
    # decompression bombs
    _label("dataset-huge-resolution", "dataset_huge_resolution.toml", "dataset_huge_resolution.toml",
           "resolution", "1920x1080"),
    _cache_flag("cache-flag-huge-resolution", "--resolution", "65536", "65536", words=("resolution", "1920x1080")),
    # wrong data accepted
    Case("labels-for-other-videos", lambda src, out: _cache_argv(str(src / "ok.jsonl"), str(out / "cache"),
         "--labels", str(src / "labels_other_videos.jsonl")), ("labels_other_videos.jsonl:1", "other.mp4"), "cache"),
    Case("labels-zero-probs", lambda src, out: _cache_argv(str(src / "ok.jsonl"), str(out / "cache"), "--labels",
         str(src / "labels_zero_probs.jsonl")), ("labels_zero_probs.jsonl:1", "not all be 0"), "cache"),
    _train("config-inf-learning-rate", ("config_inf_lr.toml", "training.learning_rate", "finite"),
           config="config_inf_lr.toml"),
    _train("config-all-ranks-zero", ("config_zero_ranks.toml", "every rank_* is 0"), config="config_zero_ranks.toml"),
    _train("cache-three-probs", ("instrument_probs", "4 values"), cache="cache",
           prepare=_cache(_set("instrument_probs", torch.tensor([0.5, 0.5, 0.0])))),
    _train("cache-no-instrument-labels", ("instrument_labels", "missing"), cache="cache",
           prepare=_cache(lambda tensors: tensors.pop("instrument_labels"))),
    _train("cache-eight-channels", ("latents must be [16", "[8, 2, 6, 8]"), cache="cache",
           prepare=_cache(_set("latents_2x6x8_bfloat16", torch.zeros(8, 2, 6, 8, dtype=torch.bfloat16)))),
    # hangs and over-long names
    _train("fifo-config", ("fifo.toml", "named pipe"), config="fifo.toml", prepare=_fifo("fifo.toml")),
    _convert("fifo-lora", "fifo.safetensors", "fifo.safetensors", "named pipe", prepare=_fifo("fifo.safetensors")),
    _label("fifo-caption", "piped/dataset.toml", "clip.txt", "named pipe",
           prepare=_folder_dataset("piped", lambda path: os.mkfifo(path))),
    _infer("fifo-prompts-file", words=("fifo.jsonl", "named pipe"), prepare=_fifo("fifo.jsonl"),
           argv=lambda src, out: ["infer", "--task", "tiny", "--prompts_file", str(src / "fifo.jsonl"),
                                  "--output_dir", str(out / "infer")]),
    _convert("long-name-input", f"{LONG}.safetensors", "file name too long"),
    _infer("long-name-output", words=("file name too long",),
           argv=lambda src, out: ["infer", "--task", "tiny", "--prompt", CAPTION, "--output_path",
                                  str(out / f"{LONG}.mp4")]),
    Case("long-name-labels-output", lambda src, out: ["label", "--dataset", str(src / "ok.jsonl"), "--output",
         str(out / f"{LONG}.jsonl")], ("file name too long",), "labels.jsonl"),
    # tampered checkpoints
    _export("checkpoint-boundary-1500", "timestep_boundaries",
            tamper=_set("timestep_gate_boundaries", torch.tensor([1500.0]))),
    _export("checkpoint-boundary-0d", "timestep_gate_boundaries", "1-d",
            tamper=_set("timestep_gate_boundaries", torch.tensor(875.0))),
    _export("checkpoint-router-width-0", "router_hidden_dim",
            tamper=lambda t: t.update({"router_hidden.weight": torch.zeros(0, 4), "router_hidden.bias": torch.zeros(0),
                                       "router_output.weight": torch.zeros(4, 0)})),
    _export("checkpoint-expert-alpha-0", "expert_alpha", tamper=_alpha(0.0)),
    _export("checkpoint-expert-alpha-negative", "expert_alpha", "-4", tamper=_alpha(-4.0)),
    # hostile JSON, TOML and text
    _label("manifest-deep-nesting", "manifest_deep.jsonl", "manifest_deep.jsonl:1", "nested deeper"),
    _label("manifest-5000-digit-integer", "manifest_bigint.jsonl", "manifest_bigint.jsonl:1", "5000 digits"),
    _train("config-deep-nesting", ("config_deep.toml", "nested deeper"), config="config_deep.toml"),
    _label("caption-lone-surrogate", "caption_surrogate.jsonl", "caption_surrogate.jsonl:1", "surrogate"),
    _label("caption-bidi-override", "caption_bidi.jsonl", "caption_bidi.jsonl:1", "U+202E"),
    _convert("lora-rank-0", "lora_rank0.safetensors", "lora_rank0.safetensors", "rank 0"),
    # flags held to the config's limits
    _infer("infer-seed-huge", "--seed", "100000000000000000000", words=("seed", "100000000000000000000")),
    _infer("infer-device-meta", "--device", "meta", words=("device 'meta'",)),
    _infer("infer-alpha-base-negative", "--alpha_base", "-1", words=("alpha_base", "-1")),
    _infer("infer-alpha-expert-nan", "--alpha_expert", "nan", words=("alpha_expert", "nan")),
    _infer("infer-guidance-nan", "--guidance_scale", "nan", words=("guidance_scale", "nan")),
    _infer("infer-flow-shift-0", "--flow_shift", "0", words=("flow_shift", "> 0")),
    _infer("infer-negative-prompt-ansi", "--negative_prompt", "blurry \x1b[31m", words=("--negative_prompt",
           "U+001B")),
    _export("export-alpha-base-negative", "alpha_base", "-1", extra=("--alpha_base", "-1"), names_file=False),
    _cache_flag("cache-tip-weight-nan", "--tip_weight", "nan", words=("tip_weight", "nan")),
    _cache_flag("cache-max-bad-fraction-nan", "--max_bad_fraction", "nan", words=("max_bad_fraction", "nan")),
    # failed commands leave nothing behind
    Case("evaluate-bad-checkpoint", lambda src, out: ["evaluate", "--task", "tiny", "--lora_moe_weights",
         str(src / "lora_bogus_header.safetensors"), "--cache", str(src / "cache"), "--output_dir", str(out / "eval"),
         "--samples_per_family", "0"], ("lora_bogus_header.safetensors", "header length field"), "metrics.json",
         _cache()),
    Case("register-bad-checkpoint", lambda src, out: ["register", "--lora_moe_weights",
         str(src / "lora_bogus_header.safetensors"), "--work_dir", str(out / "work")],
         ("lora_bogus_header.safetensors", "header length field"), "unused.txt"),
    Case("pipeline-run-negative-clips", lambda src, out: ["pipeline", "run", "--clips", "-1", "--output_dir",
         str(out / "run")], ("--clips", "-1"), "unused.txt"),
    # pipeline settings that would put newlines or garbage into the compiled YAML
    Case("compile-image-tag-newline", lambda src, out: ["pipeline", "compile", "--image_tag", "dev\n",
         "--output_dir", str(out / "yaml")], ("invalid image tag", "'dev\\n'"), "unused.txt"),
    Case("compile-s3-secret-newline", lambda src, out: ["pipeline", "compile", "--s3_secret", "x\n",
         "--output_dir", str(out / "yaml")], ("MinIO credentials secret", "'x\\n'"), "unused.txt"),
    Case("compile-accelerator-type", lambda src, out: ["pipeline", "compile", "--accelerator_type",
         "gpu\nevil: yes", "--output_dir", str(out / "yaml")], ("accelerator type",), "unused.txt"),
    Case("submit-host-unclosed-ipv6", lambda src, out: ["pipeline", "submit", "--host", "http://[::1"],
         ("KFP host", "http://[::1"), "unused.txt"),
    # tracking fallback files that are not
    _sync("sync-tracking-garbage", "tracking_garbage.jsonl", ":1:", "not a line of a tracking_fallback.jsonl"),
    _sync("sync-tracking-no-json", "tracking_no_json.jsonl", ":1:", "not valid JSON"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_round_two(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run):  # noqa: F811
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run)


def _long_video(ok: bytes, path: Path, repeats: int) -> None:
    """``ok.mp4``'s packets ``repeats`` times in a row (each copy starts with its IDR frame): a remux, no encoder."""
    import av

    source = path.with_name("source.mp4")
    source.write_bytes(ok)
    with av.open(str(source)) as reader, av.open(str(path), "w", format="mp4") as writer:
        stream_in = reader.streams.video[0]
        stream_out = writer.add_stream_from_template(stream_in)
        packets = [packet for packet in reader.demux(stream_in) if packet.dts is not None]
        span = packets[-1].dts - packets[0].dts + packets[-1].duration
        for copy in range(repeats):
            for packet in packets:
                packet.pts, packet.dts = packet.pts + (copy > 0) * span, packet.dts + (copy > 0) * span
                packet.stream = stream_out
                writer.mux(packet)
    source.unlink()


def _spy_decoder(monkeypatch, video) -> tuple[list, list]:
    """Record each decode's state and the frames it served (the decoder's generator, wrapped)."""
    states, served = [], []
    original = video._target_frames

    def spy(container, stream, ratio, max_frames, state):
        states.append(state)
        for frame in original(container, stream, ratio, max_frames, state):
            served.append(frame.shape)
            yield frame

    monkeypatch.setattr(video, "_target_frames", spy)
    return states, served


def test_long_video_decodes_only_the_frames_its_clips_use(tmp_path, monkeypatch, capsys):
    from lora_moe_core.data import video

    _long_video((BAD / "ok.mp4").read_bytes(), tmp_path / "long.mp4", repeats=118)
    assert video.probe_video(tmp_path / "long.mp4").num_frames == 17 * 118  # 2006 frames in ~260 KB
    (tmp_path / "long.jsonl").write_text(json.dumps({"video_path": "long.mp4", "caption": CAPTION}) + "\n")
    states, served = _spy_decoder(monkeypatch, video)
    assert main(_cache_argv(str(tmp_path / "long.jsonl"), str(tmp_path / "cache"))) == 0, capsys.readouterr().err
    assert states[0].count <= 8 and len(served) == 5  # the 5 frames of the clip, not 2006
    assert states[0].packets == 2006  # the rest was demuxed (truncation check), never decoded


def test_long_video_in_chunk_mode_streams_in_bounded_memory(tmp_path, monkeypatch, capsys):
    """A recording whose decoded frames exceed MAX_DECODE_BYTES is cut in chunk mode anyway: frames stream from
    the decoder into the encoder and memory holds one clip. The budget still refuses a clip too large to hold."""
    from lora_moe_core.data import video

    _long_video((BAD / "ok.mp4").read_bytes(), tmp_path / "long.mp4", repeats=6)  # 102 frames of 64x48
    (tmp_path / "long.jsonl").write_text(json.dumps({"video_path": "long.mp4", "caption": CAPTION}) + "\n")
    (tmp_path / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\nframe_extraction = "chunk"\n'
        'target_frames = [5]\n\n[[datasets]]\nvideo_jsonl_file = "long.jsonl"\n'
    )
    monkeypatch.setattr(video, "MAX_DECODE_BYTES", 20 * 64 * 48 * 3)  # 20 frames: the video's 102 would not fit
    states, served = _spy_decoder(monkeypatch, video)
    argv = ["cache", "--dataset", str(tmp_path / "dataset.toml"), "--task", "tiny", "--output", str(tmp_path / "c")]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(served) == 102 and states[0].count == 102
    files = sorted(path.name for path in (tmp_path / "c").glob("*_wan.safetensors"))
    assert len(files) == 102 // 5 and files[0].startswith("long_00000-005_") and "_00095-005_" in files[-1]
    info = video.probe_video(tmp_path / "long.mp4")
    with pytest.raises(Exception, match="would decode 102 frames of 4096x2048"):
        video.check_decode_budget(tmp_path / "long.mp4", info, None, (4096, 2048))  # all at once: refused
    with pytest.raises(Exception, match="would decode 33 frames .* at once.*lower target_frames"):
        video.check_decode_budget(tmp_path / "long.mp4", info, None, (4096, 2048), held=33)  # one clip: too big
    assert video.check_decode_budget(tmp_path / "long.mp4", info, None, (64, 48), held=5) == 102


def test_same_file_name_in_two_folders_gives_two_cache_entries(tmp_path, capsys):
    from lora_moe_core.data.mp4 import write_mp4

    for value, folder in enumerate(("case01", "case02")):  # two recordings (a byte copy would be one video)
        (tmp_path / folder).mkdir()
        write_mp4(np.full((5, 48, 64, 3), 60 + 100 * value, dtype=np.uint8), tmp_path / folder / "video.mp4")
    lines = [{"video_path": f"{folder}/video.mp4", "caption": CAPTION} for folder in ("case01", "case02")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(_cache_argv(str(tmp_path / "m.jsonl"), str(tmp_path / "cache"))) == 0, capsys.readouterr().err
    markers = sorted(path.name for path in (tmp_path / "cache").glob("*_lora_moe.json"))
    assert len(markers) == 2 and all(name.startswith("video-") for name in markers), markers


def test_fp8_lora_converts_exactly(tmp_path, capsys):
    from lora_moe_core.formats.lora_files import read_lora

    assert main(["convert-lora", "--input", str(BAD / "lora_fp8.safetensors"), "--to", "diffusers", "--output",
                 str(tmp_path / "out.safetensors")]) == 0, capsys.readouterr().err  # fmt: skip
    source, converted = read_lora(BAD / "lora_fp8.safetensors"), read_lora(tmp_path / "out.safetensors")
    ((name, module),) = source.modules.items()
    assert torch.equal(module.delta_weight(), converted.modules[name].delta_weight())
    assert np.isfinite(module.down.numpy()).all()


def test_truncated_video_in_chunk_mode_publishes_nothing(tmp_path, capsys):
    """Streamed cutting learns of the damage only at the end of the stream, after clips were encoded: they stay
    in staging, the video counts as failed, and the cache folder holds no file of it."""
    shutil.copy(BAD / "truncated.mp4", tmp_path / "cut.mp4")
    (tmp_path / "cut.jsonl").write_text(json.dumps({"video_path": "cut.mp4", "caption": CAPTION}) + "\n")
    (tmp_path / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\nframe_extraction = "chunk"\n'
        'target_frames = [5]\n\n[[datasets]]\nvideo_jsonl_file = "cut.jsonl"\n'
    )
    argv = ["cache", "--dataset", str(tmp_path / "dataset.toml"), "--task", "tiny", "--output", str(tmp_path / "c")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "truncated or damaged" in captured.out + captured.err
    assert not (tmp_path / "c").exists()  # no clip, no text file, no staging folder: not even the empty folder
