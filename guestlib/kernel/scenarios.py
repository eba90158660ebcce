"""Scripted interleavings that show the unpin race, step by step, on two vCPUs.

The vCPUs are separate processes, so they order their steps through barrier words in guest
memory (the kernel's control area), never through sleeps and luck. vCPU 1 runs task T, hands
T to vCPU 0 and then either goes idle on T's mm (lazy TLB) or starts switching away from it
and stops with the switch queued in its lazy batch (the stale-cr3 window); vCPU 0 finishes T and
runs exit_mmap with the kernel's drop_mm_ref. Each returns what vCPU 0 saw: the kernel BUG, if
any (docs/xen.md section 11: -EBUSY on the writable remap of the pgd after UNPIN).

- `lazy-exit`: `none` BUGs; `mask`, `current-cr3` and `modern` shoot vCPU 1 down and succeed.
- `stale-cr3`: `mask` BUGs (vCPU 1 left the cpumask but Xen still has T's pgd as its cr3);
  `current-cr3` and `modern` find vCPU 1 through xen_current_cr3, and succeed.
- `killed-mid-switch`: as `stale-cr3`, but vCPU 1's process SIGKILLs itself in the window; a
  new process for vCPU 1 must finish the switch when it attaches (memory names the new pgd,
  Xen still has T's), so every variant succeeds once it is back.
- `offline-call`: vCPU 1, lazy on T's mm, goes offline (the end of its workload) while vCPU 0's
  drop_mm_ref for T is addressed to it; the call must run before vCPU 1 counts as offline,
  and a call that finds it offline must never run, since its initiator stopped waiting and
  freed T (docs/linux.md section 16). Every variant that sends IPIs succeeds.
"""

import os
import signal as signals
import statistics
import time

import trio

from ..hypercalls import ops
from ..xen import MmuextCmd
from .cpu import Cpu, KernelBug, checked
from .mm import MM_FREE, Mm, fork, mm_alloc, mm_va, new_id, pin, touch
from .pgtable import PAGE_KERNEL
from .sched import leave_lazy, switch_mm
from .shootdown import DROP_MM_REF, exit_mmap
from .smp import call_function
from .workload import WRITTEN, Task, Workload, WorkloadConfig

SCENARIOS = ("lazy-exit", "stale-cr3", "killed-mid-switch", "offline-call", "kmap-readonly", "ipi-rtt")
NOP = 3  # a call function that does nothing: the IPI round trip alone (1 and 2 are the kernel's)
IPI_ROUNDS = 60
HANDED_OVER, SWITCH_QUEUED, RELEASE, FINISHED = 1, 2, 3, 4  # barrier words in the control area


def _barrier_va(cpu: Cpu, barrier: int) -> int:
    return cpu.kl.kglobal("control")[0] + 8 * barrier


async def signal(cpu: Cpu, barrier: int, value: int = 1) -> None:
    """Set `barrier` (to a nonzero `value` the waiter gets). The barriers are the test's, not
    the kernel's: their messages go straight to the client, so they do not flush a cr3 switch
    queued in the lazy batch."""
    await cpu.client.submit([ops.store(_barrier_va(cpu, barrier), value)])


async def wait_for(cpu: Cpu, barrier: int) -> int:
    """Spin (yielding the vCPU) until another vCPU signals `barrier`; its value."""
    while True:
        loaded, _ = await cpu.client.submit([ops.load(_barrier_va(cpu, barrier)), ops.sched_yield()])
        if value := checked(cpu, "wait_for", loaded):
            return value
        await trio.sleep(0.01)


async def run(kernel, scenario: str) -> dict:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    if scenario == "kmap-readonly":
        return await _kmap_readonly(kernel)
    if scenario == "ipi-rtt":
        return await _ipi_rtt(kernel)
    return await (_victim if kernel.cpu.id == 1 else _exiter)(kernel, scenario)


async def _kmap_readonly(kernel) -> dict:
    """highpte: a pinned highmem pte page is reached through a read-only kmap slot
    (xen_kmap_atomic_pte). Xen refuses a writable kmap of it (-EBUSY: a live pagetable cannot
    be mapped writable); a store through the read-only slot is a ptwr-emulated entry update,
    accepted for a valid entry and a page fault for an invalid one (the page mapping itself
    writable); once the mm is unpinned, a writable kmap works again."""
    cpu, pt = kernel.cpu, kernel.pt
    async with cpu.irq:
        batch = cpu.msg()
        mm = await mm_alloc(cpu, pt, batch, await new_id(cpu, "mm"), {})
        pin(cpu, pt, batch, mm)
        await batch.flush()
        va = pt.kmap_va(cpu)
        writable_while_pinned = await cpu.send(pt.kmap_op(cpu, mm.l1, pinned=False))
        readonly = await cpu.send(
            pt.kmap_op(cpu, mm.l1, pinned=True),
            ops.store(va + 8 * 5, 0),  # a valid (empty) entry: emulated
            ops.store(va, pt.make(mm.l1, PAGE_KERNEL)),  # the table mapping itself writable: refused
            pt.kunmap_op(cpu),
        )
        await switch_mm(cpu, mm)
        await exit_mmap(cpu, mm)
        after_unpin = await cpu.send(pt.kmap_op(cpu, mm.l1, pinned=False), ops.store(va, 0), pt.kunmap_op(cpu))
    refused = writable_while_pinned[0].exception()
    fault = readonly[2].result()
    return {
        "vcpu": cpu.id,
        "scenario": "kmap-readonly",
        "highmem_l1": not cpu.kl.is_lowmem(mm.l1),
        "writable_kmap_while_pinned": refused.errno.name if refused is not None else "allowed",
        "valid_entry_store_emulated": readonly[1].result() is None,
        "invalid_entry_store_fault": fault.error_code if fault is not None else None,
        "writable_kmap_after_unpin": all(p.exception() is None for p in after_unpin) and after_unpin[1].result() is None,
        "bug": None,
    }


@call_function(NOP)
async def _nop(cpu: Cpu, arg: int) -> None:
    return None


async def _ipi_rtt(kernel) -> dict:
    """vCPU 0 times smp_call_function_single to vCPU 1 (send, the handler on vCPU 1, its
    acknowledgement in guest memory seen by vCPU 0) against a plain hypercall, alternating one
    by one; vCPU 1 idles with interrupts on until told to stop."""
    cpu = kernel.cpu
    if cpu.id != 0:
        await wait_for(cpu, FINISHED)
        return {"vcpu": cpu.id, "scenario": "ipi-rtt", "bug": None}
    ipi, hypercall = [], []
    async with cpu.irq:
        for _ in range(IPI_ROUNDS):
            start = time.perf_counter()
            await kernel.smp.call_function_many([1], NOP, 0, wait=True)
            ipi.append(time.perf_counter() - start)
            start = time.perf_counter()
            await cpu.send(ops.mmuext_op([(MmuextCmd.TLB_FLUSH_LOCAL,)]))
            hypercall.append(time.perf_counter() - start)
    await signal(cpu, FINISHED)
    ipi_us, hypercall_us = statistics.median(ipi) * 1e6, statistics.median(hypercall) * 1e6
    return {"vcpu": 0, "scenario": "ipi-rtt", "ipi_rtt_us": ipi_us, "hypercall_rtt_us": hypercall_us, "rounds": IPI_ROUNDS, "bug": None}


async def _hand_over(kernel, workload: Workload) -> tuple[Mm, Mm]:
    """vCPU 1 runs a task T in a child of its own parent, then hands T to vCPU 0 and stays
    lazy on T's mm (a kernel thread runs here now, borrowing it): the parent and T's mm."""
    cpu, pt = kernel.cpu, kernel.pt
    async with cpu.irq:
        batch = cpu.msg()
        parent = await mm_alloc(cpu, pt, batch, await new_id(cpu, "mm"), {})
        pin(cpu, pt, batch, parent)
        await batch.flush()
        child = await fork(cpu, pt, parent, await new_id(cpu, "mm"), [])
        task = Task(await new_id(cpu, "task"), child, 42)
        await switch_mm(cpu, child)
        await touch(cpu, pt, child, task.id, task.generation, WRITTEN)
        await workload._migrate(task, 0)
    return parent, child


async def _victim(kernel, scenario: str) -> dict:
    """vCPU 1: run T, hand it over, then sit in the window the scenario is about."""
    cpu = kernel.cpu
    if kernel.offline:  # offline-call, second life: an offline CPU stays offline
        return {"vcpu": 1, "scenario": scenario, "bug": None}
    if kernel.restarted:  # killed-mid-switch, second life: attach has finished the switch
        await signal(cpu, SWITCH_QUEUED)
        await wait_for(cpu, FINISHED)
        return {"vcpu": 1, "scenario": scenario, "bug": None}
    workload = Workload(kernel, WorkloadConfig())
    parent, t_mm = await _hand_over(kernel, workload)
    if scenario == "offline-call":
        return await _go_offline_asked_to_drop(kernel, workload, parent, t_mm)
    if scenario == "lazy-exit":  # idle with interrupts on, still on T's pgd
        await signal(cpu, HANDED_OVER)
        await wait_for(cpu, FINISHED)
    else:

        async def hold_the_switch(point: str, cpu: Cpu) -> None:
            if point == "switch_mm:queued" and scenario == "killed-mid-switch":
                os.kill(os.getpid(), signals.SIGKILL)
            if point == "switch_mm:queued":
                await signal(cpu, SWITCH_QUEUED)
                await wait_for(cpu, RELEASE)

        cpu.hook, usual = hold_the_switch, cpu.hook
        async with cpu.irq:  # the context switch runs with interrupts off, as in Linux
            await leave_lazy(cpu, parent)
            await cpu.flush_lazy()  # arch_end_context_switch
        cpu.hook = usual
        await wait_for(cpu, FINISHED)
    return {"vcpu": 1, "scenario": scenario, "bug": None}


async def _go_offline_asked_to_drop(kernel, workload: Workload, parent: Mm, t_mm: Mm) -> dict:
    """offline-call, vCPU 1: goes offline (Workload.go_offline) while lazy on T's mm, with
    vCPU 0's drop_mm_ref for T posted just after its interrupts went off; it takes interrupts
    again only once vCPU 0 has freed T and posted it one more drop_mm_ref for T."""
    cpu = kernel.cpu

    async def hold(point: str, cpu: Cpu) -> None:
        if point == "finish:irqs_off":  # still on T's pgd: vCPU 0's shootdown asks this CPU
            await signal(cpu, HANDED_OVER, t_mm.id)
            await wait_for(cpu, RELEASE)
        elif point == "finish:offline":
            await wait_for(cpu, FINISHED)

    cpu.hook = hold
    async with cpu.irq:
        await workload.go_offline(parent)
    async with cpu.irq:  # the lock is fair: the upcall that waited for it runs first
        pass
    return {"vcpu": 1, "scenario": "offline-call", "bug": None, "calls_run": cpu.stats["ipis_handled"]}


async def _call_the_offline_cpu(kernel, t_mm: int) -> None:
    """offline-call, vCPU 0, after exiting T: wait until T is freed (mmdrop, then pgd_free, in
    this CPU's next messages), then ask vCPU 1, offline by now, to drop T once more, as an
    initiator that chose it just before it went offline would."""
    cpu = kernel.cpu
    while True:
        (state,) = await cpu.send(ops.load(mm_va(cpu, t_mm, "state")))
        if checked(cpu, "offline-call", state) == MM_FREE:
            break
    await kernel.smp.call_function_many([1], DROP_MM_REF, t_mm, wait=True)


async def _exiter(kernel, scenario: str) -> dict:
    """vCPU 0: take T once vCPU 1 is in its window, finish it, report what exit_mmap did."""
    cpu = kernel.cpu

    async def release_victim(point: str, cpu: Cpu) -> None:
        if point in ("call_function:sent", "exit_mmap:done"):
            await signal(cpu, RELEASE)

    handed_over = await wait_for(cpu, HANDED_OVER if scenario in ("lazy-exit", "offline-call") else SWITCH_QUEUED)
    cpu.hook = release_victim
    workload = Workload(kernel, WorkloadConfig())
    bug = None
    try:
        async with cpu.irq:
            await workload._drain_incoming()
            if scenario == "offline-call":
                await _call_the_offline_cpu(kernel, handed_over)
    except KernelBug as e:
        bug = str(e)
    await signal(cpu, FINISHED)
    return {"vcpu": 0, "scenario": scenario, "variant": kernel.variant, "bug": bug, "lifecycles": workload.lifecycles}

