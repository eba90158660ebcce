"""The balloon driver: this CPU gives pages back to Xen and takes them again, under load.

Reference: docs/xen.md section 23.3 (Linux's drivers/xen/balloon.c). Giving back (inflating
the balloon): unmap each page from the direct map, flush every TLB (flush_tlb_all), mark its
P2M entry invalid in guest memory (the list the builder handed over, start_info.mfn_list, and
this CPU's copy of it), then XENMEM_decrease_reservation with the frames, all in one message.
Taking back (deflating): XENMEM_populate_physmap for the same pfns gives new frames; the P2M
and the M2P (MMU_MACHPHYS_UPDATE, as Linux's balloon did before Xen set it itself) name them,
and the direct map maps them again.

The data-integrity oracle watches every page the balloon reuses: a frame Xen gives back must
come scrubbed (all zeros), the pattern written into it must read back, and when the page goes
back to Xen it must still hold that pattern (nobody else wrote into it meanwhile); anything
else is a data corruption of the run.

The pages stay this CPU's for good: taken from its pool once, never returned to the allocator.
So no other CPU ever names one of them, and no other CPU's copy of the P2M can be stale for a
page it uses. Their list, whether they are given back, and the pattern's generation live in
the CPU's per-CPU area, written in the message that changes them, so a restarted vCPU process
goes on with the same pages. One killed between populate_physmap's message and the next
leaves the frames it got unused: the domain still owns them (Xen accounts for them), and the
next take_back gets others.
"""

import struct

from ..hypercalls import ops
from ..xen import PAGE_SHIFT, PAGE_SIZE, MmuCmd, MmuextCmd
from .alloc import alloc_pages
from .cpu import Cpu, checked
from .pgtable import PAGE_KERNEL, PageTables


def pattern(pfn: int, generation: int) -> bytes:
    return struct.pack("<2Q", pfn, generation) * (PAGE_SIZE // 16)


class Balloon:
    """A CPU's balloon of `size` pages, inflated and deflated in turn by `cycle`."""

    def __init__(self, cpu: Cpu, pt: PageTables, size: int):
        self.cpu, self.pt, self.size = cpu, pt, size
        self.pages: list[int] = []
        self.given_back = False
        self.generation = 0
        self.corruptions: list[str] = []

    async def start(self) -> None:
        """Go on with the balloon a killed process of this CPU left, or take the pages from
        this CPU's pool and write their pattern; the message carries the pool without them and
        the balloon's record, so a restarted process never hands them out."""
        cpu = self.cpu
        count, state = await cpu.send(ops.load(self._field("balloon_count")), ops.load(self._field("balloon_state")))
        if n := checked(cpu, "balloon", count):
            (listed,) = await cpu.send(ops.read(self._field("balloon"), 8 * n))
            self.pages = list(struct.unpack(f"<{n}Q", checked(cpu, "balloon", listed)))
            state = checked(cpu, "balloon", state)
            self.given_back, self.generation = bool(state & 1), state >> 1
            return
        self.pages = await alloc_pages(cpu, self.size)
        batch = cpu.msg()
        for pfn in self.pages:
            batch.write(self.pt.direct_va(pfn), pattern(pfn, self.generation))
        batch.write(self._field("balloon"), struct.pack(f"<{len(self.pages)}Q", *self.pages))
        batch.store(self._field("balloon_count"), len(self.pages))
        self._record(batch)
        await batch.flush()

    def _field(self, name: str) -> int:
        return self.cpu.kl.percpu(self.cpu.id, name)[0]

    def _set_p2m_entry(self, batch, pfn: int, mfn: int) -> None:
        """The P2M list's entry for pfn in guest memory (an unsigned long)."""
        word = self.pt.mode.word
        batch.store(self.pt.boot.start_info.mfn_list + word * pfn, mfn, size=word)

    def _record(self, batch) -> None:
        """The balloon's state, in the message that makes it so."""
        batch.store(self._field("balloon_state"), self.generation << 1 | self.given_back)

    async def cycle(self) -> None:
        if self.given_back:
            await self.take_back()
        else:
            await self.give_back()

    async def give_back(self) -> None:
        cpu, pt, boot = self.cpu, self.pt, self.pt.boot
        mfns = [pt.mfn(pfn) for pfn in self.pages]
        batch = cpu.msg()
        held = [batch.read(pt.direct_va(pfn), PAGE_SIZE) for pfn in self.pages]
        batch.mmu_update([(boot.direct_entry(pfn) | MmuCmd.NORMAL_PT_UPDATE, 0) for pfn in self.pages])
        batch.mmuext_op([(MmuextCmd.TLB_FLUSH_ALL,)])
        for pfn in self.pages:
            self._set_p2m_entry(batch, pfn, pt.mode.invalid_p2m)
        done = batch.decrease_reservation(mfns)
        self.given_back = True
        self._record(batch)
        await batch.flush()
        for pfn, data in zip(self.pages, held, strict=True):
            if checked(cpu, "balloon", data) != pattern(pfn, self.generation):
                self.corruptions.append(f"balloon page {pfn:#x} on vCPU {cpu.id}: its pattern changed before it went back to Xen")
        if checked(cpu, "balloon", done) != len(mfns):
            raise cpu.bug("balloon", f"decrease_reservation gave back {done.result()} of {len(mfns)} frames")
        for pfn in self.pages:
            pt.set_p2m(pfn, pt.mode.invalid_p2m)
        cpu.count("ballooned_out", len(mfns))

    async def take_back(self) -> None:
        cpu, pt, boot = self.cpu, self.pt, self.pt.boot
        (got,) = await cpu.send(ops.populate_physmap(self.pages))
        mfns = checked(cpu, "balloon", got)
        if len(mfns) != len(self.pages):
            raise cpu.bug("balloon", f"populate_physmap gave {len(mfns)} of {len(self.pages)} frames")
        self.generation += 1
        batch = cpu.msg()
        for pfn, mfn in zip(self.pages, mfns, strict=True):
            pt.set_p2m(pfn, mfn)
            self._set_p2m_entry(batch, pfn, mfn)
        batch.mmu_update([(mfn << PAGE_SHIFT | MmuCmd.MACHPHYS_UPDATE, pfn) for pfn, mfn in zip(self.pages, mfns, strict=True)])
        batch.mmu_update([(boot.direct_entry(pfn) | MmuCmd.NORMAL_PT_UPDATE, pt.make(pfn, PAGE_KERNEL)) for pfn in self.pages])
        scrubbed = [batch.read(pt.direct_va(pfn), PAGE_SIZE) for pfn in self.pages]
        for pfn in self.pages:
            batch.write(pt.direct_va(pfn), pattern(pfn, self.generation))
        written = [batch.read(pt.direct_va(pfn), PAGE_SIZE) for pfn in self.pages]
        self.given_back = False
        self._record(batch)
        await batch.flush()
        for pfn, fresh, back in zip(self.pages, scrubbed, written, strict=True):
            if checked(cpu, "balloon", fresh) != bytes(PAGE_SIZE):
                self.corruptions.append(f"balloon page {pfn:#x} on vCPU {cpu.id}: the frame Xen gave was not scrubbed")
            if checked(cpu, "balloon", back) != pattern(pfn, self.generation):
                self.corruptions.append(f"balloon page {pfn:#x} on vCPU {cpu.id}: its pattern did not read back")
        cpu.count("ballooned_in", len(mfns))
