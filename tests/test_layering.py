"""The architecture as tests: layering contracts (import-linter), one home per constant, the family table pin."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_moe_core import defaults
from lora_moe_core.adapters.checkpoint import FORMAT_VERSION
from lora_moe_core.families import FAMILIES, FAMILY_TABLE, family

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_broken_layer_is_reported(tmp_path):
    """The contracts can fail: a copy of the tree where the trainer imports inference breaks one."""
    for name in ("lora_moe_core", "components", "pipelines"):
        shutil.copytree(REPO / name, tmp_path / name, symlinks=True)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    loop = tmp_path / "lora_moe_core" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom lora_moe_core.inference import generate  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode != 0
    assert "Library subpackages follow the data flow BROKEN" in result.stdout
    assert "lora_moe_core.training.loop -> lora_moe_core.inference.generate" in result.stdout


def test_task_names_are_the_model_tasks():
    from lora_moe_core.model.wan import TASKS

    assert set(defaults.TASK_NAMES) == set(TASKS)
    assert defaults.DEFAULT_TASK in TASKS


def test_family_table_is_pinned_with_the_checkpoint_format():
    """A fifth family changes every checkpoint (one expert per family): bump FORMAT_VERSION with this pin."""
    assert (FAMILIES, FORMAT_VERSION) == (("Scissors", "Hook", "Suction", "Other"), "1")
    assert [entry.name for entry in FAMILY_TABLE] == list(FAMILIES)


@pytest.mark.parametrize("entry", FAMILY_TABLE, ids=lambda entry: entry.name)
def test_every_family_entry_labels_its_own_words(entry):
    from lora_moe_core.data.vocabulary import Vocabulary, parse_instrument_hint

    vocabulary = Vocabulary.from_builtin()
    assert parse_instrument_hint(entry.hint) == [entry.name]
    assert vocabulary.match(entry.sample_prompt).families == [entry.name]
    for noun in entry.caption_nouns_zh + entry.caption_nouns_en:
        assert entry.name in vocabulary.match(noun).families, noun
    assert family(entry.name) is entry


def test_seed_inference_multipliers_are_the_export_defaults():
    import inspect

    from lora_moe_core.adapters.export import export_instrument_lora
    from lora_moe_core.cli.main import build_parser

    signature = inspect.signature(export_instrument_lora).parameters
    assert (signature["alpha_base"].default, signature["alpha_expert"].default) == (0.7, 1.0)
    assert signature["dtype"].default.__repr__() == "torch.float32"
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("export", "infer"):
        required = ["--lora_moe_weights", "x", "--instrument_hint", "Hook", "--output_dir", "o"]
        args = commands[command].parse_args(required if command == "export" else [])
        assert (args.alpha_base, args.alpha_expert) == (defaults.ALPHA_BASE, defaults.ALPHA_EXPERT)
