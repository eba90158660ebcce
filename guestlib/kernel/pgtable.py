"""Direct pagetables: pfn-to-mfn entries, table writes, the pin and unpin walks, highpte kmap.

Every entry the kernel writes names a machine frame (pte_pfn_to_mfn through the P2M) and every
entry it reads is turned back through the inverse (pte_mfn_to_pfn), a read of Xen's read-only
M2P as Linux's mfn_to_pfn does (docs/linux.md section 9, docs/xen.md section 22).
How a table is written depends on its state, as in Linux (docs/linux.md section 4): an unpinned table is
plain memory (a store through the direct map, or through this CPU's kmap slot for a highmem
pte page); a pinned one only through mmu_update, batched in the lazy-MMU multicall.

Pinning (xen_pgd_pin, docs/linux.md section 3): remap every lowmem table page read-only in the direct map,
then pin the pgds at their level (PIN_L4 the kernel and the user pgd; PAE: PIN_L3 the pgd,
docs/linux.md section 13). Unpinning is the reverse: UNPIN both, then make every
table page writable again. A highmem pte page is in no permanent mapping, only in a kmap slot,
which is mapped read-only while its table is pinned (xen_kmap_atomic_pte).
"""

import struct

from ..hypercalls import Batch, Op, PageFault, Pending, ops
from ..layout import BootLayout
from ..paging import PagingMode
from ..xen import ENTRIES_PER_TABLE, PAGE_SHIFT, PTE_MFN_MASK, UVMF_INVLPG, MmuCmd, MmuextCmd, Pte
from .cpu import Cpu, add, checked
from .layout import FIX_KMAP_BEGIN, PG_PINNED, PG_TABLE, KernelLayout

P, RW, US, A, D = (int(f) for f in (Pte.PRESENT, Pte.RW, Pte.USER, Pte.ACCESSED, Pte.DIRTY))
KERNPG_TABLE = P | RW | A | D
USER_TABLE = KERNPG_TABLE | US
PAGE_KERNEL = P | RW | A | D
PAGE_KERNEL_RO = P | A | D
USER_BASE = 0x400000  # the first user page; a process's pages sit in one L1 from here
slot = PagingMode.slot


class PageTables:
    """The P2M and its inverse, and how to reach and write any table page."""

    def __init__(self, boot: BootLayout, layout: KernelLayout):
        self.boot, self.kl, self.mode = boot, layout, layout.mode
        # The M2P's answers so far (`pfn_of`): a frame of this domain keeps its pfn until the
        # balloon gives it back (which forgets it here), and the balloon's pages are in no
        # table, so an answer stays true while the kernel maps the frame.
        self.m2p_seen: dict[int, int] = {}
        self.kernel_half: dict[int, int] = {}
        self.swapper_pfn = (boot.start_info.pt_base - boot.page_offset) >> PAGE_SHIFT
        # The table whose kernel entries every pgd's tree copies: swapper's pgd, or (PAE) the
        # kernel pmd the builder put after it (the L3, then slot 3's L2, then the L1s).
        self.swapper_kernel_pfn = self.swapper_pfn + self.mode.levels - self.mode.kernel_level

    def mfn(self, pfn: int) -> int:
        return self.boot.p2m[pfn]

    def make(self, pfn: int, flags: int) -> int:
        """pte_pfn_to_mfn: an entry mapping pfn with flags, as the hardware wants it."""
        return (self.mfn(pfn) << PAGE_SHIFT) | flags

    def set_p2m(self, pfn: int, mfn: int) -> None:
        """This CPU's copy of a P2M entry (the list in guest memory is the truth, which the
        balloon writes too); the frame it named is no longer known to be pfn's."""
        self.m2p_seen.pop(self.boot.p2m[pfn], None)
        self.boot.p2m[pfn] = mfn

    def known_pfn(self, entry: int) -> int | None:
        """The pfn of the frame an entry maps, if the M2P has told this CPU already."""
        return self.m2p_seen.get((entry & PTE_MFN_MASK) >> PAGE_SHIFT)

    def m2p_op(self, entry: int) -> Op:
        """mfn_to_pfn's read of machine_to_phys_mapping, Xen's read-only M2P
        (docs/xen.md section 22; PAE: the compat M2P of u32 entries), for the frame an entry
        maps; `pfn_of` checks its answer."""
        return ops.load(self.mode.m2p_va((entry & PTE_MFN_MASK) >> PAGE_SHIFT), size=self.mode.word)

    def pfn_of(self, cpu: Cpu, entry: int, pending: Pending) -> int:
        """pte_mfn_to_pfn from the M2P's answer (`m2p_op`), with Linux's round-trip check
        (mfn_to_pfn: p2m[pfn] == mfn, else the frame is foreign). Every frame this kernel's
        tables map is its own, so a foreign one is a kernel BUG."""
        mfn = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        pfn = checked(cpu, "mfn_to_pfn", pending)
        if isinstance(pfn, PageFault) or not 0 <= pfn < len(self.boot.p2m) or self.boot.p2m[pfn] != mfn:
            raise cpu.bug("mfn_to_pfn", f"mfn {mfn:#x} is not this domain's: the M2P answers {pfn}")
        self.m2p_seen[mfn] = pfn
        return pfn

    def maddr(self, pfn: int, index: int) -> int:
        """Machine address of entry `index` of table pfn (mmu_update's ptr)."""
        return (self.mfn(pfn) << PAGE_SHIFT) + 8 * index

    def direct_va(self, pfn: int) -> int:
        return self.boot.direct_va(pfn)

    def kmap_va(self, cpu: Cpu) -> int:
        return self.kl.fixmap_va(FIX_KMAP_BEGIN + cpu.id)

    async def read_kernel_half(self, cpu: Cpu) -> None:
        """Swapper's kernel entries, which every pgd's tree copies (pgd_ctor; PAE: into the
        pgd's own kernel pmd, pgd_prepopulate_pmd)."""
        slots = self.mode.kernel_slots
        (data,) = await cpu.send(ops.read(self.direct_va(self.swapper_kernel_pfn) + 8 * slots[0], 8 * len(slots)))
        words = struct.unpack(f"<{len(slots)}Q", data.result())
        self.kernel_half = {slots[0] + i: w for i, w in enumerate(words) if w & P}
        if self.fixmap_slot not in self.kernel_half:
            raise cpu.bug("read_kernel_half", "swapper has no fixmap slot: the kernel has not booted")

    @property
    def fixmap_slot(self) -> int:
        """The kernel table's entry that holds the fixmap's chain."""
        return slot(self.mode.fixmap_base, self.mode.kernel_level)

    # -- writing tables -------------------------------------------------------------------------

    def write_new(self, cpu: Cpu, batch: Batch, pfn: int, entries: dict[int, int]) -> None:
        """Fill a fresh (unpinned, unreferenced) table page with `entries`, the rest zero:
        plain memory, through the direct map or, for a highmem page, a kmap slot."""
        page = bytearray(8 * ENTRIES_PER_TABLE)
        for index, value in entries.items():
            struct.pack_into("<Q", page, 8 * index, value)
        if self.kl.is_lowmem(pfn):
            batch.write(self.direct_va(pfn), bytes(page))
        else:
            add(batch, self.kmap_op(cpu, pfn, pinned=False))
            batch.write(self.kmap_va(cpu), bytes(page))
            add(batch, self.kunmap_op(cpu))

    def set_entries(self, cpu: Cpu, batch: Batch, pfn: int, entries: dict[int, int], pinned: bool) -> None:
        """set_pte on a live table: mmu_update when pinned (one request per entry, one call),
        otherwise plain stores as write_new does."""
        if pinned:
            batch.mmu_update([(self.maddr(pfn, i) | MmuCmd.NORMAL_PT_UPDATE, v) for i, v in entries.items()])
        elif self.kl.is_lowmem(pfn):
            for index, value in entries.items():
                batch.store(self.direct_va(pfn) + 8 * index, value)
        else:
            add(batch, self.kmap_op(cpu, pfn, pinned=False))
            for index, value in entries.items():
                batch.store(self.kmap_va(cpu) + 8 * index, value)
            add(batch, self.kunmap_op(cpu))

    def kmap_op(self, cpu: Cpu, pfn: int, pinned: bool):
        """xen_kmap_atomic_pte: this CPU's kmap slot onto pte page pfn, read-only if the page
        is pinned (PG_pinned) and read-write otherwise (docs/linux.md section 14)."""
        return ops.update_va_mapping(self.kmap_va(cpu), self.make(pfn, PAGE_KERNEL_RO if pinned else PAGE_KERNEL), UVMF_INVLPG)

    def kunmap_op(self, cpu: Cpu):
        return ops.update_va_mapping(self.kmap_va(cpu), 0, UVMF_INVLPG)

    # -- pin and unpin (xen_pgd_pin / xen_pgd_unpin) ---------------------------------------------

    def remap_direct(self, pfns: list[int], writable: bool) -> list[tuple[int, int]]:
        """mmu_update requests remapping the lowmem ones of pfns in the direct map."""
        return [self.boot.remap(pfn, writable) for pfn in pfns if self.kl.is_lowmem(pfn)]

    def pin_ops(self, pgds: list[int], tables: list[int]) -> list:
        """The hypercalls of xen_pgd_pin: tables read-only (the pgds last), then pin each pgd
        at its level (PIN_L4; PAE: PIN_L3)."""
        return [
            ops.mmu_update(self.remap_direct(tables + pgds, writable=False)),
            ops.mmuext_op([(self.mode.pin_top, self.mfn(pgd)) for pgd in pgds]),
        ]

    def unpin_ops(self, pgds: list[int], tables: list[int]) -> list:
        """The hypercalls of xen_pgd_unpin: UNPIN each pgd, then every table page writable."""
        return [
            ops.mmuext_op([(MmuextCmd.UNPIN_TABLE, self.mfn(pgd)) for pgd in pgds]),
            ops.mmu_update(self.remap_direct(pgds + tables, writable=True)),
        ]

    def alloc_pt_ops(self, pfn: int) -> list:
        """xen_alloc_pt's hypercalls, pte page pfn joining a pinned mm (pmd_populate, before
        the pmd entry that makes Xen validate it): a lowmem page is made read-only; a highmem
        one has no permanent mapping to change (docs/linux.md section 14). The caller marks it
        PG_pinned."""
        return [ops.mmu_update([self.boot.remap(pfn, writable=False)])] if self.kl.is_lowmem(pfn) else []

    def release_pt_ops(self, pfn: int) -> list:
        """xen_release_pt's, pte page pfn leaving a pinned mm once its pmd entry is cleared
        (so Xen has dropped its type): a lowmem page is made writable again."""
        return [ops.mmu_update([self.boot.remap(pfn, writable=True)])] if self.kl.is_lowmem(pfn) else []

    def mark_pinned(self, batch: Batch, pfns: list[int], pinned: bool) -> None:
        """PG_pinned (and PG_table) in struct page, which other vCPUs read."""
        for pfn in pfns:
            va, _ = self.kl.pageinfo(pfn)
            if pinned:
                batch.atomic("fetch_or", va, PG_PINNED | PG_TABLE, size=4)
            else:
                batch.atomic("fetch_and", va, ~(PG_PINNED | PG_TABLE) & 0xFFFFFFFF, size=4)
