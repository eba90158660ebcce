"""Switching address spaces: switch_mm, lazy TLB for kernel threads, leave_mm, mmdrop.

Reference: docs/linux.md sections 2.5 and 5. A context switch is two steps, as in Linux under
Xen: first the plain memory writes that other CPUs may read at once (the cpumask bits,
`loaded_mm`, `xen_cr3`), in a message of their own; then, at the end of the switch, the
lazy-CPU multicall with NEW_BASEPTR (and NEW_USER_BASEPTR, 64-bit), followed by `xen_current_cr3`, which
is only written once Xen has the new base. That multicall leads the next message the CPU sends
(`Cpu.msg`), the first one of the task switched to, as arch_end_context_switch flushes it just
before that task runs. Between the two the switch is visible in memory but not yet at Xen: the
stale-cr3 window that the 2.6.23 fix closes. A kernel thread borrows the previous mm (lazy
TLB): cr3 stays, the CPU stays in the cpumask, and the mm's count holds it alive.
"""

from ..hypercalls import ops
from ..xen import MmuextCmd
from .cpu import Cpu, checked
from .mm import Mm, free_mm, mm_va

TLBSTATE_OK, TLBSTATE_LAZY = 0, 1
_ALL = 2**64 - 1


def load_cr3(cpu: Cpu, mm: Mm | None) -> None:
    """xen_write_cr3: xen_cr3 at once (by the caller), NEW_BASEPTR and (64-bit PV)
    NEW_USER_BASEPTR in the lazy batch, and set_current_cr3 after it."""
    pt = cpu.kernel.pt
    pgd = mm.pgd if mm else pt.swapper_pfn
    bases = [(MmuextCmd.NEW_BASEPTR, pt.mfn(pgd))]
    if pt.mode.user_pgd:
        bases.append((MmuextCmd.NEW_USER_BASEPTR, pt.mfn(mm.user_pgd) if mm else 0))
    cpu.queue(ops.mmuext_op(bases), after=ops.store(cpu.kl.percpu(cpu.id, "xen_current_cr3")[0], pgd))
    cpu.mirror["xen_current_cr3"] = pgd  # as of the flush


async def switch_mm(cpu: Cpu, next_mm: Mm | None) -> None:
    """switch_mm(prev, next) with interrupts off: the mask and per-CPU writes (one message),
    then the cr3 switch queued in the lazy batch, to lead the next message."""
    prev = cpu.mirror.get("loaded_mm", 0)
    next_id = next_mm.id if next_mm else 0
    cpu.loaded = next_mm
    batch = cpu.msg()
    if prev != next_id:
        if prev:
            batch.atomic("fetch_and", mm_va(cpu, prev, "cpumask"), _ALL ^ (1 << cpu.id))
        if next_id:
            batch.atomic("fetch_or", mm_va(cpu, next_id, "cpumask"), 1 << cpu.id)
    cpu.set_percpu(batch, "tlbstate", TLBSTATE_OK)
    cpu.set_percpu(batch, "loaded_mm", next_id)
    cpu.set_percpu(batch, "xen_cr3", next_mm.pgd if next_mm else cpu.kernel.pt.swapper_pfn)
    await batch.flush()
    if prev != next_id:
        load_cr3(cpu, next_mm)
        await cpu.hook("switch_mm:queued", cpu)
    cpu.count("switches")


def enter_lazy(cpu: Cpu, batch) -> None:
    """A kernel thread runs: it borrows the loaded mm (its count goes up in `batch`), cr3 stays."""
    borrowed = cpu.loaded
    if borrowed:
        batch.atomic("fetch_add", mm_va(cpu, borrowed.id, "count"), 1)
    cpu.borrowed = borrowed
    cpu.set_percpu(batch, "tlbstate", TLBSTATE_LAZY)
    cpu.set_percpu(batch, "active_mm", borrowed.id if borrowed else 0)
    cpu.count("lazy")


async def leave_lazy(cpu: Cpu, next_mm: Mm | None) -> None:
    """The kernel thread is switched out for a task of next_mm: switch_mm if cr3 must change
    (or leave_mm took it away meanwhile), then drop the borrowed mm (finish_task_switch), in
    the next message, after the cr3 switch that leads it."""
    borrowed, cpu.borrowed = cpu.borrowed, None
    await switch_mm(cpu, next_mm)
    cpu.set_percpu_later("active_mm", next_mm.id if next_mm else 0)
    if borrowed:
        mmdrop(cpu, borrowed)


def leave_mm(cpu: Cpu, batch) -> None:
    """leave_mm: stop using the loaded mm (clear our cpumask bit, load swapper). The cr3
    switch goes into the lazy batch; the caller flushes it. The borrowed count stays."""
    loaded = cpu.mirror.get("loaded_mm", 0)
    cpu.loaded = None
    if loaded:
        batch.atomic("fetch_and", mm_va(cpu, loaded, "cpumask"), _ALL ^ (1 << cpu.id))
    cpu.set_percpu(batch, "loaded_mm", 0)
    cpu.set_percpu(batch, "xen_cr3", cpu.kernel.pt.swapper_pfn)
    load_cr3(cpu, None)


def mmdrop(cpu: Cpu, mm: Mm) -> None:
    """Drop one count of mm in this CPU's next message; the last frees it once that message
    is answered (__mmdrop -> pgd_free)."""

    def last(old) -> None:
        if checked(cpu, "mmdrop", old) == 1:
            free_mm(cpu, mm)

    cpu.defer(ops.atomic("fetch_add", mm_va(cpu, mm.id, "count"), _ALL), then=last)
