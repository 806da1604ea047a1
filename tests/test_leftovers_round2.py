"""Round-two leftovers (issue 23.4): an over-long ``convert-lora --output``, a failed ``cache`` into a new folder,
LoRAs with swapped down/up tensors or a negative alpha. Each bad case runs through ``test_bad_inputs``' sandbox
(exit 2, one ``error:`` line naming file and reason, nothing written or lost anywhere)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.cli.main import main
from lora_moe_core.guards.files import removed_on_failure
from tests.test_bad_inputs import BAD, CAPTION, Argv, Case, _cache_argv, check_case

LONG = "a" * 300  # one path component longer than ext4's 255 bytes
Q = "lora_unet_blocks_0_self_attn_q"  # a square Linear: swapped tensors still chain there
FFN = "lora_unet_blocks_0_ffn_0"  # in 16 -> out 64 in this file: swapped tensors do not chain


def _lora(name: str, module: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = 4.0,
          metadata: dict[str, str] | None = None):  # fmt: skip
    """A prepare step writing a one-module LoRA ``name`` into the input folder."""

    def prepare(src: Path) -> None:
        tensors = {f"{module}.lora_down.weight": down.contiguous(), f"{module}.lora_up.weight": up.contiguous()}
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
        save_file(tensors, str(src / name), metadata=metadata)

    return prepare


def _convert(case_id: str, lora: str, *words: str, prepare=None, output: str = "lora.safetensors") -> Case:
    argv: Argv = lambda src, out: ["convert-lora", "--input", str(src / lora), "--to", "comfy", "--output",
                                   str(out / output)]  # fmt: skip
    return Case(case_id, argv, words, "lora.safetensors", prepare)


def _one_frame_video(src: Path) -> None:
    from lora_moe_core.data.mp4 import write_mp4

    write_mp4(np.zeros((1, 48, 64, 3), dtype=np.uint8), src / "one_frame.mp4")
    (src / "one_frame.jsonl").write_text(json.dumps({"video_path": "one_frame.mp4", "caption": CAPTION}) + "\n")


_DOWN, _UP = torch.randn(4, 16), torch.randn(16, 4)  # rank 4 of a 16 -> 16 Linear
_FFN_DOWN, _FFN_UP = torch.randn(4, 16), torch.randn(64, 4)

# fmt: off
CASES = [
    _convert("convert-output-300-char-name", "lora_fp8.safetensors", "file name too long", "at most 239 bytes",
             output=f"{LONG}.safetensors"),
    # the output folder does not exist yet: a failed run must not leave it (empty) behind
    Case("cache-one-frame-video-new-folder", lambda src, out: _cache_argv(str(src / "one_frame.jsonl"),
         str(out / "new" / "cache")), ("one_frame.mp4", "1 frames", "shorter than target_frames [5]"), "unused.txt",
         _one_frame_video),
    _convert("lora-swapped-square", "swapped_q.safetensors", "swapped_q.safetensors", f"{Q}.lora_down.weight",
             "[16, 4]", "look swapped", prepare=_lora("swapped_q.safetensors", Q, _UP, _DOWN)),
    _convert("lora-swapped-ffn", "swapped_ffn.safetensors", f"{FFN}.lora_down.weight", "[64, 4]", "look swapped",
             prepare=_lora("swapped_ffn.safetensors", FFN, _FFN_UP, _FFN_DOWN)),
    _convert("lora-negative-alpha", "negative_alpha.safetensors", "negative_alpha.safetensors", f"{Q}.alpha",
             "is -4", "must be positive", prepare=_lora("negative_alpha.safetensors", Q, _DOWN, _UP, alpha=-4.0)),
    _convert("lora-diffusers-negative-lora-alpha", "negative_peft.safetensors", "negative lora_alpha -8",
             prepare=lambda src: save_file(
                 {"transformer.blocks.0.attn1.to_q.lora_A.weight": _DOWN.contiguous(),
                  "transformer.blocks.0.attn1.to_q.lora_B.weight": _UP.contiguous()},
                 str(src / "negative_peft.safetensors"),
                 metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": -8})})),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_leftover_bad_input(case, tmp_path, monkeypatch, capsys, caplog, request):
    check_case(case, tmp_path, monkeypatch, capsys, caplog, request, mixed_run=None)  # no case writes a cache


def test_full_rank_lora_still_converts(tmp_path, capsys):
    """rank == in == out is the largest a factorisation can have, and is not mistaken for swapped tensors."""
    _lora("full.safetensors", Q, torch.randn(16, 16), torch.randn(16, 16), alpha=16.0)(tmp_path)
    argv = ["convert-lora", "--input", str(tmp_path / "full.safetensors"), "--to", "diffusers", "--output",
            str(tmp_path / "out.safetensors")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "ranks [16]" in capsys.readouterr().out


def test_failed_cache_keeps_the_entries_it_published(tmp_path, capsys):
    """A run that cached a good video before failing on too many bad ones keeps the folder and that entry (the
    error says 'rerun to resume'); only a folder holding nothing is removed."""
    _one_frame_video(tmp_path)
    shutil.copy(BAD / "ok.mp4", tmp_path / "ok.mp4")
    rows = [{"video_path": name, "caption": CAPTION} for name in ("ok.mp4", "one_frame.mp4")]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(_cache_argv(str(tmp_path / "two.jsonl"), str(tmp_path / "new" / "cache"))) == 2
    assert "1 of 2 videos failed" in capsys.readouterr().err
    markers = [path.name for path in (tmp_path / "new" / "cache").glob("*_lora_moe.json")]
    assert markers == ["ok_lora_moe.json"], markers


def test_removed_on_failure_keep_files_removes_only_empty_folders(tmp_path):
    with pytest.raises(RuntimeError), removed_on_failure(tmp_path / "a" / "b" / "c", keep_files=True) as folder:
        (folder / "staging").mkdir()  # an empty subfolder counts as nothing written
        raise RuntimeError("every video failed")
    assert list(tmp_path.iterdir()) == []  # the three folders this call created are gone
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "other.txt").write_text("x")
    with pytest.raises(RuntimeError), removed_on_failure(tmp_path / "a" / "b", keep_files=True) as folder:
        (folder / "entry.json").write_text("{}")
        raise RuntimeError("too many bad videos")
    assert (tmp_path / "a" / "b" / "entry.json").is_file()
