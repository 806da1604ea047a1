"""Dataset inputs of MLflow runs (lineage): which training and held-out data a step read.

MLflow's ``mlflow.log_input`` needs the fluent active run; our trackers address runs by id, so they log the same
entity through ``MlflowClient.log_inputs``. :class:`DatasetRef` is its JSON-ready form, queued and written to the
fallback file like every other call while MLflow is away.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASET_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT


@dataclass(frozen=True)
class DatasetRef:
    """A run's dataset input (MLflow lineage): what ``mlflow.data``'s ``MetaDataset`` of ``uri`` would log.

    ``digest`` identifies the content (≤ 36 characters, MLflow's limit); ``context`` is ``training`` or
    ``evaluation``; ``profile`` small JSON-ready facts (clip and family counts).
    """

    name: str
    uri: str
    digest: str
    context: str = "training"
    profile: dict[str, Any] | None = None

    @classmethod
    def of(cls, uri: str, items: list[str], context: str = "training", profile: dict | None = None) -> DatasetRef:
        """Name a dataset by its URI's last part and digest it from ``items`` (e.g. its clips' ids and captions)."""
        import hashlib

        digest = hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]
        name = str(uri).rstrip("/").rsplit("/", 1)[-1] or str(uri)
        return cls(name, str(uri), digest, context, profile)

    def entry(self) -> dict[str, Any]:
        """The JSON form queued and written to the fallback file; source type and JSON as MLflow's own sources
        (``LocalArtifactDatasetSource`` ``local``, S3 ``s3``; both ``{"uri": ...}``)."""
        source_type = "s3" if self.uri.startswith("s3://") else "local"
        return {"kind": "dataset", "name": self.name[:500], "digest": self.digest[:36], "source_type": source_type,
                "source": json.dumps({"uri": self.uri}), "context": self.context,
                "profile": json.dumps(self.profile) if self.profile else None}  # fmt: skip


def labelled_dataset(uri: str, labels_path: str | Path, context: str = "training") -> DatasetRef:
    """The dataset ``uri`` as its ``labels.jsonl`` describes it: digest over every line (clip fields, caption,
    families), profile = clip count and clips per family. The label and cache steps of one dataset log the same
    digest, so MLflow shows them reading the same data."""
    from collections import Counter

    lines = [line for line in Path(labels_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    families = Counter(family for line in lines for family in json.loads(line).get("families", []))
    return DatasetRef.of(uri, lines, context, {"clips": len(lines), "clips_per_family": dict(sorted(families.items()))})


def cache_dataset_ref(uri: str, entries: list, context: str = "training") -> DatasetRef:
    """A latent cache read by a training or evaluation run: digest over its clips' file names and captions."""
    from collections import Counter

    from lora_moe_core.families import FAMILIES

    counts = Counter(FAMILIES[i] for entry in entries for i in entry.labels.nonzero().flatten().tolist())
    return DatasetRef.of(uri, [f"{entry.name}\t{entry.caption}" for entry in entries], context,
                         {"clips": len(entries), "clips_per_family": dict(sorted(counts.items()))})  # fmt: skip
