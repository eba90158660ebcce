"""A small Linux-like PV guest kernel whose vCPUs are separate processes.

Theory of operation. Every piece of kernel state that more than one vCPU may look at lives in
guest memory, at addresses every vCPU process computes the same way from start-info (`layout`):
the per-CPU areas (`xen_cr3`, `xen_current_cr3`, `loaded_mm`, the run queues' inboxes), the mm
structs with their cpumasks and reference counts, the task structs, struct-page flags
(PG_pinned) and counts, the page pools, and the call-function slots. vCPUs touch it only with
the hypervisor's loads, stores and atomics, exactly as CPUs share RAM, so a vCPU process on
another host sees the same kernel. A process keeps in its own memory only what Linux keeps in
a CPU's registers or caches of read-only data (the P2M, the boot layout).

A round trip costs hundreds of microseconds here, so every kernel path is written as a few
*messages*: each message is a list of calls (hypercalls, multicalls, memory accesses) that the
hypervisor runs in order, and a path waits for a message's results only where the next step
depends on them. This is Linux's own discipline under Xen (lazy-MMU and lazy-CPU batching into
multicalls, arch/x86/xen/multicalls.c), carried to memory accesses too: a context switch's cr3
multicall leads the next message (`cpu`), and pages and mm counts are put in the message after
the flush that made them unreachable, as Linux's mmu_gather puts them (mm/mmu_gather.c).

The messages of one process lifecycle (`workload`), and the dependency that forces each:

1. drain: the tails of the run queues into this CPU, the heads of those out of it, the BUG
   count. Which tasks were handed over is known only once read. (It also carries the puts
   deferred by the last exit.)
2. switch_mm to the parent: the cpumask, loaded_mm and xen_cr3 writes. Other CPUs must see
   them before Xen has the new cr3 (the stale-cr3 protocol, `sched`); the cr3 multicall
   itself leads message 3.
3. fork, part one: cmpxchg of a task and an mm slot, and the parent's L1. The child's
   addresses depend on which slots were free, its copy-on-write entries on the L1.
4. fork, part two: the child's tables as plain writes, the parent's entries read-only by
   mmu_update, TLB_FLUSH_MULTI, the page counts, the pin. Needs 3's answers.
5. switch_mm to the child: as 2; its cr3 multicall leads 6.
6. the child's user writes, and the fault handler's read of the L1. Which writes fault is
   known only from their results.
7. the faults handled (copies, fresh pages, the heap's pte page joining the pinned mm,
   mmu_update, INVLPG_LOCAL, the old pages put) and the writes retried. Needs 6's answers.
8. exit, part one: the task's verify reads, munmap (read, clear, INVLPG_MULTI), the heap's
   munmap (its pte page read, its pmd entry cleared, TLB_FLUSH_MULTI, xen_release_pt), exit's
   read of the L1, drop_mm_ref (leave_mm, and the cpumask and every CPU's xen_current_cr3 read).
   Whom to shoot down is known only from these reads; a shootdown adds its IPI message, and
   polls until every target has acknowledged.
9. exit, part two: UNPIN and the tables made writable again, PG_pinned, `users`. Xen refuses
   the remap while any vCPU has the pgd, so it waits for 8 and the shootdown; the pages and
   the mm count are put only once it has worked (in the next message), so a failed exit
   frees nothing another CPU could reuse.

A task that migrates instead ends after 7 with one message (task struct, ring slot and tail,
the reschedule IPI, and this CPU's kernel thread borrowing the mm), after a preemption point.
The CPU that takes it over needs three dependent reads (the ring slot; its new head stored,
naming the task this CPU's, with the task's mm and generation read; the mm struct), switch_mm,
then 8 and 9; the first CPU's
next switch to its parent leaves lazy mode and puts the borrowed mm in the next message. So a
local lifecycle is 9 messages and a migrated one 14, plus, now and then, a page-pool refill
(a bitmap read, then fetch_and on the words chosen from it) or a slot claim that lost a race.

The kernel is written once for both PV paging modes, x86-64 and 32-bit PAE, against their
description in `guestlib.paging` (docs/linux.md section 13).

Modules: `layout` (where everything lives), `cpu` (one vCPU: its client, per-CPU mirror,
interrupt flag and multicall batch), `pgtable` (pfn-to-mfn entries, pin and unpin walks,
kmap for highpte), `alloc` (page pools), `mm` (fork, page faults, copy-on-write, munmap,
exit_mmap and drop_mm_ref), `smp` (IPIs and smp_call_function_many), `sched` (tasks, run
queues, context switch and lazy TLB), `boot` (start of day), `workload` (what tasks do).
"""
