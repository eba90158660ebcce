"""A vCPU that Xen does not run makes no calls: one never brought up, one taken down by
VCPUOP_down, and every vCPU of a domain that shut down. Its hypercalls and memory accesses are
refused with FAILED_PRECONDITION (ErrorInfo domain "xensim", reason VCPU_NOT_RUNNING) and
change nothing; Echo, which touches no state, still answers; the Session stays open."""

import grpc
import pytest

from xensim.v1 import common_pb2
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import SessionClient, WireGuest, error_info, status_of
from .test_session import bring_up, evtchn, sched

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vcpu0(vcpu0):
    """vCPU 0's Session, once it has been started."""
    assert vcpu0.push().HasField("started")
    return vcpu0


def attempts(guest: WireGuest) -> list[tuple[str, object]]:
    """What the issue found a stopped vCPU could still do: load a base pointer, store, and
    allocate a port; and a load."""
    pfn, _ = guest.alloc()
    return [
        ("MmuextOp", h.MmuextOpRequest(ops=[h.MmuextOp(cmd=common_pb2.MMUEXT_CMD_NEW_BASEPTR, arg1=guest.start_info.pt_base_mfn)])),
        ("Store", m.StoreRequest(va=guest.direct_va(pfn), size=8, value=0x5A)),
        ("EventChannelOp", h.EventChannelOpRequest(alloc_unbound=h.EvtchnAllocUnbound())),
        ("Load", m.LoadRequest(va=guest.direct_va(pfn), size=8)),
    ]


def assert_refused(status, guest: WireGuest, vcpu: int, why: str) -> None:
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], status
    info = error_info(status)
    assert (info.domain, info.reason) == ("xensim", "VCPU_NOT_RUNNING")
    assert f"dom{guest.domid} vCPU {vcpu} does not run" in status.message and why in status.message, status.message


def vcpu_info(guest: WireGuest, vcpu: int) -> t.Vcpu:
    (info,) = guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid, vcpu=vcpu)).vcpus
    return info


def assert_every_attempt_refused(guest: WireGuest, calls: list, vcpu: int, why: str) -> None:
    before = vcpu_info(guest, vcpu)
    for rpc, request in calls:
        with pytest.raises(grpc.RpcError) as caught:
            guest.call(rpc, request, vcpu)
        assert_refused(status_of(caught.value), guest, vcpu, why)
    assert vcpu_info(guest, vcpu) == before
    assert guest.call("Echo", h.EchoRequest(payload=b"still here"), vcpu).payload == b"still here"


def test_a_vcpu_never_brought_up_makes_no_calls(guest):
    assert_every_attempt_refused(guest, attempts(guest), 1, "never initialised")
    assert vcpu_info(guest, 1).kernel_cr3_mfn == 0  # NEW_BASEPTR did not run
    stat = guest.call("EventChannelOp", h.EventChannelOpRequest(status=h.EvtchnStatus(port=1)))  # vCPU 0 sees no new port
    assert stat.status.state == common_pb2.EVTCHN_STAT_CLOSED


def test_a_vcpu_taken_down_makes_no_calls_until_vcpu_up(guest, vcpu0):
    vcpu1 = SessionClient(guest.hc, guest.md(1))
    bring_up(guest, vcpu0, 1)
    assert vcpu1.push().HasField("started")
    vcpu0.send(1, h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=1, down=h.VcpuDown())))
    assert not vcpu0.answer().results[0].HasField("status")

    pfn, _ = guest.alloc()
    vcpu1.send(1, h.Call(store=m.StoreRequest(va=guest.direct_va(pfn), size=8, value=1)), h.Call(echo=h.EchoRequest(payload=b"e")))
    refused, echoed = vcpu1.answer().results  # a per-call status: the stream stays open
    assert_refused(refused.status, guest, 1, "taken down by VCPUOP_down")
    assert echoed.echo.payload == b"e"
    assert_every_attempt_refused(guest, attempts(guest), 1, "taken down by VCPUOP_down")

    vcpu0.send(2, h.Call(vcpu_op=h.VcpuOpRequest(vcpuid=1, up=h.VcpuUp())))
    vcpu0.answer()
    assert vcpu1.push().HasField("started")  # up again: its process may call
    vcpu1.send(2, h.Call(store=m.StoreRequest(va=guest.direct_va(pfn), size=8, value=2)))
    assert vcpu1.answer().results[0].HasField("store")
    vcpu1.close()


def test_no_vcpu_of_a_domain_that_shut_down_makes_calls_or_gets_upcalls(server, guest, vcpu0):
    vcpu1 = SessionClient(guest.hc, guest.md(1))
    bring_up(guest, vcpu0, 1)
    assert vcpu1.push().HasField("started")
    vcpu1.send(1, evtchn(bind_ipi=h.EvtchnBindIpi(vcpu=1)))
    ipi = vcpu1.answer().results[0].event_channel_op.port
    calls = attempts(guest)

    vcpu0.send(1, sched(shutdown=h.SchedShutdown(reason=common_pb2.SHUTDOWN_REASON_CRASH)))
    assert not vcpu0.answer().results[0].HasField("status")
    vcpu1.send(2, evtchn(send=h.EvtchnSend(port=ipi)), sched(block=h.SchedBlock()))  # would wake itself
    sent, blocked = vcpu1.answer().results
    for result in (sent, blocked):
        assert_refused(result.status, guest, 1, "has shut down")
    for vcpu in (0, 1):
        assert_every_attempt_refused(guest, calls, vcpu, "has shut down")
    assert not vcpu1.pushes and not vcpu0.pushes

    other = WireGuest(server)  # the rest of the machine runs on
    assert other.call("XenVersion", h.XenVersionRequest()).major == 4
    guest.toolstack("DestroyDomain", t.DestroyDomainRequest(domid=guest.domid))
    assert vcpu1.end().code() == grpc.StatusCode.ABORTED

