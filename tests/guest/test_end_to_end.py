"""guestlib against the real hypervisor: a server subprocess, and each vCPU its own process.

The test plays the guest kernel's brain (tests/guest/layout.py) and steps each vCPU process
explicitly (tests/guest/vcpus.py), so every cross-vCPU interleaving is the one written here.
"""

import pytest
import trio

from guestlib import CallSkipped, PageFault, SessionClosed, Toolstack, XenError, connect, ops, xen_mc_batch
from guestlib.layout import BootLayout
from guestlib.xen import PAGE_SHIFT, UVMF_ALL, UVMF_INVLPG, Errno
from xensim.v1 import common_pb2

from .layout import RW, A, D, P, new_pgd, read_layout
from .vcpus import spawn_vcpu

TIMEOUT = 60
USER_VA = 0x400000


def values(results: list[dict]) -> list:
    """The values of a worker's submit, raising the first error."""
    for result in results:
        assert "value" in result, result
    return [result["value"] for result in results]


async def boot(xl: Toolstack, nursery, address: str, nr_vcpus: int = 2):
    """A domain with a process per vCPU, vCPU 0 started, and the kernel's layout read."""
    created = await xl.create_domain(nr_pages=2048, nr_vcpus=nr_vcpus)
    vcpus = [await spawn_vcpu(nursery, address, created.token, i) for i in range(nr_vcpus)]
    started = await vcpus[0].do("wait_started")
    assert int(started["start_info"]["pt_base_mfn"]) == created.start_info.pt_base_mfn
    return created, vcpus, await read_layout(vcpus[0], created.start_info)


async def bring_up(vcpus, start_info, vcpu: int) -> None:
    """VCPUOP_initialise + VCPUOP_up from vCPU 0 (one message), then the target starts."""
    values(await vcpus[0].submit([("vcpu_initialise", vcpu, start_info.pt_base_mfn), ("vcpu_up", vcpu)], stop_on_error=True))
    await vcpus[vcpu].do("wait_started")


async def shut_down(xl: Toolstack, created, vcpus) -> None:
    """Stop the vCPU processes, destroy the domain, and check the machine audits clean."""
    for vcpu in vcpus:
        await vcpu.close()
    assert await xl.audit() == []
    assert await xl.destroy_domain(created.domid) == created.start_info.nr_pages + 1  # + shared info
    assert await xl.audit() == []


async def test_unpin_while_vcpu1_runs_on_the_table_then_rw_remap_is_ebusy_until_it_switches(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl, trio.open_nursery() as nursery:
            created, (vcpu0, vcpu1), layout = await boot(xl, nursery, server.address)
            start_info = created.start_info
            kernel_l4 = bytes.fromhex((await vcpu0.call("read", start_info.pt_base, 4096))["bytes"])
            tree = new_pgd(layout, kernel_l4, USER_VA, layout.alloc())
            # pgd_alloc + xen_pgd_pin in one message: fill, map the tables read-only, pin.
            filled, readonly, pinned = values(
                await vcpu0.submit(
                    [("mmu_update", tree["fill"]), ("mmu_update", [layout.remap(pfn, False) for pfn in tree["pfns"]]), ("pin_table", 4, tree["l4"])],
                    stop_on_error=True,
                )
            )
            assert (filled, readonly, pinned) == (len(tree["fill"]), 4, 1)

            await bring_up([vcpu0, vcpu1], start_info, 1)
            assert await vcpu1.call("new_baseptr", tree["l4"]) == 1  # vCPU 1 runs on the tree (lazy TLB)
            assert await vcpu0.call("unpin_table", tree["l4"]) == 1  # exit_mmap without drop_mm_ref
            (l4,) = await xl.frame_info(tree["l4"])
            assert (l4.pinned, l4.validated, l4.type_count) == (False, True, 1)

            scratch = layout.alloc()
            remap = layout.remap(tree["pfns"][0], True)
            with pytest.raises(XenError) as caught:
                await vcpu0.call("mmu_update", [((layout.mfn(scratch) << PAGE_SHIFT) + 8, 0x5A), remap])
            error = caught.value
            assert (error.errno, error.errno.name, int(error.errno), error.index, error.done) == (Errno.EBUSY, "EBUSY", 16, 1, 1)
            assert error.hypercall == "mmu_update" and error.message
            assert await vcpu0.call("load", layout.direct_va(scratch) + 8) == 0x5A  # entry 0 stayed done

            assert await vcpu1.call("new_baseptr", start_info.pt_base_mfn) == 1  # vCPU 1 switches away
            assert await vcpu0.call("mmu_update", [layout.remap(pfn, True) for pfn in tree["pfns"]]) == 4
            (l4,) = await xl.frame_info(tree["l4"])
            assert (l4.type, l4.pinned, l4.type_count) == (common_pb2.PAGE_TYPE_WRITABLE, False, 1)  # the direct map's RW mapping
            await shut_down(xl, created, [vcpu0, vcpu1])


async def test_ipi_from_vcpu0_runs_vcpu1s_handler_whose_ack_vcpu0_sees(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl, trio.open_nursery() as nursery:
            created, (vcpu0, vcpu1), layout = await boot(xl, nursery, server.address)
            # Map shared info where the kernel wants it (Linux: set_fixmap, whose set_pte is an
            # mmu_update of the kernel L1 entry), for every vCPU: they share the kernel half.
            slot = layout.alloc()
            shared_info_va = layout.direct_va(slot)
            assert await vcpu0.call("mmu_update", [(layout.direct_entry(slot), created.start_info.shared_info | P | RW | A | D)]) == 1
            ack_va = layout.direct_va(layout.alloc())

            await bring_up([vcpu0, vcpu1], created.start_info, 1)
            port = await vcpu1.call("evtchn_bind_ipi", 1)  # bind_ipi_to_irqhandler(.., cpu 1)
            await vcpu1.do("events", shared_info_va=shared_info_va)
            await vcpu1.do("bind_ack", port=port, ack_va=ack_va)

            for sent in (1, 2):
                assert await vcpu0.call("evtchn_send", port) is None  # xen_send_IPI_one
                assert await vcpu0.do("wait_value", va=ack_va, value=sent) == sent
            assert await vcpu1.do("handled") == [port, port]
            (status,) = [p for p in await xl.event_channel_status(created.domid) if p.port == port]
            assert (status.status.state, status.status.vcpu, status.pending, status.masked) == (common_pb2.EVTCHN_STAT_IPI, 1, False, False)
            (info,) = await xl.vcpu_info(created.domid, 1)
            assert (info.upcall_pending, info.upcall_mask) == (False, False)
            await shut_down(xl, created, [vcpu0, vcpu1])


async def test_update_va_mapping_remaps_a_kernel_page_and_the_load_sees_it(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=2048)
            async with connect(server.address, created.token, 0) as xen:
                await xen.wait_started()
                layout = await BootLayout.read(xen, created.start_info)
                va, target = layout.direct_va(layout.alloc()), layout.alloc()
                assert await xen.store(layout.direct_va(target), 0xFEED) is None
                _, pte = layout.remap(target, writable=True)
                assert await xen.update_va_mapping(va, pte, UVMF_INVLPG | UVMF_ALL) is None
                assert await xen.load(va) == 0xFEED
            await xl.destroy_domain(created.domid)
            assert await xl.audit() == []


async def test_destroying_the_domain_fails_a_blocked_vcpus_call_with_session_closed(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl, trio.open_nursery() as nursery:
            created, (vcpu0, vcpu1), _ = await boot(xl, nursery, server.address)
            await bring_up([vcpu0, vcpu1], created.start_info, 1)
            await vcpu1.send(call="sched_block", args=[], kwargs={})
            while not (await xl.vcpu_info(created.domid, 1))[0].blocked:  # a barrier, not a race
                await trio.sleep(0.01)
            await xl.destroy_domain(created.domid)
            with pytest.raises(SessionClosed, match="ABORTED"):
                await vcpu1.reply()
            with pytest.raises(SessionClosed, match="ABORTED"):
                await vcpu0.call("xen_version")
            for vcpu in (vcpu0, vcpu1):
                await vcpu.close()
            assert await xl.audit() == []


async def test_batch_stop_on_error_stops_at_a_xen_error_or_a_page_fault(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=2048)
            start_info = created.start_info
            va = start_info.page_offset + (start_info.first_free_pfn << PAGE_SHIFT)
            not_pinned = start_info.shared_info >> PAGE_SHIFT
            async with connect(server.address, created.token, 0) as xen:
                await xen.wait_started()
                stopped = await xen.submit([ops.store(va, 1), ops.unpin_table(not_pinned), ops.store(va, 2)], stop_on_error=True)
                assert stopped[0].result() is None and stopped[1].exception().errno == Errno.EINVAL
                with pytest.raises(CallSkipped):
                    stopped[2].result()
                assert await xen.load(va) == 1

                async with xen.batch() as b:  # without stop_on_error every call runs
                    b.unpin_table(not_pinned)
                    stored = b.store(va, 2)
                    loaded = b.load(va)
                assert (stored.result(), loaded.result()) == (None, 2)

                async with xen.batch(stop_on_error=True) as b:
                    fault = b.load(USER_VA)  # nothing is mapped in the user half
                    skipped = b.store(va, 3)
                assert isinstance(fault.result(), PageFault) and fault.result().address == USER_VA
                assert isinstance(skipped.exception(), CallSkipped) and await xen.load(va) == 2
            await xl.destroy_domain(created.domid)
            assert await xl.audit() == []


async def test_mc_batch_issues_one_multicall_and_runs_callbacks_with_each_result(server):
    with trio.fail_after(TIMEOUT):
        async with Toolstack(server.address, server.admin_token) as xl:
            created = await xl.create_domain(nr_pages=2048)
            not_pinned = created.start_info.shared_info >> PAGE_SHIFT
            async with connect(server.address, created.token, 0) as xen:
                await xen.wait_started()
                before = await xl.stats()
                seen = []
                async with xen_mc_batch(xen) as mc:
                    for entry in (mc.tlb_flush_local(), mc.unpin_table(not_pinned), mc.xen_version()):
                        mc.callback(lambda e: seen.append(e.exception() or e.result()), entry)
                flushed, refused, version = seen
                assert flushed == 1 and isinstance(refused, XenError) and refused.errno == Errno.EINVAL
                assert version.pagesize == 4096
                after = await xl.stats()
                assert after[("multicall", "ok")] - before.get(("multicall", "ok"), 0) == 1
            await xl.destroy_domain(created.domid)
