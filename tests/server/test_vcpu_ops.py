"""The vCPU ops a Linux guest uses at boot, over the wire (docs/vcpu-time.md sections 5-7):
VCPUOP_get_runstate_info, register_runstate_memory_area, register_vcpu_info as the Toolstack's
VcpuInfo and FrameInfo then show them; and a multicall entry that is itself a multicall."""

import time

import grpc
import pytest

from xensim.v1 import common_pb2 as c
from xensim.v1 import hypercalls_pb2 as h
from xensim.v1 import memory_pb2 as m
from xensim.v1 import toolstack_pb2 as t

from .helpers import error_info, status_of

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000


def vcpu_op(guest, vcpuid: int, **op) -> h.VcpuOpResponse:
    return guest.call("VcpuOp", h.VcpuOpRequest(vcpuid=vcpuid, **op))


def test_runstate_info_over_the_wire_adds_up_to_system_time(guest):
    first = vcpu_op(guest, 0, get_runstate_info=h.VcpuGetRunstateInfo()).runstate
    time.sleep(0.1)
    zero = vcpu_op(guest, 0, get_runstate_info=h.VcpuGetRunstateInfo()).runstate
    one = vcpu_op(guest, 1, get_runstate_info=h.VcpuGetRunstateInfo()).runstate
    assert (zero.state, one.state) == (c.RUNSTATE_STATE_RUNNING, c.RUNSTATE_STATE_OFFLINE)
    assert len(zero.time) == 4 and zero.time[0] - first.time[0] >= 100 * MS and zero.time[1:] == [0, 0, 0]
    assert 0 <= sum(one.time) - sum(zero.time) < 100 * MS  # both since the domain's creation, the second asked a little later
    assert one.time[3] == sum(one.time)


def test_a_registered_runstate_area_is_written_in_guest_memory(guest):
    pfn, _ = guest.alloc()
    va = guest.direct_va(pfn)
    vcpu_op(guest, 0, register_runstate_memory_area=h.VcpuRegisterRunstateMemoryArea(addr=va))
    data = guest.call("Read", m.ReadRequest(va=va, length=48)).data
    assert int.from_bytes(data[:8], "little") == 0  # RUNSTATE_running, as of its last change
    with pytest.raises(grpc.RpcError) as caught:
        vcpu_op(guest, 0, register_runstate_memory_area=h.VcpuRegisterRunstateMemoryArea(addr=0xFFFF800000000000))
    assert error_info(status_of(caught.value)).reason == "EFAULT"


def test_register_vcpu_info_moves_it_and_the_toolstack_sees_where(guest):
    pfn, mfn = guest.alloc()
    before = guest.frame(mfn)
    vcpu_op(guest, 1, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=mfn, offset=192))
    vcpus = guest.toolstack("VcpuInfo", t.VcpuInfoRequest(domid=guest.domid)).vcpus
    assert [(v.vcpu_info_mfn, v.vcpu_info_offset, v.periodic_period_ns) for v in vcpus] == [(0, 0, 10 * MS), (mfn, 192, 10 * MS)]
    assert vcpus[1].upcall_pending and vcpus[1].upcall_mask  # marked pending; the mask copied from shared info
    after = guest.frame(mfn)
    assert (after.count, after.type_count, after.type) == (before.count + 1, before.type_count + 1, c.PAGE_TYPE_WRITABLE)
    with pytest.raises(grpc.RpcError) as caught:
        vcpu_op(guest, 1, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=mfn, offset=0))
    assert error_info(status_of(caught.value)).reason == "EBUSY"
    with pytest.raises(grpc.RpcError) as caught:
        vcpu_op(guest, 0, register_vcpu_info=h.VcpuRegisterVcpuInfo(mfn=mfn, offset=4040))
    assert error_info(status_of(caught.value)).reason == "ENXIO"
    assert not guest.toolstack("Audit", t.AuditRequest()).findings


def test_a_multicall_inside_a_multicall_fails_in_its_entry_and_the_rest_goes_on(guest):
    response = guest.call("Multicall", h.MulticallRequest(entries=[
        h.MulticallEntry(multicall=h.MulticallRequest(entries=[h.MulticallEntry(xen_version=h.XenVersionRequest())])),
        h.MulticallEntry(xen_version=h.XenVersionRequest()),
    ]))
    nested, after = response.results
    assert nested.HasField("status") and error_info(nested.status).reason == "EINVAL"
    assert "itself a multicall" in nested.status.message
    assert after.xen_version.major == 4
