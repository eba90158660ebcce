"""exit_mmap and drop_mm_ref: making sure no vCPU runs on a pgd before it is unpinned.

Reference: docs/linux.md section 6. Lazy CPUs keep a dead mm's pgd as their cr3, and Xen
refuses to make a pagetable writable while any vCPU's cr3 holds it, so exit_mmap must first
push every such CPU off the pgd. Each historical form of the fix is here, chosen by name:

- `none`: only the exiting CPU leaves the pgd (the pre-SMP code): any lazy CPU breaks unpin.
- `mask` (mid 2007): IPI the mm's cpumask and wait; misses a CPU whose cr3 switch away is
  still queued in its lazy batch (it left the mask, Xen still has the pgd): the stale-cr3 race.
- `current-cr3` (2.6.23's fix): also IPI every CPU whose xen_current_cr3 still names the pgd;
  the handler forces its pending batch out.
- `modern` (4.14 and later): xen_current_cr3 alone chooses the targets.
"""

from .cpu import Cpu, checked
from .mm import Mm, mm_va, put_pages, read_l1, read_mm, release_tables
from .sched import leave_mm, mmdrop
from .smp import call_function

VARIANTS = ("none", "mask", "current-cr3", "modern")
DROP_MM_REF = 1


@call_function(DROP_MM_REF)
async def drop_mm_ref_this_cpu(cpu: Cpu, mm_id: int) -> None:
    """The IPI handler (drop_other_mm_ref / drop_mm_ref_this_cpu, by variant)."""
    kernel = cpu.kernel
    pgd = (await read_mm(cpu, mm_id)).pgd
    variant, mirror = kernel.variant, cpu.mirror
    batch = cpu.msg()  # current-cr3 and modern: a queued switch goes out to Xen first
    if mirror.get("loaded_mm") == mm_id:  # only a lazy CPU can still have a dying mm loaded
        leave_mm(cpu, batch)
    cpu.flush_into(batch)
    await batch.flush()
    if variant in ("current-cr3", "modern") and mirror.get("xen_current_cr3") == pgd:
        raise cpu.bug("drop_mm_ref", f"pgd pfn {pgd:#x} is still this CPU's cr3 after leave_mm")


async def drop_mm_ref(cpu: Cpu, mm: Mm, batch) -> None:
    """Switch this CPU off mm (all variants) in `batch`, which also reads who else may be on
    it, then the variant's remote shootdown."""
    kernel = cpu.kernel
    if cpu.mirror.get("loaded_mm") == mm.id:
        leave_mm(cpu, batch)
    cpu.flush_into(batch)
    mask = batch.load(mm_va(cpu, mm.id, "cpumask"))
    current = [batch.load(cpu.kl.percpu(c, "xen_current_cr3")[0]) for c in range(cpu.kl.nr_cpus)]
    await batch.flush()
    in_mask = {c for c in range(cpu.kl.nr_cpus) if checked(cpu, "drop_mm_ref", mask) >> c & 1} - {cpu.id}
    on_pgd = {c for c, p in enumerate(current) if checked(cpu, "drop_mm_ref", p) == mm.pgd} - {cpu.id}
    cpu.last_shootdown = (in_mask, on_pgd)
    if kernel.variant == "none":
        return
    targets = {"mask": in_mask, "current-cr3": in_mask | on_pgd, "modern": on_pgd}[kernel.variant]
    await cpu.hook("drop_mm_ref:targets", cpu)
    await kernel.smp.call_function_many(sorted(targets), DROP_MM_REF, mm.id, wait=True)


async def exit_mmap(cpu: Cpu, mm: Mm, batch=None) -> None:
    """xen_exit_mmap then the generic teardown, in two messages (and the shootdown's IPIs, if
    any, between them). The first (`batch`, when the caller has begun one with the task's
    last calls) reads the pte pages, which unmap_vmas will zap, and runs drop_mm_ref. The second
    unpins (the pgds first, then every table page made writable again: a vCPU still on the
    pgd makes that -EBUSY, a kernel BUG) and clears `users`. Only once that has worked are the
    pages and the mm's count put, in this CPU's next message (put_pages, mmdrop): an exit
    that BUGged frees nothing another CPU could reuse."""
    kernel = cpu.kernel
    pt = kernel.pt
    batch = batch if batch is not None else cpu.msg()
    l1s = _read_pte_pages(cpu, mm, batch)
    await drop_mm_ref(cpu, mm, batch)
    batch = cpu.msg()
    for call in pt.unpin_ops(mm.pgds, mm.pagetables):
        cpu.queue(call)
    pgd_mfns = ", ".join(f"{pt.mfn(pgd):#x}" for pgd in mm.pgds)
    in_mask, on_pgd = cpu.last_shootdown
    window = "stale-cr3 window: " if on_pgd - in_mask else "lazy CPU: " if on_pgd else ""
    cpu.flush_into(
        batch,
        "exit_mmap",
        f"after UNPIN_TABLE of pgds {pgd_mfns}, making the pagetable pages writable again failed "
        f"({window}vCPUs {sorted(on_pgd)} had the pgd as cr3 at Xen, cpumask {sorted(in_mask)})",
    )
    pt.mark_pinned(batch, mm.pgds + mm.pagetables, False)
    batch.store(mm_va(cpu, mm.id, "users"), 0)
    try:
        await batch.flush()
    finally:
        await cpu.hook("exit_mmap:done", cpu)
    cpu.count("unpins")
    _put_mm(cpu, mm, l1s)


def _put_mm(cpu: Cpu, mm: Mm, l1s) -> None:
    """exit_mmap's end, in this CPU's next message: the pages the pte pages map, the table
    pages and the users' count of the mm."""
    for l1 in l1s:
        put_pages(cpu, cpu.kernel.pt, l1(), "exit_mmap")
    release_tables(cpu, mm)
    mmdrop(cpu, mm)


async def exit_unpinned(cpu: Cpu, mm: Mm) -> None:
    """The end of an exit_mmap whose unpin ran (`users` is 0) but whose process died before
    its next message put what the mm held (docs/linux.md section 17): read its pte pages
    again, plain memory now but not yet reused, and put the rest as exit_mmap does."""
    batch = cpu.msg()
    l1s = _read_pte_pages(cpu, mm, batch)
    await batch.flush()
    _put_mm(cpu, mm, l1s)


def _read_pte_pages(cpu: Cpu, mm: Mm, batch) -> list:
    """Reads of the mm's pte pages (its L1 and its heap's) in `batch`, for the puts of what they map."""
    return [read_l1(cpu, cpu.kernel.pt, table, batch, "exit_mmap") for table in (mm.l1, mm.heap) if table]
