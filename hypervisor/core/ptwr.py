"""Writable pagetables: a guest kernel's store into its own read-only mapped L1 (docs/xen.md section 17).

With VMASST writable_pagetables, which the guest kernel enables at boot (docs/xen.md section 25),
Xen does not deliver the #PF of such a store: it emulates the store as a checked L1 entry update
(pv/ro-page-fault.c).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from .abi import PAGE_SIZE, PageType
from .domain import Vcpu
from .errors import XenError
from .pagetable import RW, P, entry_mfn
from .walk import walk_entries

if TYPE_CHECKING:
    from .hypervisor import Hypervisor


def emulate(hv: "Hypervisor", vcpu: Vcpu, va: int, modify: Callable[[int], tuple[int, int, bool]]) -> int | None:
    """Xen's pv_ro_page_fault + ptwr_emulated_update for a kernel write that faulted on a
    present page at `va`. If the kernel's L1 entry for `va` maps, read-only, a validated L1 of
    this domain (get_page_from_mfn, page_lock, type L1), the entry that holds `va` becomes the
    new word of `modify(entry) -> (old value, new word, store?)` through mod_l1_entry, with
    every check of docs/xen.md section 3. Returns the old value, or None when Xen would not emulate (not
    such an L1, or the new entry fails a check): then the original #PF stands and nothing
    changed.

    A sub-word store is merged into its entry by `modify`, as Xen turns it into a full-word
    access. A cmpxchg whose comparison fails stores nothing, but Xen checks its new entry
    first (taking and dropping its references), so an invalid one faults either way.
    """
    mode = vcpu.mode
    if not mode.guest_addr_ok(va):
        return None  # guest_get_eff_kern_l1e finds no L1 entry outside the guest's range
    path = walk_entries(hv.memory, vcpu.guest_table, va, mode)
    if len(path) < len(mode.shifts) or path[-1][2] & (P | RW) != P:
        return None
    l1 = entry_mfn(path[-1][2])
    frames = hv.frames
    if frames.owner.item(l1) != vcpu.domid or frames.locked_type(l1) != PageType.L1:
        return None
    slot = (va & (PAGE_SIZE - 1)) >> 3
    old, new, store = modify(hv.memory.entries(l1).item(slot))
    pagetables = hv.pagetables
    try:
        if store:
            pagetables.mod_entry(mode.levels[1], l1, slot, new, vcpu.domid, vcpu.domid)
        elif new & P:
            pagetables.get_page_from_l1e(new, vcpu.domid)
            pagetables.put_page_from_l1e(new)
    except XenError:
        return None
    return old
