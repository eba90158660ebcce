"""A vCPU's memory path: loads, stores, atomics and block copies through its TLB and MMU walk.

Theory of operation (reference: docs/xen.md sections 2.5, 9.2 and 10). vCPUs share guest
memory only through the hypervisor, so the core plays each vCPU's MMU. An access at a virtual
address looks its page up in the vCPU's TLB; on a miss it walks the 4-level table under the
current mode's base (kernel mode: `guest_table`; user mode: `guest_table_user`, docs/xen.md section 9.2),
which needs P and USER at every level and, for a write, RW at every level; it then sets the
accessed bit of every entry it used and, for a write, the L1 entry's dirty bit in the stored
entries, as the hardware does, and caches the translation (global when the L1 entry has G).
An access that cannot translate returns a `PageFault` (cr2 and the x86 error code) instead of
its result, which the guest handles as its #PF handler would; as on the CPU, a fault also
drops the address's TLB entry. A write hit on an entry cached read-only or clean re-walks,
which is how the hardware sets the dirty bit.

Why USER in kernel mode too: a 64-bit PV guest kernel runs in ring 3, so to the CPU all its
accesses are user accesses. Xen adds USER to every entry it stores (docs/xen.md section 2.5), so only Xen's
own entries are out of the guest's reach, and the guest's kernel and user are kept apart by the
two bases. The error code's U bit tells the guest's mode, as Xen's pv_inject_event rewrites it.

Xen's range (L4 slots 256..271) is never walked: an access there faults on the L4 entry Xen
wrote into every base (pagetable.xen_l4_slots), which is empty or lacks USER, whatever lies
below it, and whatever the base's slot holds. The one exception is the read-only M2P, which
Xen maps readable in slot 256 of a kernel base (docs/xen.md section 22): a read there returns
the M2P's entry, a write faults. Xen passes such a fault to the guest (xen/arch/x86/traps.c fixup_page_fault does not
emulate in Xen's range). The error code's P bit is that of Xen's L4 entry: the model has none
of Xen's lower tables, where a real walk could meet a hole and clear it.

The stale-TLB oracle. The CPU uses a cached translation until it is flushed, even after the
entry behind it changed, and so does the model; but a hit that the current tables would not
give (another frame, or a fault) is counted on the vCPU and, with `Hypervisor.strict_tlb`,
faults instead: that is how a missing guest flush becomes visible. Checking a hit costs one
word: a TLB entry remembers its base and the L1 entry it came from, and while both are the
same so is the translation, because upper levels never change behind a TLB entry (Xen flushes
every vCPU of the domain when an L2..L4 entry changes, docs/xen.md section 4.3; a base load flushes,
docs/xen.md section 8; a validated table cannot be written otherwise). Only when they differ does a hit
cost a walk.

A store the kernel makes through a read-only mapping of one of its validated L1s is emulated
as a checked entry update (`ptwr`).

A 32-bit PAE guest (docs/pv32.md section 2) walks three levels from its L3 (paging.py), and its
kernel runs in ring 1, a supervisor ring: its accesses need no USER, its user's do, and Xen
adjusts none of its L1 or L2 entries. Its hole, from HYPERVISOR_COMPAT_VIRT_START to 4 GiB, is
Xen's, answered like Xen's range: the compat M2P there is readable by the kernel only.

Argument errors are `XenError(EINVAL)`: a size other than 1, 2, 4 or 8, an access not aligned
to its size (so a single access never crosses a page; misaligned ones are not modelled), a
value wider than the access, a block of 0 or more than fits in its page, and a non-canonical
address (the CPU's #GP, which the model does not deliver).
"""

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ptwr
from .abi import (
    HYPERVISOR_COMPAT_VIRT_START,
    HYPERVISOR_L4_FIRST,
    HYPERVISOR_VIRT_END,
    HYPERVISOR_VIRT_START,
    L4_SLOT_RO_MPT,
    PAGE_SHIFT,
    PAGE_SIZE,
    RO_MPT_VIRT_START,
    Errno,
    PFEC_page_present,
    PFEC_user_mode,
    PFEC_write_access,
    VMASST_TYPE_writable_pagetables,
)
from .domain import Vcpu
from .errors import SimulatorBug, XenError
from .pagetable import RW, US, A, D, G, P, entry_mfn
from .tlb import TlbEntry
from .walk import walk_entries

if TYPE_CHECKING:
    from .hypervisor import Hypervisor


_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_OFFSET = PAGE_SIZE - 1
_RW_D = RW | D


@dataclass(frozen=True, slots=True)
class PageFault:
    """A #PF raised by an access, returned instead of its result (memory.proto PageFault): the
    faulting address (cr2), the x86 error code, and the cause naming the entry. The access had
    no effect."""

    va: int
    error_code: int
    detail: str

    def record(self) -> dict:
        """dataclasses.asdict of it, without asdict's recursive copy (5.9 -> 0.2 us a fault)."""
        return {"va": self.va, "error_code": self.error_code, "detail": self.detail}


def _error_code(user: bool, write: bool) -> int:
    return (PFEC_write_access if write else 0) | (PFEC_user_mode if user else 0)


# -- translation -------------------------------------------------------------------------


def _translate(hv: "Hypervisor", vcpu: Vcpu, va: int, user: bool, write: bool) -> TlbEntry | PageFault:
    """The translation an access uses: a TLB hit (checked by the oracle), or a fresh walk."""
    root = vcpu.guest_table_user if user and not vcpu.compat_l4 else vcpu.guest_table  # vcpu.base(user)
    hit = vcpu.tlb.entries.get(va >> PAGE_SHIFT)
    if hit is not None and (hit.user == user or hit.is_global) and (not write or hit.flags & _RW_D == _RW_D) and (not user or hit.flags & US):
        if hit.root == root and hv.memory.entries(hit.l1).item(hit.slot) == hit.pte:
            return hit
        return _recheck(hv, vcpu, va, hit, root, user, write)
    return _fill(hv, vcpu, va, root, user, write)


def _walk(hv: "Hypervisor", vcpu: Vcpu, root: int, va: int, user: bool, write: bool) -> tuple[list, int] | PageFault:
    """What the current tables say about an access, without side effects: the walk's
    (table, slot, entry) per level and the effective P/RW/USER flags, or the fault. In Xen's
    range it is Xen's own L4 entry that answers, whatever the base holds there (in a PV32
    guest's hole, Xen's entries of its PAE_XEN_L2)."""
    code = _error_code(user, write)
    if not root:
        return PageFault(va, code, f"the vCPU has no {'user' if user else 'kernel'} base pointer")
    mode = vcpu.mode
    if not mode.addressable(va):
        what = "a 32-bit address" if mode.pv32 else "canonical"
        raise XenError(Errno.EINVAL, f"va {va:#x} is not {what} (the CPU raises #GP, which the model does not deliver)")
    if mode.pv32:
        if va >= HYPERVISOR_COMPAT_VIRT_START:
            return _compat_hole_fault(hv, va, code)
        need = (US if user else 0) | (RW if write else 0)  # the kernel runs in ring 1
    else:
        if HYPERVISOR_VIRT_START <= va < HYPERVISOR_VIRT_END:
            return _xen_range_fault(hv, root, va, code)
        need = US | RW if write else US
    path = walk_entries(hv.memory, root, va, mode)
    flags = P | RW | US
    for level, (table, slot, entry) in zip(mode.walk_levels, path):
        if not entry & P:
            return PageFault(va, code, f"L{level} entry {slot} of mfn {table:#x} is not present")
        flags &= entry
    if len(path) < len(mode.shifts):
        raise SimulatorBug(f"the walk of va {va:#x} under mfn {root:#x} left machine memory")
    if flags & need != need:
        bit = RW if flags & US or not need & US else US
        level, (table, slot, _) = next((lv, step) for lv, step in zip(mode.walk_levels, path) if not step[2] & bit)
        what = "is read-only" if bit == RW else "lacks USER"
        return PageFault(va, code | PFEC_page_present, f"L{level} entry {slot} of mfn {table:#x} {what}")
    return path, flags


def _xen_range_fault(hv: "Hypervisor", root: int, va: int, code: int) -> PageFault:
    """The fault of an access in Xen's range, decided by Xen's entry in the base's L4 slot.
    The read-only M2P's slot (256, once filled) passes reads of the entries the machine has:
    those are answered by `_m2p_read` on the way back, and its fault here is never seen."""
    slot = (va >> 39) & 511
    where = f"va {va:#x} is in Xen's range: L4 entry {slot} of mfn {root:#x}"
    if slot == L4_SLOT_RO_MPT and _maps_ro_mpt(hv, root):
        if code & PFEC_write_access:
            return PageFault(va, code | PFEC_page_present, f"{where} maps Xen's M2P read-only")
        return PageFault(va, code, f"{where} maps Xen's M2P, which has no entry there (the machine has {hv.nr_frames:#x} frames)")
    if hv.pagetables.xen_l4_entries(root).item(slot - HYPERVISOR_L4_FIRST) & P:
        return PageFault(va, code | PFEC_page_present, f"{where} lacks USER")
    return PageFault(va, code, f"{where} is not present")


def _compat_m2p_bytes(hv: "Hypervisor") -> int:
    """How far Xen's compat M2P is mapped from HYPERVISOR_COMPAT_VIRT_START: its 2 MiB pages
    (pagetable.compat_xen_l2_slots)."""
    return int(np.count_nonzero(hv.pagetables.compat_xen_l2)) << 21


def _compat_hole_fault(hv: "Hypervisor", va: int, code: int) -> PageFault:
    """The fault of a PV32 access in Xen's hole, from HYPERVISOR_COMPAT_VIRT_START up, decided
    by Xen's entries of the guest's PAE_XEN_L2: the compat M2P's are PRESENT without USER or
    RW, so a write or a user access faults on them (a kernel read is answered by `_m2p_read`);
    the rest are empty."""
    where = f"va {va:#x} is in Xen's hole of a 32-bit guest"
    if va - HYPERVISOR_COMPAT_VIRT_START >= _compat_m2p_bytes(hv):
        return PageFault(va, code, f"{where}, where Xen maps nothing")
    what = "read-only" if code & PFEC_write_access else "without USER"
    return PageFault(va, code | PFEC_page_present, f"{where}: Xen's compat M2P, mapped {what}")


def _maps_ro_mpt(hv: "Hypervisor", root: int) -> bool:
    """Whether Xen has mapped its read-only M2P in slot 256 of base `root` (fill_ro_mpt);
    whatever else the slot holds is not Xen's and answers nothing."""
    return hv.memory.entries(root).item(L4_SLOT_RO_MPT) == hv.pagetables.ro_mpt_entry


def _m2p_read(hv: "Hypervisor", vcpu: Vcpu, va: int, length: int, user: bool) -> bytes | None:
    """What a read of `length` bytes at `va` gets from Xen's read-only M2P
    (machine_to_phys_mapping, docs/xen.md section 22): the M2P entry of mfn (va -
    RO_MPT_VIRT_START) / 8, as MMU_MACHPHYS_UPDATE and memory_op last set it, when the base
    maps the M2P in slot 256; None where it does not (the access faults)."""
    if vcpu.compat_l4:
        return _compat_m2p_read(hv, vcpu, va, length, user)
    first = va - RO_MPT_VIRT_START
    if not (0 <= first and first + length <= 8 * hv.nr_frames):
        return None
    root = vcpu.base(user)
    if not root or not _maps_ro_mpt(hv, root):
        return None
    words = hv.m2p[first >> 3 : (first + length + 7) >> 3].astype("<u8").tobytes()
    return words[first & 7 : (first & 7) + length]


def _compat_m2p_read(hv: "Hypervisor", vcpu: Vcpu, va: int, length: int, user: bool) -> bytes | None:
    """A PV32 kernel's read of the compat M2P (compat_machine_to_phys_mapping, one u32 pfn per
    mfn from HYPERVISOR_COMPAT_VIRT_START, the low half of the M2P's entry; INVALID past the
    machine's frames, as paging_init fills it); None for a user read or outside it (it faults)."""
    first = va - HYPERVISOR_COMPAT_VIRT_START
    if user or not vcpu.guest_table or not (0 <= first and first + length <= _compat_m2p_bytes(hv)):
        return None
    low, high = first >> 2, (first + length + 3) >> 2
    pfns = np.full(high - low, 0xFFFFFFFF, dtype="<u4")
    known = hv.m2p[low:high]
    pfns[: len(known)] = known.astype("<u4")
    return pfns.tobytes()[first & 3 : (first & 3) + length]


def _fill(hv: "Hypervisor", vcpu: Vcpu, va: int, root: int, user: bool, write: bool) -> TlbEntry | PageFault:
    """A TLB miss: walk from `root`, set the accessed (and dirty) bits, cache the translation."""
    walked = _walk(hv, vcpu, root, va, user, write)
    if walked.__class__ is PageFault:
        vcpu.tlb.invlpg(va)
        return walked
    path, flags = walked
    memory = hv.memory
    for table, slot, entry in path[:-1]:
        if not entry & A:
            memory.frame(table)[slot] = entry | A
    l1, slot, pte = path[-1]
    stored = pte | A | (D if write else 0)
    if stored != pte:
        memory.frame(l1)[slot] = stored
    hit = TlbEntry(entry_mfn(stored), flags | (stored & (D | G)), bool(stored & G), user, root, l1, slot, stored)
    vcpu.tlb.fill(va >> PAGE_SHIFT, hit)
    return hit


def _recheck(hv: "Hypervisor", vcpu: Vcpu, va: int, hit: TlbEntry, root: int, user: bool, write: bool) -> TlbEntry | PageFault:
    """The oracle, for a hit whose base or L1 entry changed since the fill. If the current
    tables give this access the same frame it is no stale hit (and when they also agree on the
    permissions, the entry is re-based so the next hit is cheap again). Otherwise the hit is
    stale: counted, then used as the CPU would, or in strict mode dropped and faulted (with P
    set when the current tables would translate, which a guest treats as a spurious fault)."""
    walked = _walk(hv, vcpu, root, va, user, write)
    if walked.__class__ is PageFault:
        current, fault = None, walked
    else:
        path, flags = walked
        l1, slot, pte = path[-1]
        current = entry_mfn(pte)
        if current == hit.mfn:
            if not (flags ^ hit.flags) & (RW | US):
                hit.root, hit.l1, hit.slot, hit.pte = root, l1, slot, pte
            return hit
        fault = PageFault(va, _error_code(user, write) | PFEC_page_present, f"the current tables map mfn {current:#x}")
    vcpu.stale_tlb_hits += 1
    vcpu.stale_tlb_records.append({"va": va, "mfn": hit.mfn, "current_mfn": current, "write": write, "user": user})
    if not hv.strict_tlb:
        return hit
    vcpu.tlb.invlpg(va)
    return PageFault(va, fault.error_code, f"stale TLB entry maps mfn {hit.mfn:#x} (strict_tlb): {fault.detail}")


# -- accesses ------------------------------------------------------------------------------


def _mask(va: int, size: int) -> int:
    mask = _MASKS.get(size)
    if mask is None:
        raise XenError(Errno.EINVAL, f"access size {size} is not 1, 2, 4 or 8")
    if va & (size - 1) or va >> 64:
        raise XenError(Errno.EINVAL, f"va {va:#x} is not a {size}-byte aligned address (misaligned accesses are not modelled)")
    return mask


def load(hv: "Hypervisor", vcpu: Vcpu, va: int, size: int, user: bool = False) -> int | PageFault:
    """Read the little-endian integer of `size` bytes at `va`."""
    mask = _mask(va, size)
    hit = _translate(hv, vcpu, va, user, False)
    if hit.__class__ is PageFault:
        data = _m2p_read(hv, vcpu, va, size, user)
        return hit if data is None else int.from_bytes(data, "little")
    return (hv.memory.entries(hit.mfn).item((va & _OFFSET) >> 3) >> ((va & 7) << 3)) & mask


def _replace(old: int, operand: int) -> int:
    return operand


ATOMIC_OPS: dict[str, Callable[[int, int], int]] = {
    "cmpxchg": _replace,  # stores only when the old value equals `expected`
    "xchg": _replace,
    "fetch_add": operator.add,  # wraps at the access size
    "fetch_or": operator.or_,
    "fetch_and": operator.and_,
}


def atomic(hv: "Hypervisor", vcpu: Vcpu, operation: str, va: int, size: int, operand: int, expected: int | None = None, user: bool = False) -> int | PageFault:
    """A locked read-modify-write (`ATOMIC_OPS`; named `operation` because `op` names the
    hypercall in the dispatch); returns the old value. `expected` is given for cmpxchg only,
    which exchanged iff the old value equals it. Like x86, every operation needs a writable
    translation, even a cmpxchg that stores nothing."""
    fn = ATOMIC_OPS.get(operation)
    if fn is None:
        raise XenError(Errno.EINVAL, f"unknown atomic operation {operation!r}; one of {', '.join(ATOMIC_OPS)}")
    if (operation == "cmpxchg") != (expected is not None):
        raise XenError(Errno.EINVAL, f"{operation} {'needs' if operation == 'cmpxchg' else 'takes no'} expected value")
    return _rmw(hv, vcpu, va, size, user, fn, operand, expected)


def store(hv: "Hypervisor", vcpu: Vcpu, va: int, size: int, value: int, user: bool = False) -> PageFault | None:
    """Write the little-endian integer `value` of `size` bytes at `va`."""
    result = _rmw(hv, vcpu, va, size, user, _replace, value)
    return result if result.__class__ is PageFault else None


def _rmw(hv: "Hypervisor", vcpu: Vcpu, va: int, size: int, user: bool, op: Callable[[int, int], int], operand: int, expected: int | None = None) -> int | PageFault:
    """Every store and atomic: put op(old, operand) in place of the value at `va` within its
    aligned 8-byte word, which is also how ptwr sees a store into an L1 entry."""
    mask = _mask(va, size)
    for name, value in (("operand", operand), ("expected", expected)):
        if value is not None and not 0 <= value <= mask:
            raise XenError(Errno.EINVAL, f"{name} {value:#x} does not fit in {size} bytes")
    shift = (va & 7) << 3
    hit = _translate(hv, vcpu, va, user, True)
    if hit.__class__ is PageFault:
        return _fixup_page_fault(hv, vcpu, hit, va, user, lambda word: _modify(word, shift, mask, op, operand, expected))
    words = hv.memory.frame(hit.mfn)
    index = (va & _OFFSET) >> 3
    old, word, stored = _modify(words.item(index), shift, mask, op, operand, expected)
    if stored:
        words[index] = word
    return old


def _modify(word: int, shift: int, mask: int, op: Callable[[int, int], int], operand: int, expected: int | None) -> tuple[int, int, bool]:
    """(old value, the word with op(old, operand) in its place, whether it is stored)."""
    old = (word >> shift) & mask
    new = (word & ~(mask << shift)) | ((op(old, operand) & mask) << shift)
    return old, new, expected is None or old == expected


def _fixup_page_fault(hv: "Hypervisor", vcpu: Vcpu, fault: PageFault, va: int, user: bool, modify: Callable[[int], tuple[int, int, bool]]) -> int | PageFault:
    """Xen's fixup_page_fault for a PV guest: a kernel-mode write that faulted on a present
    page may be a write to a read-only mapped L1, which ptwr emulates if the domain enabled
    VMASST writable_pagetables (docs/xen.md section 25); otherwise the fault stands."""
    if user or fault.error_code != PFEC_page_present | PFEC_write_access:
        return fault
    if not hv.domains[vcpu.domid].vm_assist >> VMASST_TYPE_writable_pagetables & 1:
        return fault
    old = ptwr.emulate(hv, vcpu, va, modify)
    return fault if old is None else old


def _block(addr: int, length: int) -> None:
    if not 1 <= length <= PAGE_SIZE - (addr & _OFFSET) or addr >> 64:
        raise XenError(Errno.EINVAL, f"{length} bytes at {addr:#x} do not lie within one page (1 to 4096 bytes)")


def read(hv: "Hypervisor", vcpu: Vcpu, va: int, length: int, user: bool = False) -> bytes | PageFault:
    """Copy `length` bytes out of one page at `va`."""
    _block(va, length)
    hit = _translate(hv, vcpu, va, user, False)
    if hit.__class__ is PageFault:
        data = _m2p_read(hv, vcpu, va, length, user)
        return hit if data is None else data
    return hv.memory.read(hit.mfn, va & _OFFSET, length)


def write(hv: "Hypervisor", vcpu: Vcpu, va: int, data: bytes, user: bool = False) -> PageFault | None:
    """Copy `data` into one page at `va`. A block copy is not emulated by ptwr (Xen emulates
    one instruction's store of at most 8 bytes): into a read-only mapping it faults."""
    _block(va, len(data))
    hit = _translate(hv, vcpu, va, user, True)
    if hit.__class__ is PageFault:
        return hit
    hv.memory.write(hit.mfn, va & _OFFSET, bytes(data))
    return None


# -- the dispatch table's handlers -----------------------------------------------------------


def _handler(access: Callable[..., Any], key: str | None) -> Callable[..., dict]:
    """An access as the dispatch table runs it: the shape of its response in memory.proto,
    {key: result} ({} for a store) or {"fault": {"va", "error_code", "detail"}}, JSON-able
    except for bytes, which the trace hex-encodes."""

    @functools.wraps(access)  # and its signature: tests/contract binds the wire's fields to it
    def handler(hv: "Hypervisor", vcpu: Vcpu, **args) -> dict:
        result = access(hv, vcpu, **args)
        if result.__class__ is PageFault:
            return {"fault": result.record()}
        return {} if key is None else {key: result}

    return handler


HYPERCALLS: dict[str, Callable[..., dict]] = {
    "load": _handler(load, "value"),
    "store": _handler(store, None),
    "atomic": _handler(atomic, "old"),
    "read": _handler(read, "data"),
    "write": _handler(write, None),
}
