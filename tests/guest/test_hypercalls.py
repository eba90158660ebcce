"""guestlib's client against the real server: what goes on the wire, and how results come back.

Each test boots a domain on a server subprocess (tests/guest/domain.py) and drives vCPU 0's
HypercallClient in-process over its real Session. Round trips are counted by `Exchanges`,
which records every message the client's Session sends and the server's answer to it.
"""

import logging

import grpc
import pytest
import trio
from google.rpc import error_details_pb2

from guestlib import CallRejected, CallSkipped, PageFault, XenError, ops, xen_mc_batch
from guestlib.hypercalls import MAX_CALLS_PER_MESSAGE, status_error
from guestlib.xen import DOMID_SELF, PAGE_OFFSET, PAGE_SHIFT, VIRQ_TIMER, Errno, MmuextCmd
from xensim.v1 import common_pb2

from .domain import TIMEOUT, USER_VA, boot


def error_info(status) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of a google.rpc.Status as the server sent it."""
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


async def test_xen_error_status_decodes_to_errno_name_and_number_index_and_done(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            layout, start_info = guest.layout, guest.start_info
            scratch = layout.alloc()
            # Entry 0 writes plain memory; entry 1 maps the live boot L4 writable: Xen's EBUSY.
            boot_l4_pfn = (start_info.pt_base - PAGE_OFFSET) >> PAGE_SHIFT
            guest.sent.clear()
            with pytest.raises(XenError) as caught:
                await guest.xen.mmu_update([((layout.mfn(scratch) << PAGE_SHIFT) + 8, 0x5A), layout.remap(boot_l4_pfn, True)])
            error = caught.value
            assert (error.errno, error.errno.name, int(error.errno), error.index, error.done) == (Errno.EBUSY, "EBUSY", 16, 1, 1)
            assert error.hypercall == "mmu_update" and f"mfn {start_info.pt_base_mfn:#x}" in error.message and "writable" in error.message
            assert str(error) == f"EBUSY (16): {error.message} [mmu_update entry 1, 1 done]"
            # The decoding matches the status the server put on the wire.
            ((result,),) = [m.response.results for m in guest.sent.messages]
            assert result.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert result.status.message == f"EBUSY (16): {error.message}"
            info = error_info(result.status)
            assert (info.domain, info.reason, dict(info.metadata)) == ("xen", "EBUSY", {"errno": "16", "hypercall": "mmu_update", "index": "1", "done": "1"})
            assert status_error(result.status).args == error.args
            assert await guest.xen.load(layout.direct_va(scratch) + 8) == 0x5A  # entry 0 stayed done


async def test_unbatched_xen_error_has_no_index(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server, nr_vcpus=2) as guest:
            with pytest.raises(XenError) as caught:
                await guest.xen.vcpu_is_up(7)
            error = caught.value
            assert (error.errno, error.index, error.done, error.hypercall) == (Errno.ENOENT, None, None, "vcpu_op")
            assert error.message == f"dom{guest.created.domid} has no vCPU 7"
            assert str(error) == f"ENOENT (2): dom{guest.created.domid} has no vCPU 7"
            # A batch refused before its first entry: Xen's done count (0) but no failing entry.
            with pytest.raises(XenError) as caught:
                await guest.xen.mmu_update([((guest.mfn_of(guest.page()) << PAGE_SHIFT), 1)], foreigndom=guest.created.domid)
            error = caught.value
            assert (error.errno, error.index, error.done, error.hypercall) == (Errno.ESRCH, None, 0, "mmu_update")
            assert str(error) == f"ESRCH (3): {error.message}" and "DOMID_SELF" in error.message


async def test_malformed_call_status_is_call_rejected_naming_the_field(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            with pytest.raises(CallRejected) as caught:
                await guest.xen.load(page, size=3)
            error = caught.value
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "calls[0].load.size: 3 is not 1, 2, 4 or 8" in str(error)
            async with guest.xen.batch() as b:  # the field path names the call's index
                fine = b.load(page)
                bad = b.store(page + 1, 1, size=4)
            assert fine.result() == 0 and isinstance(bad.exception(), CallRejected)
            assert "calls[1].store.va" in str(bad.exception())


async def test_mmuext_helpers_carry_xen_numbers_plus_one_and_leave_foreigndom_unset(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            xen, layout = guest.xen, guest.layout
            tree = await guest.process_pgd()
            l4, l1 = tree["l4"], layout.mfn(tree["pfns"][3])
            src, dst, mask = guest.page(), guest.page(), guest.page()
            assert await xen.write(src, b"copied") is None
            assert await xen.store(mask, 1) is None  # a vCPU bitmap naming vCPU 0
            table = [
                (ops.pin_table(4, l4), MmuextCmd.PIN_L4_TABLE, l4, 0),
                (ops.pin_table(1, l1), MmuextCmd.PIN_L1_TABLE, l1, 0),
                (ops.unpin_table(l4), MmuextCmd.UNPIN_TABLE, l4, 0),
                (ops.new_user_baseptr(0), MmuextCmd.NEW_USER_BASEPTR, 0, 0),
                (ops.invlpg_multi(USER_VA, mask), MmuextCmd.INVLPG_MULTI, USER_VA, mask),
                (ops.copy_page(guest.mfn_of(dst), guest.mfn_of(src)), MmuextCmd.COPY_PAGE, guest.mfn_of(dst), guest.mfn_of(src)),
            ]
            guest.sent.clear()
            results = await xen.submit([op for op, *_ in table], stop_on_error=True)
            assert [r.result() for r in results] == [1] * len(table)  # Xen's done count each
            (message,) = guest.sent.messages
            for call, (op, cmd, arg1, arg2) in zip(message.calls, table, strict=True):
                (wire,) = call.mmuext_op.ops
                assert (wire.cmd, wire.arg1, wire.arg2) == (cmd + 1, arg1, arg2)
                assert not call.mmuext_op.HasField("foreigndom") and not op.request.HasField("foreigndom")  # DOMID_SELF
            # What the server made of them: each command and argument reached the right op.
            (l4_frame,) = await guest.xl.frame_info(l4)
            (l1_frame,) = await guest.xl.frame_info(l1)
            assert not l4_frame.pinned and (l1_frame.pinned, l1_frame.type) == (True, common_pb2.PAGE_TYPE_L1)
            assert await xen.read(dst, 6) == b"copied"  # arg1 is the destination
            with pytest.raises(XenError) as caught:  # the caller's own domid is not DOMID_SELF
                await xen.mmuext_op([(MmuextCmd.TLB_FLUSH_LOCAL,)], foreigndom=guest.created.domid)
            assert caught.value.errno == Errno.ESRCH


async def test_one_call_is_one_message_and_returns_its_value(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            table = guest.layout.alloc()
            reqs = [((guest.layout.mfn(table) << PAGE_SHIFT) + 8 * i, i << PAGE_SHIFT | 0x67) for i in range(3)]
            guest.sent.clear()
            assert await guest.xen.mmu_update(reqs, foreigndom=DOMID_SELF) == 3
            ((call,),) = [m.calls for m in guest.sent.messages]
            assert [(r.ptr, r.val) for r in call.mmu_update.reqs] == reqs and call.mmu_update.foreigndom == DOMID_SELF
            for i in range(3):
                assert await guest.xen.load(guest.layout.direct_va(table) + 8 * i) == i << PAGE_SHIFT | 0x67

            # foreigndom reaches Xen: another domain's frames are refused to an unprivileged caller.
            other = await guest.xl.create_domain(nr_pages=256)
            guest.sent.clear()
            with pytest.raises(XenError) as caught:
                await guest.xen.mmu_update(reqs, foreigndom=other.domid)
            assert (caught.value.errno, caught.value.index, caught.value.done) == (Errno.EPERM, 0, 0)
            assert f"dom{other.domid}" in caught.value.message
            ((call,),) = [m.calls for m in guest.sent.messages]
            assert call.mmu_update.foreigndom == other.domid
            assert await guest.xl.destroy_domain(other.domid) == 257


async def test_xen_error_raises_and_page_fault_is_a_value(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            xen, page = guest.xen, guest.page()
            with pytest.raises(XenError) as caught:
                await xen.unpin_table(guest.mfn_of(page))
            assert (caught.value.errno, caught.value.index, caught.value.done) == (Errno.EINVAL, 0, 0)
            assert "is not pinned" in caught.value.message
            fault = await xen.load(0x1000)
            assert fault == PageFault(0x1000, 0, fault.detail) and "not present" in fault.detail
            write_fault = await xen.store(0x2000, 1)
            assert isinstance(write_fault, PageFault) and (write_fault.address, write_fault.error_code) == (0x2000, 2)
            assert await xen.store(page + 8, 0xABCD) is None
            assert await xen.load(page + 8) == 0xABCD


async def test_batch_sends_every_call_in_one_message_in_order(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            assert await guest.xen.store(page, 41) is None
            guest.sent.clear()
            async with guest.xen.batch() as b:
                old = b.atomic("fetch_add", page, 1)
                new = b.load(page)
                b.write(page + 16, b"ack")
                data = b.read(page + 16, 3)
                echo = b.echo(b"x")
                with pytest.raises(RuntimeError, match="not been issued"):
                    old.result()
            (message,) = guest.sent.messages
            assert message.kinds == ["atomic", "load", "write", "read", "echo"] and not message.stop_on_error
            assert (old.result(), new.result(), data.result(), echo.result()) == (41, 42, b"ack", b"x")


async def test_batch_stop_on_error_skips_the_calls_after_a_fault(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            assert await guest.xen.store(page + 8, 0x5E) is None
            guest.sent.clear()
            async with guest.xen.batch(stop_on_error=True) as b:
                first = b.store(page, 1)
                fault = b.store(0x2000, 2)
                skipped = b.store(page + 8, 3)
            assert first.result() is None and isinstance(fault.result(), PageFault) and fault.result().address == 0x2000
            with pytest.raises(CallSkipped):
                skipped.result()
            (message,) = guest.sent.messages
            assert message.stop_on_error and len(message.calls) == 3 and len(message.response.results) == 2  # Xen stopped
            assert (await guest.xen.load(page), await guest.xen.load(page + 8)) == (1, 0x5E)


async def test_batch_that_raises_sends_nothing(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            assert await guest.xen.store(page, 0x5E) is None
            guest.sent.clear()
            before = await guest.xl.stats()
            with pytest.raises(ValueError):
                async with guest.xen.batch() as b:
                    b.store(page, 1)
                    raise ValueError
            assert guest.sent.messages == []
            assert (await guest.xl.stats()).get(("store", "ok"), 0) == before.get(("store", "ok"), 0)
            assert await guest.xen.load(page) == 0x5E


async def test_submit_splits_at_the_per_message_limit(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            assert await guest.xen.store(page, 7) is None
            guest.sent.clear()
            results = await guest.xen.submit([ops.load(page) for _ in range(MAX_CALLS_PER_MESSAGE + 1)])
            assert [len(m.calls) for m in guest.sent.messages] == [MAX_CALLS_PER_MESSAGE, 1]
            assert [len(m.response.results) for m in guest.sent.messages] == [MAX_CALLS_PER_MESSAGE, 1]
            assert [r.result() for r in results] == [7] * (MAX_CALLS_PER_MESSAGE + 1)


async def test_submit_stop_on_error_does_not_send_later_messages(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            page = guest.page()
            guest.sent.clear()
            results = await guest.xen.submit([ops.load(0x3000)] + [ops.load(page)] * MAX_CALLS_PER_MESSAGE, stop_on_error=True)
            (message,) = guest.sent.messages
            assert len(message.calls) == MAX_CALLS_PER_MESSAGE and len(message.response.results) == 1
            assert isinstance(results[0].result(), PageFault) and results[0].result().address == 0x3000
            assert all(isinstance(r.exception(), CallSkipped) for r in results[1:])


async def test_mc_batch_is_one_multicall_and_runs_callbacks_after_it_in_order(server, caplog):
    with trio.fail_after(TIMEOUT):
        async with boot(server, nr_vcpus=2) as guest:
            tree = await guest.process_pgd()
            other = await guest.xl.create_domain(nr_pages=256)
            foreign_l4 = other.start_info.pt_base_mfn
            before = await guest.xl.stats()
            guest.sent.clear()
            seen = []
            with caplog.at_level(logging.WARNING, logger="guestlib.multicall"):
                async with xen_mc_batch(guest.xen) as mc:
                    pin = mc.pin_table(4, tree["l4"])
                    mc.callback(lambda p: seen.append(("pinned", p.result())), pin)
                    bad = mc.pin_table(4, foreign_l4)
                    port = mc.evtchn_bind_ipi(1)
                    mc.callback(lambda: seen.append(("port", port.result())))
                    assert seen == []
            ((call,),) = [m.calls for m in guest.sent.messages]
            assert [e.WhichOneof("call") for e in call.multicall.entries] == ["mmuext_op", "mmuext_op", "event_channel_op"]
            assert seen == [("pinned", 1), ("port", 1)]  # port 0 is reserved: the first is 1
            assert bad.exception().errno == Errno.EINVAL and f"owned by dom{other.domid}" in bad.exception().message
            assert "1 of 3 multicall entries failed" in caplog.text
            after = await guest.xl.stats()
            assert after[("multicall", "ok")] - before.get(("multicall", "ok"), 0) == 1
            (l4,) = await guest.xl.frame_info(tree["l4"])
            assert (l4.pinned, l4.type) == (True, common_pb2.PAGE_TYPE_L4)
            (status,) = [p for p in await guest.xl.event_channel_status(guest.created.domid) if p.port == 1]
            assert (status.status.state, status.status.vcpu) == (common_pb2.EVTCHN_STAT_IPI, 1)
            assert await guest.xl.destroy_domain(other.domid) == 257


async def test_mc_batch_refuses_memory_accesses(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            guest.sent.clear()
            async with xen_mc_batch(guest.xen) as mc:
                with pytest.raises(TypeError, match="load cannot be a multicall entry"):
                    mc.load(guest.page())
            assert guest.sent.messages == []  # nothing was queued, so nothing was sent


async def test_multicall_value_is_one_resolved_pending_per_entry(server):
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            version = await guest.xen.xen_version()
            guest.sent.clear()
            entries = await guest.xen.multicall([ops.xen_version(), ops.sched_yield()])
            assert (entries[0].result().major, entries[0].result().minor, entries[1].result()) == (4, version.minor, None)
            assert entries[0].result() == version
            ((call,),) = [m.calls for m in guest.sent.messages]
            assert [e.WhichOneof("call") for e in call.multicall.entries] == ["xen_version", "sched_op"]


async def test_the_client_knows_xens_time_and_names_absolute_deadlines_in_it(server):
    """system_time_ns follows the hypervisor's messages; sched_poll, set_timer_op and the
    single-shot timer take absolute deadlines in it, as in Xen."""
    wait = 200_000_000
    with trio.fail_after(TIMEOUT):
        async with boot(server) as guest:
            xen = guest.xen
            await xen.vcpu_stop_periodic_timer(0)  # as Linux at boot: no 10 ms ticks
            timer = await xen.evtchn_bind_virq(VIRQ_TIMER, 0)  # never pending: only timeouts end a poll
            before = xen.system_time_ns
            await xen.sched_poll([timer], before + wait)
            assert xen.system_time_ns >= before + wait
            now = xen.system_time_ns
            await xen.sched_poll([timer], now - 1)  # already past: at once
            assert xen.system_time_ns < now + wait
            await xen.vcpu_set_singleshot_timer(0, xen.system_time_ns + wait)
            await xen.vcpu_stop_singleshot_timer(0)
            await xen.set_timer_op(xen.system_time_ns - 1)  # already past: VIRQ_TIMER at once
            now = xen.system_time_ns
            await xen.sched_poll([timer], now + 50 * wait)  # the port is pending: at once
            assert xen.system_time_ns < now + wait
