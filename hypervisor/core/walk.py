"""Walking a guest's 4-level pagetable: how Xen itself reads guest virtual memory.

Xen copies hypercall arguments that live in guest memory (the vCPU bitmaps of the MULTI
flushes, docs/xen.md section 10) through the calling vCPU's current kernel pagetable, as supervisor, so
only presence matters here. The guest's own loads and stores, with permissions, accessed and
dirty bits and the TLB, are the CPU model's business and build on `walk_entries`.

Only guest addresses are walked. Xen's range (L4 slots 256..271) holds Xen's entries, which
lead to Xen's own tables; Xen refuses to copy guest arguments from there (access_ok,
xen/arch/x86/include/asm/x86_64/uaccess.h) and a guest access there faults on Xen's entries.
"""

from .abi import HYPERVISOR_VIRT_END, PAGE_SHIFT, PAGE_SIZE, PTE_MFN_MASK, Pte
from .errors import SimulatorBug
from .memory import MachineMemory

_P, _RW = int(Pte.PRESENT), int(Pte.RW)
LEVEL_SHIFTS = (39, 30, 21, 12)


def canonical(va: int) -> bool:
    """A 48-bit canonical address."""
    return 0 <= va < (1 << 47) or (0xFFFF800000000000 <= va < (1 << 64))


def guest_addr_ok(va: int) -> bool:
    """Xen's __addr_ok for a 64-bit PV guest: canonical and outside Xen's reserved range
    (the lower half, or from HYPERVISOR_VIRT_END up)."""
    return 0 <= va < (1 << 47) or HYPERVISOR_VIRT_END <= va < (1 << 64)


def walk_entries(memory: MachineMemory, l4: int, va: int) -> list[tuple[int, int, int]]:
    """The (table mfn, slot, entry) of each level visited for guest address `va`, stopping
    after the first non-present entry. A complete walk has four items and a present last
    entry. Callers check `guest_addr_ok` first: Xen's slots are never walked."""
    if not guest_addr_ok(va):
        raise SimulatorBug(f"walk of va {va:#x}, which is not a guest address")
    path = []
    table = l4
    for shift in LEVEL_SHIFTS:
        slot = (va >> shift) & 511
        entry = memory.entries(table).item(slot)
        path.append((table, slot, entry))
        if not entry & _P:
            break
        table = (entry & PTE_MFN_MASK) >> PAGE_SHIFT
        if table >= memory.nr_frames:
            break
    return path


def translate(memory: MachineMemory, l4: int, va: int, write: bool = False) -> int | None:
    """The mfn backing `va` under the table `l4`, or None where the walk finds no page (no
    writable page, with `write`: Xen runs with CR0.WP set) or `va` is not a guest address."""
    if not l4 or not guest_addr_ok(va):
        return None
    path = walk_entries(memory, l4, va)
    last = path[-1][2]
    if len(path) < 4 or not last & _P or (write and not all(entry & _RW for _, _, entry in path)):
        return None
    mfn = (last & PTE_MFN_MASK) >> PAGE_SHIFT
    return mfn if mfn < memory.nr_frames else None


def copy_from_guest(memory: MachineMemory, l4: int, va: int, length: int) -> bytes | None:
    """Read `length` bytes at guest virtual `va` as Xen's copy_from_guest does; None on a
    fault, which includes any page outside the guest's range."""
    out = bytearray()
    while length:
        mfn = translate(memory, l4, va)
        if mfn is None:
            return None
        offset = va & (PAGE_SIZE - 1)
        chunk = min(length, PAGE_SIZE - offset)
        out += memory.read(mfn, offset, chunk)
        va, length = va + chunk, length - chunk
    return bytes(out)


def copy_to_guest(memory: MachineMemory, l4: int, va: int, data: bytes) -> bool:
    """Write `data` at guest virtual `va` as Xen's copy_to_guest does, through writable
    mappings only; False, having written nothing, if any page of it faults."""
    pages = []
    offset = 0
    while offset < len(data):
        mfn = translate(memory, l4, va + offset, write=True)
        if mfn is None:
            return False
        chunk = min(len(data) - offset, PAGE_SIZE - ((va + offset) & (PAGE_SIZE - 1)))
        pages.append((mfn, (va + offset) & (PAGE_SIZE - 1), data[offset : offset + chunk]))
        offset += chunk
    for mfn, at, chunk in pages:
        memory.write(mfn, at, chunk)
    return True
