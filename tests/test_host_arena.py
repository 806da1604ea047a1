"""The host arena: copies packed into power-of-two slabs (no per-tensor rounding by the pinned allocator), equal to
their sources, and shared by every host copy of a memory-mode placement."""

from __future__ import annotations

import torch

from lora_moe_core.model.host_arena import ALIGN_BYTES, FIRST_SLAB_BYTES, HostArena
from lora_moe_core.model.memory import FP8_DTYPE, DiTPlacement
from lora_moe_core.model.wan import build_transformer

MB = 1 << 20


def test_copies_equal_their_sources_whatever_dtype_layout_or_size():
    generator = torch.Generator().manual_seed(0)
    sources = [
        torch.randn(33, 7, generator=generator).to(torch.bfloat16),
        torch.randn(5, 9, generator=generator).to(FP8_DTYPE),
        torch.randn(6, 4, generator=generator).t(),  # not contiguous
        torch.tensor(3.5),  # a scalar
        torch.empty(0, 3),  # no bytes
        torch.randint(0, 100, (17,), generator=generator),  # int64
        torch.rand(11, generator=generator) > 0.5,  # bool
    ]
    arena = HostArena(pin=False)
    copies = [arena.copy(source) for source in sources]
    for source, copy in zip(sources, copies, strict=True):
        assert copy.dtype == source.dtype and copy.shape == source.shape and copy.is_contiguous()
        assert torch.equal(copy.reshape(-1).view(torch.uint8), source.reshape(-1).view(torch.uint8))  # bit-exact
    packed = [copy for copy in copies if copy.numel()]
    assert len(arena.slabs) == 1 and {c.untyped_storage().data_ptr() for c in packed} == {
        arena.slabs[0].untyped_storage().data_ptr()
    }
    assert all((c.data_ptr() - arena.slabs[0].data_ptr()) % ALIGN_BYTES == 0 for c in packed)
    sources[0].fill_(0)
    assert copies[0].abs().sum() > 0  # a copy, not a view of the source


def test_slabs_double_from_16_mb_and_waste_only_the_last_slabs_end():
    arena = HostArena(pin=False, slab_bytes=64 * MB)
    for _ in range(10):
        arena.copy(torch.zeros(3 * MB, dtype=torch.uint8))
    # 16 MB takes 5 of the 3 MB tensors, then 32 MB takes the other 5: 48 MB for 30 MB (per-tensor powers of two
    # would be 10 × 4 MB = 40 MB here, and 1.46× for the A14B fp8 linears)
    assert [slab.numel() // MB for slab in arena.slabs] == [16, 32] and arena.reserved_bytes == 48 * MB
    for _ in range(30):
        arena.copy(torch.zeros(3 * MB, dtype=torch.uint8))
    assert [slab.numel() // MB for slab in arena.slabs] == [16, 32, 64, 64]  # capped at slab_bytes
    big = arena.copy(torch.ones(65 * MB, dtype=torch.uint8))  # larger than a slab: an allocation of its own
    assert arena.own_bytes == 65 * MB and big.untyped_storage().nbytes() == 65 * MB
    assert FIRST_SLAB_BYTES == 16 * MB


def test_slab_bytes_0_gives_each_tensor_its_own_allocation():
    arena = HostArena(pin=False, slab_bytes=0)
    copies = [arena.copy(torch.full((1000,), float(i))) for i in range(3)]
    assert arena.slabs == [] and arena.reserved_bytes == 3 * 4000
    assert [c[0].item() for c in copies] == [0.0, 1.0, 2.0]


def test_a_placement_packs_every_host_copy_of_both_dits_into_one_arena():
    torch.manual_seed(0)
    dits = {"high": build_transformer("tiny"), "low": build_transformer("tiny")}
    frozen = sum(p.numel() * p.element_size() for dit in dits.values() for p in dit.parameters())
    placement = DiTPlacement(dits, torch.device("cpu"), offload_inactive_dit=True, blocks_to_swap=2)
    storages = {p.untyped_storage().data_ptr() for dit in dits.values() for p in dit.parameters()}
    slabs = {slab.untyped_storage().data_ptr() for slab in placement.host.slabs}
    assert storages <= slabs and placement.host.own_bytes == 0
    assert frozen <= placement.host.reserved_bytes <= 2 * frozen + FIRST_SLAB_BYTES
