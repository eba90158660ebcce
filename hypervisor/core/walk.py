"""Walking a guest's pagetable: how Xen itself reads guest virtual memory.

Xen copies hypercall arguments that live in guest memory (the vCPU bitmaps of the MULTI
flushes, docs/xen.md section 10) through the calling vCPU's current kernel pagetable, as supervisor, so
only presence matters here. The guest's own loads and stores, with permissions, accessed and
dirty bits and the TLB, are the CPU model's business and build on `walk_entries`.

The walk starts from the table the CPU walks from, an L4 in long mode: a 64-bit guest's base,
or a 32-bit guest's compat L4, whose slot 0 holds its PAE L3 (paging.py); the paging mode
gives the shifts and which addresses are the guest's.

Only guest addresses are walked. Xen's range (L4 slots 256..271; a PV32 guest's hole from
HYPERVISOR_COMPAT_VIRT_START) holds Xen's entries, which lead to Xen's own tables; Xen refuses
to copy guest arguments from there (access_ok and compat_access_ok,
xen/arch/x86/include/asm/x86_64/uaccess.h) and a guest access there faults on Xen's entries.
"""

from .abi import PAGE_SHIFT, PAGE_SIZE, PTE_MFN_MASK, Pte
from .errors import SimulatorBug
from .memory import MachineMemory
from .paging import PV64, PagingMode

_P, _RW = int(Pte.PRESENT), int(Pte.RW)


def canonical(va: int) -> bool:
    """A 48-bit canonical address."""
    return PV64.addressable(va)


def guest_addr_ok(va: int) -> bool:
    """Xen's __addr_ok for a 64-bit PV guest (paging.PagingMode.guest_addr_ok)."""
    return PV64.guest_addr_ok(va)


def walk_entries(memory: MachineMemory, l4: int, va: int, mode: PagingMode = PV64) -> list[tuple[int, int, int]]:
    """The (table mfn, slot, entry) of each level visited for guest address `va` from root
    `l4`, stopping after the first non-present entry. A complete walk has an item per level
    and a present last entry. Callers check `mode.guest_addr_ok` first: Xen's slots are never
    walked."""
    if not mode.guest_addr_ok(va):
        raise SimulatorBug(f"walk of va {va:#x}, which is not a guest address")
    path = []
    table = l4
    for shift in mode.shifts:
        slot = (va >> shift) & 511
        entry = memory.entries(table).item(slot)
        path.append((table, slot, entry))
        if not entry & _P:
            break
        table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        if table >= memory.nr_frames:
            break
    return path


def translate(memory: MachineMemory, l4: int, va: int, write: bool = False, mode: PagingMode = PV64) -> int | None:
    """The mfn backing `va` under the table `l4`, or None where the walk finds no page (no
    writable page, with `write`: Xen runs with CR0.WP set) or `va` is not a guest address."""
    if not l4 or not mode.guest_addr_ok(va):
        return None
    path = walk_entries(memory, l4, va, mode)
    last = path[-1][2]
    if len(path) < len(mode.shifts) or not last & _P or (write and not all(entry & _RW for _, _, entry in path)):
        return None
    mfn = (last & PTE_MFN_MASK) >> PAGE_SHIFT
    return mfn if mfn < memory.nr_frames else None


def copy_from_guest(memory: MachineMemory, l4: int, va: int, length: int, mode: PagingMode = PV64) -> bytes | None:
    """Read `length` bytes at guest virtual `va` as Xen's copy_from_guest does; None on a
    fault, which includes any page outside the guest's range."""
    out = bytearray()
    while length:
        mfn = translate(memory, l4, va, mode=mode)
        if mfn is None:
            return None
        offset = va & (PAGE_SIZE - 1)
        chunk = min(length, PAGE_SIZE - offset)
        out += memory.read(mfn, offset, chunk)
        va, length = va + chunk, length - chunk
    return bytes(out)


def copy_to_guest(memory: MachineMemory, l4: int, va: int, data: bytes, mode: PagingMode = PV64) -> bool:
    """Write `data` at guest virtual `va` as Xen's copy_to_guest does, through writable
    mappings only; False, having written nothing, if any page of it faults."""
    pages = []
    offset = 0
    while offset < len(data):
        mfn = translate(memory, l4, va + offset, write=True, mode=mode)
        if mfn is None:
            return False
        chunk = min(len(data) - offset, PAGE_SIZE - ((va + offset) & (PAGE_SIZE - 1)))
        pages.append((mfn, (va + offset) & (PAGE_SIZE - 1), data[offset : offset + chunk]))
        offset += chunk
    for mfn, at, chunk in pages:
        memory.write(mfn, at, chunk)
    return True
