"""A small instrument classifier over cached VAE latents (seed FAQ: "train a simple instrument classifier").

Multi-label (a clip may show two families): one logit per family. It supplies teacher logits where a caption
names nothing, the identity loss on predicted x0, and the presence check of generated clips; its pooled
features serve the Fréchet distance of the evaluation (no downloaded feature network exists here).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lora_moe_core.data.latent_cache import CacheEntry
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES, NUM_FAMILIES
from lora_moe_core.formats.safetensors_io import read_safetensors, write_safetensors

CLASSIFIER_FORMAT = "lora-moe-classifier-1"


class InstrumentClassifier(nn.Module):
    """``[B, 16, F, H, W]`` latents → ``[B, 4]`` family logits (and ``[B, width]`` pooled features).

    Two 3-D conv stages (the second halves H and W), then average and max pooling over space-time: size-agnostic,
    so clips of any bucket and length share one model.
    """

    def __init__(self, in_channels: int = 16, width: int = 48):
        super().__init__()
        self.width = width
        self.stem = nn.Conv3d(in_channels, width, kernel_size=3, padding=1)
        self.down = nn.Conv3d(width, width, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.head = nn.Linear(2 * width, NUM_FAMILIES)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.down(F.silu(self.stem(latents))))  # [B, W, F, H/2, W/2]
        return torch.cat([hidden.mean(dim=(2, 3, 4)), hidden.amax(dim=(2, 3, 4))], dim=1)  # [B, 2W]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(latents))


def split_entries(entries: list[CacheEntry], held_out_fraction: float) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Deterministic split by a hash of the file name (stable when entries are added)."""
    held = [e for e in entries if zlib.crc32(e.name.encode()) % 1000 < held_out_fraction * 1000]
    names = {e.name for e in held}
    return [e for e in entries if e.name not in names], held


@dataclass
class ClassifierReport:
    train_clips: int
    held_out_clips: int
    held_out_accuracy: float | None  # exact family-set match
    per_family_accuracy: dict[str, float]

    def line(self, path: str | Path) -> str:
        accuracy = "n/a" if self.held_out_accuracy is None else f"{self.held_out_accuracy:.3f}"
        return (f"trained on {self.train_clips} clips; held-out exact family-set accuracy {accuracy} "
                f"on {self.held_out_clips} clips -> {path}")  # fmt: skip


@torch.no_grad()
def evaluate_classifier(model: InstrumentClassifier, entries: list[CacheEntry]) -> tuple[float, dict[str, float]]:
    """Exact family-set accuracy and per-family accuracy (threshold 0.5)."""
    predicted = torch.stack([model(e.latents[None])[0] > 0 for e in entries]).float()
    truth = torch.stack([e.labels for e in entries])
    exact = (predicted == truth).all(dim=1).float().mean().item()
    per_family = {name: (predicted[:, i] == truth[:, i]).float().mean().item() for i, name in enumerate(FAMILIES)}
    return exact, per_family


def train_classifier(
    entries: list[CacheEntry], epochs: int = 60, lr: float = 1e-3, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[InstrumentClassifier, ClassifierReport]:
    """Train on the labelled entries (caption labels), report accuracy on a held-out split."""
    labelled = [e for e in entries if e.labelled]
    if len(labelled) < 2:
        raise UserError(f"need at least 2 labelled clips to train the classifier, found {len(labelled)}")
    train, held = split_entries(labelled, held_out_fraction)
    torch.manual_seed(seed)
    model = InstrumentClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train), generator=generator).tolist():
            entry = train[index]
            latents = entry.latents[None]
            if torch.rand(1, generator=generator).item() < 0.5:  # mirror: instruments enter from either side
                latents = latents.flip(-1)
            loss = F.binary_cross_entropy_with_logits(model(latents)[0], entry.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    accuracy, per_family = evaluate_classifier(model, held) if held else (None, {})
    return model, ClassifierReport(len(train), len(held), accuracy, per_family)


def save_classifier(model: InstrumentClassifier, path: str | Path, report: ClassifierReport) -> Path:
    metadata = {"format": CLASSIFIER_FORMAT, "width": str(model.width), "families": json.dumps(list(FAMILIES)),
                "report": json.dumps(report.__dict__)}  # fmt: skip
    return write_safetensors(dict(model.state_dict()), path, metadata)


def load_classifier(path: str | Path) -> InstrumentClassifier:
    """Load a classifier written by :func:`save_classifier`."""
    tensors, metadata = read_safetensors(path, what="instrument classifier")
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path} is not a lora-moe instrument classifier")
    model = InstrumentClassifier(width=int(metadata["width"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise UserError(f"{path}: classifier weights do not match: {str(exc).splitlines()[0]}") from None
    return model.eval()
