"""Host memory for the frozen weights that the memory modes keep off the GPU, packed into a few large slabs.

torch's pinned-memory allocator (the CUDA caching host allocator) rounds every allocation up to a power of two,
so pinning the fp8 linears of a Wan2.2-A14B DiT one tensor at a time costs about 1.46× their size: a 70.8 MB FFN
weight (5120 × 13824 fp8) takes a 128 MB block, a 26.2 MB attention weight a 32 MB one. For the two DiTs of the
low-memory mode that is ~12 GiB of host memory holding nothing. Slabs of exactly a power of two, filled back to
back, waste at most the unused end of the last slab. Slabs grow by doubling from 16 MB up to the slab size, so a
small model pins megabytes, not a whole slab.
"""

from __future__ import annotations

import torch

SLAB_BYTES = 1 << 30  # 1 GiB: a power of two (no rounding), larger than any single Wan weight (the largest is 80 MB)
FIRST_SLAB_BYTES = 1 << 24  # 16 MB
ALIGN_BYTES = 256  # every copy starts on a 256-byte boundary: aligned for any dtype and for DMA


class HostArena:
    """Copies of tensors in host memory (pinned when ``pin``), carved from slabs of ``slab_bytes``.

    Args:
        pin: page-locked memory (for asynchronous host-to-device copies); ``False`` on CPU-only runs.
        slab_bytes: the largest slab (a power of two); ``0`` gives each tensor its own allocation (torch's
            default behaviour, kept for benchmarks that compare the two).
    """

    def __init__(self, pin: bool, slab_bytes: int = SLAB_BYTES) -> None:
        self.pin, self.slab_bytes = pin, slab_bytes
        self.slabs: list[torch.Tensor] = []
        self.used = 0  # bytes taken in the last slab
        self.own_bytes = 0  # bytes of the tensors that got their own allocation

    @property
    def reserved_bytes(self) -> int:
        """Host bytes this arena asked for (slabs plus tensors of their own)."""
        return self._slab_bytes_total() + self.own_bytes

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` (any device, any layout) as a contiguous view into a slab."""
        source = tensor.detach()
        nbytes = source.numel() * source.element_size()
        if nbytes == 0 or nbytes > self.slab_bytes:
            own = torch.empty(source.shape, dtype=source.dtype, pin_memory=self.pin)
            self.own_bytes += nbytes
            return own.copy_(source)
        start = -(-self.used // ALIGN_BYTES) * ALIGN_BYTES
        if not self.slabs or start + nbytes > self.slabs[-1].numel():
            self._new_slab(nbytes)
            start = 0
        self.used = start + nbytes
        # uint8 bytes → the tensor's dtype (the byte count is a multiple of its element size) → its shape
        view = self.slabs[-1][start : start + nbytes].view(source.dtype).view(source.shape)
        return view.copy_(source)

    def _new_slab(self, nbytes: int) -> None:
        """A slab twice the size of all slabs so far (16 MB first), at least ``nbytes``, at most ``slab_bytes``."""
        size = max(FIRST_SLAB_BYTES, 1 << self._slab_bytes_total().bit_length(), 1 << (nbytes - 1).bit_length())
        self.slabs.append(torch.empty(min(size, self.slab_bytes), dtype=torch.uint8, pin_memory=self.pin))

    def _slab_bytes_total(self) -> int:
        return sum(slab.numel() for slab in self.slabs)
