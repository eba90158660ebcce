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
multicalls), carried to memory accesses too.

Modules: `layout` (where everything lives), `cpu` (one vCPU: its client, per-CPU mirror,
interrupt flag and multicall batch), `pgtable` (pfn-to-mfn entries, pin and unpin walks,
kmap for highpte), `alloc` (page pools), `mm` (fork, page faults, copy-on-write, munmap,
exit_mmap and drop_mm_ref), `smp` (IPIs and smp_call_function_many), `sched` (tasks, run
queues, context switch and lazy TLB), `boot` (start of day), `workload` (what tasks do).
"""
