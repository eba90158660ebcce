"""The guest kernel's page allocator (guestlib/kernel/alloc.py) against a real server: vCPU 0
boots the kernel in-process and its refills are driven directly, so a test can look at the
free bitmap around the lowmem/highmem boundary word."""

from contextlib import asynccontextmanager

import pytest
import trio

from guestlib import Toolstack, connect
from guestlib.kernel.alloc import _refill
from guestlib.kernel.boot import attach, start_of_day
from guestlib.paging import mode_of_start

from .domain import TIMEOUT


@asynccontextmanager
async def booted_kernel(server, nr_pages: int, highmem_pages: int):
    """vCPU 0's Cpu in a freshly booted one-vCPU kernel; the domain is destroyed and the
    machine audited after."""
    async with Toolstack(server.address, server.admin_token) as xl:
        created = await xl.create_domain(nr_pages=nr_pages, nr_vcpus=1, highmem_pages=highmem_pages)
        async with connect(server.address, created.token, 0) as client:
            mode = mode_of_start(await client.wait_started())
            await start_of_day(client, mode, "modern", highpte=True)
            yield (await attach(client, mode, 0)).cpu
        await xl.destroy_domain(created.domid)
        assert await xl.audit() == []


@pytest.mark.parametrize("high_first", [False, True], ids=["lowmem-first", "highmem-first"])
async def test_a_refill_claims_no_page_of_the_other_zone_in_the_shared_boundary_word(server, high_first):
    """nr_lowmem 1948 is not a multiple of 64: bitmap word 30 holds lowmem pfns 1920..1947 and
    highmem pfns 1948..1983. Emptying both zones, in either order, hands out every free page
    exactly once: a refill of one zone that cleared the other zone's bits of that word lost
    them for good (neither refill returned them)."""
    with trio.fail_after(TIMEOUT):
        async with booted_kernel(server, nr_pages=2048, highmem_pages=100) as cpu:
            kl = cpu.kl
            assert kl.nr_lowmem % 64
            zones = {False: range(kl.first_free_pfn, kl.nr_lowmem), True: range(kl.nr_lowmem, kl.nr_pages)}
            got = {}
            for highmem in (high_first, not high_first):
                got[highmem] = await _refill(cpu, highmem, kl.nr_pages)
            assert {h: sorted(pfns) for h, pfns in got.items()} == {h: list(zone) for h, zone in zones.items()}
