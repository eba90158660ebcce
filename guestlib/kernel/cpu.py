"""One vCPU as the kernel sees it: its client, interrupt flag, lazy batch and per-CPU mirror.

Interrupts: holding `irq` is local_irq_disable; the upcall task takes the same lock before it
runs handlers, so handlers run only where this vCPU's code has interrupts enabled, as on a CPU.
Code that waits for another vCPU (a call-function ack) opens an interrupt window between tries,
as Linux's smp_call_function waits do, or two vCPUs waiting on each other would deadlock.

Messages: `msg()` is a batch of calls sent as one Session message. It ends with the writes
this CPU deferred (its page pools, pages given back, page counts dropped after a TLB flush), so
those cost no message of their own. The lazy batch is Linux's per-CPU multicall buffer in
lazy-CPU/lazy-MMU mode: hypercalls that become one multicall when flushed, followed in the
same message by the stores that Linux makes in post-flush callbacks (set_current_cr3), so
another vCPU sees them only once Xen has run the multicall. Whatever the lazy batch still holds
when a message starts goes first in it: the CPU leaves lazy mode before it does anything else
(arch_end_context_switch flushes the cr3 switch before the next task runs), so a context
switch's multicall rides in the first message of the task switched to.

The per-CPU mirror holds this CPU's own per-CPU fields (only this vCPU writes them); each change
is also written to guest memory in the message that makes it, so other vCPUs read the truth
there and a restarted process reads it back.
"""

import struct
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from ..hypercalls import Batch, HypercallClient, Op, Pending, XenError, ops
from .layout import STATS, KernelLayout


class KernelBug(Exception):
    """A kernel BUG: a hypercall the kernel needs failed, data was corrupted, or a lock
    protocol broke. It names the vCPU, the operation, the hypercall, its errno and the frames."""

    def __init__(self, cpu: int, operation: str, detail: str, error: XenError | None = None):
        self.cpu, self.operation, self.error, self.detail = cpu, operation, error, detail
        errno = f": -{error.errno.name} from {error.hypercall or 'the hypercall'}: {error.message}" if error else ""
        super().__init__(f"kernel BUG on vCPU {cpu} in {operation}: {detail}{errno}")


class Panicked(Exception):
    """Another vCPU hit a kernel BUG: this one stops too (as Linux's panic stops all CPUs)."""


Hook = Callable[[str, "Cpu"], Awaitable[None]]


async def _no_hook(point: str, cpu: "Cpu") -> None:
    return None


class Cpu:
    """The running vCPU `cpu_id` of the kernel laid out by `layout`."""

    def __init__(self, client: HypercallClient, layout: KernelLayout, cpu_id: int, hook: Hook = _no_hook):
        self.client, self.kl, self.id = client, layout, cpu_id
        self.irq = trio.Lock()
        self.hook = hook
        self._lazy: list[Op] = []
        self._after_lazy: list[Op] = []
        self._deferred: list[tuple[Op, Callable | None]] = []
        self.mirror: dict[str, int] = {}
        self.loaded = None  # the mm whose pgd this CPU has loaded (an `mm.Mm`), None = init_mm
        self.borrowed = None  # the mm a lazy kernel thread here borrows, holding a count
        self.kernel = None  # the `boot.Kernel` this CPU belongs to
        self.last_shootdown: tuple[set[int], set[int]] = (set(), set())  # drop_mm_ref's view
        self.pool: list[int] = []
        self.hipool: list[int] = []
        self.pool_dirty = False
        self.slot_cursor: dict[str, int] = {}  # where this CPU tries to claim an mm or task slot next
        self.stats = dict.fromkeys(STATS, 0)
        self.phase = "boot"  # what this CPU is doing, for progress reports
        self.messages = 0

    # -- messages ------------------------------------------------------------------------------

    def msg(self, stop_on_error: bool = False) -> "Message":
        """A new message: it starts with the lazy batch (if any) and ends with this CPU's
        deferred writes and page pools."""
        self.messages += 1
        batch = Message(self, stop_on_error)
        self.flush_into(batch)
        return batch

    def _complete(self, batch: Batch) -> None:
        """Close a message with what this CPU owes guest memory. The pools go in the same
        message as the calls that used their pages: a message runs whole or not at all, so
        a vCPU killed at any point comes back with pools that match what it did. (One whose
        process dies while it sleeps in Xen loses what follows the sleep, as
        docs/transport.md section 8 says: after call_function_many's poll come only these
        writes, whose loss leaks the pages and counts they give back, never hands one out twice.)"""
        deferred, self._deferred = self._deferred, []
        for op, then in deferred:
            pending = add(batch, op)
            if then is not None:
                batch.callback(then, pending)
        if self.pool_dirty:
            self.pool_dirty = False
            self._write_pools(batch)

    def _write_pools(self, batch: Batch) -> None:
        """This CPU's page pools (alloc) into its per-CPU area."""
        for name, pool in (("pool", self.pool), ("hipool", self.hipool)):
            va, _ = self.kl.percpu(self.id, name)
            if pool:
                batch.write(va, struct.pack(f"<{len(pool)}Q", *pool))
            self.set_percpu(batch, f"{name}_count", len(pool))

    async def send(self, *calls: Op) -> list[Pending]:
        """One message of `calls` (after the deferred writes); their Pendings, in order."""
        batch = self.msg()
        pendings = [add(batch, op) for op in calls]
        await batch.flush()
        return pendings

    def defer(self, op: Op, then: Callable[[Pending], None] | None = None) -> None:
        """A call that may wait for this CPU's next message; `then(pending)` runs once that
        message is answered (Linux's mmu_gather: pages are put after the flush)."""
        self._deferred.append((op, then))

    @asynccontextmanager
    async def irqs_off(self):
        async with self.irq:
            yield

    async def irq_window(self) -> None:
        """Let pending interrupts run (local_irq_enable; cpu_relax; local_irq_disable)."""
        self.irq.release()
        try:
            await trio.sleep(0)
        finally:
            await self.irq.acquire()

    # -- the lazy batch (xen_mc_batch / xen_mc_issue) -------------------------------------------

    def queue(self, op: Op, after: Op | None = None) -> None:
        """Queue a hypercall in the lazy batch, and a store to make once Xen has run it."""
        self._lazy.append(op)
        if after is not None:
            self._after_lazy.append(after)

    @property
    def lazy_pending(self) -> bool:
        return bool(self._lazy)

    def flush_into(self, batch: Batch, operation: str | None = None, detail: str = "a multicall entry failed") -> None:
        """Put the lazy batch into `batch` as one multicall; a failed entry is a kernel BUG
        of `operation` (default: the entry's hypercall) when the batch is flushed (Linux's
        xen_mc_flush WARNs and the caller BUGs)."""
        queued, after = self._lazy, self._after_lazy
        self._lazy, self._after_lazy = [], []
        if not queued:
            return
        call = batch.multicall(queued)
        for op in after:
            add(batch, op)

        def check():
            for pending in call.result():
                error = pending.exception()
                if error is not None:
                    raise self.bug(operation or pending.op.kind, detail, error if isinstance(error, XenError) else None)

        batch.callback(check)

    async def flush_lazy(self) -> None:
        """xen_mc_flush: submit the lazy batch now (a new message starts with it)."""
        if self._lazy:
            await self.msg().flush()

    # -- this CPU's per-CPU fields -----------------------------------------------------------

    def set_percpu(self, batch: Batch, field: str, value: int) -> None:
        self.mirror[field] = value
        va, size = self.kl.percpu(self.id, field)
        batch.store(va, value, size)

    def set_percpu_later(self, field: str, value: int) -> None:
        """A per-CPU field changed in this CPU's next message (with what it defers)."""
        self.mirror[field] = value
        self.defer(ops.store(self.kl.percpu(self.id, field)[0], value))

    def count(self, stat: str, n: int = 1) -> None:
        self.stats[stat] += n

    def check_panic(self, batch: Batch) -> Callable[[], None]:
        """Read the kernel's BUG count in `batch`; call the result after the flush to stop if
        any vCPU has hit a BUG."""
        bugs = batch.load(self.kl.kglobal("bugs")[0])

        def check():
            if bugs.exception() is None and bugs.result():
                raise Panicked(f"vCPU {self.id} stops: another vCPU hit a kernel BUG")

        return check

    def bug(self, operation: str, detail: str, error: XenError | None = None) -> KernelBug:
        self.stats["bugs"] += 1
        return KernelBug(self.id, operation, detail, error)


class Message(Batch):
    """A kernel message: a batch that `Cpu._complete`s itself just before it is sent."""

    def __init__(self, cpu: Cpu, stop_on_error: bool = False):
        super().__init__(cpu.client, stop_on_error)
        self._cpu = cpu

    async def flush(self) -> None:
        self._cpu._complete(self)
        await super().flush()


def add(batch: Batch, op: Op) -> Pending:
    """Queue an already built Op (from `ops`) in a message."""
    return batch._issue(op)


def checked(cpu: Cpu, operation: str, pending: Pending):
    """A call's value; a Xen error the kernel did not expect is a kernel BUG."""
    error = pending.exception()
    if error is not None:
        raise cpu.bug(operation, f"{pending.op.kind} failed", error if isinstance(error, XenError) else None) from error
    return pending.result()
