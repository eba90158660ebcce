"""Address spaces: creation, fork with copy-on-write, page faults, munmap, teardown.

Reference: docs/linux.md sections 2, 8, 10 and 13. An mm lives in guest memory (`layout.MM`): its
pgds (kernel and user, 64-bit PV; one for PAE), the table pages below them it owns, its cpumask (which doubles
as the vCPU bitmap TLB_FLUSH_MULTI reads from guest memory) and two counts: `users` (tasks
using it) and `count` (one for all users, plus one per CPU borrowing it lazily). "Late pin,
early unpin": a new mm is built while its pages are plain memory and pinned at the end of
dup_mmap; exit_mmap (in `shootdown`) unpins it before tearing it down with plain writes.
"""

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..hypercalls import Batch, PageFault, Pending, ops
from ..xen import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE, PTE_MFN_MASK, MmuCmd, MmuextCmd
from .alloc import alloc_pages, free_pages
from .cpu import Cpu, add, checked
from .layout import MAX_MMS, MAX_TABLES, MAX_TASKS, MM, PAGE_COUNT_ONE
from .pgtable import RW, US, USER_BASE, USER_TABLE, PageTables, slot

P = 1
PAGE_USER = P | RW | US | 0x60  # present, writable, user, accessed, dirty
MM_FREE, MM_LIVE = 0, 1  # an mm or task slot's state (a task's LIVE is TASK_RUNNING)
CLAIMED = 0x100  # | the claiming CPU: claimed, not yet recorded (docs/linux.md section 17)
PFEC_PRESENT, PFEC_WRITE = 1, 2
_U32 = 0xFFFFFFFF
_MM_FORMAT = f"<9Q{MAX_TABLES}Q"
HEAP_FIRST = ENTRIES_PER_TABLE  # page indexes from here are the heap's: the next pmd entry's region


@dataclass
class Mm:
    """A process address space as read from guest memory (ids from 1; 0 is init_mm)."""

    id: int
    pgd: int = 0
    user_pgd: int = 0
    tables: list[int] = field(default_factory=list)  # the pfns below its pgds from its start, the L1 last
    heap: int = 0  # the heap's pte page, which joins the pinned mm at its first fault (0: none)
    users: int = 1  # as read from memory: 0 once exit_mmap has unpinned it

    @property
    def l1(self) -> int:
        return self.tables[-1]

    @property
    def pagetables(self) -> list[int]:
        """Every table page below its pgds now."""
        return self.tables + [self.heap] if self.heap else self.tables

    @property
    def pgds(self) -> list[int]:
        """The kernel pgd, and the user pgd of a 64-bit PV mm."""
        return [self.pgd, self.user_pgd] if self.user_pgd else [self.pgd]


def mm_va(cpu: Cpu, mm_id: int, name: str) -> int:
    return cpu.kl.mm(mm_id, name)[0]


def user_va(index: int) -> int:
    return USER_BASE + index * PAGE_SIZE


def pattern(task: int, index: int, generation: int) -> bytes:
    """What a task writes into its page `index`: a wrong mapping or a stale TLB shows up as a
    mismatch when the page is read back, from whichever CPU."""
    word = struct.pack("<QQQ", task, index, generation)
    return (word * (PAGE_SIZE // len(word) + 1))[:PAGE_SIZE]


async def read_mm(cpu: Cpu, mm_id: int) -> Mm:
    (data,) = await cpu.send(ops.read(mm_va(cpu, mm_id, "state"), MM.size))
    fields = struct.unpack_from(_MM_FORMAT, checked(cpu, "read_mm", data))
    if fields[0] != MM_LIVE:
        raise cpu.bug("read_mm", f"mm {mm_id} is not live (state {fields[0]})")
    return Mm(mm_id, fields[1], fields[2], list(fields[9 : 9 + fields[6]]), heap=fields[8], users=fields[4])


_SLOTS = {"mm": (MAX_MMS, lambda cpu, i: mm_va(cpu, i, "state")), "task": (MAX_TASKS, lambda cpu, i: cpu.kl.task(i, "state")[0])}


def claim(cpu: Cpu, batch, kind: str) -> Callable[[], Awaitable[int]]:
    """Claim a free mm or task slot (1..limit-1) in `batch`: a candidate is ours only if
    cmpxchg moves its state from free to CLAIMED by this CPU (a slot whose mm a lazy CPU
    still holds is live, and skipped); the message that records it makes it live, and a
    restarted CPU frees what its predecessor claimed but never recorded (`release_claims`).
    Candidates come round-robin from a cursor of this CPU's, started where the other
    CPUs' are farthest away, so the first try seldom fails and costs no message of its own.
    Await the returned function once `batch` is answered: it tries further candidates, one
    message each, until one is free."""
    limit, state_va = _SLOTS[kind]

    def attempt(batch) -> tuple[int, Pending]:
        cursor = cpu.slot_cursor.setdefault(kind, cpu.id * (limit - 1) // cpu.kl.nr_cpus)
        cpu.slot_cursor[kind] = cursor + 1
        candidate = cursor % (limit - 1) + 1
        return candidate, batch.atomic("cmpxchg", state_va(cpu, candidate), CLAIMED | cpu.id, expected=MM_FREE)

    first = attempt(batch)

    async def claimed() -> int:
        candidate, old = first
        tries = 1
        while checked(cpu, "claim_slot", old) != MM_FREE:
            if tries == limit - 1:
                raise cpu.bug("claim_slot", f"every one of the {limit - 1} {kind} slots is in use")
            retry = cpu.msg()
            candidate, old = attempt(retry)
            await retry.flush()
            tries += 1
        return candidate

    return claimed


async def new_id(cpu: Cpu, kind: str) -> int:
    """A claimed mm or task slot, in a message of its own."""
    batch = cpu.msg()
    claimed = claim(cpu, batch, kind)
    await batch.flush()
    return await claimed()


async def release_claims(cpu: Cpu) -> int:
    """A restarted CPU frees the slots its dead process claimed and had not recorded (their
    state still CLAIMED by this CPU: the claimer learns its slot only from the answer, so
    nothing else names them): one message reading the mm and task arrays, one freeing them.
    Returns how many."""
    regions = {"mm": cpu.kl.mms, "task": cpu.kl.tasks}
    batch = cpu.msg()
    pages = {kind: [batch.read(region.va(0) + p * PAGE_SIZE, PAGE_SIZE) for p in range(region.pages)] for kind, region in regions.items()}
    await batch.flush()
    mine = []
    for kind, region in regions.items():
        data = b"".join(checked(cpu, "release_claims", page) for page in pages[kind])
        limit, state_va = _SLOTS[kind]
        mine += [state_va(cpu, i) for i in range(1, limit) if struct.unpack_from("<Q", data, i * region.struct_size)[0] == CLAIMED | cpu.id]
    if mine:
        await cpu.send(*(ops.store(va, MM_FREE) for va in mine))
    return len(mine)


def free_task(cpu: Cpu, task: int) -> None:
    cpu.defer(ops.store(cpu.kl.task(task, "state")[0], MM_FREE))


async def mm_alloc(cpu: Cpu, pt: PageTables, batch, mm_id: int, user_ptes: dict[int, int]) -> Mm:
    """pgd_alloc and the user tables, filled while still plain memory (docs/linux.md sections
    2.2, 2.3, 13): the kernel entries copied from swapper's (PAE: into the pgd's own kernel
    pmd), the user path one table per level down to the L1 (from highmem with highpte), PAE's
    other user pmds preallocated empty, and the mm struct."""
    mode = pt.mode
    user_slot = slot(USER_BASE, mode.levels)
    pmd_slots = [s for s in mode.user_pmd_slots() if s != user_slot] + ([mode.kernel_pgd_slot] if mode.own_kernel_pmd else [])
    pages = iter(await alloc_pages(cpu, 1 + mode.user_pgd + mode.levels - 2 + len(pmd_slots)))
    (l1,) = await alloc_pages(cpu, 1, highmem=bool(cpu.mirror.get("highpte")))
    pgd = next(pages)
    user_pgds = [next(pages) for _ in range(mode.user_pgd)]
    path = [*(next(pages) for _ in range(mode.levels - 2)), l1]  # below the pgd: L3, L2 (PAE: the user pmd), then the L1
    pmds = dict(zip(pmd_slots, pages))
    top = {s: pt.make(table, mode.top_flags) for s, table in {user_slot: path[0], **pmds}.items()}
    pt.write_new(cpu, batch, pgd, top if mode.own_kernel_pmd else {**top, **pt.kernel_half})
    for user_pgd in user_pgds:
        pt.write_new(cpu, batch, user_pgd, top)
    for s, pmd in pmds.items():
        pt.write_new(cpu, batch, pmd, pt.kernel_half if s == mode.kernel_pgd_slot else {})
    for level, table, below in zip(range(mode.levels - 1, 1, -1), path, path[1:]):
        pt.write_new(cpu, batch, table, {slot(USER_BASE, level): pt.make(below, USER_TABLE)})
    pt.write_new(cpu, batch, l1, user_ptes)
    mm = Mm(mm_id, pgd, user_pgds[0] if user_pgds else 0, [*path[:-1], *pmds.values(), l1])
    tables = mm.tables + [0] * (MAX_TABLES - len(mm.tables))
    batch.write(mm_va(cpu, mm_id, "state"), struct.pack(_MM_FORMAT, MM_LIVE, pgd, mm.user_pgd, 0, 1, 1, len(mm.tables), 0, 0, *tables))
    return mm


def pin(cpu: Cpu, pt: PageTables, batch, mm: Mm) -> None:
    """xen_pgd_pin: queue it in the lazy-MMU batch and flush that into `batch`."""
    for call in pt.pin_ops(mm.pgds, mm.pagetables):
        cpu.queue(call)
    cpu.flush_into(batch)
    pt.mark_pinned(batch, mm.pgds + mm.pagetables, True)
    cpu.count("pins")


def read_l1(cpu: Cpu, pt: PageTables, l1: int, batch, operation: str) -> Callable[[], tuple[int, ...]]:
    """Read a pinned pte page in `batch` (through a read-only kmap when it is a highmem page,
    pte_offset_map); the returned function gives its entries once `batch` is answered."""
    if cpu.kl.is_lowmem(l1):
        data = batch.read(pt.direct_va(l1), PAGE_SIZE)
    else:
        add(batch, pt.kmap_op(cpu, l1, pinned=True))
        data = batch.read(pt.kmap_va(cpu), PAGE_SIZE)
        add(batch, pt.kunmap_op(cpu))
    return lambda: struct.unpack(f"<{ENTRIES_PER_TABLE}Q", checked(cpu, operation, data))


def put_pages(cpu: Cpu, pt: PageTables, entries, operation: str) -> None:
    """Drop the count of each page these L1 entries map, in this CPU's next message, and free
    those whose count hits zero once it is answered (Linux's mmu_gather puts pages after the
    TLB flush that follows the unmapping)."""

    def put(pfn: int) -> None:
        def freed(count) -> None:
            if checked(cpu, operation, count) >> 8 == 1:
                free_pages(cpu, [pfn])

        cpu.defer(ops.atomic("fetch_add", cpu.kl.pageinfo(pfn)[0], -PAGE_COUNT_ONE & _U32, size=4), then=freed)

    for entry in entries:
        if entry & P:
            pfn = pt.known_pfn(entry)
            if pfn is not None:
                put(pfn)
            else:  # the M2P's answer first, in this CPU's next message, then the count
                cpu.defer(pt.m2p_op(entry), then=lambda m2p, entry=entry: put(pt.pfn_of(cpu, entry, m2p)))


async def fork(cpu: Cpu, pt: PageTables, parent: Mm, child_id: int, shared: list[int], parent_l1: tuple[int, ...] = (), record: Callable[[Batch], None] | None = None) -> Mm:
    """dup_mmap, from the parent's L1 entries (`parent_l1`, read in the caller's last message;
    needed only when `shared` names slots): a child sharing the parent's pages in L1 slots
    `shared` copy-on-write. Both entries lose RW, the
    parent's through mmu_update (its tables are pinned) then flush_tlb_others on the parent's
    cpumask (TLB_FLUSH_MULTI reading it from guest memory); each page's count goes up. The
    child is pinned at the end, in the same message, which `record` also writes into (the
    task that owns the child, named where a restarted process finds it)."""
    cow = {i: parent_l1[i] & ~RW for i in shared if parent_l1[i] & P}
    unknown = [entry for entry in cow.values() if pt.known_pfn(entry) is None]
    if unknown:  # the pages' pfns, for their counts: the M2P's answers (docs/xen.md section 22)
        for entry, answer in zip(unknown, await cpu.send(*(pt.m2p_op(entry) for entry in unknown)), strict=True):
            pt.pfn_of(cpu, entry, answer)
    pfns = [pt.known_pfn(entry) for entry in cow.values()]
    batch = cpu.msg()
    child = await mm_alloc(cpu, pt, batch, child_id, cow)
    if cow:
        pt.set_entries(cpu, batch, parent.l1, cow, pinned=True)
        batch.mmuext_op([(MmuextCmd.TLB_FLUSH_MULTI, 0, mm_va(cpu, parent.id, "cpumask"))])
        for pfn in pfns:
            batch.atomic("fetch_add", cpu.kl.pageinfo(pfn)[0], PAGE_COUNT_ONE, size=4)
    pin(cpu, pt, batch, child)
    if record is not None:
        record(batch)
    await batch.flush()
    cpu.count("forks")
    return child


def user_pmd(pt: PageTables, mm: Mm) -> int:
    """The table whose entries name the user pte pages (the L2; PAE: the first user pmd)."""
    return mm.tables[pt.mode.levels - 3]


def pte_alloc(cpu: Cpu, pt: PageTables, batch, mm: Mm, pfn: int) -> None:
    """__pte_alloc for the heap in the pinned mm, in `batch` (docs/linux.md section 14): the
    page zeroed as plain memory (clear_highpage, through a writable kmap for a highmem page,
    unmapped again at once), then xen_alloc_pt and pmd_populate's entry by mmu_update on the
    pinned pmd, which makes Xen validate the page as an L1, in the lazy-MMU multicall (a
    failure is a kernel BUG); PG_pinned and the mm struct record it."""
    pt.write_new(cpu, batch, pfn, {})
    for call in pt.alloc_pt_ops(pfn):
        cpu.queue(call)
    cpu.queue(ops.mmu_update([(pt.maddr(user_pmd(pt, mm), slot(user_va(HEAP_FIRST), 2)) | MmuCmd.NORMAL_PT_UPDATE, pt.make(pfn, USER_TABLE))]))
    cpu.flush_into(batch, "page fault")
    pt.mark_pinned(batch, [pfn], True)
    batch.store(mm_va(cpu, mm.id, "heap"), pfn)
    mm.heap = pfn
    cpu.count("pte_allocs")


async def touch(cpu: Cpu, pt: PageTables, mm: Mm, task: int, generation: int, indexes: list[int]) -> None:
    """The running task writes its pattern into pages `indexes` as user code, and the fault
    handler's read of the L1 follows in the same message. The faults are handled as Linux's,
    in one message: not present maps a fresh page (mmu_update on the pinned L1; a first heap
    page allocates the heap's pte page, `pte_alloc`), a write to a copy-on-write page copies
    it and puts the old one after the local flush (do_wp_page without its reuse shortcut,
    which would need the page's count first: a message more); then the writes are retried."""
    writes = {i: pattern(task, i, generation) for i in indexes}
    batch = cpu.msg()
    results = [batch.write(user_va(i), data, user=True) for i, data in writes.items()]
    l1 = read_l1(cpu, pt, mm.l1, batch, "page fault")
    await batch.flush()
    faults = {i: r.result() for i, r in zip(writes, results) if isinstance(checked(cpu, "user write", r), PageFault)}
    if not faults:
        return
    fresh = [i for i, f in faults.items() if not f.error_code & PFEC_PRESENT]
    cow = [i for i, f in faults.items() if f.error_code & (PFEC_PRESENT | PFEC_WRITE) == PFEC_PRESENT | PFEC_WRITE]
    if len(fresh) + len(cow) != len(faults) or any(i >= HEAP_FIRST for i in cow):
        raise cpu.bug("page fault", f"faults the kernel cannot explain: {faults}")
    entries = l1()
    pages = dict(zip(cow + fresh, await alloc_pages(cpu, len(faults))))
    heap = [] if mm.heap or all(i < HEAP_FIRST for i in fresh) else await alloc_pages(cpu, 1, highmem=bool(cpu.mirror.get("highpte")))
    batch = cpu.msg()
    for pfn in heap:
        pte_alloc(cpu, pt, batch, mm, pfn)
    for index in cow:
        batch.mmuext_op([(MmuextCmd.COPY_PAGE, pt.mfn(pages[index]), (entries[index] & PTE_MFN_MASK) >> PAGE_SHIFT)])
    for pfn in pages.values():
        batch.store(cpu.kl.pageinfo(pfn)[0], PAGE_COUNT_ONE, size=4)
    for table, first in ((mm.l1, 0), (mm.heap, HEAP_FIRST)):
        mapped = {i - first: pt.make(pfn, PAGE_USER) for i, pfn in pages.items() if first <= i < first + ENTRIES_PER_TABLE}
        if mapped:
            pt.set_entries(cpu, batch, table, mapped, pinned=True)
    for index in cow:  # the old read-only translation may still be in this CPU's TLB
        batch.mmuext_op([(MmuextCmd.INVLPG_LOCAL, user_va(index))])
    put_pages(cpu, pt, [entries[i] for i in cow], "cow fault")
    retry = {i: batch.write(user_va(i), writes[i], user=True) for i in faults}
    await batch.flush()
    cpu.count("cow", len(cow))
    cpu.count("faults", len(faults))
    for index, pending in retry.items():
        if isinstance(checked(cpu, "page fault", pending), PageFault):
            raise cpu.bug("page fault", f"page {index} faults again after its fault was handled: {pending.result()}")


def verify(cpu: Cpu, batch, task: int, generation: int, indexes: list[int]) -> Callable[[], dict[int, bytes | PageFault]]:
    """Read the pages back as the task, in `batch`; the returned function gives the pages
    whose contents are wrong, by index, with what was read, once it is answered."""
    results = [batch.read(user_va(i), PAGE_SIZE, user=True) for i in indexes]

    def wrong() -> dict[int, bytes | PageFault]:
        read = {i: checked(cpu, "verify", r) for i, r in zip(indexes, results)}
        return {i: data for i, data in read.items() if data != pattern(task, i, generation)}

    return wrong


def describe_corruption(cpu_id: int, task: int, generation: int, index: int, va: int, entry: int, data: bytes | PageFault) -> str:
    """A page that read back wrong at `va`, as the data-integrity oracle reports it: where
    (va, and the mfn its L1 `entry` maps), and what was read instead (the task, page and generation
    whose pattern it holds), which is what `xensim trace explain` needs to find the read in
    the trace and follow the frame back to the call that last changed it."""
    found = "task {} page {} generation {:#x}".format(*struct.unpack_from("<QQQ", data)) if isinstance(data, bytes) else repr(data)  # or a PageFault
    return (
        f"task {task} generation {generation:#x} page {index} (va {va:#x}, mfn {(entry & PTE_MFN_MASK) >> PAGE_SHIFT:#x}) on vCPU {cpu_id}: "
        f"contents differ from what it wrote (it read {found})"
    )


def munmap(cpu: Cpu, pt: PageTables, mm: Mm, index: int, batch) -> Callable[[], tuple[int, ...]]:
    """zap one page in `batch`: read its entry, clear it, flush it on every CPU in the mm's
    cpumask with INVLPG_MULTI (flush_tlb_others: no IPI, Xen flushes them); the page is put
    in this CPU's next message (put_pages). Returns the L1 as read before the zap."""
    l1 = read_l1(cpu, pt, mm.l1, batch, "munmap")
    pt.set_entries(cpu, batch, mm.l1, {index: 0}, pinned=True)
    batch.mmuext_op([(MmuextCmd.INVLPG_MULTI, user_va(index), mm_va(cpu, mm.id, "cpumask"))])
    batch.callback(lambda: put_pages(cpu, pt, [l1()[index]], "munmap"))
    cpu.count("munmaps")
    return l1


def munmap_heap(cpu: Cpu, pt: PageTables, mm: Mm, batch) -> Callable[[], tuple[int, ...]]:
    """munmap of the whole heap in `batch`, with the pte page it frees (unmap_region and
    free_pgtables, docs/linux.md section 14): read the pte page, clear its pmd entry (Xen drops
    the page's L1 type), flush the TLBs of the mm's CPUs (TLB_FLUSH_MULTI on the cpumask),
    then xen_release_pt, in the lazy-MMU multicall; its pages and the pte page itself are put
    in this CPU's next message. Returns the pte page's entries as read before."""
    heap, mm.heap = mm.heap, 0
    entries = read_l1(cpu, pt, heap, batch, "munmap")
    cpu.queue(ops.mmu_update([(pt.maddr(user_pmd(pt, mm), slot(user_va(HEAP_FIRST), 2)) | MmuCmd.NORMAL_PT_UPDATE, 0)]))
    cpu.queue(ops.mmuext_op([(MmuextCmd.TLB_FLUSH_MULTI, 0, mm_va(cpu, mm.id, "cpumask"))]))
    for call in pt.release_pt_ops(heap):
        cpu.queue(call)
    cpu.flush_into(batch, "munmap")
    pt.mark_pinned(batch, [heap], False)
    batch.store(mm_va(cpu, mm.id, "heap"), 0)

    def put() -> None:
        put_pages(cpu, pt, entries(), "munmap")
        free_pages(cpu, [heap])

    batch.callback(put)
    cpu.count("munmaps")
    return entries


def release_tables(cpu: Cpu, mm: Mm) -> None:
    """free_pgtables: the table pages below the pgds go back to the allocator (they were unpinned)."""
    free_pages(cpu, mm.pagetables)


def free_mm(cpu: Cpu, mm: Mm) -> None:
    """__mmdrop's pgd_free: the last reference went, the pgds and the mm struct are free."""
    free_pages(cpu, mm.pgds)
    cpu.defer(ops.store(mm_va(cpu, mm.id, "state"), MM_FREE))
