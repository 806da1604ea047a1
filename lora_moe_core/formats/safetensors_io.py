"""Checked safetensors reading and atomic writing. A user's file is never unpickled."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_moe_core.errors import DiskFullError, UserError, disk_full_reason
from lora_moe_core.guards.files import check_output_name, check_regular_file, removed_on_failure
from lora_moe_core.guards.parse import load_json

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: The largest JSON header read. A Wan 14B DiT's ~1,100 tensors take ~150 kB and kohya/musubi LoRA metadata
#: (training settings, tag frequencies) rarely reaches 1 MB; safetensors' own limit, 100 MB, would let a hostile
#: file make every command parse 100 MB of JSON (and hold it, several times over, in memory) before failing.
MAX_HEADER_BYTES = 16 << 20


def check_header(path: Path, what: str) -> None:
    """Refuse missing files and pickles before safetensors parses anything, with actionable messages."""
    if os.path.isdir(path):  # os.path: False, not OSError, for a name too long to stat
        raise UserError(f"{what} path {path} is a directory; give the .safetensors file itself")
    check_regular_file(path, what)  # a FIFO would block the reads below forever
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    # safetensors = u64 header length, then a JSON object: byte 8 is "{". Test that first, since a header
    # length whose low byte is 0x80 would otherwise look like a pickle opcode.
    if head[8:9] == b"{":
        size, claimed = path.stat().st_size, int.from_bytes(head[:8], "little")
        if claimed > size - 8:
            raise UserError(f"{path}: header length field says {claimed} bytes but the file has {size}: "
                            f"truncated or corrupt {what}")  # fmt: skip
        if claimed > MAX_HEADER_BYTES:
            raise UserError(f"{path}: safetensors header of {claimed:,} bytes, more than the {MAX_HEADER_BYTES:,} "
                            f"a {what} needs: corrupt or hostile file")  # fmt: skip
        return
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5):
        raise UserError(
            f"{path} is a PyTorch pickle checkpoint; only .safetensors files are accepted (unpickling can run code)"
        )
    raise UserError(f"{path} is not a safetensors {what} (empty, truncated or another format)")


def whole_file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` is not a whole safetensors file, from its header alone (no tensor is read): a pickle, a header
    cut short, or data that does not cover exactly what the header names (a truncated copy); None when whole."""
    try:
        check_header(path, what)
        with safe_open(str(path), framework="pt"):
            pass
    except UserError as exc:
        return str(exc)
    except (SafetensorError, OSError) as exc:
        return f"{path} is not a valid safetensors {what} (truncated or corrupt: {str(exc).splitlines()[0]})"
    return None


def read_safetensors(path: str | Path, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a safetensors file, refusing anything suspicious.

    Args:
        path: the file.
        what: what the file is meant to be ("LoRA", "checkpoint"), for the error messages.

    Raises:
        UserError: missing/unreadable file, a pickle offered instead, a truncated or corrupt file, or a tensor
            holding NaN/Inf — one line each.
    """
    path = Path(path)
    check_header(path, what)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a valid safetensors {what} (truncated or corrupt: {reason})") from None
    for key, tensor in list(tensors.items()):
        if tensor.is_floating_point() and tensor.dtype not in _COMPUTE_DTYPES:
            # fp8 (e4m3/e5m2) widens exactly to float32; torch implements almost no op (isfinite, matmul) on it
            tensor = tensors[key] = tensor.float()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            counts = {"NaN": int(tensor.isnan().sum()), "Inf": int(tensor.isinf().sum())}
            found = " and ".join(f"{count} {name}" for name, count in counts.items() if count)
            raise UserError(f"{path}: tensor '{key}' holds {found} value(s) of {tensor.numel()} (a diverged or "
                            "corrupted save; use an earlier checkpoint)")  # fmt: skip
    return tensors, metadata


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None) -> Path:
    """Write atomically: a temporary file in the target folder (created if needed), then ``os.replace``.

    Raises:
        UserError: when the path is a folder or cannot be created or written.
    """
    path = Path(path)
    check_output_name(path)  # before is_dir(): a 300-byte name makes stat() raise ENAMETOOLONG
    if path.is_dir():
        raise UserError(f"output path {path} is a directory")
    with removed_on_failure(path.parent):  # a folder made for this file goes again when the write fails
        try:
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(handle)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror}") from None
        try:
            contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
            save_file(contiguous, temporary, metadata=metadata)
            _publishable(temporary)
            os.replace(temporary, path)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if (reason := disk_full_reason(exc)) is not None:
                raise DiskFullError(reason, path) from None
            raise
    return path


def _publishable(temporary: str) -> None:
    """Flush the finished file to disk and give it the mode a plain ``open`` would (mkstemp makes it 0600).

    Without the flush a power cut after the rename can leave a named but empty file; without the mode a cache on
    a shared volume is unreadable to the next user or pod.
    """
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, which races with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        return 0o022


def metadata_json(metadata: dict[str, str], key: str, path: str | Path) -> object:
    """Parse one JSON metadata entry, failing with the file and key named."""
    if key not in metadata:
        raise UserError(f"{path}: metadata '{key}' is missing (not a lora-moe file?)")
    return load_json(metadata[key], f"{path}: metadata '{key}'")
