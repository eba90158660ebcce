"""SMP over event channels: IPI ports, the upcall loop, smp_call_function_many.

Reference: linux-guest.md section 7. Each CPU has a reschedule and a call-function port, bound
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

from collections.abc import Awaitable, Callable

from ..events import EventChannels
from ..hypercalls import Batch, ops
from .cpu import Cpu, checked

CallFunc = Callable[[Cpu, int], Awaitable[None]]
FUNCTIONS: dict[int, CallFunc] = {}


def call_function(number: int):
    """Register a function other CPUs may run here (its number travels in the csd slot)."""

    def register(fn: CallFunc) -> CallFunc:
        FUNCTIONS[number] = fn
        return fn

    return register


class Smp:
    """This CPU's side of the IPIs: the ports of every CPU, its handlers, its call slots."""

    def __init__(self, cpu: Cpu, events: EventChannels, ports: dict[str, list[int]]):
        self.cpu, self.events, self.ports = cpu, events, ports
        self.seq: dict[int, int] = {}  # per target: the last sequence this CPU posted
        self.need_resched = False  # set by the reschedule IPI, cleared by the scheduler
        events.bind(ports["resched"][cpu.id], self._resched)
        events.bind(ports["callfunc"][cpu.id], self._callfunc)

    @staticmethod
    async def read_ports(cpu: Cpu) -> dict[str, list[int]]:
        """Every CPU's IPI ports from the per-CPU areas (written once at boot)."""
        kinds = ("resched", "callfunc")
        loads = await cpu.send(*(ops.load(cpu.kl.percpu(c, f"{k}_port")[0]) for k in kinds for c in range(cpu.kl.nr_cpus)))
        values = [checked(cpu, "read_ports", p) for p in loads]
        n = cpu.kl.nr_cpus
        return {k: values[i * n : (i + 1) * n] for i, k in enumerate(kinds)}

    async def upcall_loop(self) -> None:
        """The vCPU's interrupt entry: each Upcall push runs xen_evtchn_do_upcall with
        interrupts off on this vCPU."""
        async for upcall in self.cpu.client.session.upcalls:
            async with self.cpu.irq:
                await self.events.do_upcall(upcall.pending_ports)

    async def _resched(self, port: int, tail: Batch) -> None:
        self.need_resched = True
        self.cpu.count("ipis_handled")

    async def _callfunc(self, port: int, tail: Batch) -> None:
        """generic_smp_call_function_interrupt: run every slot addressed to this CPU."""
        cpu, kl = self.cpu, self.cpu.kl
        n = kl.nr_cpus
        fields = ("seq", "done", "func", "arg")
        loads = await cpu.send(*(ops.load(kl.csd(src, cpu.id, f)[0]) for src in range(n) for f in fields))
        values = [checked(cpu, "call_function", p) for p in loads]
        for src in range(n):
            seq, done, func, arg = values[4 * src : 4 * src + 4]
            if seq != done:
                await FUNCTIONS[func](cpu, arg)
                await cpu.flush_lazy()  # what the function queued is out before we ack
                tail.store(kl.csd(src, cpu.id, "done")[0], seq)
        cpu.count("ipis_handled")

    async def call_function_many(self, targets: list[int], func: int, arg: int, wait: bool = True) -> None:
        """smp_call_function_many(mask, func, arg, wait): post a slot for each target, send
        their call-function IPIs in the same message, then wait for every `done`."""
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
        await batch.flush()
        cpu.count("ipis_sent", len(targets))
        await cpu.hook("call_function:sent", cpu)
        while wait:
            batch = cpu.msg()
            dones = [batch.load(kl.csd(cpu.id, t, "done")[0]) for t in targets]
            panicked = cpu.check_panic(batch)
            batch.sched_yield()
            await batch.flush()
            panicked()
            if all(checked(cpu, "call_function wait", d) == self.seq[t] for d, t in zip(dones, targets)):
                return
            await cpu.irq_window()

    async def send_reschedule(self, target: int) -> None:
        await self.cpu.send(ops.evtchn_send(self.ports["resched"][target]))
