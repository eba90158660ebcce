"""guestlib's client without a server: what goes on the wire, and how results come back.

The hypervisor is played by FakeSession (tests/guest/fake_xen.py); the end-to-end behaviour
against the real server is in test_end_to_end.py.
"""

import logging

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from guestlib import CallRejected, CallSkipped, HypercallClient, PageFault, XenError, ops, xen_mc_batch
from guestlib.hypercalls import MAX_CALLS_PER_MESSAGE, status_error
from guestlib.xen import PAGE_SHIFT, Errno, MmuextCmd

from .fake_xen import FakeSession, xen_status

PAGE = 0xFFFF880000100000


@pytest.fixture
def xen():
    return FakeSession(mapped={PAGE})


@pytest.fixture
def client(xen):
    return HypercallClient(xen)


def test_xen_error_status_decodes_to_errno_name_and_number_index_and_done():
    error = status_error(xen_status(Errno.EBUSY, "L1 entry 3 of mfn 0x1a2 maps a live L4 writable", "mmu_update", index=1, done=1))
    assert isinstance(error, XenError)
    assert (error.errno, error.errno.name, int(error.errno), error.index, error.done) == (Errno.EBUSY, "EBUSY", 16, 1, 1)
    assert (error.hypercall, error.message) == ("mmu_update", "L1 entry 3 of mfn 0x1a2 maps a live L4 writable")
    assert str(error) == "EBUSY (16): L1 entry 3 of mfn 0x1a2 maps a live L4 writable [mmu_update entry 1, 1 done]"


def test_unbatched_xen_error_has_no_index():
    error = status_error(xen_status(Errno.ENOENT, "dom1 has no vCPU 7", "vcpu_op"))
    assert (error.errno, error.index, error.done, str(error)) == (Errno.ENOENT, None, None, "ENOENT (2): dom1 has no vCPU 7")


def test_malformed_call_status_is_call_rejected_naming_the_field():
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[{"field": "calls[0].load.size", "description": "must be 1, 2, 4 or 8"}]))
    error = status_error(status_pb2.Status(code=3, message="bad call", details=[detail]))
    assert isinstance(error, CallRejected) and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "calls[0].load.size: must be 1, 2, 4 or 8" in str(error)


def test_mmuext_helpers_carry_xen_numbers_plus_one_and_leave_foreigndom_unset():
    for op, cmd, arg1, arg2 in [
        (ops.pin_table(4, 0x1A2), MmuextCmd.PIN_L4_TABLE, 0x1A2, 0),
        (ops.pin_table(1, 0x1A3), MmuextCmd.PIN_L1_TABLE, 0x1A3, 0),
        (ops.unpin_table(0x1A2), MmuextCmd.UNPIN_TABLE, 0x1A2, 0),
        (ops.new_user_baseptr(0), MmuextCmd.NEW_USER_BASEPTR, 0, 0),
        (ops.invlpg_multi(0x400000, PAGE), MmuextCmd.INVLPG_MULTI, 0x400000, PAGE),
        (ops.copy_page(5, 6), MmuextCmd.COPY_PAGE, 5, 6),
    ]:
        (wire,) = op.call().mmuext_op.ops
        assert (wire.cmd, wire.arg1, wire.arg2) == (cmd + 1, arg1, arg2)
        assert not op.request.HasField("foreigndom")  # DOMID_SELF


async def test_one_call_is_one_message_and_returns_its_value(client, xen):
    xen.answers["mmu_update"] = lambda r: {"done": len(r.reqs)}
    reqs = [((0x1A2 << PAGE_SHIFT) + 8 * i, i << PAGE_SHIFT | 0x67) for i in range(3)]
    assert await client.mmu_update(reqs, foreigndom=5) == 3
    ((call,),) = xen.messages
    assert [(r.ptr, r.val) for r in call.mmu_update.reqs] == reqs and call.mmu_update.foreigndom == 5


async def test_xen_error_raises_and_page_fault_is_a_value(client, xen):
    xen.answers["mmuext_op"] = lambda r: xen_status(Errno.EINVAL, "mfn 0x5 is not pinned", "mmuext_op", index=0, done=0)
    with pytest.raises(XenError) as caught:
        await client.unpin_table(5)
    assert (caught.value.errno, caught.value.index, caught.value.done) == (Errno.EINVAL, 0, 0)
    assert await client.load(0x1000) == PageFault(0x1000, 0, "not mapped")
    assert await client.store(PAGE + 8, 0xABCD) is None
    assert await client.load(PAGE + 8) == 0xABCD


async def test_batch_sends_every_call_in_one_message_in_order(client, xen):
    xen.poke(PAGE, 41)
    async with client.batch() as b:
        old = b.atomic("fetch_add", PAGE, 1)
        new = b.load(PAGE)
        b.write(PAGE + 16, b"ack")
        data = b.read(PAGE + 16, 3)
        echo = b.echo(b"x")
        with pytest.raises(RuntimeError, match="not been issued"):
            old.result()
    assert len(xen.messages) == 1 and [c.WhichOneof("call") for c in xen.messages[0]] == ["atomic", "load", "write", "read", "echo"]
    assert (old.result(), new.result(), data.result(), echo.result()) == (41, 42, b"ack", b"x")


async def test_batch_stop_on_error_skips_the_calls_after_a_fault(client, xen):
    async with client.batch(stop_on_error=True) as b:
        first = b.store(PAGE, 1)
        fault = b.store(0x2000, 2)
        skipped = b.store(PAGE + 8, 3)
    assert first.result() is None and isinstance(fault.result(), PageFault)
    with pytest.raises(CallSkipped):
        skipped.result()
    assert xen.peek(PAGE + 8) == 0


async def test_batch_that_raises_sends_nothing(client, xen):
    with pytest.raises(ValueError):
        async with client.batch() as b:
            b.store(PAGE, 1)
            raise ValueError
    assert xen.messages == []


async def test_submit_splits_at_the_per_message_limit(client, xen):
    results = await client.submit([ops.load(PAGE) for _ in range(MAX_CALLS_PER_MESSAGE + 1)])
    assert [len(m) for m in xen.messages] == [MAX_CALLS_PER_MESSAGE, 1]
    assert [r.result() for r in results] == [0] * (MAX_CALLS_PER_MESSAGE + 1)


async def test_submit_stop_on_error_does_not_send_later_messages(client, xen):
    results = await client.submit([ops.load(0x3000)] + [ops.load(PAGE)] * MAX_CALLS_PER_MESSAGE, stop_on_error=True)
    assert len(xen.messages) == 1 and isinstance(results[0].result(), PageFault)
    assert all(isinstance(r.exception(), CallSkipped) for r in results[1:])


async def test_mc_batch_is_one_multicall_and_runs_callbacks_after_it_in_order(client, xen, caplog):
    def mmuext(request):
        if request.ops[0].arg1 == 0xBAD:
            return xen_status(Errno.EINVAL, "mfn 0xbad is not owned by dom1", "mmuext_op", index=0, done=0)
        return {"done": 1}

    xen.answers["mmuext_op"] = mmuext
    xen.answers["event_channel_op"] = lambda r: {"port": 7}
    seen = []
    with caplog.at_level(logging.WARNING, logger="guestlib.multicall"):
        async with xen_mc_batch(client) as mc:
            pin = mc.pin_table(4, 0x1A2)
            mc.callback(lambda p: seen.append(("pinned", p.result())), pin)
            bad = mc.pin_table(4, 0xBAD)
            port = mc.evtchn_bind_ipi(1)
            mc.callback(lambda: seen.append(("port", port.result())))
            assert seen == []
    ((call,),) = xen.messages
    assert [e.WhichOneof("call") for e in call.multicall.entries] == ["mmuext_op", "mmuext_op", "event_channel_op"]
    assert seen == [("pinned", 1), ("port", 7)]
    assert bad.exception().errno == Errno.EINVAL
    assert "1 of 3 multicall entries failed" in caplog.text


async def test_mc_batch_refuses_memory_accesses(client):
    async with xen_mc_batch(client) as mc:
        with pytest.raises(TypeError, match="load cannot be a multicall entry"):
            mc.load(PAGE)


async def test_multicall_value_is_one_resolved_pending_per_entry(client, xen):
    xen.answers["xen_version"] = lambda r: {"major": 4, "minor": 19}
    entries = await client.multicall([ops.xen_version(), ops.sched_yield()])
    assert (entries[0].result().major, entries[1].result()) == (4, None)
