"""The guest kernel's page allocator (guestlib/kernel/alloc.py) against a real server: vCPU 0
boots the kernel in-process and its refills are driven directly, so a test can look at the
free bitmap around the lowmem/highmem boundary word."""

from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from guestlib import Toolstack, connect
from guestlib.kernel.alloc import REFILL_TRIES, _refill, alloc_pages, pcp_limits
from guestlib.kernel.boot import attach, start_of_day
from guestlib.kernel.cpu import KernelBug
from guestlib.paging import mode_of_start

from .domain import TIMEOUT
from .kernel import audit_after_destroy, run_guest


@asynccontextmanager
async def booted_kernel(server, nr_pages: int, highmem_pages: int, nr_vcpus: int = 1):
    """The Cpus of a freshly booted kernel, every vCPU attached in this process with its
    upcall loop running; the domain is destroyed and the machine audited after."""
    async with Toolstack(server.address, server.admin_token) as xl:
        created = await xl.create_domain(nr_pages=nr_pages, nr_vcpus=nr_vcpus, highmem_pages=highmem_pages)
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            clients = [await stack.enter_async_context(connect(server.address, created.token, v)) for v in range(nr_vcpus)]
            mode = mode_of_start(await clients[0].wait_started())
            await start_of_day(clients[0], mode, "modern", highpte=True)
            cpus = []
            for vcpu, client in enumerate(clients):
                kernel = await attach(client, mode, vcpu)
                await nursery.start(kernel.smp.upcall_loop)
                await kernel.smp.events.local_irq_enable()
                cpus.append(kernel.cpu)
            yield cpus
            nursery.cancel_scope.cancel()
        await xl.destroy_domain(created.domid)
        assert await xl.audit() == []


@pytest.mark.parametrize("high_first", [False, True], ids=["lowmem-first", "highmem-first"])
async def test_a_refill_claims_no_page_of_the_other_zone_in_the_shared_boundary_word(server, high_first):
    """nr_lowmem 1948 is not a multiple of 64: bitmap word 30 holds lowmem pfns 1920..1947 and
    highmem pfns 1948..1983. Emptying both zones, in either order, hands out every free page
    exactly once: a refill of one zone that cleared the other zone's bits of that word lost
    them for good (neither refill returned them)."""
    with trio.fail_after(TIMEOUT):
        async with booted_kernel(server, nr_pages=2048, highmem_pages=100) as (cpu,):
            kl = cpu.kl
            assert kl.nr_lowmem % 64
            zones = {False: range(kl.first_free_pfn, kl.nr_lowmem), True: range(kl.nr_lowmem, kl.nr_pages)}
            got = {}
            for highmem in (high_first, not high_first):
                got[highmem] = await _refill(cpu, highmem, kl.nr_pages)
            assert {h: sorted(pfns) for h, pfns in got.items()} == {h: list(zone) for h, zone in zones.items()}


def test_a_vcpu_short_of_highmem_drains_the_other_pools_instead_of_bugging(server):
    """16 highmem pages for four vCPUs whose pte pages come from highmem: one refill can take
    them all into one CPU's pool. A CPU that finds the bitmap empty asks the others to give
    their pools back (drain_all_pages) and retries, so nobody BUGs while pages are free."""
    domid, run = run_guest(server, 4, "--highpte", "--lifecycles", "6", "--seconds", "60", "--seed", "3", "--migrate", "0.5", nr_pages=4096, highmem_pages=16)
    assert run.bugs == [] and run.returncodes == [0, 0, 0, 0], run.stderr
    assert run.lifecycles >= 4 * 6
    assert sum(r["stats"]["drains"] for r in run.reports) > 0  # the drain ran in real vCPU processes
    assert audit_after_destroy(server, domid) == []


async def test_a_cpu_takes_the_pages_another_cpu_holds_in_its_pool_and_bugs_only_when_none_are_left(server):
    """vCPU 1 holds every free highmem page in its pool. vCPU 0's refill finds the bitmap
    empty, so it IPIs vCPU 1, which gives its pools back, and vCPU 0 gets its page. Once every
    page is taken, vCPU 0's refills find nothing REFILL_TRIES times in a row, draining between
    them, and it BUGs saying so."""
    with trio.fail_after(TIMEOUT):
        async with booted_kernel(server, nr_pages=2048, highmem_pages=40, nr_vcpus=2) as (cpu0, cpu1):
            kl = cpu1.kl
            async with cpu1.irq:
                cpu1.hipool.extend(await _refill(cpu1, True, kl.nr_pages))
                cpu1.pool_dirty = True
                await cpu1.msg().flush()
            assert len(cpu1.hipool) == 40
            async with cpu0.irq:
                (page,) = await alloc_pages(cpu0, 1, highmem=True)
                assert cpu1.hipool == [] and cpu1.pool == [] and cpu0.stats["drains"] == 1
                assert len(cpu0.hipool) == pcp_limits(kl, True)[0] - 1 and page >= kl.nr_lowmem
                rest = await alloc_pages(cpu0, 39, highmem=True)
                assert sorted([page, *rest]) == list(range(kl.nr_lowmem, kl.nr_pages))
                with pytest.raises(KernelBug, match=f"out of highmem: 1 pages wanted, 0 in this CPU's pool, the bitmap empty {REFILL_TRIES} times in a row"):
                    await alloc_pages(cpu0, 1, highmem=True)
                assert cpu0.stats["drains"] == 1 + REFILL_TRIES - 1


def test_a_guest_whose_highmem_is_truly_gone_still_bugs_and_says_so(server):
    """Two highmem pages: the parent's pte page takes one, its child's the other, and the
    child's heap pte page finds none (one vCPU, so the outcome does not depend on timing; the
    drained case is the test above)."""
    domid, run = run_guest(server, 1, "--highpte", "--lifecycles", "2", "--seconds", "60", nr_pages=4096, highmem_pages=2)
    assert len(run.bugs) == 1 and "in alloc_pages: out of highmem: 1 pages wanted, 0 in this CPU's pool" in run.bugs[0], run.bugs
    assert audit_after_destroy(server, domid) == []
