"""Safetensors tensors as views of private file mappings: a 28 GB DiT file loads without a copy in host memory.

``safetensors.torch.load_file`` (what diffusers' ``from_single_file`` reads with) maps the file and copies every
tensor out of the mapping, so until the mapping closes the host holds the file's pages *and* the copies: twice
the file, four times the model for the two Wan2.2-A14B experts. Here each tensor is its own private mapping
(``MAP_PRIVATE``: writes, such as ``--merge`` folding adapters into weights, never reach the file) and the tensor
is a view of it. The pages count once, as file-backed memory the kernel can drop and re-read under pressure, and
each mapping goes away with the last view of its tensor (moving the weights to a GPU frees the host pages tensor by
tensor). ``populate`` reads the pages at once (``MAP_POPULATE``) so that the time of the load is the time of the
read, not spread over the first forward.
"""

from __future__ import annotations

import mmap
import os
from math import prod
from pathlib import Path

import torch

from lora_moe_core.errors import UserError
from lora_moe_core.formats.safetensors_io import check_header
from lora_moe_core.guards.parse import load_json

#: safetensors dtype names → torch dtypes (the ones model weights use)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def read_header(path: Path, what: str) -> tuple[int, dict[str, dict]]:
    """``(first data byte, {name: {"dtype", "shape", "data_offsets"}})`` of a checked safetensors file."""
    check_header(path, what)
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = load_json(handle.read(length).decode("utf-8", errors="replace"), f"{what} {path} header")
    if not isinstance(header, dict):
        raise UserError(f"{what} {path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + length, header


def map_safetensors(path: str | Path, what: str, readahead: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` as a view of its own private mapping of the file (see the module doc).

    Args:
        path: a ``.safetensors`` file.
        what: what the file is meant to be, for the error lines (``"--dit weights file"``).
        readahead: start reading every page now (the caller keeps the tensors as they are); ``False`` for a
            caller that converts each tensor once and drops it.

    Raises:
        UserError: a corrupt header, an unknown dtype, or a tensor whose bytes lie outside the file.
    """
    path = Path(path)
    start, header = read_header(path, what)
    size = path.stat().st_size
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return {name: _tensor(descriptor, path, name, info, start, size, readahead, what)
                for name, info in header.items()}  # fmt: skip
    finally:
        os.close(descriptor)  # each mapping keeps its own reference to the file


def _tensor(descriptor: int, path: Path, name: str, info: object, start: int, size: int, readahead: bool,
            what: str) -> torch.Tensor:  # fmt: skip
    try:
        dtype = DTYPES[info["dtype"]]
        shape = [int(side) for side in info["shape"]]
        first, last = (int(offset) for offset in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{what} {path}: tensor '{name}' has no valid dtype, shape and offsets "
                        f"(dtype {info.get('dtype') if isinstance(info, dict) else info!r})") from None  # fmt: skip
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=1) < 0 or last - first != prod(shape) * itemsize or first < 0 or start + last > size:
        raise UserError(f"{what} {path}: tensor '{name}' ({info['dtype']} {shape}) does not fit its offsets "
                        f"{first}..{last} in a file of {size:,} bytes: truncated or corrupt")  # fmt: skip
    if last == first:
        return torch.empty(shape, dtype=dtype)
    offset = start + first
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapping = mmap.mmap(descriptor, offset + (last - first) - aligned, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)  # fmt: skip
    except OSError as exc:
        raise UserError(f"cannot map {what} {path}: {exc.strerror}") from None
    if readahead:
        mapping.madvise(mmap.MADV_WILLNEED)
    inner = offset - aligned
    if inner % itemsize:  # an odd offset: a view would be misaligned for the dtype, so this one tensor is copied
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=last - first, offset=inner)
        return raw.clone().view(dtype).reshape(shape)
    # the view keeps the mapping alive; the mapping closes when the last view of the tensor goes
    return torch.frombuffer(mapping, dtype=dtype, count=prod(shape), offset=inner).reshape(shape)
