"""What a PV kernel knows about its memory at boot: start info, the P2M list, the direct map.

The domain builder maps all lowmem at the direct map's base (the paging mode's page_offset,
which start info's magic names) through the initial pagetable, whose frames are the top level's, the tables below it, then the L1s at
consecutive pfns from pt_base (common.proto StartInfo).
From that and the P2M list (read out of guest memory) the kernel can name the machine address
of the direct-map entry for any lowmem pfn, which is what Linux's set_pte on the linear map,
make_lowmem_page_readonly and friends hand to mmu_update.
"""

import struct

from .hypercalls import HypercallClient, ops
from .paging import mode_of_magic
from .xen import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE, Pte

_PTE = int(Pte.PRESENT | Pte.ACCESSED | Pte.DIRTY)


class BootLayout:
    """Start info and the P2M, with a bump allocator over the free lowmem pfns."""

    def __init__(self, start_info, p2m: list[int]):
        self.start_info, self.p2m = start_info, p2m
        self.page_offset = mode_of_magic(start_info.magic).page_offset
        self.next_pfn = start_info.first_free_pfn
        nr_l1 = -(-start_info.nr_lowmem_pages // ENTRIES_PER_TABLE)
        pt_base_pfn = (start_info.pt_base - self.page_offset) >> PAGE_SHIFT
        self.first_direct_l1_pfn = pt_base_pfn + start_info.nr_pt_frames - nr_l1

    @staticmethod
    def p2m_pages(start_info) -> list[tuple[int, int]]:
        """(va, length) of each page of the P2M list (an unsigned long per pfn), for page-sized reads."""
        size = start_info.nr_pages * mode_of_magic(start_info.magic).word
        return [(start_info.mfn_list + offset, min(PAGE_SIZE, size - offset)) for offset in range(0, size, PAGE_SIZE)]

    @classmethod
    def from_p2m_bytes(cls, start_info, data: bytes) -> "BootLayout":
        word = "I" if mode_of_magic(start_info.magic).word == 4 else "Q"
        return cls(start_info, list(struct.unpack(f"<{start_info.nr_pages}{word}", data)))

    @classmethod
    async def read(cls, client: HypercallClient, start_info) -> "BootLayout":
        """Read the P2M list in one message."""
        reads = await client.submit([ops.read(va, length) for va, length in cls.p2m_pages(start_info)])
        return cls.from_p2m_bytes(start_info, b"".join(read.result() for read in reads))

    def mfn(self, pfn: int) -> int:
        return self.p2m[pfn]

    def alloc(self) -> int:
        """A fresh lowmem pfn, mapped writable in the direct map."""
        if self.next_pfn >= self.start_info.nr_lowmem_pages:
            raise MemoryError(f"no free lowmem pfn left (lowmem ends at pfn {self.start_info.nr_lowmem_pages})")
        pfn, self.next_pfn = self.next_pfn, self.next_pfn + 1
        return pfn

    def direct_va(self, pfn: int) -> int:
        return self.page_offset + (pfn << PAGE_SHIFT)

    def direct_entry(self, pfn: int) -> int:
        """Machine address of the boot L1 entry that maps pfn in the direct map."""
        l1 = self.mfn(self.first_direct_l1_pfn + pfn // ENTRIES_PER_TABLE)
        return (l1 << PAGE_SHIFT) + 8 * (pfn % ENTRIES_PER_TABLE)

    def remap(self, pfn: int, writable: bool) -> tuple[int, int]:
        """The mmu_update request that maps pfn in the direct map read-only or writable."""
        return self.direct_entry(pfn), (self.mfn(pfn) << PAGE_SHIFT) | _PTE | (int(Pte.RW) if writable else 0)
