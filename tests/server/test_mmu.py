"""The MMU hypercalls end to end over unary RPCs: a table built and pinned by hand, Xen's
errors with their details, multicall entries with their own outcomes, memory accesses."""

import grpc
import pytest
from google.rpc import code_pb2

from xensim.v1 import common_pb2, hypercalls_pb2, memory_pb2, toolstack_pb2

from .helpers import RW, US, A, D, P, WireGuest, error_info, status_of

pytestmark = pytest.mark.timeout(60)


def test_table_built_by_hand_with_mmu_update_then_pinned_shows_pinned_and_validated(server):
    guest = WireGuest(server)
    pfn, l1 = guest.alloc()
    _, data = guest.alloc()
    assert guest.mmu_update(((l1 << 12) + 8 * 5, (data << 12) | P | US | A)).done == 1
    writable = guest.frame(l1)  # plain memory, mapped writable by the direct map
    assert (writable.type, writable.type_count, writable.pinned) == (common_pb2.PAGE_TYPE_WRITABLE, 1, False)

    guest.make_readonly(pfn, l1)
    assert guest.mmuext((common_pb2.MMUEXT_CMD_PIN_L1_TABLE, l1)).done == 1

    frame = guest.frame(l1)
    assert (frame.owner, frame.type, frame.pinned, frame.validated) == (guest.domid, common_pb2.PAGE_TYPE_L1, True, True)
    assert (frame.type_count, frame.count) == (1, 3)  # the pin's type ref; allocation, pin, read-only direct map
    assert guest.frame(data).count == 3  # allocation, direct map, and the entry the pin validated


def test_unpin_while_other_vcpu_holds_cr3_then_rw_remap_fails_with_ebusy_index_and_done(server):
    guest = WireGuest(server)
    guest.bring_up(1)
    pfn, l4 = guest.pinned_table(4)
    guest.mmuext((common_pb2.MMUEXT_CMD_NEW_BASEPTR, l4), vcpu=1)  # vCPU 1 runs on it, with its own metadata
    assert guest.mmuext((common_pb2.MMUEXT_CMD_UNPIN_TABLE, l4)).done == 1  # Xen never refuses an unpin
    direct_l1, slot = guest.direct_l1(pfn)
    _, scratch = guest.alloc()
    before = guest.frame(l4)

    with pytest.raises(grpc.RpcError) as caught:
        guest.mmu_update(((scratch << 12), 0x1234), ((direct_l1 << 12) + 8 * slot, (l4 << 12) | P | RW | A | D))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = status_of(caught.value)
    assert status.code == code_pb2.FAILED_PRECONDITION and status.message.startswith("EBUSY (16): ")
    info = error_info(status)
    assert (info.reason, info.domain) == ("EBUSY", "xen")
    assert dict(info.metadata) == {"errno": "16", "hypercall": "mmu_update", "index": "1", "done": "1"}
    assert guest.frame(l4) == before  # still a live L4 (vCPU 1's cr3), not writable
    assert guest.call("Load", memory_pb2.LoadRequest(va=guest.direct_va(guest.next_pfn - 1), size=8)).value == 0x1234  # entry 0 stayed done


def test_multicall_entries_fail_on_their_own_and_the_rest_run(server):
    guest = WireGuest(server)
    pfn, l1 = guest.alloc()
    entries = [
        hypercalls_pb2.MulticallEntry(mmuext_op=hypercalls_pb2.MmuextOpRequest(ops=[hypercalls_pb2.MmuextOp(cmd=common_pb2.MMUEXT_CMD_UNPIN_TABLE, arg1=l1)])),
        hypercalls_pb2.MulticallEntry(xen_version=hypercalls_pb2.XenVersionRequest()),
        hypercalls_pb2.MulticallEntry(mmuext_op=hypercalls_pb2.MmuextOpRequest(ops=[hypercalls_pb2.MmuextOp(cmd=common_pb2.MMUEXT_CMD_TLB_FLUSH_LOCAL)])),
    ]
    results = guest.call("Multicall", hypercalls_pb2.MulticallRequest(entries=entries)).results

    failed = results[0]
    assert not failed.HasField("mmuext_op") and failed.status.message.startswith("EINVAL (22): ")
    assert dict(error_info(failed.status).metadata) == {"errno": "22", "hypercall": "mmuext_op", "index": "0", "done": "0"}
    assert results[1].xen_version.capabilities == "xen-3.0-x86_64"
    assert results[2].mmuext_op.done == 1 and not results[2].HasField("status")


def test_memory_accesses_return_values_and_page_faults_as_results(server):
    guest = WireGuest(server)
    pfn, _ = guest.alloc()
    va = guest.direct_va(pfn)
    assert guest.call("Store", memory_pb2.StoreRequest(va=va + 8, size=4, value=0xDEADBEEF)) == memory_pb2.StoreResponse()
    assert guest.call("Load", memory_pb2.LoadRequest(va=va + 8, size=2)).value == 0xBEEF
    old = guest.call("Atomic", memory_pb2.AtomicRequest(op=memory_pb2.ATOMIC_OP_CMPXCHG, va=va + 8, size=4, expected=0xDEADBEEF, operand=7))
    assert old.old == 0xDEADBEEF
    assert guest.call("Read", memory_pb2.ReadRequest(va=va + 8, length=4)).data == (7).to_bytes(4, "little")

    fault = guest.call("Load", memory_pb2.LoadRequest(va=0x400000, size=8)).fault
    assert fault.address == 0x400000 and fault.error_code == 0 and "not present" in fault.detail


def test_toolstack_errors_are_xen_errnos_too(server):
    guest = WireGuest(server)
    with pytest.raises(grpc.RpcError) as caught:
        guest.toolstack("DomainInfo", toolstack_pb2.DomainInfoRequest(domid=999))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error_info(status_of(caught.value)).metadata) == {"errno": "3", "hypercall": "domain_info"}
