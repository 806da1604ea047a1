"""Where the base model's weights come from: a diffusers-layout folder, musubi-style single files, or both.

musubi-tuner users hold the original Wan/ComfyUI single files (``--dit`` low-noise DiT, ``--dit_high_noise``
high-noise DiT, ``--vae wan_2.1_vae.safetensors``, ``--t5 models_t5_umt5-xxl-enc-bf16.pth``); a diffusers user
holds ``Wan2.2-T2V-A14B-Diffusers``. :class:`ModelSource` carries either or both: a file given for a part wins over
the folder's copy of that part, so a folder can supply the tokenizer and configs while the DiTs come from files.

This module also says what a weights file *holds* (:func:`inspect_file`), from its tensor names and shapes only,
so that a file given for the wrong part fails with one line naming the file and its contents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError
from lora_moe_core.guards.files import check_regular_file

#: single-file flags (musubi's names), in the order ``--help`` lists them
FILE_FLAGS = ("dit", "dit_high_noise", "vae", "t5")
COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's single DiT files prefix every key with this


@dataclass(frozen=True)
class ModelSource:
    """The base model: ``model`` (diffusers-layout folder) and/or single files, each a local path or ``s3://``.

    ``dit`` is the low-noise DiT and ``dit_high_noise`` the high-noise one (musubi's meaning); ``vae`` the Wan2.1
    VAE; ``t5`` the UMT5-XXL encoder (original ``.pth`` or ``.safetensors``).
    """

    model: str | None = None
    dit: str | None = None
    dit_high_noise: str | None = None
    vae: str | None = None
    t5: str | None = None

    @classmethod
    def of(cls, value: ModelSource | str | None | Any) -> ModelSource:
        """From a source, a folder string, ``None`` (nothing: ``tiny`` builds its parts) or any object with
        ``model``/``dit``/... attributes (parsed flags, ``config.model``); empty strings count as unset."""
        if isinstance(value, ModelSource):
            return value
        if value is None or isinstance(value, str):
            return cls(model=value or None)
        return cls(**{f.name: getattr(value, f.name, None) or None for f in fields(cls)})

    @classmethod
    def from_uris(
        cls, model: str = "", dit: str = "", dit_high_noise: str = "", vae: str = "", t5: str = ""
    ) -> ModelSource:
        """From pipeline parameters, where an empty string means "not given"."""
        return cls(model or None, dit or None, dit_high_noise or None, vae or None, t5 or None)

    def overrides(self) -> dict[str, str]:
        """The given fields as config flag overrides (``{"model": ..., "dit": ...}``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    def identity(self) -> str | None:
        """What the latent cache's content hash records: the folder alone (as before single files existed), or
        every given part."""
        return self.model if not any(getattr(self, flag) for flag in FILE_FLAGS) else self.describe()

    def local_inputs(self) -> tuple[list[str], list[str]]:
        """``(files, folders)`` this source reads from (for the guard that outputs never overwrite inputs)."""
        return [path for flag in FILE_FLAGS if (path := getattr(self, flag))], [self.model] if self.model else []

    @property
    def empty(self) -> bool:
        """Nothing given: only ``tiny`` can build its parts."""
        return not any(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        """``--model X --dit Y`` for messages and run parameters."""
        return " ".join(f"--{f.name} {getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name))


def add_model_flags(parser: Any) -> None:
    """``--model`` and the musubi single-file flags, for commands that take them outside the config."""
    group = parser.add_argument_group("base model", MODEL_HELP)
    group.add_argument("--model", help="diffusers-layout Wan2.2 folder, local or s3://")
    for flag, text in FILE_HELP.items():
        group.add_argument(f"--{flag}", help=text)


MODEL_HELP = ("a diffusers-layout folder (--model), musubi-tuner's single files (--dit, --dit_high_noise, --vae, "
              "--t5), or both: a file replaces the folder's copy of that part, and the folder then supplies the "
              "rest (configs, tokenizer). Without --dit_high_noise the --dit DiT runs every step, as in musubi. "
              "Required for t2v-A14B; tiny builds whatever is not given.")  # fmt: skip
FILE_HELP = {
    "dit": "low-noise DiT single file (musubi --dit; original Wan/ComfyUI keys), local or s3://",
    "dit_high_noise": "high-noise DiT single file (musubi --dit_high_noise), local or s3://",
    "vae": "Wan2.1 VAE single file, e.g. wan_2.1_vae.safetensors (musubi --vae), local or s3://",
    "t5": "UMT5-XXL encoder, e.g. models_t5_umt5-xxl-enc-bf16.pth (musubi --t5; tensors only), local or s3://",
}


def resolve_model_file(uri: str, flag: str) -> Path:
    """A local path for one weights file; an ``s3://`` file is copied once into ``$LORA_MOE_CACHE`` (default
    ``~/.cache/lora_moe``) and reused while unchanged, as :func:`resolve_model_folder` does for folders."""
    from lora_moe_core.storage.download_cache import download_folder
    from lora_moe_core.storage.store import Storage, is_s3, parse_s3

    if is_s3(uri):
        bucket, key = parse_s3(uri)
        local = download_folder("models") / bucket / key
        Storage().sync_file_from(uri, local)
        return local
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"--{flag} {uri}: {'is a directory, not a weights file' if path.is_dir() else 'no such file'}")
    return path


# -- what a file holds ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileContents:
    """What :func:`inspect_file` found: a kind (``dit``, ``vae``, ``t5`` or ``unknown``) and a human description."""

    kind: str
    description: str
    shapes: dict[str, tuple[int, ...]]


#: Wan DiT families by (hidden dim, input channels): the shapes tell them apart, the files carry no name
_DIT_FAMILIES = {(5120, 16): "14B T2V: Wan2.1 T2V-14B or a Wan2.2 T2V-A14B expert", (5120, 36): "14B I2V",
                 (3072, 48): "Wan2.2 TI2V-5B", (1536, 16): "Wan2.1 T2V-1.3B"}  # fmt: skip


def weights_format(path: Path, flag: str) -> str:
    """``safetensors`` or ``pickle`` (a ``torch.save`` file, zip or pre-1.6), from the file's first bytes.

    The name must agree: torch, safetensors and diffusers pick their reader by the suffix, so a ``.pth`` saved
    under a ``.safetensors`` name (or the reverse) used to end in a traceback from the wrong reader.

    Raises:
        UserError: one line naming the file and what it really holds, for a name that says otherwise or a file
            that is neither format (empty, truncated, a video, text); a folder or FIFO as for any input file.
    """
    check_regular_file(path, f"--{flag} weights file")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise UserError(f"cannot read --{flag} {path}: {exc.strerror or exc}") from None
    named = path.suffix.lower() == ".safetensors"
    if head[8:9] == b"{":  # u64 header length, then the JSON header
        if not named:
            raise UserError(f"--{flag} {path} is a safetensors file under a {path.suffix or 'suffix-less'} name, "
                            "which loaders read as a PyTorch pickle: rename it to .safetensors")  # fmt: skip
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        kind = "a PyTorch checkpoint (torch.save zip, a .pth)"
    elif head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        kind = "a PyTorch checkpoint (pre-1.6 torch.save pickle, a .pth)"
    else:
        raise UserError(f"--{flag} {path} is neither a safetensors file nor a PyTorch checkpoint (empty, truncated "
                        "or another format)")  # fmt: skip
    if named:
        raise UserError(f"--{flag} {path} is {kind} under a .safetensors name, not a safetensors file: rename it "
                        "to .pth (a tensors-only .pth is read without running code) or convert it")  # fmt: skip
    return "pickle"


def read_shapes(path: Path, flag: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a ``.safetensors`` (header only) or a tensors-only ``.pth`` (memory-mapped)."""
    from lora_moe_core.formats.safetensors_io import check_header

    if weights_format(path, flag) == "safetensors":
        from safetensors import SafetensorError, safe_open

        check_header(path, f"--{flag} weights file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--{flag} {path} is not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    return {key: tuple(value.shape) for key, value in load_tensor_pth(path, flag).items()}


def load_tensor_pth(path: Path, flag: str) -> dict[str, Any]:
    """A ``.pth`` state dict, loaded with ``weights_only=True`` (never unpickles code) and memory-mapped."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 format: read, not mapped
    except pickle.UnpicklingError as exc:  # weights_only refused a global: torch's text suggests the unsafe retry
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a reference to {found[1]}" if found else "pickled Python objects"
        raise UserError(f"--{flag} {path}: holds {what}, not only tensors: refused, since unpickling it could run "
                        "code (give a tensors-only .pth or a .safetensors file)") from None  # fmt: skip
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"--{flag} {path}: not a tensors-only PyTorch file or safetensors ({reason})") from None
    while isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--{flag} {path}: holds {type(state).__name__}, not a dict of tensors")
    return dict(state)


def inspect_file(path: Path, flag: str) -> FileContents:
    """Classify a weights file by its tensor names and shapes: a Wan DiT, a Wan VAE, a UMT5 encoder, or unknown."""
    shapes = read_shapes(path, flag)
    names = {key.removeprefix(COMFY_PREFIX) for key in shapes}
    if "patch_embedding.weight" in names:
        patch = shapes.get("patch_embedding.weight") or shapes[COMFY_PREFIX + "patch_embedding.weight"]
        blocks = len({int(m[1]) for key in names if (m := re.match(r"blocks\.(\d+)\.", key))})
        family = _DIT_FAMILIES.get((patch[0], patch[1]), "unknown size")
        return FileContents("dit", f"a Wan DiT (dim {patch[0]}, {patch[1]} input channels, {blocks} blocks: "
                                   f"{family})", shapes)  # fmt: skip
    if "decoder.middle.0.residual.0.gamma" in names or "decoder.conv_in.weight" in names:
        z_dim = (shapes.get("conv2.weight") or shapes.get("post_quant_conv.weight") or (0,))[0]
        version = {16: "Wan2.1 VAE", 48: "Wan2.2 VAE (TI2V-5B)"}.get(z_dim, "Wan VAE")
        return FileContents("vae", f"a {version} ({z_dim} latent channels)", shapes)
    if "token_embedding.weight" in names or "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        vocab, width = next(shape for key, shape in shapes.items() if key.endswith(("token_embedding.weight",
                                                                                   "shared.weight")))  # fmt: skip
        return FileContents("t5", f"a T5 encoder (vocabulary {vocab}, width {width})", shapes)
    first = ", ".join(sorted(shapes)[:3])
    return FileContents("unknown", f"no Wan DiT, VAE or T5 tensors ({len(shapes)} tensors: {first}, ...)", shapes)


def require_kind(path: Path, flag: str, kind: str) -> FileContents:
    """Inspect ``path`` and fail with one line when it is not a ``kind`` file."""
    contents = inspect_file(path, flag)
    wanted = {"dit": "a Wan DiT", "vae": "a Wan VAE", "t5": "a UMT5 text encoder"}[kind]
    if contents.kind != kind:
        raise UserError(f"--{flag} {path} holds {contents.description}, not {wanted}")
    return contents


def check_state_shapes(
    converted: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], path: Path, flag: str, what: str
) -> None:
    """Compare a file's tensors (already renamed to the model's keys) with what the model needs; one-line errors."""
    missing = [key for key in expected if key not in converted]
    if missing:
        raise UserError(f"--{flag} {path}: {len(missing)} of the {len(expected)} tensors {what} needs are missing "
                        f"(first: {missing[0]}): a truncated file or another model")  # fmt: skip
    wrong = [key for key in expected if tuple(converted[key]) != tuple(expected[key])]
    if wrong:
        key = wrong[0]
        raise UserError(f"--{flag} {path}: tensor {key} has shape {list(converted[key])} but {what} needs "
                        f"{list(expected[key])} ({len(wrong)} tensors differ): a different model size")  # fmt: skip
    extra = [key for key in converted if key not in expected]
    if extra:
        raise UserError(f"--{flag} {path}: {len(extra)} tensors {what} has no place for (first: {extra[0]}); "
                        "fp8-scaled or quantized files are not supported, use the fp16/bf16 file")  # fmt: skip
