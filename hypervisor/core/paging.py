"""A PV domain's paging mode: one description of its pagetable levels and their rules.

Reference: docs/xen.md sections 2, 3 and 9, and docs/pv32.md sections 2 and 3. A 64-bit PV
guest (PV64) has four levels, its base pointer an L4. A 32-bit PAE guest on the compat ABI
(PV32) has three, its base pointer a PAE L3 of which four entries matter; the CPU still walks
four levels in long mode, through a per-vCPU compat L4 that Xen owns and whose slot 0 holds the
guest's L3 (setup_compat_l4, xen/arch/x86/pv/domain.c). That entry is Xen's, always
PRESENT|RW|USER|ACCESSED, so it decides nothing: the model walks a PV32 guest's three levels
from its L3, and keeps the compat L4 for what Xen keeps it (docs/pv32.md section 2).

What differs between the levels of a mode (the disallow mask, what Xen adds to a stored entry,
which slots the guest holds and may write, and with which errno it may not) is one `Level`
row, and the code of pagetable.py is written once over the rows: the PAE rows are rows, not a
second copy of the rules. The L2 that slot 3 of a PAE L3 points at takes the type
`PGT_pae_xen_l2` on top of L2 and has a row of its own (Xen's slots at its top).
"""

from dataclasses import dataclass, field

import numpy as np

from .abi import (
    ENTRIES_PER_TABLE,
    HYPERVISOR_COMPAT_VIRT_START,
    HYPERVISOR_L4_FIRST,
    HYPERVISOR_L4_LAST,
    HYPERVISOR_VIRT_END,
    L2_SLOT_COMPAT_XEN_FIRST,
    PAE_L3_DISALLOW,
    PAE_L3_SLOTS,
    Errno,
    PageType,
    Pte,
)

_P, _RW, _US, _A = int(Pte.PRESENT), int(Pte.RW), int(Pte.USER), int(Pte.ACCESSED)
_BASE_DISALLOW = int(Pte.PWT | Pte.PCD | Pte.PSE | Pte.GLOBAL)  # base_disallow_mask at L2..L4
_L1_DISALLOW = int(Pte.PWT | Pte.PCD | Pte.PSE)  # L1_DISALLOW_MASK: G allowed, PSE is PAT


def _slots(below: int = ENTRIES_PER_TABLE, xen: range = range(0)) -> np.ndarray:
    """A per-slot mask: the slots below `below`, less the slots of `xen`."""
    slots = np.arange(ENTRIES_PER_TABLE) < below
    slots[xen.start : xen.stop] = False
    return slots


@dataclass(frozen=True)
class Level:
    """What differs between pagetable levels (docs/xen.md sections 2.1, 2.4, 2.5, 3; the PAE
    rows: docs/pv32.md section 3)."""

    level: int
    page_type: PageType
    target_type: PageType | None
    disallow: int  # present entries with any of these bits fail with EINVAL
    adjust: int  # flags Xen adds to every present entry it stores (the 64-bit L1: `adjust_l1`)
    guest_slots: np.ndarray  # slots validated and holding references; the rest are Xen's, or ignored
    update_slots: np.ndarray = field(default=None)  # slots mod_lN_entry writes (default: guest_slots)
    update_errno: Errno = Errno.EINVAL  # the errno of an update outside them
    unadjust: int = 0  # flags Xen strips from an entry it devalidates (unadjust_guest_l3e)
    linear: bool = True  # a same-level read-only entry may be a linear pagetable (get_lN_linear_pagetable)
    adjust_l1: bool = False  # the 64-bit adjust_guest_l1e (USER|GUEST_KERNEL, or USER|GLOBAL)
    pae_xen_l2: bool = False  # the L2 of a PAE L3's slot 3, typed PGT_pae_xen_l2

    def __post_init__(self):
        if self.update_slots is None:
            object.__setattr__(self, "update_slots", self.guest_slots)

    @property
    def name(self) -> str:
        return f"L{self.level}"


@dataclass(frozen=True)
class PagingMode:
    """A domain's paging mode (docs/pv32.md section 2)."""

    address_size: int  # 64, or 32 for PAE on the compat ABI
    levels: dict[int, Level]  # the rows by level, 1 to 4 (PV32's L4 is Xen's compat L4)
    root: int  # the level of a base pointer, of the table the toolstack pins
    pae_xen_l2: Level | None  # PV32's row for the PGT_pae_xen_l2 L2
    # The walk from a base: the shift of each level's slot index, top level first, and the
    # level of each step (4 3 2 1, or 3 2 1).
    shifts: tuple[int, ...] = (39, 30, 21, 12)
    walk_levels: tuple[int, ...] = field(init=False)
    pv32: bool = field(init=False)  # address_size 32 (read on every walk: a plain attribute)

    def __post_init__(self):
        object.__setattr__(self, "walk_levels", tuple(range(len(self.shifts), 0, -1)))
        object.__setattr__(self, "pv32", self.address_size == 32)

    @property
    def root_type(self) -> PageType:
        return self.levels[self.root].page_type

    def guest_addr_ok(self, va: int) -> bool:
        """Xen's __addr_ok (PV64: the lower half, or from HYPERVISOR_VIRT_END up) or
        __compat_addr_ok (PV32: below HYPERVISOR_COMPAT_VIRT_START, Xen's hole at the top of
        the 4 GiB space; xen/arch/x86/include/asm/x86_64/uaccess.h)."""
        if self.pv32:
            return 0 <= va < HYPERVISOR_COMPAT_VIRT_START
        return 0 <= va < (1 << 47) or HYPERVISOR_VIRT_END <= va < (1 << 64)

    def addressable(self, va: int) -> bool:
        """Whether `va` is an address at all: canonical (PV64), or 32 bits (PV32). Any other
        access is the CPU's #GP, which the model does not deliver."""
        if self.pv32:
            return 0 <= va < (1 << 32)
        return 0 <= va < (1 << 47) or (0xFFFF800000000000 <= va < (1 << 64))

    def level_of(self, kind: int, pae_xen_l2: bool = False) -> Level | None:
        """The row of a table of type `kind` (None: not a pagetable type)."""
        if pae_xen_l2:
            return self.pae_xen_l2
        return _BY_TYPE[self.address_size].get(kind)


_XEN_L4 = range(HYPERVISOR_L4_FIRST, HYPERVISOR_L4_LAST + 1)

PV64 = PagingMode(
    64,
    {
        1: Level(1, PageType.L1, None, _L1_DISALLOW, 0, _slots(), adjust_l1=True),
        2: Level(2, PageType.L2, PageType.L1, _BASE_DISALLOW, _US, _slots()),
        3: Level(3, PageType.L3, PageType.L2, _BASE_DISALLOW, _US, _slots()),
        4: Level(4, PageType.L4, PageType.L3, _BASE_DISALLOW, _A | _US, _slots(xen=_XEN_L4)),
    },
    root=4,
    pae_xen_l2=None,
)

# PV32 (docs/pv32.md section 3): Xen adjusts no L1 or L2 entry (the kernel runs in ring 1, a
# supervisor ring), adds USER|RW to an L3 entry (the long-mode walk reads them; PAE's PDPTEs
# have none) and strips them again with ACCESSED when the L3 is devalidated; an L3 holds slots
# 0..3 (the rest are zeroed), its slot 3 is not the guest's to update, and no L3 entry is a
# linear pagetable (XSA-185). Its L4 is Xen's compat L4, of which slot 0 is the guest's.
_PV32_L2 = Level(2, PageType.L2, PageType.L1, _BASE_DISALLOW, 0, _slots())
PV32 = PagingMode(
    32,
    {
        1: Level(1, PageType.L1, None, _L1_DISALLOW, 0, _slots()),
        2: _PV32_L2,
        3: Level(3, PageType.L3, PageType.L2, PAE_L3_DISALLOW, _US | _RW, _slots(PAE_L3_SLOTS), _slots(PAE_L3_SLOTS - 1), unadjust=_US | _RW | _A, linear=False),
        4: Level(4, PageType.L4, PageType.L3, _BASE_DISALLOW, _A, _slots(1)),
    },
    root=3,
    shifts=(30, 21, 12),
    pae_xen_l2=Level(2, PageType.L2, PageType.L1, _BASE_DISALLOW, 0, _slots(L2_SLOT_COMPAT_XEN_FIRST), update_errno=Errno.EPERM, pae_xen_l2=True),
)

MODES = {64: PV64, 32: PV32}
_BY_TYPE = {size: {lv.page_type: lv for lv in mode.levels.values()} for size, mode in MODES.items()}
