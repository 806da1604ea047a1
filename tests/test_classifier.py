"""Instrument classifier on cached latents: learning, split, save/load, errors, and `train-classifier`."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from lora_moe_core.cli.main import main
from lora_moe_core.data.latent_cache import CacheEntry, read_cache
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES, NUM_FAMILIES
from lora_moe_core.formats.safetensors_io import read_safetensors
from lora_moe_core.model.classifier import (
    ClassifierReport,
    InstrumentClassifier,
    load_classifier,
    save_classifier,
    split_entries,
    train_classifier,
)

SHAPE = (16, 3, 4, 6)  # [C, F, H, W]


@pytest.fixture(autouse=True)
def _one_thread():
    """Batch-1 steps on tiny tensors: intra-op threads only add overhead (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_entry(name: str, families: list[str], generator: torch.Generator) -> CacheEntry:
    """Noise latents; each family present adds a bright blob to its own channel (so it is learnable)."""
    latents = torch.randn(SHAPE, generator=generator) * 0.5
    for family in families:
        channel = 2 * FAMILIES.index(family)
        latents[channel] += 2.0
    labels = torch.tensor([float(f in families) for f in FAMILIES])
    probs = labels / labels.sum() if families else torch.full((NUM_FAMILIES,), 1 / NUM_FAMILIES)
    return CacheEntry(name=name, latents=latents, roi_weights=torch.ones(SHAPE[1:]), probs=probs, labels=labels,
                      text=torch.zeros(5, 16), caption=" + ".join(families))  # fmt: skip


def toy_entries(count: int, seed: int = 0, unlabelled: int = 0) -> list[CacheEntry]:
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    entries = []
    for i in range(count):
        families = []
        while not families:  # each family independently: every combination can occur
            families = [f for f in FAMILIES if rng.random() < 0.35]
        entries.append(make_entry(f"clip_{i:04d}_00000-017_0064x0048_wan.safetensors", families, generator))
    for i in range(unlabelled):
        entries.append(make_entry(f"none_{i:04d}_00000-017_0064x0048_wan.safetensors", [], generator))
    return entries


# --- model --------------------------------------------------------------------------------------------


def test_features_and_logits_shapes_any_clip_size():
    model = InstrumentClassifier(width=8)
    for shape in [(2, 16, 3, 4, 6), (1, 16, 5, 6, 10), (3, 16, 1, 2, 2)]:
        latents = torch.randn(shape)
        assert model.features(latents).shape == (shape[0], 16)  # mean + max pooling: 2 * width
        assert model(latents).shape == (shape[0], NUM_FAMILIES)


# --- training -----------------------------------------------------------------------------------------


def test_train_classifier_learns_separable_toy_problem():
    entries = toy_entries(120, unlabelled=6)
    # lr 1e-3: the default 3e-3 with batch-1 AdamW steps oscillates on this toy problem (see the report)
    model, report = train_classifier(entries, epochs=6, lr=1e-3, held_out_fraction=0.25, seed=0)
    assert report.train_clips + report.held_out_clips == 120  # the unlabelled entries are not used
    assert report.held_out_clips >= 20
    assert report.held_out_accuracy is not None and report.held_out_accuracy >= 0.9, report
    assert set(report.per_family_accuracy) == set(FAMILIES)
    assert all(acc >= 0.9 for acc in report.per_family_accuracy.values()), report
    assert not model.training


def test_train_classifier_is_reproducible():
    entries = toy_entries(8)
    first, report = train_classifier(entries, epochs=1, seed=3)
    second, _ = train_classifier(entries, epochs=1, seed=3)
    latents = torch.stack([e.latents for e in entries])
    assert torch.equal(first(latents), second(latents))


def test_train_classifier_needs_two_labelled_entries():
    with pytest.raises(UserError, match="at least 2 labelled"):
        train_classifier(toy_entries(1, unlabelled=5), epochs=1)
    with pytest.raises(UserError, match="found 0"):
        train_classifier([], epochs=1)


def test_no_held_out_split_reports_no_accuracy():
    _, report = train_classifier(toy_entries(4), epochs=1, held_out_fraction=0.0)
    assert (report.train_clips, report.held_out_clips, report.held_out_accuracy) == (4, 0, None)


# --- split --------------------------------------------------------------------------------------------


def test_split_entries_deterministic_and_disjoint():
    entries = toy_entries(50)
    train, held = split_entries(entries, 0.2)
    train_names, held_names = [e.name for e in train], [e.name for e in held]
    assert set(train_names).isdisjoint(held_names)
    assert sorted(train_names + held_names) == sorted(e.name for e in entries)
    assert 0 < len(held) < len(entries)
    again = split_entries(entries, 0.2)
    assert ([e.name for e in again[0]], [e.name for e in again[1]]) == (train_names, held_names)
    # order of the input does not change membership, and adding entries does not move existing ones
    shuffled = entries[::-1]
    assert {e.name for e in split_entries(shuffled, 0.2)[1]} == set(held_names)
    more = entries + [make_entry(f"late_{i}_00000-017_0064x0048_wan.safetensors", ["Hook"], torch.Generator())
                      for i in range(20)]  # fmt: skip
    assert set(held_names) <= {e.name for e in split_entries(more, 0.2)[1]}
    assert split_entries(entries, 0.0)[1] == [] and split_entries(entries, 1.0)[0] == []


# --- save / load --------------------------------------------------------------------------------------


def test_save_load_round_trip_identical_logits(tmp_path):
    model, report = train_classifier(toy_entries(10), epochs=1, seed=1)
    path = save_classifier(model, tmp_path / "sub" / "classifier.safetensors", report)
    loaded = load_classifier(path)
    assert not loaded.training and loaded.width == model.width
    latents = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(latents), loaded(latents))
        assert torch.equal(model.features(latents), loaded.features(latents))
    _, metadata = read_safetensors(path)
    assert metadata["format"] == "lora-moe-classifier-1"


def test_save_load_non_default_width(tmp_path):
    model = InstrumentClassifier(width=8).eval()
    path = save_classifier(model, tmp_path / "c.safetensors", ClassifierReport(0, 0, None, {}))
    latents = torch.randn(1, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_classifier(path)(latents), model(latents))


def test_load_classifier_rejects_other_files(tmp_path):
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(2, 4)}, other)
    with pytest.raises(UserError, match="not a lora-moe instrument classifier"):
        load_classifier(other)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"stem.weight": torch.zeros(2, 2)}, wrong, metadata={"format": "lora-moe-classifier-1", "width": "48"})
    with pytest.raises(UserError, match="do not match"):
        load_classifier(wrong)
    with pytest.raises(UserError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")


# --- CLI on a hand-written musubi-layout cache ---------------------------------------------------------


def write_cache_file(folder, stem: str, families: list[str] | None, caption: str, generator: torch.Generator):
    """One latent file + its text-encoder file; ``families=None`` writes a plain musubi file (no label keys)."""
    latents = torch.randn(16, 3, 6, 8, generator=generator) * 0.5
    tensors = {"latents_3x6x8_bfloat16": latents.to(torch.bfloat16)}
    if families is not None:
        labels = torch.tensor([float(f in families) for f in FAMILIES])
        tensors |= {"instrument_probs": labels / labels.sum(), "instrument_labels": labels,
                    "roi_weights_3x6x8": torch.ones(3, 6, 8)}  # fmt: skip
    save_file(tensors, str(folder / f"{stem}_00000-009_0064x0048_wan.safetensors"), metadata={"architecture": "wan"})
    text = torch.randn(5, 16, generator=generator).to(torch.bfloat16)
    save_file({"varlen_t5_bfloat16": text}, str(folder / f"{stem}_wan_te.safetensors"),
              metadata={"architecture": "wan", "caption1": caption})  # fmt: skip


def test_train_classifier_cli_on_handwritten_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    generator = torch.Generator().manual_seed(0)
    write_cache_file(cache, "x", ["Hook"], "电凝钩分离胆囊三角", generator)
    write_cache_file(cache, "y", ["Scissors", "Other"], "抓钳提起胆囊，剪刀剪断胆囊管", generator)
    write_cache_file(cache, "z", ["Suction"], "the irrigator clears the field", generator)
    write_cache_file(cache, "m", None, "the hook dissects the peritoneum", generator)  # musubi: label from caption
    write_cache_file(cache, "n", None, "胆囊三角解剖清晰", generator)  # musubi, names nothing: unlabelled

    entries = read_cache(str(cache))
    assert [e.name.split("_")[0] for e in entries] == ["m", "n", "x", "y", "z"]
    assert entries[0].labels.tolist() == [0.0, 1.0, 0.0, 0.0] and entries[0].caption.startswith("the hook")
    assert not entries[1].labelled and torch.equal(entries[1].probs, torch.full((4,), 0.25))
    assert entries[3].latents.shape == (16, 3, 6, 8) and entries[3].latents.dtype == torch.float32

    out = tmp_path / "models" / "classifier.safetensors"
    assert main(["train-classifier", "--cache", str(cache), "--output", str(out), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trained on" in printed and str(out) in printed
    model = load_classifier(out)
    assert model(entries[2].latents[None]).shape == (1, NUM_FAMILIES)


def test_train_classifier_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "c.safetensors")
    (tmp_path / "empty").mkdir()
    for argv, words in [
        (["--cache", str(tmp_path / "missing")], "does not exist"),
        (["--cache", str(tmp_path / "empty")], "no latent files"),  # the output beside the cache, not inside it
    ]:
        assert main(["train-classifier", *argv, "--output", out, "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and words in err, err
    cache = tmp_path / "cache"
    cache.mkdir()
    write_cache_file(cache, "x", ["Hook"], "电凝钩", torch.Generator().manual_seed(0))
    assert main(["train-classifier", "--cache", str(cache), "--output", out, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "at least 2 labelled" in err, err
