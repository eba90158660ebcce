"""A restarted vCPU process takes over what its dead predecessor owned (docs/linux.md section
17), at each step it may have been killed at: in-process, the first process's Session is
closed mid-lifecycle, its deferred writes lost as a SIGKILL loses them, and a second process
attaches to the same vCPU and runs the workload to its end. The domain must then hold no mm
and no slot but the kernel's own."""

import struct

import pytest
import trio

from guestlib import Toolstack, connect
from guestlib.kernel.alloc import DRAIN_PAGES
from guestlib.kernel.boot import attach, start_of_day
from guestlib.kernel.layout import MAX_MMS, MAX_TASKS
from guestlib.kernel.mm import MM_FREE, claim, touch
from guestlib.kernel.shootdown import exit_mmap
from guestlib.kernel.workload import WRITTEN, Workload, WorkloadConfig
from guestlib.paging import MODES, lowmem_pages, mode_of_start

from .domain import TIMEOUT

KILL_POINTS = ("claimed", "forked", "touched", "unpinned", "parent-unpinned")


async def _first_life(client, mode, point: str) -> int:
    """vCPU 0's first process: boot, make its parent, start a lifecycle and stop dead at
    `point`. Returns the parent's mm id."""
    await start_of_day(client, mode, "modern", highpte=False)
    kernel = await attach(client, mode, 0)
    cpu, pt = kernel.cpu, kernel.pt
    workload = Workload(kernel, WorkloadConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(kernel.smp.upcall_loop)
        await kernel.smp.events.local_irq_enable()
        async with cpu.irq:
            parent = await workload._make_parent()
            if point == "parent-unpinned":  # go_offline's exit of the parent, its puts lost
                await exit_mmap(cpu, parent)
            elif point == "claimed":  # the claims answered, the slots not yet recorded
                batch = cpu.msg()
                claimed = [claim(cpu, batch, kind) for kind in ("task", "mm")]
                await batch.flush()
                assert [await c() for c in claimed] == [1, 2]  # the parent has mm 1
            else:
                task = await workload._fork_child(parent)
            if point in ("touched", "unpinned"):
                await workload._run_user(task.mm)
                await touch(cpu, pt, task.mm, task.id, task.generation, WRITTEN)
            if point == "unpinned":
                await exit_mmap(cpu, task.mm)  # its puts wait for a next message that never comes
        nursery.cancel_scope.cancel()
    return parent.id


async def _states(client, kl) -> tuple[list[int], list[int]]:
    """Every mm slot's and task slot's state, as memory has them."""
    out = []
    for region, limit in ((kl.mms, MAX_MMS), (kl.tasks, MAX_TASKS)):
        data = b"".join([await client.read(region.va(0) + p * 4096, 4096) for p in range(region.pages)])
        out.append([struct.unpack_from("<Q", data, i * region.struct_size)[0] for i in range(1, limit)])
    return out[0], out[1]


@pytest.mark.parametrize("address_size", [64, 32])
@pytest.mark.parametrize("point", KILL_POINTS)
async def test_a_restarted_vcpu_ends_what_its_predecessor_was_killed_holding(server, point, address_size):
    nr_pages = 2048
    highmem = nr_pages - lowmem_pages(address_size, nr_pages) if address_size == 32 else 0
    with trio.fail_after(3 * TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=nr_pages, nr_vcpus=1, highmem_pages=highmem, address_size=address_size)
            mode = MODES[address_size]
            async with connect(server.address, created.token, 0) as client:
                await client.wait_started()
                parent = await _first_life(client, mode, point)
            async with connect(server.address, created.token, 0) as client, trio.open_nursery() as nursery:
                kernel = await attach(client, mode, 0)
                assert kernel.restarted and kernel.cpu.mirror["parent_mm"] == parent
                await nursery.start(kernel.smp.upcall_loop)
                await kernel.smp.events.local_irq_enable()
                workload = Workload(kernel, WorkloadConfig(seconds=60, max_lifecycles=2, migrate=0))
                await workload.run()
                assert workload.lifecycles == 2 and workload.corruptions == []
                assert kernel.cpu.stats["killed_tasks"] == (point in ("forked", "touched", "unpinned"))
                mms, tasks = await _states(client, kernel.cpu.kl)
                nursery.cancel_scope.cancel()
            assert [s for s in mms + tasks if s != MM_FREE] == []
            assert (await xl.domain_summary(created.domid)).pinned_pagetables == 1
            await xl.destroy_domain(created.domid)
            assert await xl.audit() == []


async def test_a_restarted_vcpu_waits_for_the_calls_its_predecessor_posted(server):
    """vCPU 0's first process posts a call to vCPU 1, which has interrupts off, and dies before
    the acknowledgement. Its restart may free what the call names (the task whose exit was
    waiting), so it waits for the acknowledgement first, as its predecessor was waiting."""
    with trio.fail_after(3 * TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=2048, nr_vcpus=2)
            async with connect(server.address, created.token, 1) as client1, trio.open_nursery() as nursery:
                async with connect(server.address, created.token, 0) as client:
                    mode = mode_of_start(await client.wait_started())
                    await start_of_day(client, mode, "modern", highpte=False)
                    first = await attach(client, mode, 0)
                    await first.smp.call_function_many([1], DRAIN_PAGES, 0, wait=False)
                await client1.wait_started()
                cpu1 = (await _running(nursery, client1, mode, 1, irqs_off=True)).cpu  # the call waits
                async with connect(server.address, created.token, 0) as client:
                    second = await _running(nursery, client, mode, 0)
                    assert second.restarted and second.smp.seq[1] == 1
                    waited = trio.Event()

                    async def wait() -> None:
                        async with second.cpu.irq:
                            await second.smp.wait_posted()
                        waited.set()

                    nursery.start_soon(wait)
                    await trio.sleep(0.3)
                    assert not waited.is_set()
                    cpu1.irq.release()
                    await waited.wait()
                    nursery.cancel_scope.cancel()
            await xl.destroy_domain(created.domid)
            assert await xl.audit() == []


async def _running(nursery, client, mode, vcpu: int, irqs_off: bool = False):
    """vCPU `vcpu` attached, its upcall loop running and upcalls unmasked (with `irqs_off`,
    holding its interrupt lock, so no handler runs until the caller releases it)."""
    kernel = await attach(client, mode, vcpu)
    if irqs_off:
        await kernel.cpu.irq.acquire()
    await nursery.start(kernel.smp.upcall_loop)
    await kernel.smp.events.local_irq_enable()
    return kernel
