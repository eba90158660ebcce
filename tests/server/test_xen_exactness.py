"""Where Xen judges a call itself, the wire lets the call reach it: empty batches, command
numbers Xen does not know, and what a failed validation leaves in the frame table, as
do_mmu_update, do_mmuext_op, do_multicall, do_event_channel_op, do_vcpu_op, do_sched_op and
validate_page (xen/arch/x86/mm.c) answer them."""

import grpc
import pytest

from xensim.v1 import common_pb2, toolstack_pb2
from xensim.v1 import hypercalls_pb2 as h

from .helpers import RW, US, A, P, SessionClient, WireGuest, error_info, field_violation, status_of

pytestmark = pytest.mark.timeout(60)

NOP = h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_TLB_FLUSH_LOCAL)
PSE = 0x80  # an L1 flag Xen refuses (L1_DISALLOW_MASK)


def xen_error(call) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), dict(error_info(status_of(caught.value)).metadata)


def test_batches_with_no_entries_are_done_0_as_xens_loops_do_not_run(server):
    guest = WireGuest(server)
    assert guest.call("MmuUpdate", h.MmuUpdateRequest()) == h.MmuUpdateResponse(done=0)
    assert guest.call("MmuextOp", h.MmuextOpRequest()) == h.MmuextOpResponse(done=0)
    assert guest.call("Multicall", h.MulticallRequest()) == h.MulticallResponse()

    empty = h.MulticallRequest(entries=[h.MulticallEntry(mmu_update=h.MmuUpdateRequest()), h.MulticallEntry(mmuext_op=h.MmuextOpRequest())])
    results = guest.call("Multicall", empty).results
    assert [r.WhichOneof("result") for r in results] == ["mmu_update", "mmuext_op"]
    assert (results[0].mmu_update.done, results[1].mmuext_op.done) == (0, 0)

    session = SessionClient(guest.hc, guest.md(0))
    session.send(1, h.Call(mmuext_op=h.MmuextOpRequest()), h.Call(multicall=h.MulticallRequest()))
    answer = session.answer()
    assert answer.results[0].HasField("mmuext_op") and answer.results[1].HasField("multicall")
    session.close()


def test_an_empty_batch_still_checks_its_foreign_domain_first(server):
    """get_pg_owner runs before the loop: naming oneself by number is ESRCH with no entries too."""
    guest = WireGuest(server)
    code, info = xen_error(lambda: guest.call("MmuextOp", h.MmuextOpRequest(foreigndom=guest.domid)))
    assert code == grpc.StatusCode.NOT_FOUND and info == {"errno": "3", "hypercall": "mmuext_op", "done": "0"}  # no entry failed
    code, info = xen_error(lambda: guest.call("MmuUpdate", h.MmuUpdateRequest(foreigndom=guest.domid)))
    assert code == grpc.StatusCode.NOT_FOUND and info["done"] == "0"


@pytest.mark.parametrize("xen_cmd", [14, 99])
def test_unknown_mmuext_command_mid_batch_is_enosys_and_the_ops_before_it_stay_done(server, xen_cmd):
    guest = WireGuest(server)
    pfn, l1 = guest.alloc()
    guest.make_readonly(pfn, l1)
    ops = [h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_PIN_L1_TABLE, arg1=l1), h.MmuextOp(cmd=xen_cmd + 1), NOP]

    code, info = xen_error(lambda: guest.call("MmuextOp", h.MmuextOpRequest(ops=ops)))

    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert info == {"errno": "38", "hypercall": "mmuext_op", "index": "1", "done": "1"}
    assert guest.frame(l1).pinned  # the op before it was committed


def test_unknown_mmuext_command_in_a_multicall_entry_is_that_entrys_enosys(server):
    guest = WireGuest(server)
    entry = h.MulticallEntry(mmuext_op=h.MmuextOpRequest(ops=[NOP, h.MmuextOp(cmd=100)]))
    (result,) = guest.call("Multicall", h.MulticallRequest(entries=[entry])).results
    assert dict(error_info(result.status).metadata) == {"errno": "38", "hypercall": "mmuext_op", "index": "1", "done": "1"}


def test_unknown_shutdown_reason_is_kept_as_xen_keeps_it(server):
    """do_sched_op passes any reason to domain_shutdown (its low byte); the proto carries Xen's + 1."""
    guest = WireGuest(server)
    guest.call("SchedOp", h.SchedOpRequest(shutdown=h.SchedShutdown(reason=100)))
    domain = guest.toolstack("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=guest.domid)).domain
    assert domain.shutdown_reason == 100


@pytest.mark.parametrize("rpc, request_, hypercall", [
    ("EventChannelOp", h.EventChannelOpRequest(cmd=99), "event_channel_op"),
    ("VcpuOp", h.VcpuOpRequest(vcpuid=1, cmd=99), "vcpu_op"),
    ("SchedOp", h.SchedOpRequest(cmd=99), "sched_op"),
])
def test_an_op_number_xen_does_not_know_is_enosys(server, rpc, request_, hypercall):
    guest = WireGuest(server)
    code, info = xen_error(lambda: guest.call(rpc, request_))
    assert code == grpc.StatusCode.UNIMPLEMENTED and info == {"errno": "38", "hypercall": hypercall}


def test_vcpu_op_checks_the_vcpu_before_the_command(server):
    guest = WireGuest(server)
    code, info = xen_error(lambda: guest.call("VcpuOp", h.VcpuOpRequest(vcpuid=7, cmd=99)))
    assert code == grpc.StatusCode.NOT_FOUND and info["errno"] == "2"


@pytest.mark.parametrize("rpc, request_, case", [
    ("EventChannelOp", h.EventChannelOpRequest(cmd=4), "send"),
    ("VcpuOp", h.VcpuOpRequest(vcpuid=0, cmd=3), "is_up"),
    ("SchedOp", h.SchedOpRequest(cmd=0), "sched_yield"),
])
def test_an_op_number_with_a_case_of_its_own_must_use_it(server, rpc, request_, case):
    guest = WireGuest(server)
    with pytest.raises(grpc.RpcError) as caught:
        guest.call(rpc, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = field_violation(status_of(caught.value))
    assert violation.field == "cmd" and case in violation.description


def test_evtchnop_reset_closes_every_port_of_the_caller(server):
    guest = WireGuest(server)
    alloc = h.EventChannelOpRequest(alloc_unbound=h.EvtchnAllocUnbound())
    ports = [guest.call("EventChannelOp", alloc).port for _ in range(3)]
    assert guest.call("EventChannelOp", h.EventChannelOpRequest(reset=h.EvtchnReset())) == h.EventChannelOpResponse()
    for port in ports:
        status = guest.call("EventChannelOp", h.EventChannelOpRequest(status=h.EvtchnStatus(port=port))).status
        assert status.state == common_pb2.EVTCHN_STAT_CLOSED


def test_evtchnop_reset_of_a_running_domain_needs_privilege(server):
    guest, other = WireGuest(server), WireGuest(server)
    code, info = xen_error(lambda: guest.call("EventChannelOp", h.EventChannelOpRequest(reset=h.EvtchnReset(dom=other.domid))))
    assert code == grpc.StatusCode.PERMISSION_DENIED and info["errno"] == "1"


@pytest.mark.parametrize("pirq, code, errno", [(5, grpc.StatusCode.PERMISSION_DENIED, "1"), (48, grpc.StatusCode.FAILED_PRECONDITION, "22")])
def test_evtchnop_bind_pirq_answers_as_xen_answers_a_domu_without_irqs(server, pirq, code, errno):
    guest = WireGuest(server)
    got, info = xen_error(lambda: guest.call("EventChannelOp", h.EventChannelOpRequest(bind_pirq=h.EvtchnBindPirq(pirq=pirq))))
    assert got == code and info == {"errno": errno, "hypercall": "event_channel_op"}


def test_a_pin_whose_validation_fails_leaves_the_frame_without_a_type(server):
    """validate_page's error path sets type_info = 0: no type, not validated."""
    guest = WireGuest(server)
    pfn, l1 = guest.alloc()
    _, data = guest.alloc()
    guest.mmu_update(((l1 << 12) + 8 * 3, (data << 12) | P | US | A | PSE))
    guest.make_readonly(pfn, l1)
    assert guest.frame(l1).type == common_pb2.PAGE_TYPE_WRITABLE  # mapped writable until now

    code, info = xen_error(lambda: guest.mmuext((common_pb2.MMUEXT_CMD_PIN_L1_TABLE, l1)))

    assert code == grpc.StatusCode.FAILED_PRECONDITION and info["errno"] == "22"
    frame = guest.frame(l1)
    assert (frame.type, frame.type_count, frame.validated, frame.pinned) == (common_pb2.PAGE_TYPE_NONE, 0, False, False)
    assert frame.count == 2  # its allocation and the read-only direct map, as before
    guest.mmu_update(((l1 << 12) + 8 * 3, (data << 12) | P | RW | A))  # plain memory again
    assert guest.frame(l1).type == common_pb2.PAGE_TYPE_WRITABLE


def test_fifo_over_the_wire_xsa_188_then_init_control_expand_and_reset(server):
    """XTF's XSA-188 test over gRPC: init_control on a bad gfn is EINVAL and leaves the domain
    on 2-level (expand_array EOPNOTSUPP); then the switch, and EVTCHNOP_reset back (docs/xen.md
    section 24). Each op reaches the core by unary RPC, Session and multicall alike."""
    guest = WireGuest(server)
    evtchn = lambda **op: guest.call("EventChannelOp", h.EventChannelOpRequest(**op))  # noqa: E731
    _, control = guest.alloc()
    _, array = guest.alloc()
    code, info = xen_error(lambda: evtchn(init_control=h.EvtchnInitControl(control_gfn=2**64 - 2, vcpu=0)))
    assert info["errno"] == "22"
    code, info = xen_error(lambda: evtchn(expand_array=h.EvtchnExpandArray(array_gfn=array)))
    assert info["errno"] == "95"  # EOPNOTSUPP
    assert evtchn(init_control=h.EvtchnInitControl(control_gfn=control, vcpu=0)) == h.EventChannelOpResponse(link_bits=17)
    session = SessionClient(guest.hc, guest.md(0))
    op = h.EventChannelOpRequest
    session.send(1, h.Call(event_channel_op=op(expand_array=h.EvtchnExpandArray(array_gfn=array))), h.Call(event_channel_op=op(bind_ipi=h.EvtchnBindIpi(vcpu=0))))
    port = session.answer().results[1].event_channel_op.port
    entries = [h.MulticallEntry(event_channel_op=op(set_priority=h.EvtchnSetPriority(port=port, priority=p))) for p in (16, 0)]
    results = guest.call("Multicall", h.MulticallRequest(entries=entries)).results
    assert dict(error_info(results[0].status).metadata)["errno"] == "22" and results[1].HasField("event_channel_op")
    assert evtchn(reset=h.EvtchnReset()) == h.EventChannelOpResponse()
    code, info = xen_error(lambda: evtchn(set_priority=h.EvtchnSetPriority(port=port, priority=0)))
    assert info["errno"] == "38"  # ENOSYS: 2-level again
    assert not guest.toolstack("Audit", toolstack_pb2.AuditRequest()).findings
