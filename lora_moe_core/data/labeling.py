"""Caption keyword labelling: one labels.jsonl line per dataset clip, in order, from captions only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_moe_core.data.dataset import Dataset, jsonl_records
from lora_moe_core.data.vocabulary import Vocabulary
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.guards.files import check_output_folder, refuse_clobber
from lora_moe_core.guards.text import decode_utf8
from lora_moe_core.storage.store import Storage, is_s3


@dataclass
class LabelSummary:
    """Coverage of a labelling run."""

    total: int
    per_family: dict[str, int]
    unlabelled: int
    empty: int = 0  # of the unlabelled: clips whose caption is empty

    def lines(self) -> list[str]:
        width = max(len(name) for name in FAMILIES)
        rows = [f"{name:<{width}}  {count:5d}  {100 * count / max(self.total, 1):5.1f}%"
                for name, count in self.per_family.items()]  # fmt: skip
        return [f"labelled {self.total - self.unlabelled}/{self.total} captions", *rows,
                f"{'none':<{width}}  {self.unlabelled:5d}  (no instrument named: uniform probs; "
                f"{self.empty} empty caption(s))"]  # fmt: skip

    def metrics(self) -> dict[str, int]:
        """``clips.<Family>``, ``clips.total``, ``clips.unlabelled`` (for MLflow and KFP metadata)."""
        counts = {f"clips.{name}": count for name, count in self.per_family.items()}
        return {**counts, "clips.total": self.total, "clips.unlabelled": self.unlabelled,
                "clips.empty_caption": self.empty}  # fmt: skip


def label_dataset(
    dataset_uri: str, output: str, vocab: str | None = None, storage: Storage | None = None
) -> LabelSummary:
    """``lora-moe label``: label every caption of a dataset (local or s3://) and write ``labels.jsonl`` to ``output``.

    ``vocab`` is an extra vocabulary TOML added to the built-in zh/en terms.
    """
    from lora_moe_core.data.dataset import load_dataset
    from lora_moe_core.data.vocabulary import Vocabulary

    storage = storage or Storage()
    dataset = load_dataset(dataset_uri, storage)
    refuse_clobber([output], [dataset_uri, vocab, *dataset.input_files()], "label")
    if not is_s3(output):  # a file where its folder should be, or a read-only folder: refused before labelling
        check_output_folder(Path(output).parent, f"cannot write {Path(output).name}: its folder")
    records, summary = label_records(dataset, Vocabulary.load(vocab))
    write_labels(records, output, storage)
    return summary


def label_records(dataset: Dataset, vocabulary: Vocabulary) -> tuple[list[dict[str, Any]], LabelSummary]:
    """The manifest's fields plus ``families``, ``probs`` and ``matched`` for every clip, in order."""
    records, per_family, unlabelled, empty = [], dict.fromkeys(FAMILIES, 0), 0, 0
    for clip in dataset.clips:
        empty += not clip.caption  # matches nothing: no family, uniform probs
        match = vocabulary.match(clip.caption)
        records.append({**clip.fields, "families": match.families, "probs": match.probs, "matched": match.matched})
        for family in match.families:
            per_family[family] += 1
        unlabelled += not match.families
    return records, LabelSummary(len(records), per_family, unlabelled, empty)


def write_labels(records: list[dict[str, Any]], uri: str, storage: Storage | None = None) -> None:
    """Write labels.jsonl (UTF-8, one object per line), atomically, locally or to s3://."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    (storage or Storage()).write_bytes(uri, text.encode("utf-8"))


def read_labels(uri: str, storage: Storage | None = None) -> list[dict[str, Any]]:
    """Read labels.jsonl back, checking what caching uses: one object a line, known ``families``, 4 ``probs``.

    Raises:
        UserError: one line naming the file and line (or byte offset, for text that is not UTF-8).
    """
    text = decode_utf8((storage or Storage()).read_bytes(uri), f"labels file {uri}")
    records = []
    for number, record in jsonl_records(text, uri):
        problem = _label_problem(record)
        if problem:
            raise UserError(f"{uri}:{number}: {problem} (write it with `lora-moe label`)")
        records.append(record)
    return records


def _label_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"each line must be a JSON object, got {type(record).__name__}"
    families = record.get("families", [])
    if not isinstance(families, list) or any(name not in FAMILIES for name in families):
        return f"'families' must be a list of {', '.join(FAMILIES)}, got {families!r}"
    probs = record.get("probs")
    if probs is not None and not (isinstance(probs, list) and len(probs) == len(FAMILIES)
                                  and all(_is_probability(p) for p in probs)):  # fmt: skip
        return f"'probs' must be {len(FAMILIES)} numbers in [0, 1], got {probs!r}"
    if probs is not None and not sum(probs) > 0:
        return f"'probs' must not all be 0 (no family would get any weight), got {probs!r}"
    if not isinstance(record.get("video_path"), str):
        return "no 'video_path' string: which video do these labels belong to?"
    return None


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
