"""The pipeline's first data step: write synthetic datasets when asked and check that every dataset has clips."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_moe_core.errors import UserError
from lora_moe_core.storage.store import Storage, is_s3


@dataclass(frozen=True)
class DatasetRequest:
    """One dataset of a run: its URI and, when ``synthetic_clips`` > 0, the procedural clips to write there."""

    name: str  # "train", "heldout"
    uri: str  # local folder or s3:// prefix
    synthetic_clips: int = 0
    seed: int = 0


def prepare_datasets(requests: list[DatasetRequest], clip_size: tuple[int, int, int] = (128, 96, 33),
                     storage: Storage | None = None) -> dict[str, int]:  # fmt: skip
    """Write the synthetic clips asked for (``clip_size`` = width, height, frames) and count every dataset's clips.

    Runs before any GPU step, so a missing or empty dataset fails the pipeline in seconds.

    Raises:
        UserError: a dataset that cannot be read or holds no clips.
    """
    from lora_moe_core.data.dataset import load_dataset
    from lora_moe_core.data.synth import generate_dataset

    storage = storage or Storage()
    width, height, frames = clip_size
    counts: dict[str, int] = {}
    for request in requests:
        if request.synthetic_clips > 0:
            with tempfile.TemporaryDirectory(prefix="synthetic-") as scratch:
                folder = Path(scratch) if is_s3(request.uri) else Path(request.uri)
                generate_dataset(folder, request.synthetic_clips, seed=request.seed, width=width, height=height,
                                 num_frames=frames)  # fmt: skip
                if is_s3(request.uri):
                    storage.sync_dir_to(folder, request.uri)
            print(f"wrote {request.synthetic_clips} synthetic clips to {request.uri}")
        counts[request.name] = len(load_dataset(request.uri, storage).clips)
        if counts[request.name] == 0:
            raise UserError(f"{request.name} dataset {request.uri} has no clips")
        print(f"{request.name} dataset {request.uri}: {counts[request.name]} clips")
    return counts
