"""The files a musubi-tuner user brings, with random weights: Wan DiT, Wan2.1 VAE and UMT5 ``.pth`` in the ORIGINAL
Wan single-file layouts (written through the project's own ``*_to_original`` key maps), plus the synthetic clips.

``a14b``: one Wan2.2-A14B expert (14.3 B parameters, 28.6 GB bf16; it serves as ``--dit`` and ``--dit_high_noise``,
two do not fit a 64 GB disk beside the rest), the Wan2.1 VAE (fp32), UMT5-XXL (bf16, 11.4 GB) and a folder holding
only ``model_index.json`` and a tokenizer (the UMT5 tokenizer cannot be downloaded on the GPU machine; any T5
tokenizer whose ids fit the vocabulary serves). Weights are drawn on the GPU and streamed to disk one tensor at a
time; the page cache of each file is dropped afterwards, so the first load reads the disk as a user's would.
``tiny``: the same files for the tiny model (the code path of the CPU test).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_moe_core.formats.mapped import DTYPES  # noqa: E402

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_streaming(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written one tensor at a time (each copied to the host alone), then dropped from the
    page cache (``fsync`` + ``POSIX_FADV_DONTNEED``: no root needed) so that its next read is a cold one."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        handle.flush()
        os.fsync(handle.fileno())
    drop_page_cache(path)


def drop_page_cache(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _on_device(build, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def write_files(folder: Path, task: str, device: torch.device) -> tuple[dict[str, str], dict[str, float]]:
    """``({flag: path}, {what: seconds})``: the files of ``task`` (``t2v-A14B`` or ``tiny``, see the module doc)."""
    from diffusers import AutoencoderKLWan
    from train_step import build_dit  # the train-step benchmark's DiT (A14B or tiny), built on the device
    from transformers import UMT5Config, UMT5EncoderModel

    from lora_moe_core.model.loading import TINY_SINGLE_FILE_VAE, TINY_TEXT_ENCODER, build_tiny_tokenizer
    from lora_moe_core.model.single_file import UMT5_XXL, dit_to_original, t5_to_original, vae_to_original

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tiny = task == "tiny"
    seconds, paths = {}, {"dit": str(folder / f"wan2.2_t2v_{task}_random_bf16.safetensors")}
    start = time.perf_counter()
    write_streaming(dit_to_original(build_dit(task, device, torch.bfloat16).state_dict()), Path(paths["dit"]))
    seconds["dit"] = time.perf_counter() - start
    start = time.perf_counter()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(TINY_SINGLE_FILE_VAE if tiny else {}))  # diffusers' defaults: the Wan2.1 VAE, fp32
    paths["vae"] = str(folder / "wan_2.1_vae_random.safetensors")
    write_streaming(vae_to_original(vae.state_dict()), Path(paths["vae"]))
    seconds["vae"] = time.perf_counter() - start
    start = time.perf_counter()
    config = UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER) if tiny else UMT5Config(**UMT5_XXL)
    t5 = _on_device(lambda: UMT5EncoderModel(config), device, torch.bfloat16)
    paths["t5"] = str(folder / f"models_t5_umt5-{'tiny' if tiny else 'xxl'}-enc-bf16_random.pth")
    torch.save({k: v.cpu() for k, v in t5_to_original(t5.state_dict()).items()}, paths["t5"])
    del t5
    drop_page_cache(Path(paths["t5"]))
    seconds["t5"] = time.perf_counter() - start
    model = folder / "tokenizer_only"
    tokenizer.save_pretrained(model / "tokenizer")
    (model / "model_index.json").write_text("{}")
    paths.update(dit_high_noise=paths["dit"], model=str(model))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return paths, seconds


def write_clips(folder: Path, count: int, seed: int, size: tuple[int, int, int]) -> list[dict]:
    """``count`` synthetic clips with captions (``lora-moe synth-data``), ``size`` = width, height, frames."""
    from lora_moe_core.data.synth import generate_dataset

    width, height, frames = size
    return generate_dataset(folder, count, seed=seed, width=width, height=height, num_frames=frames)
