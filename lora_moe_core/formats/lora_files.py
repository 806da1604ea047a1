"""Wan LoRA files in musubi-tuner, ComfyUI/original and diffusers layouts, behind one neutral representation.

Every module is keyed by its diffusers name inside ``WanTransformer3DModel`` (e.g. ``blocks.39.attn1.to_q``) and
carries ``down`` [rank, in], ``up`` [out, rank] and ``alpha``, so that ΔW = (alpha / rank) · up @ down in every
format. Only safetensors is read or written: pickled checkpoints can run code when loaded.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lora_moe_core.defaults import LORA_FORMATS
from lora_moe_core.errors import UserError
from lora_moe_core.formats.safetensors_io import read_safetensors, write_safetensors
from lora_moe_core.guards.files import check_output_name
from lora_moe_core.guards.parse import load_json

FORMATS = LORA_FORMATS  # the one list, in the order auto-detection prefers on a tie
WRITE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

#: The safetensors ``__metadata__`` key under which diffusers 0.42.1 stores the peft LoraConfig as JSON
#: (``loaders/lora_base.py::LORA_ADAPTER_METADATA_KEY``). Pipeline saves prefix its keys with ``transformer.``.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

# Original (Wan / musubi / ComfyUI) names inside a WanAttentionBlock -> diffusers names.
_BLOCK_ORIG_TO_DIFF: dict[str, str] = {
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)},
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_ORIG_TO_DIFF: dict[str, str] = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_BLOCK_DIFF_TO_ORIG = {d: o for o, d in _BLOCK_ORIG_TO_DIFF.items()}
_TOP_DIFF_TO_ORIG = {d: o for o, d in _TOP_ORIG_TO_DIFF.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# musubi names are "lora_unet_" + original.replace(".", "_"); the underscores are ambiguous ("cross_attn_k_img"),
# so each known module shape gets its own regex instead of guessing which underscores were dots.
_MUSUBI_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^lora_unet_blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)$"), "blocks.{0}.{1}.{2}"),
    (re.compile(r"^lora_unet_blocks_(\d+)_ffn_(0|2)$"), "blocks.{0}.ffn.{1}"),
    (re.compile(r"^lora_unet_(text_embedding|time_embedding)_(0|2)$"), "{0}.{1}"),
    (re.compile(r"^lora_unet_(time_projection)_(1)$"), "{0}.{1}"),
    (re.compile(r"^lora_unet_(head)_(head)$"), "{0}.{1}"),
)

# Full-key layouts: group 1 is the module name in that format, group 2 the tensor role.
_KEY_PATTERNS: dict[str, re.Pattern[str]] = {
    "musubi": re.compile(r"^(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$"),
    "comfy": re.compile(
        r"^diffusion_model\.([\w.]+?)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|"
        r"lora_B\.weight|alpha)$"
    ),
    "diffusers": re.compile(
        r"^(?:transformer\.)?((?:blocks\.\d+|condition_embedder|proj_out)[\w.]*?)\."
        r"(lora_A\.weight|lora_B\.weight)$"
    ),
}
_ROLE = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
}
_LAYOUTS_HELP = (
    "musubi 'lora_unet_blocks_N_self_attn_q.lora_down.weight', ComfyUI/original "
    "'diffusion_model.blocks.N.self_attn.q.lora_down.weight', or diffusers "
    "'transformer.blocks.N.attn1.to_q.lora_A.weight'"
)


@dataclass
class LoRAModuleWeights:
    """One LoRA'd Linear: ΔW = (alpha / rank) · up @ down."""

    down: torch.Tensor  # [rank, in_features]   (musubi lora_down / peft lora_A)
    up: torch.Tensor  # [out_features, rank]  (musubi lora_up / peft lora_B)
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LoRA shapes do not chain: up {tuple(self.up.shape)}, down {tuple(self.down.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] in float32, so bf16/fp16 storage does not add rounding to the product."""
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoRAFile:
    """A whole LoRA: modules keyed by diffusers module name, plus where it came from."""

    modules: dict[str, LoRAModuleWeights]
    format: str = "musubi"
    dtype: torch.dtype = torch.float32
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- module names


def original_to_diffusers(name: str) -> str:
    """``blocks.3.self_attn.q`` -> ``blocks.3.attn1.to_q``; ``head.head`` -> ``proj_out``. UserError if unknown."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_ORIG_TO_DIFF:
        return f"blocks.{int(m.group(1))}.{_BLOCK_ORIG_TO_DIFF[m.group(2)]}"
    if name in _TOP_ORIG_TO_DIFF:
        return _TOP_ORIG_TO_DIFF[name]
    raise UserError(f"'{name}' is not a Wan Linear that LoRA files target (e.g. blocks.N.self_attn.q, blocks.N.ffn.0)")


def diffusers_to_original(name: str) -> str:
    """``blocks.3.attn1.to_out.0`` -> ``blocks.3.self_attn.o``; inverse of :func:`original_to_diffusers`."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_DIFF_TO_ORIG:
        return f"blocks.{int(m.group(1))}.{_BLOCK_DIFF_TO_ORIG[m.group(2)]}"
    if name in _TOP_DIFF_TO_ORIG:
        return _TOP_DIFF_TO_ORIG[name]
    raise UserError(
        f"'{name}' is not a WanTransformer3DModel Linear that LoRA files target "
        "(e.g. blocks.N.attn1.to_q, blocks.N.ffn.net.0.proj)"
    )


def musubi_to_original(lora_name: str) -> str:
    """``lora_unet_blocks_3_cross_attn_k_img`` -> ``blocks.3.cross_attn.k_img`` (regex per known module shape)."""
    for pattern, template in _MUSUBI_PATTERNS:
        m = pattern.match(lora_name)
        if m:
            return template.format(*(str(int(g)) if g.isdigit() else g for g in m.groups()))
    raise UserError(f"'{lora_name}' is not a musubi Wan LoRA module name (e.g. lora_unet_blocks_N_self_attn_q)")


def original_to_musubi(name: str) -> str:
    """``blocks.3.ffn.0`` -> ``lora_unet_blocks_3_ffn_0`` (musubi's own naming rule)."""
    original_to_diffusers(name)  # validates the name
    return "lora_unet_" + name.replace(".", "_")


# ---------------------------------------------------------------- reading


def detect_format(keys: Iterable[str]) -> str:
    """Return "musubi", "comfy" or "diffusers" when every key fits that layout; UserError otherwise."""
    keys = list(keys)
    if not keys:
        raise UserError("the LoRA file holds no tensors")
    fits = {fmt: sum(bool(p.match(k)) for k in keys) for fmt, p in _KEY_PATTERNS.items()}
    best = max(FORMATS, key=lambda fmt: fits[fmt])
    if fits[best] == len(keys):
        return best
    sample = next(k for k in keys if not _KEY_PATTERNS[best].match(k))
    raise UserError(f"unrecognised LoRA key layout at key '{sample}'; expected {_LAYOUTS_HELP}")


def _load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = read_safetensors(path, what="LoRA file")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(f"{path}: tensor '{key}' has dtype {t.dtype}; LoRA tensors must be floating point")
    return tensors, metadata


def _module_name(fmt: str, name: str) -> str:
    if fmt == "musubi":
        return original_to_diffusers(musubi_to_original(name))
    if fmt == "comfy":
        return original_to_diffusers(name)
    diffusers_to_original(name)  # validates the name
    return name


def _group(path: str, tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """{diffusers module: {"down"|"up"|"alpha": (file key, tensor)}}."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY_PATTERNS[fmt].match(key)
        try:
            name = _module_name(fmt, m.group(1))
        except UserError as exc:
            raise UserError(f"{path}: key '{key}': {exc}") from exc
        role = _ROLE[m.group(2)]
        if role in groups.setdefault(name, {}):
            raise UserError(f"{path}: keys '{groups[name][role][0]}' and '{key}' are the same tensor of one module")
        groups[name][role] = (key, t)
    return groups


def _file_alpha(path: str, entry: dict[str, tuple[str, torch.Tensor]], rank: int) -> float:
    """musubi/comfy alpha; absent or 0 means alpha = rank (scale 1), as musubi/kohya read it. A negative alpha is
    refused: musubi and ComfyUI would silently apply the LoRA inverted, and diffusers 0.42.1's Wan converter
    (``get_alpha_scales``) loops forever halving a negative scale.

    ComfyUI reads an absent alpha as scale 1 too, but an alpha of 0 as scale 0 (``alpha / rank``): files we write
    always carry a non-zero alpha, so every reader agrees on them.
    """
    if "alpha" not in entry:
        return float(rank)
    key, t = entry["alpha"]
    if t.numel() != 1:
        raise UserError(f"{path}: alpha '{key}' has shape {tuple(t.shape)}; expected a scalar")
    alpha = float(t.float().item())
    if alpha < 0:
        raise UserError(f"{path}: alpha '{key}' is {alpha:g}; LoRA alphas must be positive (negate '{key[:-5]}"
                        "lora_up.weight' for an inverted LoRA: diffusers' Wan converter never returns on a "
                        "negative alpha)")  # fmt: skip
    return float(rank) if alpha == 0 else alpha


def _peft_match(patterns: dict, name: str, default):
    # peft.utils.other.get_pattern_key semantics: a pattern matches a dotted suffix of the module name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _diffusers_alpha_rule(path: str, metadata: dict[str, str]):
    """Alpha per (module, rank) from diffusers' LoraConfig metadata, or None when the file has none (scale 1)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    cfg = load_json(raw, f"{path}: metadata '{DIFFUSERS_METADATA_KEY}'")
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: metadata '{DIFFUSERS_METADATA_KEY}' is not a JSON object")
    if any(k.startswith("transformer.") for k in cfg):  # pipeline.save_lora_weights prefixes the component
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    elif any("." in k for k in cfg):  # only other components (e.g. text_encoder.*): nothing for the transformer
        return None
    if cfg.get("use_dora"):
        raise UserError(f"{path} is a DoRA adapter; only plain LoRA is supported")
    if "lora_alpha" not in cfg or "r" not in cfg:
        raise UserError(f"{path}: metadata '{DIFFUSERS_METADATA_KEY}' lacks 'r' or 'lora_alpha'")
    alphas, ranks = cfg.get("alpha_pattern") or {}, cfg.get("rank_pattern") or {}

    def rule(name: str, rank: int) -> float:
        want = _peft_match(ranks, name, cfg["r"])
        if int(want) != rank:
            raise UserError(f"{path}: module '{name}' has rank {rank} but the diffusers metadata says {want}")
        alpha = float(_peft_match(alphas, name, cfg["lora_alpha"]))
        if alpha < 0:  # refused as in musubi/comfy files (see _file_alpha)
            raise UserError(f"{path}: metadata '{DIFFUSERS_METADATA_KEY}' gives module '{name}' the negative "
                            f"lora_alpha {alpha:g}; LoRA alphas must be positive")  # fmt: skip
        # rsLoRA scales by alpha/sqrt(r); express that as an equivalent alpha for alpha/r.
        return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha

    return rule


def _check_shapes(path: str, name: str, dkey: str, down: torch.Tensor, ukey: str, up: torch.Tensor) -> None:
    """down [rank, in] and up [out, rank] with 0 < rank <= 2 * min(in, out); else one line naming the keys.

    A file whose down and up tensors were swapped chains just as well when in == out (every attention Linear):
    its "rank" is then the layer width, far larger than the other dimension, which no low-rank factorisation has.
    """
    if down.ndim != 2 or up.ndim != 2:
        raise UserError(f"{path}: '{dkey}'/'{ukey}' are not 2-D; only Linear LoRA layers are supported")
    shapes = f"'{dkey}' is {list(down.shape)} and '{ukey}' is {list(up.shape)}"
    swapped = f"{path}: {shapes}: down must be [rank, in] and up [out, rank]; the two look swapped"
    if up.shape[1] != down.shape[0]:
        if down.shape[1] == up.shape[0] <= min(down.shape[0], up.shape[1]):  # they chain, as a low rank, swapped
            raise UserError(swapped)
        raise UserError(f"{path}: rank mismatch in '{name}': '{dkey}' has rank {down.shape[0]} "
                        f"but '{ukey}' has rank {up.shape[1]}")  # fmt: skip
    rank = down.shape[0]
    if rank == 0:
        raise UserError(f"{path}: module '{name}' has rank 0 ('{dkey}' is empty): nothing to apply; remove it")
    # a rank above the layer's smaller side is legal (and trained by small test models: rank 32 on 24 features),
    # but one above twice that side is no LoRA anyone trains: the swapped reading is the one that holds
    if rank > 2 * min(down.shape[1], up.shape[0]):
        raise UserError(swapped)


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Read a Wan LoRA .safetensors in any of the three layouts. Every failure is a one-line UserError."""
    path = os.fspath(path)
    tensors, metadata = _load_tensors(path)
    fmt = detect_format(tensors)
    alpha_rule = _diffusers_alpha_rule(path, metadata) if fmt == "diffusers" else None
    modules: dict[str, LoRAModuleWeights] = {}
    for name, entry in sorted(_group(path, tensors, fmt).items()):
        if "down" not in entry or "up" not in entry:
            have, miss = ("down", "up") if "down" in entry else ("up", "down")
            which = entry[have][0] if have in entry else entry["alpha"][0]
            raise UserError(f"{path}: '{which}' has no matching {miss} weight for module '{name}'")
        (dkey, down), (ukey, up) = entry["down"], entry["up"]
        _check_shapes(path, name, dkey, down, ukey, up)
        # diffusers keys never carry an alpha, so _file_alpha gives alpha = rank (scale baked in) for them.
        alpha = alpha_rule(name, down.shape[0]) if alpha_rule else _file_alpha(path, entry, down.shape[0])
        modules[name] = LoRAModuleWeights(down=down, up=up, alpha=alpha)
    counts = Counter(t.dtype for m in modules.values() for t in (m.down, m.up))
    dtype = counts.most_common(1)[0][0] if len(counts) == 1 else torch.float32
    return LoRAFile(modules=modules, format=fmt, dtype=dtype, metadata=metadata)


# ---------------------------------------------------------------- writing


def _pow2_split(scale: float) -> tuple[float, float]:
    """Split scale = down_factor · up_factor with up_factor a power of two near sqrt(scale).

    Both factors are powers of two when scale is, so baking the scale into bf16/fp16 weights stays exact (except
    for values pushed into fp16's subnormal range); the two halves keep similar magnitudes, so neither factor pushes
    weights towards under- or overflow.
    """
    if scale == 0:
        return 0.0, 1.0
    up_factor = 2.0 ** (math.frexp(abs(scale))[1] // 2)
    return scale / up_factor, up_factor


def _baked(mod: LoRAModuleWeights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with the scale multiplied in (in fp32, before the cast), for layouts without an alpha."""
    f_down, f_up = _pow2_split(mod.scale)
    return (mod.down.float() * f_down).to(dtype), (mod.up.float() * f_up).to(dtype)


def _state_dict(lora: LoRAFile, to: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, mod in sorted(lora.modules.items()):
        original = diffusers_to_original(name)
        if to == "diffusers":
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = _baked(mod, dtype)
            continue
        if to == "comfy" and not name.startswith("blocks."):
            # diffusers' non-diffusers Wan converter (0.42.1) applies .alpha only inside blocks and raises on a
            # leftover top-level alpha, so top-level modules get the scale baked in and no alpha (= scale 1 for
            # ComfyUI, musubi and diffusers alike).
            prefix = f"diffusion_model.{original}"
            out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = _baked(mod, dtype)
            continue
        prefix = original_to_musubi(original) if to == "musubi" else f"diffusion_model.{original}"
        out[f"{prefix}.lora_down.weight"] = mod.down.to(dtype)
        out[f"{prefix}.lora_up.weight"] = mod.up.to(dtype)
        # float32 0-d alpha: readers all call .item(), and float32 keeps alpha exact where bf16 would round it.
        out[f"{prefix}.alpha"] = torch.tensor(float(mod.alpha), dtype=torch.float32)
    for key, t in out.items():
        if not torch.isfinite(t.float()).all():
            raise UserError(f"LoRA tensor '{key}' overflows {dtype}; write it in a wider dtype")
    return {k: t.contiguous() for k, t in out.items()}


def write_lora(
    lora: LoRAFile,
    path: str | os.PathLike,
    to: str,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``lora`` as a .safetensors in layout ``to`` (musubi | comfy | diffusers), atomically.

    ``dtype`` (fp32/bf16/fp16) defaults to ``lora.dtype``. ``metadata`` entries are merged over ``lora.metadata``.
    musubi/comfy keep alpha as a 0-d tensor; diffusers has no alpha, so (alpha/rank) is baked into A and B.
    """
    if to not in FORMATS:
        raise UserError(f"unknown LoRA format '{to}'; choose one of {', '.join(FORMATS)}")
    dtype = lora.dtype if dtype is None else dtype
    if dtype not in WRITE_DTYPES:
        raise UserError(f"cannot write LoRA tensors as {dtype}; choose float32, bfloat16 or float16")
    if not lora.modules:
        raise UserError("the LoRA has no modules to write")
    meta = {**lora.metadata, **(metadata or {})}
    # The diffusers LoraConfig describes alpha for unscaled weights; our outputs carry alpha explicitly or baked,
    # so a stale copy would make diffusers apply the scale twice.
    meta.pop(DIFFUSERS_METADATA_KEY, None)
    meta["format"] = "pt"
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise UserError(f"safetensors metadata must map strings to strings; '{bad[0]}' does not")
    write_safetensors(_state_dict(lora, to, dtype), path, meta)


def convert_lora_file(
    input_path: str | os.PathLike, to: str, output_path: str | os.PathLike, dtype: torch.dtype | None = None
) -> LoRAFile:
    """Read ``input_path``, write it to ``output_path`` in layout ``to``; returns the LoRA as read."""
    src, dst = os.path.abspath(os.fspath(input_path)), os.path.abspath(os.fspath(output_path))
    check_output_name(dst)  # before the samefile() below, which would raise ENAMETOOLONG on such a name
    if src == dst or (os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst)):
        raise UserError(f"output {output_path} is the input file; choose another output path")
    lora = read_lora(src)
    write_lora(lora, dst, to, dtype=dtype)
    return lora
