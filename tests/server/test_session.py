"""The Session stream: batches with request ids and stop_on_error, pushes (VcpuStarted,
Upcall), blocking calls, one stream per vCPU, pause, and streams ended by DestroyDomain."""

import queue
import time

import grpc
import pytest

from xensim.v1 import common_pb2, toolstack_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m

from .helpers import SessionClient, WireGuest, error_info

pytestmark = pytest.mark.timeout(60)

VGCF_in_kernel = 4


def mmuext(cmd, arg1=0) -> h.Call:
    return h.Call(mmuext_op=h.MmuextOpRequest(ops=[h.MmuextOp(cmd=cmd, arg1=arg1)]))


def evtchn(**op) -> h.Call:
    return h.Call(event_channel_op=h.EventChannelOpRequest(**op))


def sched(**op) -> h.Call:
    return h.Call(sched_op=h.SchedOpRequest(**op))


def bring_up(guest: WireGuest, session: SessionClient, vcpu: int) -> None:
    """VCPUOP_initialise (on the boot page table) and VCPUOP_up, sent on vCPU 0's stream."""
    context = h.VcpuGuestContext(flags=VGCF_in_kernel, kernel_cr3_mfn=guest.start_info.pt_base_mfn, rip=0x1000, rsp=0x2000)
    session.send(
        99,
        h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=vcpu, initialise=h.VcpuInitialise(context=context))),
        h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=vcpu, up=h.VcpuUp())),
        stop_on_error=True,
    )
    answer = session.answer()
    assert len(answer.results) == 2 and not any(r.HasField("status") for r in answer.results), answer


def test_vcpu0_is_started_with_the_start_info_when_its_session_opens(guest, vcpu0):
    started = vcpu0.push().started
    assert started.vcpu_id == 0
    assert started.start_info == guest.start_info
    assert (started.context.flags & VGCF_in_kernel, started.context.kernel_cr3_mfn) == (VGCF_in_kernel, guest.start_info.pt_base_mfn)


def test_calls_run_in_order_and_answers_echo_request_ids(guest, vcpu0):
    pfn, mfn = guest.alloc()
    va = guest.direct_va(pfn)
    vcpu0.send(7, h.Call(store=m.StoreRequest(va=va, size=8, value=41)), h.Call(atomic=m.AtomicRequest(op=m.ATOMIC_OP_FETCH_ADD, va=va, size=8, operand=1)))
    vcpu0.send(8, h.Call(load=m.LoadRequest(va=va, size=8)))
    first, second = vcpu0.answer(), vcpu0.answer()
    assert (first.request_id, first.results[1].atomic.old) == (7, 41)
    assert (second.request_id, second.results[0].load.value) == (8, 42)


def test_stop_on_error_stops_after_the_first_failure_and_without_it_every_call_runs(guest, vcpu0):
    pfn, _ = guest.alloc()
    calls = (mmuext(common_pb2.MMUEXT_CMD_UNPIN_TABLE, 0x10), h.Call(echo=h.EchoRequest(payload=b"after")))
    vcpu0.send(1, *calls, stop_on_error=True)
    stopped = vcpu0.answer()
    assert len(stopped.results) == 1 and error_info(stopped.results[0].status).reason == "EINVAL"

    vcpu0.send(2, *calls)
    assert [r.WhichOneof("result") for r in vcpu0.answer().results] == [None, "echo"]

    fault = h.Call(load=m.LoadRequest(va=0x400000, size=8))  # a page fault counts as a failure
    vcpu0.send(3, fault, calls[1], stop_on_error=True)
    faulted = vcpu0.answer()
    assert len(faulted.results) == 1 and faulted.results[0].load.HasField("fault")


def test_ipi_sent_by_vcpu0_is_pushed_as_an_upcall_to_vcpu1(guest, vcpu0):
    vcpu1 = SessionClient(guest.hc, guest.md(1))
    vcpu0.send(1, evtchn(bind_ipi=h.EvtchnBindIpi(vcpu=1)))
    port = vcpu0.answer().results[0].event_channel_op.port
    bring_up(guest, vcpu0, 1)
    assert vcpu1.push().started.context.rip == 0x1000  # VCPUOP_up started it
    vcpu1.send(9, sched(block=h.SchedBlock()))  # events start masked (as Xen builds it): block enables them

    vcpu0.send(2, evtchn(send=h.EvtchnSend(port=port)))
    vcpu0.answer()
    upcall = vcpu1.push().upcall
    assert (upcall.vcpu_id, list(upcall.pending_ports)) == (1, [port])
    assert vcpu1.answer().request_id == 9
    (info,) = guest.toolstack("VcpuInfo", toolstack_pb2.VcpuInfoRequest(domid=guest.domid, vcpu=1)).vcpus
    assert info.upcall_pending and info.upcall_mask and info.session_open  # masked, as Xen's bounce frame does

    vcpu0.send(3, evtchn(send=h.EvtchnSend(port=port)))  # coalesced: no second upcall while masked
    vcpu0.answer()
    vcpu1.send(1, h.Call(echo=h.EchoRequest()))
    assert vcpu1.answer().request_id == 1 and not vcpu1.pushes
    vcpu1.close()


def test_block_sleeps_until_an_event_then_the_upcall_comes_before_its_answer(guest, vcpu0):
    vcpu1 = SessionClient(guest.hc, guest.md(1))
    vcpu0.send(1, evtchn(bind_ipi=h.EvtchnBindIpi(vcpu=1)))
    port = vcpu0.answer().results[0].event_channel_op.port
    bring_up(guest, vcpu0, 1)
    assert vcpu1.push().HasField("started")

    vcpu1.send(5, sched(block=h.SchedBlock()))
    time.sleep(0.2)
    (info,) = guest.toolstack("VcpuInfo", toolstack_pb2.VcpuInfoRequest(domid=guest.domid, vcpu=1)).vcpus
    assert info.blocked
    vcpu0.send(2, h.Call(echo=h.EchoRequest()))  # vCPU 0 is not held up by vCPU 1's sleep
    assert vcpu0.answer().request_id == 2

    vcpu0.send(3, evtchn(send=h.EvtchnSend(port=port)))
    vcpu0.answer()
    assert vcpu1.next().HasField("upcall")
    woken = vcpu1.next()
    assert woken.request_id == 5 and woken.results[0].HasField("sched_op")
    vcpu1.close()


def test_timer_fires_virq_timer_as_an_upcall(guest, vcpu0):
    vcpu0.push()  # started
    vcpu0.send(
        1,
        evtchn(bind_virq=h.EvtchnBindVirq(virq=0, vcpu=0)),
        h.Call(set_timer_op=h.SetTimerOpRequest(timeout_ns_relative=50_000_000)),
        sched(block=h.SchedBlock()),  # events start masked (as Xen builds it): block enables them
    )
    upcall = vcpu0.push(timeout=5).upcall
    port = vcpu0.answer().results[0].event_channel_op.port
    assert list(upcall.pending_ports) == [port]


def test_a_second_session_on_the_same_vcpu_is_already_exists_and_a_new_one_may_attach_later(guest, vcpu0):
    vcpu0.push()
    second = SessionClient(guest.hc, guest.md(0))
    assert second.end().code() == grpc.StatusCode.ALREADY_EXISTS
    vcpu0.close()
    time.sleep(0.2)
    third = SessionClient(guest.hc, guest.md(0))  # the vCPU's state outlives its process
    assert third.push().started.vcpu_id == 0
    third.close()


def test_destroy_domain_ends_its_streams_with_aborted(guest, vcpu0):
    vcpu1 = SessionClient(guest.hc, guest.md(1))
    bring_up(guest, vcpu0, 1)
    vcpu1.push()
    vcpu1.send(1, sched(block=h.SchedBlock()))
    time.sleep(0.2)
    guest.toolstack("DestroyDomain", toolstack_pb2.DestroyDomainRequest(domid=guest.domid))
    for session in (vcpu0, vcpu1):
        end = session.end()
        assert end.code() == grpc.StatusCode.ABORTED and f"dom{guest.domid}" in end.details()


def test_calls_of_a_paused_domain_wait_until_unpause(guest, vcpu0):
    vcpu0.push()
    guest.toolstack("PauseDomain", toolstack_pb2.PauseDomainRequest(domid=guest.domid))
    assert guest.toolstack("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=guest.domid)).domain.paused
    vcpu0.send(1, h.Call(xen_version=h.XenVersionRequest()))
    with pytest.raises(queue.Empty):  # nothing runs while paused
        vcpu0.next(timeout=0.5)
    guest.toolstack("UnpauseDomain", toolstack_pb2.UnpauseDomainRequest(domid=guest.domid))
    assert vcpu0.answer().results[0].xen_version.major == 4
