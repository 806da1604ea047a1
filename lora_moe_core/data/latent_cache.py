"""Reading a latent cache, ours or musubi-tuner's, into entries for the classifier, training and evaluation.

A musubi cache (no ROI or label keys) is used as it is, without re-encoding: labels come from the caption
that musubi stored in the text file's metadata (``caption1``) via the keyword vocabulary, ROI weights are 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_moe_core.data.vocabulary import Vocabulary
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES
from lora_moe_core.formats.safetensors_io import read_safetensors
from lora_moe_core.storage.store import Storage, is_s3, parse_s3

LATENT_FILE = re.compile(
    r"^(?P<stem>.+)_(?P<start>\d{5})-(?P<frames>\d{3})_(?P<w>\d{4})x(?P<h>\d{4})_wan\.safetensors$"
)
LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_(\w+)$")


@dataclass
class CacheEntry:
    """One cached clip."""

    name: str  # latent file name
    latents: torch.Tensor  # [16, F, H, W] float32, normalised
    roi_weights: torch.Tensor  # [F, H, W]
    probs: torch.Tensor  # [4] family distribution (uniform when unlabelled)
    labels: torch.Tensor  # [4] multi-hot families named by the caption
    text: torch.Tensor  # [L, D] UMT5 embeddings
    caption: str

    @property
    def labelled(self) -> bool:
        return bool(self.labels.any())


def local_cache_dir(cache: str, storage: Storage | None = None) -> Path:
    """A local folder for ``cache``; an ``s3://`` cache is mirrored into a local folder first."""
    if not is_s3(cache):
        folder = Path(cache)
        if not folder.is_dir():
            raise UserError(f"cache folder {cache} does not exist")
        return folder
    import os

    bucket, key = parse_s3(cache.rstrip("/"))
    local = Path(os.environ.get("LORA_MOE_CACHE", Path.home() / ".cache" / "lora_moe")) / "latents" / bucket / key
    (storage or Storage()).sync_dir_from(cache, local)
    return local


def _latent_tensor(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    keys = [key for key in tensors if LATENT_KEY.match(key)]
    if len(keys) != 1:
        raise UserError(f"{path}: expected one latents_FxHxW_dtype tensor, found {len(keys)}")
    latents = tensors[keys[0]].float()
    if latents.dim() != 4:
        raise UserError(f"{path}: latents must be [C, F, H, W], got {list(latents.shape)}")
    return latents


def _text_tensor(path: Path) -> tuple[torch.Tensor, str]:
    tensors, metadata = read_safetensors(path, what="text-encoder cache")
    keys = [key for key in tensors if key.startswith("varlen_t5_")]
    if not keys:
        raise UserError(f"{path}: no varlen_t5_* tensor")
    return tensors[keys[0]].float(), metadata.get("caption1", "")


def read_entry(path: Path, vocabulary: Vocabulary) -> CacheEntry:
    """Read one latent file and its text file."""
    match = LATENT_FILE.match(path.name)
    if match is None:
        raise UserError(f"{path.name} is not a cache file name (stem_start-frames_WxH_wan.safetensors)")
    tensors, metadata = read_safetensors(path, what="latent cache file")
    latents = _latent_tensor(tensors, path)
    text, caption = _text_tensor(path.with_name(f"{match['stem']}_wan_te.safetensors"))
    caption = metadata.get("lora_moe.caption", caption)
    frames, height, width = latents.shape[1:]
    roi = tensors.get(f"roi_weights_{frames}x{height}x{width}", torch.ones(frames, height, width)).float()
    if "instrument_probs" in tensors:
        probs, labels = tensors["instrument_probs"].float(), tensors["instrument_labels"].float()
    else:  # a musubi cache: label from the stored caption
        found = vocabulary.match(caption)
        probs = torch.tensor(found.probs)
        labels = torch.tensor([float(name in found.families) for name in FAMILIES])
    return CacheEntry(path.name, latents, roi, probs, labels, text, caption)


def read_cache(cache: str, storage: Storage | None = None, vocabulary: Vocabulary | None = None) -> list[CacheEntry]:
    """Every entry of a cache folder (local or ``s3://``), sorted by file name.

    Raises:
        UserError: when the folder holds no cache files or a file is broken.
    """
    folder = local_cache_dir(cache, storage)
    vocabulary = vocabulary or Vocabulary.from_builtin()
    paths = sorted(path for path in folder.glob("*_wan.safetensors") if LATENT_FILE.match(path.name))
    if not paths:
        raise UserError(f"cache {cache} holds no latent files (*_wan.safetensors); run `lora-moe cache` first")
    return [read_entry(path, vocabulary) for path in paths]
