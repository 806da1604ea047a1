"""Loading the original Wan single files musubi-tuner users have: DiTs, the Wan2.1 VAE and the UMT5 ``.pth``.

The DiT and the VAE go through diffusers' own ``from_single_file`` (whose converters rename the original Wan /
ComfyUI keys), after a check of every tensor name and shape against the task's model so that a wrong file fails
with one line instead of a half-initialised model. The T5 ``.pth`` is loaded tensors-only
(``torch.load(weights_only=True, mmap=True)``) and renamed to transformers' ``UMT5EncoderModel``.

The ``*_to_original`` functions invert those renames; :func:`save_tiny_single_files` uses them to write the tiny
model as original-layout single files, so the path that loads real files is tested on tiny ones.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_moe_core.errors import UserError
from lora_moe_core.model.sources import (
    check_state_shapes,
    load_tensor_pth,
    require_kind,
    resolve_model_file,
    weights_format,
)
from lora_moe_core.model.wan import get_task

#: UMT5-XXL as Wan uses it (``wan/modules/t5.py::umt5_xxl``; HF ``google/umt5-xxl``); the tokenizer is Google's
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu")  # fmt: skip
UMT5_TOKENIZER = "google/umt5-xxl"
# Original Wan T5 encoder (wan/modules/t5.py: T5Encoder → T5SelfAttention blocks) ↔ transformers UMT5 names.
# Wan's FFN is fc2(fc1(x) · gelu_tanh(gate(x))), transformers' is wo(wi_1(x) · gelu_new(wi_0(x))).
_T5_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_TOP_NAMES = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


# -- configs -----------------------------------------------------------------------------------------------------
def _meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in build().state_dict().items()}


def _config_folder(config: Mapping[str, Any], subfolder: str, scratch: str) -> str:
    """Write ``config`` as ``<scratch>/<subfolder>/config.json``: ``from_single_file`` takes configs from a folder,
    and without one it would fetch Wan2.1's from the Hugging Face Hub (unreachable on the cluster, and not ours)."""
    target = Path(scratch) / subfolder
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(dict(config)), encoding="utf-8")
    return scratch


def dit_config(task: str, folder: Path | None) -> dict[str, Any]:
    """The DiT's diffusers config: the folder's ``transformer/config.json`` when given, else the task's."""
    from diffusers import WanTransformer3DModel

    if folder is not None and (folder / "transformer" / "config.json").is_file():
        return dict(WanTransformer3DModel.load_config(folder / "transformer"))
    return dict(get_task(task).transformer_config)


def vae_config(task: str, folder: Path | None) -> dict[str, Any]:
    """The VAE's config: the folder's, else the Wan2.1 VAE (diffusers' defaults hold its geometry and latent
    statistics) or, for ``tiny``, the same geometry at a small width (the only one diffusers' converter maps)."""
    from diffusers import AutoencoderKLWan

    from lora_moe_core.model.loading import TINY_SINGLE_FILE_VAE

    if folder is not None and (folder / "vae" / "config.json").is_file():
        return dict(AutoencoderKLWan.load_config(folder / "vae"))
    return dict(TINY_SINGLE_FILE_VAE) if task == "tiny" else {}


# -- loaders -----------------------------------------------------------------------------------------------------
def load_dit_file(uri: str, flag: str, task: str, dtype: torch.dtype, folder: Path | None = None) -> nn.Module:
    """One DiT from an original Wan / ComfyUI (or diffusers-keyed) single file, frozen and in eval mode."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = resolve_model_file(uri, flag)
    contents = require_kind(path, flag, "dit")
    config = dit_config(task, folder)
    expected = _meta_shapes(lambda: WanTransformer3DModel.from_config(config))
    renamed = dict(contents.shapes)
    if "patch_embedding.weight" not in expected or not set(expected) <= set(renamed):
        renamed = convert_wan_transformer_to_diffusers(renamed)  # renames keys only: shapes serve as values
    need = expected["patch_embedding.weight"]
    if tuple(renamed.get("patch_embedding.weight", ())) != need:
        raise UserError(f"--{flag} {path} holds {contents.description}, but task {task} needs a Wan DiT with dim "
                        f"{need[0]} and {need[1]} input channels")  # fmt: skip
    check_state_shapes(renamed, expected, path, flag, f"the {task} DiT")
    return mapped_dit(path, flag, config, dtype)


def mapped_dit(path: Path, flag: str, config: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """The DiT of a checked single file, its weights views of the file's pages (:mod:`formats.mapped`).

    The same model ``WanTransformer3DModel.from_single_file(..., torch_dtype=dtype)`` builds (diffusers' dtype
    rules: fp16 keeps ``_keep_in_fp32_modules`` in fp32, then the whole model is cast), without the one mapping
    of the whole file that safetensors' reader keeps while any of its tensors lives: a tensor already in ``dtype``
    stays a view of its own mapping, whose pages go when it does (moved to the GPU, quantised to fp8, pinned for
    offloading), and any other is cast one tensor at a time, so the host never holds the file's pages and the
    converted model at once.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from lora_moe_core.formats.mapped import map_safetensors, read_header

    what = f"--{flag} weights file"
    stored = {info.get("dtype") for info in read_header(path, what)[1].values() if isinstance(info, dict)}
    as_is = stored == {_SAFETENSORS_NAMES.get(dtype)}  # nothing to cast: start reading every page now
    state = map_safetensors(path, what, readahead=as_is)
    expected_keys = set(_meta_shapes(lambda: WanTransformer3DModel.from_config(config)))
    if not expected_keys <= set(state):
        state = convert_wan_transformer_to_diffusers(state)  # renames only: the views stay views
    with init_empty_weights():  # parameters on the meta device, buffers (RoPE tables) real, as diffusers does
        model = WanTransformer3DModel.from_config(config)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
    loaded = {}
    for key in list(state):
        tensor = state.pop(key)  # dropped as soon as it is cast: its mapping closes with it
        wanted = torch.float32 if any(part in keep for part in key.split(".")) else dtype
        loaded[key] = tensor if tensor.dtype == wanted else tensor.to(wanted)
    model.load_state_dict(loaded, strict=True, assign=True)
    nn.Module.to(model, dtype)  # buffers too, as from_single_file ends (without ModelMixin.to's fp32 warning)
    return model.eval().requires_grad_(False)


_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def load_vae_file(uri: str, task: str, folder: Path | None = None) -> nn.Module:
    """The Wan2.1 VAE from its original single file (``wan_2.1_vae.safetensors``), in fp32 as the folder path."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = resolve_model_file(uri, "vae")
    contents = require_kind(path, "vae", "vae")
    config = vae_config(task, folder)
    expected = _meta_shapes(lambda: AutoencoderKLWan.from_config(config))
    renamed = dict(contents.shapes)
    if not set(expected) <= set(renamed):  # original Wan keys (a diffusers-keyed file loads as it is)
        renamed = convert_wan_vae_to_diffusers(renamed)
    check_state_shapes(renamed, expected, path, "vae", f"the {task} VAE (Wan2.1)")
    with tempfile.TemporaryDirectory(prefix="lora-moe-config-") as scratch:
        vae = AutoencoderKLWan.from_single_file(str(path), config=_config_folder(config, "vae", scratch),
                                                subfolder="vae", torch_dtype=torch.float32,
                                                local_files_only=True)  # fmt: skip
    if task == "tiny" and folder is None:
        from lora_moe_core.model.loading import calibrate_latent_stats

        calibrate_latent_stats(vae)  # a random VAE has no published statistics: measure them as for the built one
    return vae.eval()


def load_t5_file(uri: str, task: str, dtype: torch.dtype, folder: Path | None = None, vocab_size: int = 0):
    """UMT5 encoder from the original ``models_t5_umt5-xxl-enc-bf16.pth`` (or a ``.safetensors`` with original or
    transformers keys); the ``.pth`` is read tensors-only and memory-mapped."""
    from safetensors.torch import load_file
    from transformers import UMT5Config, UMT5EncoderModel

    from lora_moe_core.model.loading import TINY_TEXT_ENCODER

    path = resolve_model_file(uri, "t5")
    contents = require_kind(path, "t5", "t5")
    if folder is not None and (folder / "text_encoder" / "config.json").is_file():
        config = UMT5Config.from_pretrained(folder / "text_encoder")
    else:
        config = UMT5Config(**(UMT5_XXL if task != "tiny" else {"vocab_size": vocab_size, **TINY_TEXT_ENCODER}))
    expected = _meta_shapes(lambda: UMT5EncoderModel(config))
    renamed_shapes = t5_to_transformers(contents.shapes)
    check_state_shapes(renamed_shapes, expected, path, "t5", f"the {task} UMT5 encoder")
    state = load_file(str(path)) if weights_format(path, "t5") == "safetensors" else load_tensor_pth(path, "t5")
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model.load_state_dict(t5_to_transformers(state), strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # one embedding, as transformers ties them
    return model.to(dtype).eval().requires_grad_(False)


def load_umt5_tokenizer(task: str, folder: Path | None):
    """The tokenizer for a ``--t5`` file: the folder's, the tiny one, or Google's ``umt5-xxl`` (what Wan and musubi
    load; the ``.pth`` holds no vocabulary), from the Hugging Face cache or Hub."""
    from transformers import AutoTokenizer

    from lora_moe_core.model.loading import build_tiny_tokenizer

    if folder is not None and (folder / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(folder / "tokenizer")
    if task == "tiny":
        return build_tiny_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(UMT5_TOKENIZER)
    except (OSError, ValueError) as exc:
        raise UserError(f"--t5 needs the {UMT5_TOKENIZER} tokenizer, which could not be loaded "
                        f"({str(exc).splitlines()[0][:120]}): pass --model <diffusers folder> for its tokenizer/, "
                        "or pre-fill the Hugging Face cache") from None  # fmt: skip


# -- key layouts -------------------------------------------------------------------------------------------------
def t5_to_transformers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Original Wan T5 encoder keys → ``UMT5EncoderModel`` keys (transformers keys pass through unchanged)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _T5_TOP_NAMES:
            out[_T5_TOP_NAMES[key]] = value
        elif match := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            name = _T5_BLOCK_NAMES.get(match[2], f"unknown.{match[2]}")
            out[f"encoder.block.{match[1]}.{name}"] = value
        else:
            out[key] = value
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"])  # tied in transformers
    return out


def t5_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``UMT5EncoderModel`` keys → the original Wan T5 encoder's (the inverse of :func:`t5_to_transformers`)."""
    top = {value: key for key, value in _T5_TOP_NAMES.items()}
    block = {value: key for key, value in _T5_BLOCK_NAMES.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif match := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key):
            out[f"blocks.{match[1]}.{block[match[2]]}"] = value
    return out


# diffusers → original Wan DiT, applied in order: the inverse of single_file_utils.convert_wan_transformer_to_diffusers
_DIT_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_(\d)", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.text_embedder\.linear_(\d)", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_proj", "time_projection.1"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm([23])\.", lambda m: f".norm{5 - int(m[1])}."),  # diffusers swapped the two block norms' names
]
# diffusers → original Wan2.1 VAE (wan/modules/vae.py): the inverse of convert_wan_vae_to_diffusers
_RESNET_TO_ORIGINAL = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                       "conv2": "residual.6", "conv_shortcut": "shortcut"}  # fmt: skip
_VAE_TO_ORIGINAL = [
    (r"(down_blocks\.\d+|resnets\.\d+)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)\b",
     lambda m: f"{m[1]}.{_RESNET_TO_ORIGINAL[m[2]]}"),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.middle.{2 * int(m[2])}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}."),
    (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}."),
]  # fmt: skip


def _renamed(state: Mapping[str, Any], rules: list, forward: Callable[[dict], dict]) -> dict[str, Any]:
    """Rename by ``rules`` and prove it: diffusers' ``forward`` converter must map the result back key for key."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    back = forward({key: key for key in out})  # values are the original names: a rename table
    mismatched = [(k, v) for k, v in back.items() if v not in out or state.get(k) is not out[v]]
    if len(back) != len(state) or mismatched:
        raise RuntimeError(f"original-layout rename does not invert diffusers' converter: {mismatched[:3]}")
    return out


def dit_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``WanTransformer3DModel`` state dict in the original Wan key layout (``blocks.0.self_attn.q.weight``)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return _renamed(state, _DIT_TO_ORIGINAL, convert_wan_transformer_to_diffusers)


def vae_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKLWan`` state dict (Wan2.1 geometry) in the original Wan VAE key layout."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return _renamed(state, _VAE_TO_ORIGINAL, convert_wan_vae_to_diffusers)
