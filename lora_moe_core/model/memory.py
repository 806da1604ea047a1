"""GPU memory modes of the seed's FAQ for the two Wan2.2-A14B DiTs (80 GB / 40 GB / 24 GB cards).

* ``offload_inactive_dit``: only the DiT of the current noise regime is on the GPU; the other one's frozen
  weights wait in pinned host memory (musubi-tuner's ``--offload_inactive_dit``). Weights are frozen, so the
  host copy stays authoritative: switching regimes is one host-to-device copy, never a copy back.
* ``fp8_base``: the frozen linears of the DiT blocks are stored in float8 e4m3 with one scale per output
  channel (musubi's ``--fp8_base --fp8_scaled``) and de-quantised to the compute dtype inside each call.
* ``blocks_to_swap``: the first N blocks keep their frozen weights in pinned host memory and are streamed in
  on a side CUDA stream one block ahead of use (musubi's ``--blocks_to_swap`` with ``--block_swap_h2d_only``).
  The first blocks are the cheap ones to swap: truncated backprop runs them forward only, once per step.

The adapters are never moved: they are shared by both DiTs and trained. All three modes combine; musubi
cannot combine block swap with DiT offloading. Correctness does not depend on the device: on CPU every move
is a real copy too, so the CPU tests exercise the same bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_moe_core.errors import UserError
from lora_moe_core.model.host_arena import SLAB_BYTES, HostArena

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


class FP8Linear(nn.Linear):
    """A frozen linear with a float8 e4m3 weight and a per-output-channel scale (``W ≈ scale[:, None] · W8``).

    Stays an ``nn.Linear`` (shapes, adapter injection); the weight is de-quantised to the autocast (or input)
    dtype for each call, so the matmul runs in bf16 with half the resident weight memory.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, fast: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        # fp8 tensor-core matmul where no gradient flows (see forward); cuBLAS wants sides divisible by 16
        self.fast = fast and in_features % 16 == 0 and out_features % 16 == 0
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)  # fmt: skip
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fast: bool = False, device: torch.device | None = None) -> FP8Linear:
        """Quantise ``linear`` (absmax per output row → e4m3's ±448) on ``device``; the bias keeps its dtype."""
        weight = linear.weight.detach().to(device).float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX  # [out]
        quantised = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, fast)
        quantised.weight.data = (weight / scale[:, None]).to(FP8_DTYPE)
        quantised.weight_scale.data = scale
        if linear.bias is not None:
            quantised.bias.data = linear.bias.detach().to(weight.device, copy=True)
        return quantised

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        if self.fast and x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()):
            # nothing to differentiate (frozen weight, constant input): the blocks before the first adapted one
            return _fp8_matmul(x.to(dtype), self.weight, self.weight_scale, bias)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)


def _fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
    """``x W^T`` on fp8 tensor cores: ``x`` quantised per token (row-wise scales), ``W`` per output channel."""
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
    x_fp8 = (rows / x_scale).to(FP8_DTYPE)
    # W is [out, in] row-major, so W.t() is the column-major [in, out] operand _scaled_mm wants
    out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().view(1, -1),
                           out_dtype=x.dtype)  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantize_blocks_fp8(dit: nn.Module, fast: bool = False, device: torch.device | None = None) -> int:
    """Replace every plain ``nn.Linear`` inside ``dit.blocks`` with an :class:`FP8Linear`; returns how many.

    Args:
        fast: let the linears run fp8 tensor-core matmuls where no gradient flows (musubi's ``--fp8_fast``).
        device: where to quantise and keep the fp8 linears (a GPU quantises 14B weights in seconds).
    """
    count = 0
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, FP8Linear.from_linear(module, fast, device))
                count += 1
    return count


class HostCopy:
    """Frozen tensors whose master copy lives in (pinned) host memory; ``load`` puts a device copy in place.

    Args:
        arena: where the host copies go (one arena per placement packs every DiT's copies into shared slabs).
    """

    def __init__(self, params: list[nn.Parameter], device: torch.device, arena: HostArena) -> None:
        self.params, self.device = params, device
        self.host = []
        for param in params:  # point each parameter at its pinned copy at once: the original (a view of the
            param.data = arena.copy(param.data)  # file's pages) goes now, not after the whole DiT is pinned
            self.host.append(param.data)

    @property
    def loaded(self) -> bool:
        """Whether the parameters point at a device copy rather than at the host copy."""
        return bool(self.params) and self.params[0].data.data_ptr() != self.host[0].data_ptr()

    def load(self, used_on: torch.cuda.Stream | None = None) -> None:
        """Copy to the device on the current stream and point the parameters at the copies.

        Args:
            used_on: the stream that will compute with the copies when it is not the current one (a prefetch
                on a side stream); recorded so that the allocator does not reuse them while still in use.
        """
        for param, host in zip(self.params, self.host, strict=True):
            # copy=True: on CPU too the device copy is a distinct tensor, so tests see the same bookkeeping
            device_tensor = host.to(self.device, non_blocking=True, copy=True)
            if used_on is not None:
                device_tensor.record_stream(used_on)
            param.data = device_tensor

    def unload(self) -> None:
        """Point the parameters back at the host copy; the device memory returns to the caching allocator."""
        for param, host in zip(self.params, self.host, strict=True):
            param.data = host


def _frozen_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if not p.requires_grad]


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    """Streams the frozen weights of ``blocks[:count]`` from host memory, one block ahead of use.

    A forward pre-hook on each swapped block makes sure its weights are on the device, drops every other
    swapped block except the next one, and starts copying the next one (forward order, or reverse order while
    backward recomputes checkpointed blocks) on a side stream. Dropping is safe once a block's kernels are
    queued: the caching allocator reuses memory in stream order. At most three swapped blocks are resident.
    """

    def __init__(self, blocks: nn.ModuleList, count: int, device: torch.device, arena: HostArena) -> None:
        if not 0 < count < len(blocks):
            raise UserError(f"blocks_to_swap must be between 1 and {len(blocks) - 1} for this {len(blocks)}-block "
                            f"DiT, got {count}")  # fmt: skip
        self.device, self.count = device, count
        self.copies = [HostCopy(_frozen_params(blocks[i]), device, arena) for i in range(count)]
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_flight: dict[int, torch.cuda.Event] = {}
        self.loads = 0  # host-to-device block copies done (for tests and benchmarks)
        for index in range(count):
            blocks[index].register_forward_pre_hook(self._hook(index))

    def _hook(self, index: int):
        def before_forward(module: nn.Module, args) -> None:
            self.before(index)

        return before_forward

    def before(self, index: int) -> None:
        """Block ``index`` is about to run: make it resident, evict the others, prefetch the next one."""
        upcoming = index - 1 if _in_backward() else index + 1
        for other, copy in enumerate(self.copies):
            if other not in (index, upcoming) and copy.loaded:
                self.in_flight.pop(other, None)
                copy.unload()
        if not self.copies[index].loaded:
            self.copies[index].load()
            self.loads += 1
        event = self.in_flight.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if 0 <= upcoming < self.count and not self.copies[upcoming].loaded:
            self._prefetch(upcoming)

    def _prefetch(self, index: int) -> None:
        self.loads += 1
        if self.side_stream is None:
            self.copies[index].load()
            return
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.side_stream):
            self.copies[index].load(used_on=compute)
            event = torch.cuda.Event()
            event.record(self.side_stream)
        self.in_flight[index] = event

    def swapped_params(self) -> set[int]:
        return {id(p) for copy in self.copies for p in copy.params}


class DiTPlacement:
    """Where the frozen weights of the DiTs live during training, as the memory-mode settings ask.

    Build it on the freshly loaded DiTs, before any adapter is applied: every parameter present then is a
    frozen base weight. ``activate(name)`` is called before each DiT forward.

    Args:
        dits: ``{"high": dit, "low": dit}`` (the same module twice for a single-DiT model).
        device: the compute device.
        offload_inactive_dit: keep only the active DiT's (non-swapped) weights on the device.
        fp8_base: quantise the block linears to fp8 e4m3 with per-channel scales.
        blocks_to_swap: stream the first N blocks' weights from host memory.
        fp8_fast: with ``fp8_base``, run the forward-only linears as fp8 tensor-core matmuls.
        host_slab_bytes: slab size of the host copies (``host_arena.SLAB_BYTES``; 0: one allocation per tensor).
    """

    def __init__(self, dits: dict[str, nn.Module], device: torch.device, offload_inactive_dit: bool = False,
                 fp8_base: bool = False, blocks_to_swap: int = 0, fp8_fast: bool = False,
                 host_slab_bytes: int = SLAB_BYTES) -> None:  # fmt: skip
        self.dits = dits
        self.host = HostArena(device.type == "cuda", host_slab_bytes)
        unique = {id(dit): dit for dit in dits.values()}
        self.offload = offload_inactive_dit and len(unique) > 1
        self.blocks_to_swap = blocks_to_swap
        self.swappers: dict[int, BlockSwapper] = {}
        self.resident: dict[int, HostCopy] = {}
        for key, dit in unique.items():
            if fp8_base:
                quantize_blocks_fp8(dit, fp8_fast, device)
            _move_buffers(dit, device)
            swapped: set[int] = set()
            if blocks_to_swap:
                self.swappers[key] = BlockSwapper(dit.blocks, blocks_to_swap, device, self.host)
                swapped = self.swappers[key].swapped_params()
            rest = [p for p in _frozen_params(dit) if id(p) not in swapped]
            if self.offload:
                self.resident[key] = HostCopy(rest, device, self.host)
            else:
                for param in rest:
                    param.data = param.data.to(device)
        self.active: int | None = None
        self.switches = 0  # host-to-device DiT loads (for benchmarks)

    def activate(self, name: str) -> None:
        """Make the DiT of regime ``name`` ("high" or "low") resident, sending the other one back to the host."""
        key = id(self.dits[name])
        if not self.offload or key == self.active:
            return
        if self.active is not None:
            self.resident[self.active].unload()
        self.resident[key].load()
        self.active = key
        self.switches += 1

    def check_backward(self, gradient_checkpointing: bool) -> None:
        """Refuse swapping blocks that backward needs unless they are recomputed (call after adapters exist).

        Backward stops at the first block holding a trainable parameter (truncated backprop); a swapped block
        at or after it must be re-loaded by its recompute, which gradient checkpointing provides.
        """
        if not self.blocks_to_swap or gradient_checkpointing:
            return
        dit = next(iter(self.dits.values()))
        trained = [i for i, block in enumerate(dit.blocks) if any(p.requires_grad for p in block.parameters())]
        if trained and trained[0] < self.blocks_to_swap:
            fewer = f"use --blocks_to_swap {trained[0]} or less, or " if trained[0] else ""
            raise UserError(f"blocks_to_swap {self.blocks_to_swap} reaches block {trained[0]}, which is trained: "
                            f"{fewer}turn --gradient_checkpointing on")  # fmt: skip
