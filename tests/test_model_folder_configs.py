"""A diffusers model folder's configs are read through the bounded readers before diffusers or transformers parse
them (issue 26 class 8): a deeply nested, huge, non-object or non-regular ``config.json`` is one line naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_moe_core.cli.main import main
from lora_moe_core.errors import UserError
from lora_moe_core.model.loading import check_folder_configs


def _folder(root: Path) -> Path:
    folder = root / "Wan2.2"
    for part in ("vae", "transformer", "text_encoder"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps({"_class_name": part, "dim": 16}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return folder


BAD = {
    "nested": ("vae/config.json", "[" * 100_000 + "]" * 100_000, "JSON nested deeper than 64 levels"),
    "huge": ("transformer/config.json", " " * 2_000_000 + "{}", "has 2,000,002 bytes"),
    "not an object": ("text_encoder/config.json", "[1, 2]", "is not a JSON object"),
    "not JSON": ("model_index.json", "{'a': 1}", "not valid JSON"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_hostile_config_is_one_line(case, tmp_path, capsys) -> None:
    name, text, words = BAD[case]
    folder = _folder(tmp_path)
    check_folder_configs(folder)  # the well-formed folder passes
    (folder / name).write_text(text)
    with pytest.raises(UserError, match=words):
        check_folder_configs(folder)
    out = tmp_path / "out" / "o.mp4"
    argv = ["infer", "--task", "tiny", "--prompt", "电凝钩切割组织", "--model", str(folder), "--output_path", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model config ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_a_fifo_does_not_hang(tmp_path) -> None:
    folder = _folder(tmp_path)
    (folder / "vae" / "config.json").unlink()
    os.mkfifo(folder / "vae" / "config.json")
    with pytest.raises(UserError, match="is a named pipe"):
        check_folder_configs(folder)
