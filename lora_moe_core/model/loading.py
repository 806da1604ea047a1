"""The WAN2.2 components around the DiT: VAE, UMT5 text encoder, tokenizer, scheduler, whole pipelines.

Real weights load from a diffusers-layout folder (``Wan-AI/Wan2.2-T2V-A14B-Diffusers`` as downloaded, local or
``s3://``) and/or from the original Wan single files musubi-tuner users hold (:class:`ModelSource`; a file given
for a part wins over the folder's copy). ``tiny`` builds every part small and random from a fixed seed;
:func:`save_tiny_model` writes it in the diffusers layout and :func:`save_tiny_single_files` as original-layout
single files, so both loading paths for real weights are tested on tiny saved files.
"""

from __future__ import annotations

import functools
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import check_regular_file, read_regular_bytes
from lora_moe_core.guards.parse import load_json
from lora_moe_core.guards.text import decode_utf8
from lora_moe_core.model.sources import ModelSource
from lora_moe_core.model.tiny_vae import make_patch_average_encoder
from lora_moe_core.model.wan import build_transformer, get_task

# base_dim 8: the deterministic encoder (tiny_vae.py) needs >= 4 channels; wider ones make CPU conv3d the cost of
# caching and inference.
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# diffusers' Wan VAE single-file converter maps only the Wan2.1 geometry (dim_mult 1,2,4,4, two res blocks; its decoder
# indices are hard-coded), so tiny single files use that geometry at a small width instead of TINY_VAE's.
TINY_SINGLE_FILE_VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True])  # fmt: skip
TINY_TEXT_ENCODER = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
MAX_SEQUENCE_LENGTH = 512  # UMT5 context Wan was trained with; prompts are zero-padded to it


@dataclass
class Encoders:
    """What latent caching needs: the VAE and the text side."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any


# Characters of surgical captions beyond the instrument terms, so tiny prompts rarely hit <unk>.
_COMMON_CHARACTERS = (
    "的在了是用和与及中下上左右前后进行将对把从被内外处部位区域侧面三角胆囊管动脉静脉肝脏组织分离切割切除出血"
    "止血视野清晰缓慢快速移动夹持牵拉提起暴露显露创面积液体血烟雾尖端头手术医生腹腔镜画面一二两个只根正这"
)


def build_tiny_tokenizer() -> Any:
    """An offline T5-style Unigram tokenizer for ``tiny`` (no UMT5 vocabulary can be downloaded here).

    The vocabulary is constructed, not trained (the Unigram trainer orders pieces differently run to run):
    the built-in instrument terms and common English words as whole pieces, every character they use plus
    common caption characters and ASCII as fallbacks. Same ids on every machine.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from lora_moe_core.data.vocabulary import BUILTIN_TERMS

    words = sorted({word.lower() for terms in BUILTIN_TERMS.values() for term in terms for word in term.split()})
    words += ["the", "a", "with", "and", "of", "tissue", "view", "laparoscopic", "surgery", "while"]
    characters = sorted({char for text in [*words, _COMMON_CHARACTERS] for char in text} | set(string.printable[:94]))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -8.0) for char in characters]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)] + [(word, -1.5) for word in dict.fromkeys(words)]
    tokenizer = Tokenizer(models.Unigram(list(dict(pieces).items()), unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)  # fmt: skip


@functools.lru_cache(maxsize=2)
def build_tiny_encoders(seed: int = 0) -> Encoders:
    """Tiny VAE (deterministic patch-average encoder, see :mod:`tiny_vae`) and random UMT5 encoder (text width 16).

    Memoised: the result is deterministic and used read-only (eval, no grad), and building it includes a
    calibration pass that would otherwise repeat in every command of one process (tests, the local pipeline).
    """
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    make_patch_average_encoder(vae, seed)  # a random encoder erases what tells the families apart (issue #13)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER))
    calibrate_latent_stats(vae)
    return Encoders(vae, text_encoder.eval(), tokenizer)


@torch.no_grad()
def calibrate_latent_stats(vae: nn.Module) -> None:
    """Set ``latents_mean``/``latents_std`` to this tiny VAE's own per-channel statistics.

    The real Wan VAE ships statistics that make its latents roughly unit-variance; a tiny VAE with Wan's
    numbers would give latents of std ~0.02 around fixed offsets, and flow matching against unit noise would
    then learn almost nothing. Measured on procedural clips from a fixed seed, so it is deterministic.
    """
    import numpy as np

    from lora_moe_core.data.synth import render_clip
    from lora_moe_core.data.video import frames_to_tensor
    from lora_moe_core.families import FAMILIES

    rng = np.random.default_rng(1234)
    clips = torch.stack([frames_to_tensor(render_clip(rng, [family], 64, 48, 9, 16)[0]) for family in FAMILIES])
    moments = vae.encode(clips).latent_dist.mode()  # [4, 16, 3, 6, 8]
    vae.register_to_config(latents_mean=moments.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=moments.std(dim=(0, 2, 3, 4)).tolist())  # fmt: skip


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny Wan2.2-A14B-shaped pipeline (two DiTs, boundary 0.875) in diffusers layout."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    encoders = build_tiny_encoders(seed)
    task = get_task("tiny")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=task.flow_shift)  # fmt: skip
    pipeline = WanPipeline(
        tokenizer=encoders.tokenizer, text_encoder=encoders.text_encoder, vae=encoders.vae, scheduler=scheduler,
        transformer=build_transformer("tiny", seed=seed), transformer_2=build_transformer("tiny", seed=seed + 1),
        boundary_ratio=task.boundary_ratio,
    )  # fmt: skip
    pipeline.save_pretrained(str(folder))
    return Path(folder)


def resolve_model_folder(model: str) -> Path:
    """A local folder for ``model``; an ``s3://`` folder is mirrored once into ``$LORA_MOE_CACHE`` (default
    ``~/.cache/lora_moe``) and reused while unchanged."""
    from lora_moe_core.storage.download_cache import download_folder
    from lora_moe_core.storage.store import Storage, is_s3, parse_s3

    if is_s3(model):
        bucket, key = parse_s3(model.rstrip("/"))
        local = download_folder("models") / bucket / key
        Storage().sync_dir_from(model, local)
        folder = local
    else:
        folder = Path(model)
    return check_model_folder(folder, f"model folder {model}")


def check_model_folder(folder: Path, shown: str) -> Path:
    """``folder`` when it has the diffusers layout (``model_index.json`` or ``vae/``) and bounded configs
    (:func:`check_folder_configs`); ``shown`` names it in the error."""
    if not (folder / "model_index.json").is_file() and not (folder / "vae").is_dir():
        raise UserError(f"{shown} is not a diffusers-layout Wan2.2 folder (no model_index.json)")
    check_folder_configs(folder)
    return folder


MAX_CONFIG_BYTES = 1 << 20  # a Wan2.2 config.json is ~1 KB, model_index.json ~0.5 KB
CONFIG_FILES = ("model_index.json", "transformer/config.json", "transformer_2/config.json", "vae/config.json",
                "text_encoder/config.json")  # fmt: skip


def check_folder_configs(folder: Path) -> None:
    """Read every config of a diffusers folder through the bounded readers before diffusers or transformers does:
    their ``json.load`` recurses on deep nesting and reads any size, so a hostile ``config.json`` (100,000 ``[``,
    gigabytes) was a traceback or an out-of-memory kill instead of one line naming the file.

    Raises:
        UserError: a config that is not a regular file, over 1 MiB, nested too deep or not one JSON object.
    """
    for name in CONFIG_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        size = check_regular_file(path, "model config").stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserError(f"model config {path} has {size:,} bytes (a diffusers config has a few KB; at most "
                            f"{MAX_CONFIG_BYTES:,})")  # fmt: skip
        text = decode_utf8(read_regular_bytes(path, "model config"), f"model config {path}")
        if not isinstance(load_json(text, f"model config {path}"), dict):
            raise UserError(f"model config {path} is not a JSON object")


def _required(task: str, part: str) -> UserError:
    return UserError(f"--model is required for {task}: a diffusers-layout Wan2.2 folder (local or s3://), or the "
                     f"single file for the {part} ({MODEL_FILE_FLAGS[part]})")  # fmt: skip


MODEL_FILE_FLAGS = {"VAE": "--vae", "text encoder": "--t5", "DiT": "--dit and --dit_high_noise",
                    "model": "--dit/--dit_high_noise/--vae/--t5"}  # fmt: skip


def load_encoders(task: str, model: ModelSource | str | None = None, dtype: torch.dtype = torch.float32) -> Encoders:
    """VAE, text encoder and tokenizer for ``task``.

    ``model`` is a diffusers-layout folder or a :class:`ModelSource` (folder and/or ``--vae``/``--t5`` files; a file
    wins over the folder's part). ``tiny`` builds whatever is not given, small and random.
    """
    from lora_moe_core.model.single_file import load_t5_file, load_umt5_tokenizer, load_vae_file

    get_task(task)
    source = ModelSource.of(model)
    folder = resolve_model_folder(source.model) if source.model else None
    tiny = build_tiny_encoders() if task == "tiny" and folder is None else None
    if source.vae:
        vae = load_vae_file(source.vae, task, folder)
    elif folder is not None:
        vae = _from_folder(folder, "vae", dtype).vae
    elif tiny is not None:
        vae = tiny.vae
    else:
        raise _required(task, "VAE" if source.t5 else "model")
    if source.t5:
        tokenizer = load_umt5_tokenizer(task, folder)
        text_encoder = load_t5_file(source.t5, task, dtype, folder, vocab_size=len(tokenizer))
    elif folder is not None:
        loaded = _from_folder(folder, "text_encoder", dtype)
        text_encoder, tokenizer = loaded.text_encoder, loaded.tokenizer
    elif tiny is not None:
        text_encoder, tokenizer = tiny.text_encoder, tiny.tokenizer
    else:
        raise _required(task, "text encoder")
    return Encoders(vae.eval(), text_encoder.eval(), tokenizer)


def _from_folder(folder: Path, part: str, dtype: torch.dtype) -> Encoders:
    """The VAE (``part="vae"``) or the text encoder and tokenizer of a diffusers-layout folder."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    try:
        if part == "vae":
            return Encoders(AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32,
                                                             use_safetensors=True), None, None)  # fmt: skip
        text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype,
                                                        use_safetensors=True)  # fmt: skip
        return Encoders(None, text_encoder, AutoTokenizer.from_pretrained(folder / "tokenizer"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the VAE/text encoder from {folder}: {str(exc).splitlines()[0]}") from None


def encoders_on(encoders: Encoders, device: torch.device, copy: bool = False) -> Encoders:
    """The encoders for computing on ``device``: on a GPU the text encoder and the VAE in bf16 (musubi's cache
    dtypes), on the CPU as loaded. ``copy``: move a copy (the tiny encoders are memoised and shared)."""
    if device.type == "cpu":
        return encoders
    import copy as copying

    moved = copying.deepcopy(encoders) if copy else encoders
    moved.text_encoder.to(device, torch.bfloat16)
    moved.vae.to(device, torch.bfloat16)
    return moved


@torch.no_grad()
def encode_prompts(
    encoders: Encoders, prompts: list[str], device: str | torch.device | None = None
) -> list[torch.Tensor]:
    """UMT5 embeddings per prompt, cut to the real token count: ``[L_i, D]`` (musubi's ``varlen_t5``), on the CPU.

    ``device``: where the tokens go (default: the text encoder's).
    """
    device = device if device is not None else next(encoders.text_encoder.parameters()).device
    tokens = encoders.tokenizer(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    mask = tokens.attention_mask.to(device)
    hidden = encoders.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state  # [B, 512, D]
    return [hidden[i, : int(mask[i].sum())].float().cpu() for i in range(len(prompts))]


def pad_prompt_embeds(embeds: list[torch.Tensor], length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """Zero-pad varlen embeddings to ``[B, length, D]``, as WanPipeline feeds the DiT."""
    width = embeds[0].shape[-1]
    padded = torch.zeros(len(embeds), length, width, dtype=embeds[0].dtype)
    for index, embed in enumerate(embeds):
        padded[index, : min(length, embed.shape[0])] = embed[:length]
    return padded


@torch.no_grad()
def encode_video(vae: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in [-1, 1] → normalised latents ``[B, 16, 1+(T-1)/4, H/8, W/8]``.

    The clip moves to the VAE's device and dtype. Uses the posterior mean, normalised with the VAE's
    ``latents_mean``/``latents_std``: musubi's cache convention, so a user's musubi cache and ours are
    interchangeable.
    """
    weight = next(vae.parameters())
    mean, std = latent_stats(vae, weight.device)
    moments = vae.encode(video.to(weight.device, weight.dtype)).latent_dist.mode().float()
    return (moments - mean) / std  # on the VAE's device


def latent_stats(vae: nn.Module, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents_mean``/``latents_std`` shaped ``[1, C, 1, 1, 1]``."""
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def load_dits(
    task: str, model: ModelSource | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, nn.Module]:
    """The DiT(s): ``{"high": transformer, "low": transformer_2}`` for Wan2.2-A14B (frozen, eval).

    ``model`` is a diffusers-layout folder or a :class:`ModelSource`: ``--dit`` (low noise) and ``--dit_high_noise``
    files win over the folder's ``transformer_2`` and ``transformer``. One DiT alone serves both noise regimes
    (musubi does the same with ``--dit`` only). ``tiny`` without any source builds the pair
    :func:`save_tiny_model` writes.
    """
    from lora_moe_core.model.single_file import load_dit_file

    source = ModelSource.of(model)
    folder = resolve_model_folder(source.model) if source.model else None
    if source.dit_high_noise and not source.dit and folder is None:
        raise UserError("--dit_high_noise needs --dit (the low-noise DiT), as in musubi-tuner")
    dits: dict[str, nn.Module] = {}
    if source.dit_high_noise:
        dits["high"] = load_dit_file(source.dit_high_noise, "dit_high_noise", task, dtype, folder)
    elif folder is not None:
        dits["high"] = _dit_from_folder(folder, "transformer", dtype)
    if source.dit:
        dits["low"] = load_dit_file(source.dit, "dit", task, dtype, folder)
    elif folder is not None and (folder / "transformer_2").is_dir():
        dits["low"] = _dit_from_folder(folder, "transformer_2", dtype)
    if not dits:
        if task != "tiny":
            raise _required(task, "DiT")
        dits = {"high": build_transformer("tiny", seed=0, dtype=dtype),
                "low": build_transformer("tiny", seed=1, dtype=dtype)}  # fmt: skip
    if "high" not in dits and get_task(task).two_experts:
        print("warning: only --dit given: the low-noise DiT also runs the high-noise steps (as musubi-tuner does); "
              "pass --dit_high_noise for Wan2.2's high-noise expert", file=sys.stderr)  # fmt: skip
    for dit in dits.values():
        dit.eval().requires_grad_(False)
    dits.setdefault("high", dits.get("low"))
    dits.setdefault("low", dits["high"])  # a single-DiT model serves both noise regimes
    return dits


def _dit_from_folder(folder: Path, subfolder: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import WanTransformer3DModel

    try:
        return WanTransformer3DModel.from_pretrained(folder / subfolder, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the DiT from {folder}: {str(exc).splitlines()[0]}") from None


def build_tiny_single_file_vae(seed: int = 0) -> nn.Module:
    """The random Wan2.1-geometry VAE :func:`save_tiny_single_files` writes (``TINY_SINGLE_FILE_VAE``)."""
    from diffusers import AutoencoderKLWan

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_SINGLE_FILE_VAE).eval()
    torch.random.set_rng_state(generator_state)
    return vae


def save_tiny_single_files(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny model as the original Wan single files a musubi-tuner user holds; returns ``{flag: path}``.

    The DiTs are the pair :func:`load_dits` builds (``dit`` = low noise, seed+1), the T5 the tiny encoder as a
    tensors-only ``.pth``; the VAE is a random Wan2.1-geometry VAE (``TINY_SINGLE_FILE_VAE``), seed ``seed``.
    """
    from safetensors.torch import save_file

    from lora_moe_core.model.single_file import dit_to_original, t5_to_original, vae_to_original

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"dit": folder / "wan2.2_t2v_low_noise_tiny.safetensors",
             "dit_high_noise": folder / "wan2.2_t2v_high_noise_tiny.safetensors",
             "vae": folder / "wan_2.1_vae_tiny.safetensors", "t5": folder / "models_t5_umt5-tiny-enc.pth"}  # fmt: skip
    for flag, dit_seed in (("dit", seed + 1), ("dit_high_noise", seed)):
        state = build_transformer("tiny", seed=dit_seed).state_dict()
        save_file({k: v.contiguous() for k, v in dit_to_original(state).items()}, paths[flag])
    vae_state = build_tiny_single_file_vae(seed).state_dict()
    save_file({k: v.contiguous() for k, v in vae_to_original(vae_state).items()}, paths["vae"])
    text_state = build_tiny_encoders(seed).text_encoder.state_dict()
    torch.save({k: v.clone() for k, v in t5_to_original(text_state).items()}, paths["t5"])
    return paths
