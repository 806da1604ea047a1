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
LATENT_CHANNELS = 16  # the Wan2.1/2.2 VAE's z_dim (the A14B DiTs' in_channels)


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
    from lora_moe_core.storage.download_cache import download_folder

    bucket, key = parse_s3(cache.rstrip("/"))
    local = download_folder("latents") / bucket / key
    (storage or Storage()).sync_dir_from(cache, local)
    return local


def _latent_tensor(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    keys = [key for key in tensors if LATENT_KEY.match(key)]
    if len(keys) != 1:
        raise UserError(f"{path}: expected one latents_FxHxW_dtype tensor, found {len(keys)}")
    latents = tensors[keys[0]].float()
    if latents.dim() != 4 or latents.shape[0] != LATENT_CHANNELS or 0 in latents.shape:
        raise UserError(f"{path}: latents must be [{LATENT_CHANNELS}, F, H, W] (the Wan VAE's channels), "
                        f"got {list(latents.shape)}")  # fmt: skip
    return latents


def _text_tensor(path: Path) -> tuple[torch.Tensor, str]:
    tensors, metadata = read_safetensors(path, what="text-encoder cache")
    keys = [key for key in tensors if key.startswith("varlen_t5_")]
    if not keys:
        raise UserError(f"{path}: no varlen_t5_* tensor")
    text = tensors[keys[0]].float()
    if text.dim() != 2 or 0 in text.shape:
        raise UserError(f"{path}: '{keys[0]}' must be [L, D] text embeddings, got {list(text.shape)}")
    return text, metadata.get("caption1", "")


def _label_tensors(tensors: dict[str, torch.Tensor], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``instrument_probs`` and ``instrument_labels``, checked: 4 values each, probs >= 0 and not all 0."""
    missing = [key for key in ("instrument_probs", "instrument_labels") if key not in tensors]
    if missing:
        raise UserError(f"{path}: '{missing[0]}' is missing (a damaged or hand-edited cache file; recache it)")
    probs, labels = tensors["instrument_probs"].float(), tensors["instrument_labels"].float()
    for key, value in (("instrument_probs", probs), ("instrument_labels", labels)):
        if tuple(value.shape) != (len(FAMILIES),):
            raise UserError(f"{path}: '{key}' must hold {len(FAMILIES)} values ({', '.join(FAMILIES)}), "
                            f"got shape {list(value.shape)}")  # fmt: skip
    if (probs < 0).any() or not probs.sum() > 0:
        raise UserError(f"{path}: 'instrument_probs' must be >= 0 and not all 0, got {probs.tolist()}")
    return probs, labels


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
    if tuple(roi.shape) != (frames, height, width):
        raise UserError(f"{path}: ROI weights must be [{frames}, {height}, {width}], got {list(roi.shape)}")
    if any(key.startswith("instrument_") for key in tensors):
        probs, labels = _label_tensors(tensors, path)
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
    entries = [read_entry(path, vocabulary) for path in paths]
    widths = {entry.text.shape[1] for entry in entries}
    if len(widths) > 1:
        raise UserError(f"cache {cache} mixes text embeddings of widths {sorted(widths)}: caches of different "
                        "models in one folder")  # fmt: skip
    return entries
