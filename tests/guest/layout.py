"""The guest kernel's bookkeeping for end-to-end tests, on guestlib's BootLayout: the P2M read
by a vCPU process, and process pagetables built the way Linux's pgd_alloc builds them."""

from guestlib.layout import BootLayout
from guestlib.xen import ENTRIES_PER_TABLE, PAGE_SHIFT, Pte

from .vcpus import VcpuProcess

P, RW, US, A, D = (int(flag) for flag in (Pte.PRESENT, Pte.RW, Pte.USER, Pte.ACCESSED, Pte.DIRTY))
TABLE = P | RW | A | D  # how Linux writes upper-level entries (_KERNPG_TABLE)
KERNEL_SLOTS = range(272, 512)  # the L4 slots of the kernel half, shared by every pgd


def slot(va: int, level: int) -> int:
    return (va >> (PAGE_SHIFT + 9 * (level - 1))) & (ENTRIES_PER_TABLE - 1)


async def read_layout(vcpu: VcpuProcess, start_info) -> BootLayout:
    """The P2M list read by vCPU `vcpu`'s process, in one message."""
    results = await vcpu.submit([("read", va, length) for va, length in BootLayout.p2m_pages(start_info)])
    return BootLayout.from_p2m_bytes(start_info, b"".join(bytes.fromhex(r["value"]["bytes"]) for r in results))


def new_pgd(layout: BootLayout, kernel_l4: bytes, user_va: int, user_pfn: int) -> dict:
    """A process pgd: the kernel half copied from kernel_l4 (the boot L4's contents) and a fresh
    L3/L2/L1 chain mapping user_va to user_pfn. Returns the L4's mfn, the tree's pfns and the
    mmu_update requests that fill it (written while its pages are still plain memory)."""
    l4, l3, l2, l1 = (layout.alloc() for _ in range(4))
    entries = [
        (l1, slot(user_va, 1), (layout.mfn(user_pfn) << PAGE_SHIFT) | P | RW | US | A | D),
        (l2, slot(user_va, 2), (layout.mfn(l1) << PAGE_SHIFT) | TABLE | US),
        (l3, slot(user_va, 3), (layout.mfn(l2) << PAGE_SHIFT) | TABLE | US),
        (l4, slot(user_va, 4), (layout.mfn(l3) << PAGE_SHIFT) | TABLE | US),
    ]
    kernel = [int.from_bytes(kernel_l4[8 * i : 8 * i + 8], "little") for i in KERNEL_SLOTS]
    entries += [(l4, i, value) for i, value in zip(KERNEL_SLOTS, kernel) if value & P]
    fill = [((layout.mfn(pfn) << PAGE_SHIFT) + 8 * index, value) for pfn, index, value in entries]
    return {"l4": layout.mfn(l4), "pfns": [l4, l3, l2, l1], "fill": fill}
