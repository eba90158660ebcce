"""SMP over event channels: IPI ports, the upcall loop, smp_call_function_many.

Reference: docs/linux.md section 7. Each CPU has a reschedule and a call-function port, bound
by the boot CPU with EVTCHNOP_bind_ipi and recorded in the per-CPU areas. An IPI is
EVTCHNOP_send on the *target's* port; the target's upcall (guestlib.events) clears the pending
bits and runs the handler with interrupts off on that vCPU.

Call-function data lives in guest memory: one slot per (source, target) CPU pair holding the
function, its argument and a sequence number; the target runs every slot whose sequence is
ahead of its `done` field and then writes `done`, which is the initiator's wait condition
(the modern per-CPU csd lock, made lock-free by giving each pair its own slot). A waiting
initiator opens interrupt windows and yields, as Linux's smp_call_function does, so two CPUs
calling each other cannot deadlock.
"""

import struct
from collections.abc import Awaitable, Callable

import trio

from ..events import EventChannels
from ..hypercalls import Batch, Pending, ops
from .cpu import Cpu, checked
from .layout import CSD, OFFLINE

CallFunc = Callable[[Cpu, int], Awaitable[None]]
FUNCTIONS: dict[int, CallFunc] = {}


def call_function(number: int):
    """Register a function other CPUs may run here (its number travels in the csd slot). The
    modules that register one choose its number; a second claim of a number is refused at
    import, or one module's calls would silently run the other's function."""

    def register(fn: CallFunc) -> CallFunc:
        if number in FUNCTIONS:
            raise ValueError(f"call-function number {number} is {FUNCTIONS[number].__qualname__}'s, not free for {fn.__qualname__}")
        FUNCTIONS[number] = fn
        return fn

    return register


IPI_KINDS = ("resched", "callfunc", "kick")
CALL_WAIT_NS = 20_000_000  # a waiter re-checks at least this often, kicked or not


class Smp:
    """This CPU's side of the IPIs: the ports of every CPU, its handlers, its call slots.

    Waiting for a call to complete is Linux's PV-spinlock technique (xen_lock_spinning):
    each CPU has a third, masked IPI port that it only ever SCHEDOP_polls on; a target that
    has written its acknowledgement kicks the initiator's port, so the initiator sleeps in Xen
    instead of spinning with loads, and its poll, the reads of the acknowledgement and the call
    itself ride in one message.
    """

    def __init__(self, cpu: Cpu, events: EventChannels, ports: dict[str, list[int]]):
        self.cpu, self.events, self.ports = cpu, events, ports
        self.seq: dict[int, int] = {}  # per target: the last sequence this CPU posted
        self.need_resched = False  # set by the reschedule IPI, cleared by the scheduler
        events.bind(ports["resched"][cpu.id], self._resched)
        events.bind(ports["callfunc"][cpu.id], self._callfunc, prefetch=self._read_slots)

    @staticmethod
    async def read_ports(cpu: Cpu) -> dict[str, list[int]]:
        """Every CPU's IPI ports from the per-CPU areas (written once at boot)."""
        n = cpu.kl.nr_cpus
        loads = await cpu.send(*(ops.load(cpu.kl.percpu(c, f"{k}_port")[0]) for k in IPI_KINDS for c in range(n)))
        values = [checked(cpu, "read_ports", p) for p in loads]
        return {k: values[i * n : (i + 1) * n] for i, k in enumerate(IPI_KINDS)}

    async def upcall_loop(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The vCPU's interrupt entry: each Upcall push runs xen_evtchn_do_upcall with
        interrupts off on this vCPU. Started with `nursery.start`, it is waiting for a push
        before the vCPU can unmask upcalls, so that a push is always handed to a waiting task,
        never buffered for one that has yet to run (which took one scheduling round more, and
        let the workload's next message overtake the handler's at random):
        docs/schedule.md section 6."""
        task_status.started()
        async for upcall in self.cpu.client.session.upcalls:
            async with self.cpu.irq:
                await self.events.do_upcall(upcall.pending_ports)

    async def _resched(self, port: int, tail: Batch) -> None:
        self.need_resched = True
        self.cpu.count("ipis_handled")

    def _read_slots(self, batch: Batch) -> Pending:
        """The call slots addressed to this CPU (one read), in the upcall's first message."""
        kl = self.cpu.kl
        return batch.read(kl.csd(0, self.cpu.id, "func")[0], CSD.size * kl.nr_cpus)

    async def _callfunc(self, port: int, tail: Batch, slots: Pending) -> None:
        """generic_smp_call_function_interrupt: run every slot addressed to this CPU, then
        acknowledge each (`done`) and kick its initiator, in the upcall's last message."""
        cpu, kl = self.cpu, self.cpu.kl
        if cpu.mirror.get("online") == OFFLINE:  # given up by their initiators (docs/linux.md section 16)
            return
        data = checked(cpu, "call_function", slots)
        for src in range(kl.nr_cpus):
            func, arg, seq, done = struct.unpack_from("<4Q", data, CSD.size * src)
            if seq != done:
                await FUNCTIONS[func](cpu, arg)
                await cpu.flush_lazy()  # what the function queued is out before we ack
                tail.store(kl.csd(src, cpu.id, "done")[0], seq)
                tail.evtchn_send(self.ports["kick"][src])
        cpu.count("ipis_handled")

    async def call_function_many(self, targets: list[int], func: int, arg: int, wait: bool = True) -> None:
        """smp_call_function_many(mask, func, arg, wait): post a slot for each target and send
        their call-function IPIs; with `wait`, poll this CPU's kick port in the same message
        and read the acknowledgements after it, until every target has run the call."""
        cpu, kl = self.cpu, self.cpu.kl
        targets = [t for t in targets if t != cpu.id]
        if not targets:
            return
        batch = cpu.msg()
        for t in targets:
            self.seq[t] = self.seq.get(t, 0) + 1
            batch.store(kl.csd(cpu.id, t, "func")[0], func)
            batch.store(kl.csd(cpu.id, t, "arg")[0], arg)
            batch.store(kl.csd(cpu.id, t, "seq")[0], self.seq[t])
        for t in targets:
            batch.evtchn_send(self.ports["callfunc"][t])
        cpu.count("ipis_sent", len(targets))
        await cpu.hook("call_function:sent", cpu)
        await self._wait_for(targets, batch, wait)

    async def wait_posted(self) -> None:
        """A restarted CPU waits, as its dead process was waiting, for the calls that process
        posted and no target has acknowledged: the restart may free what they name (ending the
        task whose exit was waiting, docs/linux.md section 17), and a target that left the mm
        before it took the IPI is not asked again, so it would run the call on a freed mm."""
        targets = [t for t, seq in self.seq.items() if seq and t != self.cpu.id]
        if targets:
            await self._wait_for(targets, self.cpu.msg())

    async def _wait_for(self, targets: list[int], batch: Batch, wait: bool = True) -> None:
        """Poll this CPU's kick port in `batch` and read the acknowledgements after it, until
        every target has run this CPU's last call to it or is offline (without `wait`: one
        look, sent with `batch`)."""
        cpu, kl = self.cpu, self.cpu.kl
        kick = self.ports["kick"][cpu.id]
        cpu.phase = f"call_function_many waiting for {targets}"
        while True:
            if wait:
                batch.sched_poll([kick], cpu.client.system_time_ns + CALL_WAIT_NS)
                self.events.clear_pending(batch, kick)
            dones = [batch.load(kl.csd(cpu.id, t, "done")[0]) for t in targets]
            online = [batch.load(kl.percpu(t, "online")[0]) for t in targets]
            panicked = cpu.check_panic(batch)
            await batch.flush()
            panicked()
            targets = [  # an offline CPU runs no calls (it answered those posted before)
                t for t, d, o in zip(targets, dones, online)
                if checked(cpu, "call_function wait", d) != self.seq[t] and checked(cpu, "call_function wait", o) != OFFLINE
            ]  # fmt: skip
            if not wait or not targets:
                cpu.phase = "running"
                return
            await cpu.irq_window()  # let this CPU's own IPIs in, or two callers would deadlock
            batch = cpu.msg()

    async def send_reschedule(self, target: int) -> None:
        await self.cpu.send(ops.evtchn_send(self.ports["resched"][target]))
